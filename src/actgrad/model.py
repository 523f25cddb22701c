"""The makemore models, each mapping (batch, block_size) character indices to (batch, vocab) logits.

MLP (makemore part 3): embedding -> flatten -> n_layers x (Linear [-> norm] -> activation) -> Linear.
WaveNet (makemore part 5): embedding -> n_layers x (FlattenConsecutive -> Linear [-> norm] -> activation)
-> Linear: neighbouring characters are fused a pair at a time (8 -> 4 -> 2 -> 1) instead of all at once.
Both keep the same names (embedding, blocks[i].linear/.norm/.act, output), so what knows one knows the other.
"""

from collections import OrderedDict

import torch.nn as nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU}


def has_shift(norm: nn.Module) -> bool:
    """Whether a norm layer adds a learned shift (BatchNorm, LayerNorm with bias; not RMSNorm)."""
    return isinstance(getattr(norm, "bias", None), nn.Parameter)


class FlattenConsecutive(nn.Module):
    """(B, T, C) -> (B, T // n, C * n): every n neighbouring positions become one. A single position left
    is squeezed away, (B, C * n), as in the lecture, so the layers after it see a plain (batch, features)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x):
        B, T, C = x.shape
        x = x.reshape(B, T // self.n, C * self.n)  # a copy only when x is not contiguous (after a BatchNorm)
        return x.squeeze(1) if x.shape[1] == 1 else x

    def extra_repr(self):
        return f"n={self.n}"


class SwapTimeAndChannels(nn.Module):
    """(batch, time, channels) <-> (batch, channels, time); a 2-D (batch, channels) passes as it is.
    nn.BatchNorm1d reads 3-D input as (batch, channels, time): between two of these, a WaveNet block's
    BatchNorm normalises each channel over batch and time, as the lecture's fix does, and stays a plain
    nn.BatchNorm1d with PyTorch's own convention for whatever reads it."""

    def forward(self, x):
        return x.transpose(1, 2) if x.dim() == 3 else x


class Block(nn.Sequential):
    """One hidden layer. A Linear followed by a norm with a shift has no bias: the shift replaces it.
    With `flatten`, the layer first fuses that many neighbouring positions (a WaveNet block)."""

    def __init__(self, n_in, n_out, activation, norm=None, flatten=None):
        norm_layer = norm(n_out) if norm is not None else None  # draws no random numbers: init order unchanged
        layers = OrderedDict(flatten=FlattenConsecutive(flatten)) if flatten else OrderedDict()
        layers["linear"] = nn.Linear(n_in, n_out, bias=norm_layer is None or not has_shift(norm_layer))
        if flatten and isinstance(norm_layer, nn.BatchNorm1d):  # over batch and time, as the lecture's fix
            layers.update(to_channels=SwapTimeAndChannels(), norm=norm_layer, from_channels=SwapTimeAndChannels())
        elif norm_layer is not None:  # LayerNorm, RMSNorm normalise the last dim, whatever comes before it
            layers["norm"] = norm_layer
        layers["act"] = ACTIVATIONS[activation]()
        super().__init__(layers)


def check_sizes(activation, **sizes) -> None:
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"model.{key}={value!r}: must be a positive whole number")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model.activation={activation!r}: accepted values are {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    def __init__(self, vocab_size=27, block_size=3, n_embd=10, n_hidden=200, n_layers=1, activation="tanh", norm=None):
        super().__init__()
        check_sizes(activation, vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden,
                    n_layers=n_layers)
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


class WaveNet(nn.Module):
    """makemore part 5's hierarchical model: each of n_layers blocks fuses `group` neighbouring positions,
    so block_size must be group ** n_layers (8 = 2^3: 8 characters -> 4 pairs -> 2 -> 1). The lecture's:
    n_embd 24, n_hidden 128, tanh, BatchNorm over batch and time: 76,579 parameters."""

    def __init__(self, vocab_size=27, block_size=8, n_embd=24, n_hidden=128, n_layers=3, group=2, activation="tanh",
                 norm=None):
        super().__init__()
        check_sizes(activation, vocab_size=vocab_size, block_size=block_size, n_embd=n_embd, n_hidden=n_hidden,
                    n_layers=n_layers, group=group)
        if block_size != group**n_layers:
            raise ValueError(f"data.block_size={block_size}: model=wavenet fuses {group} positions {n_layers} times, "
                             f"so it needs block_size {group**n_layers} (group ** n_layers)")
        self.activation = activation
        self.embedding = nn.Embedding(vocab_size, n_embd)
        sizes = [n_embd * group] + [n_hidden * group] * (n_layers - 1)
        self.blocks = nn.ModuleList(Block(n_in, n_hidden, activation, norm, flatten=group) for n_in in sizes)
        self.output = nn.Linear(n_hidden, vocab_size)

    def forward(self, idx):
        x = self.embedding(idx)  # (batch, block_size, n_embd): the blocks fuse positions, not one flatten
        for block in self.blocks:
            x = block(x)
        return self.output(x)

    def hidden_linears(self):
        return [block.linear for block in self.blocks]
