"""What actgrad knows of any network: found by running it once, not by its attribute names.

A probe forward pass (`probe`) runs the network on a batch of context windows and records the
order in which its modules are called. It changes nothing: no random stream (torch.random.fork_rng)
and no buffer (BatchNorm's running statistics are put back), so a run with a probe logs what a run
without one logs.

The watched hidden layers are the calls of nonlinearity modules (NONLINEARITIES), found by type:
layer1, layer2, ... in call order, a module called twice being two layers. `watched` finds them
once when training starts, with the name each parameter has in tags (grouped by the layer it feeds);
in a plain Lightning Trainer, where the input is the user's, `found` reads them from the first
watched step's real forward instead (`record_calls`).
"""

import contextlib
import logging
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

log = logging.getLogger(__name__)

# The nonlinearities whose calls are the watched hidden layers (subclasses too: a sweep's stacked Tanh).
# Not RReLU: its slope is random in training, so a diagnostic calling it would move the random stream.
NONLINEARITIES = (nn.Tanh, nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Softplus, nn.Mish,
                  nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.CELU, nn.SELU, nn.PReLU, nn.Hardswish,
                  nn.Hardsigmoid, nn.LogSigmoid)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def untouched(net: nn.Module):
    """Run `net` inside without changing it: its random streams, buffers and train/eval modes are restored."""
    buffers = {name: b.detach().clone() for name, b in net.named_buffers()}
    modes = {m: m.training for m in net.modules()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for name, b in net.named_buffers():
                b.copy_(buffers[name])
        for m, mode in modes.items():
            m.training = mode


def probe(net: nn.Module, block_size: int, batch: int = 2,
          when: str = "end") -> tuple[torch.Tensor, list[tuple[str, nn.Module]]]:
    """(the output of `net` on `batch` windows of index 0, [(module path, module)] in call order: a
    module called twice appears twice). Nothing of `net` changes (see `untouched`).
    when="end" lists each call as it returns (a container after what it holds), "start" as it begins
    (a container before what it holds: what a module feeds is what starts after it)."""
    device = next(net.parameters(), torch.empty(0)).device
    calls, handles = record_calls(net, when)
    try:
        with untouched(net):
            out = net(torch.zeros(batch, block_size, dtype=torch.long, device=device))
    finally:
        for h in handles:
            h.remove()
    return out, calls


def record_calls(net: nn.Module, when: str = "start") -> tuple[list, list]:
    """([(module path, module)], hook handles): the list fills, in call order (see `probe` for `when`),
    as `net`'s submodules are called, until the handles are removed. A probe's, or a real step's forward
    in a plain Lightning Trainer (actgrad.diagnostic)."""
    if when not in ("start", "end"):
        raise ValueError(f"record_calls: when={when!r}: accepted: start, end")
    calls, names = [], {m: n for n, m in net.named_modules()}

    def seen(module, *args):
        calls.append((names[module], module))

    register = nn.Module.register_forward_pre_hook if when == "start" else nn.Module.register_forward_hook
    return calls, [register(m, seen) for m in net.modules() if m is not net]


def nonlinear(module: nn.Module) -> bool:
    return isinstance(module, NONLINEARITIES)


def feeds(calls: list) -> dict:
    """{module path: "layerN"}: the layer each called module feeds, the first nonlinearity call from its
    own first call on (a nonlinearity feeds its own layer), for `calls` in start order. A module called
    after the last nonlinearity feeds none and is left out."""
    fed, pending, n = {}, {}, 0
    for path, module in calls:
        if path not in fed:
            pending[path] = None
        if nonlinear(module):
            n += 1
            fed |= dict.fromkeys(pending, f"layer{n}")
            pending = {}
    return fed


def param_name(name: str) -> str:
    """A parameter's name in tags for actgrad's MLP: blocks.0.linear.weight -> layer1.weight,
    blocks.0.norm.bias -> layer1.norm.bias; other names unchanged."""
    m = re.fullmatch(r"blocks\.(\d+)\.(?:linear\.)?(.+)", name)
    return f"layer{int(m[1]) + 1}.{m[2]}" if m else name


MLP_PARAM = re.compile(r"embedding\.weight|output\.(weight|bias)|blocks\.\d+\.(linear|norm)\.(weight|bias)")


def tags(net: nn.Module, calls: list, paths: list) -> dict:
    """{parameter name: its name in tags}, for `calls` in start order and `paths` the watched layers'
    nonlinearity paths. Laid out as actgrad's MLP (model.MLP, its stacked twin): param_name, the tags
    runs have always had. Otherwise `layerN.<name>` for a parameter of a module feeding layer N, so
    each layer is a TensorBoard subrun of its own (actgrad.writer.subrun); an embedding table, what
    is used after the last nonlinearity and what no module call uses keep their name."""
    names = [n for n, _ in net.named_parameters()]
    if paths == [f"blocks.{i}.act" for i in range(len(paths))] and all(MLP_PARAM.fullmatch(n) for n in names):
        return {n: param_name(n) for n in names}
    fed, out = feeds(calls), {}
    for path, module in net.named_modules():
        for own, _ in module.named_parameters(recurse=False):
            name = f"{path}.{own}" if path else own
            layer = None if isinstance(module, nn.Embedding) else fed.get(path)
            out[name] = f"{layer}.{name}" if layer else name
    return {n: out.get(n, n) for n in names}


@dataclass(frozen=True)
class Layers:
    """What the diagnostics watch in a network, found by one probe."""

    paths: dict  # "layer1", "layer2", ...: each nonlinearity call in call order -> its module's path
    modules: dict  # "layer1", ... -> the nonlinearity module (the same one twice for a module called twice)
    tags: dict  # parameter name -> its name in tags (layerN.<...>: shown with layer N)

    def line(self) -> str:
        """What is watched, in one line for the log."""
        if not self.paths:
            return ("no nonlinearity module is called (torch.tanh or F.relu in forward are not seen): the layer "
                    "diagnostics (act/*, act_grad/*, layer histograms and figures) will log nothing; use modules "
                    "(nn.Tanh, nn.ReLU, ...) to watch them. The parameter diagnostics still work")
        return f"watching {len(self.paths)} layers: " + ", ".join(
            f"{name} {path} ({type(self.modules[name]).__name__})" for name, path in self.paths.items())


def watched(net: nn.Module, block_size: int, quiet: bool = False) -> Layers:
    """The watched layers of `net` and its parameters' tags, from one probe (which changes nothing);
    logs what is watched unless `quiet`."""
    _, calls = probe(net, block_size, when="start")
    layers = found(net, calls)
    if not quiet:
        log.info("%s", layers.line())
    return layers


def found(net: nn.Module, calls: list) -> Layers:
    """The watched layers and parameter tags of `net`, from its calls in start order: a probe's
    (`watched`) or a real forward's (a plain Lightning Trainer, actgrad.diagnostic)."""
    acts = [(path, m) for path, m in calls if nonlinear(m)]
    return Layers(paths={f"layer{i}": path for i, (path, _) in enumerate(acts, 1)},
                  modules={f"layer{i}": m for i, (_, m) in enumerate(acts, 1)},
                  tags=tags(net, calls, [path for path, _ in acts]))
