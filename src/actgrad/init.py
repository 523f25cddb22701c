"""Initialisation rules, each applied once to a freshly built network (conf/init/*.yaml).

A rule sets weights by their role, found by running the network once (actgrad.layers.probe, which
changes nothing), so it works on any network, not only actgrad's MLP:
    embeddings  every nn.Embedding table
    hidden      every Linear (or Conv) called before the last one, with the gain of the nonlinearity
                called next (1 if another Linear comes first)
    output      the last Linear called: the logits
Norm layers and anything else keep their own start (a norm: gain 1, shift 0) under every rule, as
in the lecture. A role the network lacks is skipped, in one log line.
"""

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from actgrad.layers import nonlinear, probe

log = logging.getLogger(__name__)

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # fan_in = weight[0].numel() for each

# calculate_gain's name for each nonlinearity; it knows no GELU, SiLU, ...: their gain is close to ReLU's,
# which is what people use for them. Any other (Hardtanh, Softsign, ...) gets 1, a Linear's.
GAINS = [((nn.Tanh,), "tanh"), ((nn.Sigmoid,), "sigmoid"), ((nn.SELU,), "selu"),
         ((nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish, nn.ELU, nn.CELU, nn.Softplus, nn.Hardswish), "relu")]
GAIN_NAME = {"gelu": "relu", "leaky_relu": "leaky_relu"}  # the same, for an activation given by name


def gain_for(activation: str) -> float:
    return nn.init.calculate_gain(GAIN_NAME.get(activation, activation))


def gain_of(act: nn.Module | None) -> float:
    """The gain for the weights feeding `act` (None: no nonlinearity, gain 1)."""
    if isinstance(act, nn.LeakyReLU):
        return nn.init.calculate_gain("leaky_relu", act.negative_slope)
    if isinstance(act, nn.PReLU):
        return nn.init.calculate_gain("leaky_relu", act.init)  # its slope as it starts
    for types, name in GAINS:
        if isinstance(act, types):
            return nn.init.calculate_gain(name)
    return 1.0


@dataclass
class Roles:
    embeddings: list = field(default_factory=list)  # nn.Embedding tables
    hidden: list = field(default_factory=list)  # [(Linear, the nonlinearity called after it or None)], in call order
    output: nn.Module | None = None  # the last Linear called


def roles(model: nn.Module, block_size: int | None = None, rule: str = "") -> Roles:
    """The roles of `model`'s layers, from the order of one probe's calls. Without `block_size` (nor a
    `model.block_size`), the order the modules were registered in stands in for the call order (actgrad's
    MLP registers them in the order it calls them). Logs, in one line, the roles it lacks."""
    block_size = block_size or getattr(model, "block_size", None)
    calls = probe(model, block_size)[1] if block_size else list(model.named_modules())[1:]
    calls = [m for _, m in calls if isinstance(m, WEIGHTED) or nonlinear(m)]
    found = Roles(embeddings=[m for m in model.modules() if isinstance(m, nn.Embedding)])
    linears = [m for m in calls if isinstance(m, WEIGHTED)]
    found.output = linears[-1] if linears else None
    seen = {id(found.output)}
    for i, m in enumerate(calls):
        if isinstance(m, WEIGHTED) and id(m) not in seen:
            seen.add(id(m))
            after = next((n for n in calls[i + 1:] if isinstance(n, WEIGHTED) or nonlinear(n)), None)
            found.hidden.append((m, after if nonlinear(after) else None))
    missing = [what for what, there in [("nn.Embedding", found.embeddings), ("hidden Linear", found.hidden),
                                        ("output Linear", found.output is not None)] if not there]
    if missing:
        log.info("init%s: the model has no %s: skipped", f"={rule}" if rule else "", ", no ".join(missing))
    return found


def normal_everything(found: Roles):
    """Every weight, bias and embedding of the roles ~ N(0, 1), in the order of today's MLP rule."""
    for table in found.embeddings:
        nn.init.normal_(table.weight)
    layers = [m for m, _ in found.hidden] + ([found.output] if found.output is not None else [])
    for layer in layers:
        nn.init.normal_(layer.weight)
        if layer.bias is not None:
            nn.init.normal_(layer.bias)


@torch.no_grad()
def naive(model, block_size=None):
    """Every weight, bias and the embedding ~ N(0, 1): the lecture's starting point."""
    normal_everything(roles(model, block_size, "naive"))


@torch.no_grad()
def scaled(model, output_weight=0.01, output_bias=0.0, hidden_weight=0.2, hidden_bias=0.01, block_size=None):
    """The lecture's hand fixes on top of N(0, 1): a quiet output layer, hidden layers out of saturation."""
    found = roles(model, block_size, "scaled")
    normal_everything(found)
    if found.output is not None:
        found.output.weight.mul_(output_weight)
        if found.output.bias is not None:
            found.output.bias.mul_(output_bias)
    for layer, _ in found.hidden:
        layer.weight.mul_(hidden_weight)
        if layer.bias is not None:
            layer.bias.mul_(hidden_bias)


def zero_bias(layer):
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


@torch.no_grad()
def kaiming(model, gain=None, output_scale=0.1, block_size=None):
    """Weights ~ N(0, gain^2 / fan_in), gain that of the nonlinearity each layer feeds, biases 0; the
    output layer's std is gain 1 x output_scale, so the net starts unsure."""
    found = roles(model, block_size, "kaiming")
    for table in found.embeddings:
        nn.init.normal_(table.weight)
    for layer, act in found.hidden:
        g = gain_of(act) if gain is None else gain
        nn.init.normal_(layer.weight, std=g / math.sqrt(layer.weight[0].numel()))
        zero_bias(layer)
    if found.output is not None:
        nn.init.normal_(found.output.weight, std=output_scale / math.sqrt(found.output.weight[0].numel()))
        zero_bias(found.output)


@torch.no_grad()
def xavier(model, gain=None, block_size=None):
    """Glorot: weights ~ N(0, gain^2 * 2 / (fan_in + fan_out)), gain that of the nonlinearity fed; biases 0."""
    found = roles(model, block_size, "xavier")
    for table in found.embeddings:
        nn.init.normal_(table.weight)
    for layer, act in found.hidden:
        nn.init.xavier_normal_(layer.weight, gain=gain_of(act) if gain is None else gain)
        zero_bias(layer)
    if found.output is not None:
        nn.init.xavier_normal_(found.output.weight)
        zero_bias(found.output)


def pytorch(model, block_size=None):
    """PyTorch's own defaults (uniform, 1/sqrt(fan_in) bounds), left as construction made them."""
