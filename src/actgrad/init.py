"""Initialisation rules, each applied once to a freshly built MLP (conf/init/*.yaml).

Norm layers keep their own start (gain 1, shift 0) under every rule, as in the lecture.
"""

import math

import torch
import torch.nn as nn

# calculate_gain knows no GELU; its gain is close to ReLU's, which is what people use for it
GAIN_NAME = {"gelu": "relu", "leaky_relu": "leaky_relu"}


def gain_for(activation: str) -> float:
    return nn.init.calculate_gain(GAIN_NAME.get(activation, activation))


@torch.no_grad()
def naive(model):
    """Every weight, bias and the embedding ~ N(0, 1): the lecture's starting point."""
    nn.init.normal_(model.embedding.weight)
    for layer in model.hidden_linears() + [model.output]:
        nn.init.normal_(layer.weight)
        if layer.bias is not None:
            nn.init.normal_(layer.bias)


@torch.no_grad()
def scaled(model, output_weight=0.01, output_bias=0.0, hidden_weight=0.2, hidden_bias=0.01):
    """The lecture's hand fixes on top of N(0, 1): a quiet output layer, hidden layers out of saturation."""
    naive(model)
    model.output.weight.mul_(output_weight)
    model.output.bias.mul_(output_bias)
    for layer in model.hidden_linears():
        layer.weight.mul_(hidden_weight)
        if layer.bias is not None:
            layer.bias.mul_(hidden_bias)


@torch.no_grad()
def kaiming(model, gain=None, output_scale=0.1):
    """Weights ~ N(0, gain^2 / fan_in), biases 0; the output layer is scaled further so the net starts unsure."""
    gain = gain_for(model.activation) if gain is None else gain
    nn.init.normal_(model.embedding.weight)
    for layer in model.hidden_linears():
        nn.init.normal_(layer.weight, std=gain / math.sqrt(layer.in_features))
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    nn.init.normal_(model.output.weight, std=output_scale / math.sqrt(model.output.in_features))
    nn.init.zeros_(model.output.bias)


@torch.no_grad()
def xavier(model, gain=None):
    """Glorot: weights ~ N(0, gain^2 * 2 / (fan_in + fan_out)), biases 0."""
    gain = gain_for(model.activation) if gain is None else gain
    nn.init.normal_(model.embedding.weight)
    for layer in model.hidden_linears():
        nn.init.xavier_normal_(layer.weight, gain=gain)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    nn.init.xavier_normal_(model.output.weight)
    nn.init.zeros_(model.output.bias)


def pytorch(model):
    """PyTorch's own defaults (uniform, 1/sqrt(fan_in) bounds), left as construction made them."""
