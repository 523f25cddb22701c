"""What the training loop records on a step that a diagnostic watches: one read-only Snapshot.

The loop asks every diagnostic which steps it watches and what it needs (`Diagnostic.needs`),
records the union once on those steps, and hands every watching diagnostic the same Snapshot.
On every other step nothing is recorded and no hook is attached.

Every tensor is detached and must not be changed in place (they are the model's own tensors
where no copy was needed). A run of several stacked members (one model, a leading member
dimension on every tensor) gives each member's diagnostics `snapshot.member(i)`: the same
Snapshot of that member alone, so a diagnostic is written once, for a run of one.
"""

from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn

from actgrad.layers import Layers, nonlinear, param_name

NEEDS = {"layers", "params", "grads", "updates"}


@dataclass(frozen=True)
class Layer:
    """One hidden layer on the watched step: one call of a nonlinearity module."""

    act: nn.Module  # its nonlinearity
    pre: torch.Tensor  # the nonlinearity's input: after the norm, if there is one
    out: torch.Tensor  # the nonlinearity's output, the layer's output
    grad: torch.Tensor | None = None  # d loss / d out (None if it did not reach the loss)


@dataclass(frozen=True)
class Snapshot:
    step: int  # optimizer steps done before this one: step 0 sees the untrained model
    loss: torch.Tensor
    lr: float
    layers: dict = field(default_factory=dict)  # "layer1".. in call order -> Layer        (needs "layers")
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


def matrices(tensors: dict) -> dict:
    """The weight matrices of {name: tensor} (embedding, hidden and output weights), as the lecture looks at."""
    return {name: t for name, t in tensors.items() if t.ndim >= 2}


class Recorder:
    """Records one step's Snapshot for a network: layer hooks attached for that step only.

    The layers are the calls of nonlinearity modules (actgrad.layers.NONLINEARITIES), found by type,
    named layer1, layer2, ... in the order of the step's calls: a module called twice is two layers.
    `layers` (actgrad.layers.watched, found once when training starts) gives the parameters' tag names;
    without it, the names of actgrad's MLP (param_name)."""

    def __init__(self, net: nn.Module, needs: set, layers: Layers | None = None):
        unknown = set(needs) - NEEDS
        if unknown:
            raise ValueError(f"needs={sorted(unknown)}: accepted: {', '.join(sorted(NEEDS))}")
        self.net, self.needs = net, set(needs)
        tag = layers.tags.get if layers is not None else lambda n, _: param_name(n)
        self.params = {tag(n, n): p for n, p in net.named_parameters()}
        self.seen, self.handles, self.before, self.inputs, self.grads = {}, [], {}, {}, {}

    def named(self, layers: Layers) -> None:
        """Tag names from `layers`, found after this recorder started (a plain Trainer's first watched step)."""
        self.params = {layers.tags.get(n, n): p for n, p in self.net.named_parameters()}

    def start(self) -> None:
        """Before the forward pass. Again before another forward of the same step (a micro-batch of
        gradient accumulation): the layers of the last forward are the ones kept."""
        self.stop()
        if "layers" in self.needs:
            self.seen, self.inputs = {}, {}
            for module in self.net.modules():
                if nonlinear(module):
                    if getattr(module, "inplace", False):  # its input is overwritten by its output: keep a copy
                        self.handles.append(module.register_forward_pre_hook(self.copy_input))
                    self.handles.append(module.register_forward_hook(self.keep))

    def copy_input(self, module, inputs):
        self.inputs[module] = inputs[0].detach().clone()

    def keep(self, module, inputs, output):
        name = f"layer{len(self.seen) + 1}"  # this call's place in the step
        pre = self.inputs.pop(module) if module in self.inputs else inputs[0].detach()
        self.seen[name] = {"act": module, "pre": pre, "out": output.detach()}
        if output.requires_grad:
            output.register_hook(lambda grad: self.seen[name].__setitem__("grad", grad.detach()))

    def stop(self) -> None:
        """No later forward is recorded."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def before_update(self) -> None:
        """After backward, before optimizer.step(): the values the update starts from, and the gradients
        (the tensors themselves: what the optimizer reads, e.g. after Lightning unscaled or clipped them)."""
        self.stop()  # backward is done
        if self.needs & {"params", "updates"}:
            self.before = {name: p.detach().clone() for name, p in self.params.items()}
        if "grads" in self.needs:
            self.grads = {n: p.grad.detach() for n, p in self.params.items() if p.grad is not None}

    def snapshot(self, step: int, loss: torch.Tensor, lr: float) -> Snapshot:
        """After optimizer.step()."""
        return Snapshot(
            step=step, loss=loss.detach(), lr=lr,
            layers={name: Layer(**seen) for name, seen in self.seen.items()},
            params=self.before if "params" in self.needs else {},
            grads=self.grads,
            updates={n: p.detach() - self.before[n] for n, p in self.params.items()} if "updates" in self.needs else {},
        )
