"""What the training loop records on a step that a diagnostic watches: one read-only Snapshot.

The loop asks every diagnostic which steps it watches and what it needs (`Diagnostic.needs`),
records the union once on those steps, and hands every watching diagnostic the same Snapshot.
On every other step nothing is recorded and no hook is attached.

Every tensor is detached and must not be changed in place (they are the model's own tensors
where no copy was needed). A run of several stacked members (one model, a leading member
dimension on every tensor) gives each member's diagnostics `snapshot.member(i)`: the same
Snapshot of that member alone, so a diagnostic is written once, for a run of one.
"""

import re
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

NEEDS = {"layers", "params", "grads", "updates"}


@dataclass(frozen=True)
class Layer:
    """One hidden layer on the watched step."""

    act: nn.Module  # its nonlinearity
    pre: torch.Tensor  # the nonlinearity's input: after the norm, if there is one
    out: torch.Tensor  # the nonlinearity's output, the layer's output
    grad: torch.Tensor | None = None  # d loss / d out (None if it did not reach the loss)


@dataclass(frozen=True)
class Snapshot:
    step: int  # optimizer steps done before this one: step 0 sees the untrained model
    loss: torch.Tensor
    lr: float
    layers: dict = field(default_factory=dict)  # "layer1".. -> Layer                       (needs "layers")
    params: dict = field(default_factory=dict)  # tag name -> value before the update      (needs "params")
    grads: dict = field(default_factory=dict)  # tag name -> gradient                      (needs "grads")
    updates: dict = field(default_factory=dict)  # tag name -> after minus before          (needs "updates")
    # what diagnostics derive from this snapshot, computed once for all of them (update_ratios);
    # not copied by replace() or member(): each snapshot derives its own
    derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def member(self, i: int) -> "Snapshot":
        """Member i of a stacked snapshot (every tensor indexed on its leading dimension)."""
        pick = lambda d: {k: v[i] for k, v in d.items()}  # noqa: E731
        return replace(self, loss=self.loss[i], layers={k: replace(l, pre=l.pre[i], out=l.out[i],
                                                                    grad=None if l.grad is None else l.grad[i])
                                                        for k, l in self.layers.items()},
                       params=pick(self.params), grads=pick(self.grads), updates=pick(self.updates))


def param_name(name: str) -> str:
    """A parameter's name in tags: blocks.0.linear.weight -> layer1.weight, blocks.0.norm.bias -> layer1.norm.bias."""
    m = re.fullmatch(r"blocks\.(\d+)\.(?:linear\.)?(.+)", name)
    return f"layer{int(m[1]) + 1}.{m[2]}" if m else name


def matrices(tensors: dict) -> dict:
    """The weight matrices of {name: tensor} (embedding, hidden and output weights), as the lecture looks at."""
    return {name: t for name, t in tensors.items() if t.ndim >= 2}


class Recorder:
    """Records one step's Snapshot for a network: layer hooks attached for that step only."""

    def __init__(self, net: nn.Module, needs: set):
        unknown = set(needs) - NEEDS
        if unknown:
            raise ValueError(f"needs={sorted(unknown)}: accepted: {', '.join(sorted(NEEDS))}")
        self.net, self.needs = net, set(needs)
        self.params = {param_name(n): p for n, p in net.named_parameters()}
        self.seen, self.handles, self.before = {}, [], {}

    def start(self) -> None:
        """Before the forward pass."""
        if "layers" in self.needs:
            self.seen = {}
            self.handles = [block.act.register_forward_hook(self.keep(f"layer{i}"))
                            for i, block in enumerate(self.net.blocks, 1)]

    def keep(self, name):
        def hook(module, inputs, output):
            self.seen[name] = {"act": module, "pre": inputs[0].detach(), "out": output.detach()}
            if output.requires_grad:
                output.register_hook(lambda grad: self.seen[name].__setitem__("grad", grad.detach()))

        return hook

    def before_update(self) -> None:
        """After backward, before optimizer.step(): the values the update starts from."""
        for handle in self.handles:
            handle.remove()  # backward is done: no later forward is recorded
        self.handles = []
        if self.needs & {"params", "updates"}:
            self.before = {name: p.detach().clone() for name, p in self.params.items()}

    def snapshot(self, step: int, loss: torch.Tensor, lr: float) -> Snapshot:
        """After optimizer.step()."""
        return Snapshot(
            step=step, loss=loss.detach(), lr=lr,
            layers={name: Layer(**seen) for name, seen in self.seen.items()},
            params=self.before if "params" in self.needs else {},
            grads={n: p.grad.detach() for n, p in self.params.items() if p.grad is not None} if "grads" in self.needs else {},
            updates={n: p.detach() - self.before[n] for n, p in self.params.items()} if "updates" in self.needs else {},
        )
