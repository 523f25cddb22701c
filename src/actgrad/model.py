"""The makemore MLP: embedding -> flatten -> n_layers x (Linear [-> norm] -> activation) -> Linear."""

from collections import OrderedDict

import torch.nn as nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


class Block(nn.Sequential):
    """One hidden layer. A Linear followed by a norm layer has no bias: the norm's shift replaces it."""

    def __init__(self, n_in, n_out, activation, norm=None):
        layers = OrderedDict(linear=nn.Linear(n_in, n_out, bias=norm is None))
        if norm is not None:
            layers["norm"] = norm(n_out)
        layers["act"] = ACTIVATIONS[activation]()
        super().__init__(layers)


class MLP(nn.Module):
    def __init__(self, vocab_size=27, block_size=3, n_embd=10, n_hidden=200, n_layers=1, activation="tanh", norm=None):
        super().__init__()
        for key, value in {"vocab_size": vocab_size, "block_size": block_size, "n_embd": n_embd,
                           "n_hidden": n_hidden, "n_layers": n_layers}.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"model.{key}={value!r}: must be a positive whole number")
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.activation={activation!r}: accepted values are {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.embedding = nn.Embedding(vocab_size, n_embd)
        sizes = [block_size * n_embd] + [n_hidden] * n_layers
        self.blocks = nn.ModuleList(Block(a, b, activation, norm) for a, b in zip(sizes, sizes[1:]))
        self.output = nn.Linear(n_hidden, vocab_size)

    def forward(self, idx):
        x = self.embedding(idx).flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def hidden_linears(self):
        return [block.linear for block in self.blocks]
