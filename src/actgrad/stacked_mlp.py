"""Several MLPs of one shape as one module: every parameter and buffer gets a leading member
dimension, and a step of all of them is one forward and one backward (PyTorch's model-ensembling
pattern, written out: batched matmuls instead of vmap, so BatchNorm keeps running statistics).

Names are those of actgrad.model.MLP (embedding.weight, blocks.0.linear.weight, blocks.0.norm.bias,
...), so the snapshot, the diagnostics and a member's checkpoint read the same as a single run's:
`member_state(stacked.state_dict(), i)` is member i's MLP state dict.

Inside, activations are feature-major, (members, features, batch): each layer is W x + b as one
batched matmul, and BatchNorm is one F.batch_norm over members x features channels of a
(1, channels, batch) input, with no transposed copies around it (5-8% faster a step than
(members, batch, features) on a CPU). The logits come out as (members, vocab, batch), the layout
F.cross_entropy takes for a (members, batch) target.

Where batching changes the arithmetic (float32, measured in tests/test_stacked.py): a batched
matmul may sum in another order than a single one, BatchNorm reduces the batch in another order,
LayerNorm's affine is applied apart from the normalisation, the embedding's gradient is summed
in the batch's order (index_select's backward), and on a CPU tanh is computed as 2 sigmoid(2x) - 1
(`Tanh` below); a member's loss stays within 1e-5 (relative) of its single run's.
"""

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

from actgrad.model import ACTIVATIONS, MLP


class StackedLinear(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (members, out, in)
        self.bias = nn.Parameter(bias) if bias is not None else None  # (members, out)

    def forward(self, x):  # (members, in, batch) -> (members, out, batch): W x + b
        if self.bias is None:
            return torch.bmm(self.weight, x)
        return torch.baddbmm(self.bias.unsqueeze(2), self.weight, x)


class StackedEmbedding(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (members, vocab, n_embd)
        members, vocab, _ = weight.shape  # member m's rows of one table start at m * vocab:
        self.register_buffer("offsets", torch.arange(members).view(-1, 1, 1) * vocab, persistent=False)

    def forward(self, idx):  # (members, batch, block) -> (members, batch, block, n_embd)
        members, vocab, n_embd = self.weight.shape
        # index_select, not F.embedding: its backward (an index_add) is the faster one for a stack
        rows = self.weight.view(members * vocab, n_embd).index_select(0, (idx + self.offsets).flatten())
        return rows.view(*idx.shape, n_embd)


def sigmoid_tanh(x):
    """tanh(x) as 2 sigmoid(2x) - 1, in one new tensor."""
    return x.mul(2).sigmoid_().mul_(2).sub_(1)


class CPUTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = sigmoid_tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(grad, y)  # grad * (1 - y^2), as torch.tanh's own backward


class Tanh(nn.Tanh):
    """nn.Tanh, computed on a CPU as 2 sigmoid(2x) - 1: torch's CPU tanh is not vectorized (~2.6 ns an
    element here, its sigmoid 0.45 ns): it was a seventh of a 12-member step and half of an evaluation.
    Absolute error <= 2e-7 (torch.tanh's: 3e-8); the backward is tanh's. Other devices: torch.tanh."""

    def forward(self, x):
        if x.device.type != "cpu":
            return torch.tanh(x)
        if torch.is_grad_enabled() and x.requires_grad:
            return CPUTanh.apply(x)
        return sigmoid_tanh(x)


class StackedBatchNorm(nn.Module):
    """BatchNorm1d of every member as one F.batch_norm over members x features channels:
    each member keeps its own statistics (the batch reduced in another order than a single run's: ~1e-7)."""

    def __init__(self, norm: nn.BatchNorm1d, members: int):
        super().__init__()
        n = norm.num_features
        self.eps, self.momentum = norm.eps, norm.momentum
        self.weight = nn.Parameter(torch.empty(members, n))
        self.bias = nn.Parameter(torch.empty(members, n))
        self.register_buffer("running_mean", torch.zeros(members, n))
        self.register_buffer("running_var", torch.ones(members, n))
        self.register_buffer("num_batches_tracked", torch.zeros(members, dtype=torch.long))

    def forward(self, x):  # (members, features, batch): one batch of members x features channels, no copy
        if self.training:
            self.num_batches_tracked.add_(1)
        y = F.batch_norm(x.reshape(1, -1, x.shape[2]), self.running_mean.view(-1), self.running_var.view(-1),
                         self.weight.view(-1), self.bias.view(-1), self.training, self.momentum, self.eps)
        return y.view(x.shape)


class StackedLayerNorm(nn.Module):
    def __init__(self, norm: nn.LayerNorm, members: int):
        super().__init__()
        self.shape, self.eps = norm.normalized_shape, norm.eps
        self.weight = nn.Parameter(torch.empty(members, *self.shape))
        self.bias = nn.Parameter(torch.empty(members, *self.shape))

    def forward(self, x):  # (members, features, batch), normalised over the features
        y = F.layer_norm(x.transpose(1, 2), self.shape, eps=self.eps) * self.weight.unsqueeze(1) + self.bias.unsqueeze(1)
        return y.transpose(1, 2)


STACKED_NORMS = {nn.BatchNorm1d: StackedBatchNorm, nn.LayerNorm: StackedLayerNorm}


class StackedMLP(nn.Module):
    """The MLPs `nets` (same shape) as one module, their weights and buffers copied in."""

    def __init__(self, nets: list[MLP]):
        super().__init__()
        first, members = nets[0], len(nets)
        self.members, self.activation = members, first.activation
        shape = lambda p: torch.empty(members, *p.shape) if p is not None else None  # noqa: E731
        self.embedding = StackedEmbedding(shape(first.embedding.weight))
        self.blocks = nn.ModuleList()
        for block in first.blocks:
            layers = {"linear": StackedLinear(shape(block.linear.weight), shape(block.linear.bias))}
            if hasattr(block, "norm"):
                layers["norm"] = STACKED_NORMS[type(block.norm)](block.norm, members)
            layers["act"] = Tanh() if first.activation == "tanh" else ACTIVATIONS[first.activation]()
            self.blocks.append(nn.Sequential(OrderedDict(layers)))
        self.output = StackedLinear(shape(first.output.weight), shape(first.output.bias))
        states = [net.state_dict() for net in nets]
        self.load_state_dict({k: torch.stack([s[k] for s in states]) for k in states[0]})

    def forward(self, idx):  # (members, batch, block) -> logits (members, vocab, batch)
        x = self.embedding(idx).flatten(2).transpose(1, 2)  # feature-major from here on: (members, features, batch)
        for block in self.blocks:
            x = block(x)
        return self.output(x)


def stackable(net) -> bool:
    """Whether StackedMLP can stack this network: an actgrad MLP with norms it knows."""
    return type(net) is MLP and all(not hasattr(b, "norm") or type(b.norm) in STACKED_NORMS for b in net.blocks)


def member_state(state: dict, i: int) -> dict:
    """Member i's part of a stacked state dict: what its own MLP's state_dict() would be."""
    return {k: v[i].clone() for k, v in state.items()}


def stack_states(states: list[dict]) -> dict:
    """The stacked state dict of members' state dicts (the inverse of member_state)."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}
