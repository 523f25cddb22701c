"""The base of every diagnostic in callbacks/: cadence, step hooks, layer capture, one-transfer logging.

actgrad runs many optimizer steps per Lightning batch (see module.py), so a diagnostic is
told about individual steps by three hooks that the module calls *only on the steps the
diagnostic asked for* (`step % every_n_steps == 0`); on every other step it costs one
modulo. A step it watches runs, in this order:

    d.active = True; d.on_step_start(trainer, module, step)
    loss = cross_entropy(module.net(x), y); loss.backward()
    d.on_after_backward(trainer, module, step)    # .grad is set, parameters not yet updated
    optimizer.step(); scheduler.step()
    d.on_step_end(trainer, module, step); d.active = False

A diagnostic that sets `captures_layers = True` finds in `self.layers` every hidden layer
("layer1".."layerN") as seen on the step being watched: its nonlinearity's input `pre`,
output `out` and, after backward, the output's gradient `grad` (all detached). The forward
hooks behind it are shared by all diagnostics of a network and attached only while one of
them watches a step (`active`); on steps nobody watches there are none.
A subclass that overrides setup, teardown or on_exception calls super().

A whole diagnostic (see callbacks/never_fired.py for one that uses `self.layers`):

    class MeanWeight(Diagnostic):
        charts = {"mean of the output layer's weights": ["weight_mean/.*"]}

        def on_step_end(self, trainer, module, step):
            self.log_scalars(trainer, {"weight_mean/output": module.net.output.weight.mean()}, step)

Tags read `quantity/statistic/where`, e.g. act/saturation/layer1 or param_grad/std/layer2.weight;
`charts` puts every layer of a quantity in one TensorBoard custom-scalars chart.
"""

import re
import weakref
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.loggers import TensorBoardLogger


def write_scalars(trainer, scalars: dict, step: int) -> dict:
    """Stack on the device, move to the host in one transfer, write to every logger at `step`."""
    if not scalars:
        return {}
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in scalars.values()]).tolist()
    metrics = dict(zip(scalars, values))
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
    return metrics


def tensorboard_writers(trainer):
    """The SummaryWriter of every TensorBoard logger: for histograms and images, which only it takes."""
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def param_name(name: str) -> str:
    """A parameter's name in tags: blocks.0.linear.weight -> layer1.weight, blocks.0.norm.bias -> layer1.norm.bias."""
    m = re.fullmatch(r"blocks\.(\d+)\.(?:linear\.)?(.+)", name)
    return f"layer{int(m[1]) + 1}.{m[2]}" if m else name


def named_params(net: nn.Module, weights_only: bool = True) -> dict:
    """{tag name: parameter}; weights_only keeps the matrices (embedding, hidden and output weights), as the lecture."""
    return {param_name(n): p for n, p in net.named_parameters() if p.ndim >= 2 or not weights_only}


@dataclass(eq=False)
class Layer:
    """One hidden layer as seen on the watched step (tensors detached)."""

    act: nn.Module  # its nonlinearity
    pre: torch.Tensor | None = None  # the nonlinearity's input: after the norm, if there is one
    out: torch.Tensor | None = None  # the nonlinearity's output, the layer's output
    grad: torch.Tensor | None = None  # d loss / d out, set during backward

    def keep_grad(self, grad):
        self.grad = grad  # a tensor hook: returning None leaves the gradient as it is


class LayerCapture:
    """A forward hook on each hidden layer's nonlinearity, shared by every diagnostic of a network.

    The hooks are attached only while one of those diagnostics watches a step, so a forward
    pass on any other step runs exactly as without diagnostics.
    """

    _of = weakref.WeakKeyDictionary()  # net -> its capture

    def __init__(self, net):
        self.net, self.members, self.handles = net, [], []
        self.layers = {f"layer{i}": Layer(block.act) for i, block in enumerate(net.blocks, 1)}

    @classmethod
    def join(cls, net, diagnostic) -> "LayerCapture":
        capture = cls._of.get(net) or cls._of.setdefault(net, cls(net))
        capture.members.append(diagnostic)
        return capture

    def leave(self, diagnostic):
        self.members.remove(diagnostic)
        self.update()
        if not self.members:
            del self._of[self.net]

    def update(self):
        """Hooks on while any member is watching a step, off otherwise."""
        watched = any(d.active for d in self.members)
        if watched and not self.handles:
            self.handles = [layer.act.register_forward_hook(self._hook(layer)) for layer in self.layers.values()]
        elif not watched and self.handles:
            for handle in self.handles:
                handle.remove()
            self.handles = []

    @staticmethod
    def _hook(layer):
        def hook(module, inputs, output):
            layer.pre, layer.out, layer.grad = inputs[0].detach(), output.detach(), None
            if output.requires_grad:
                output.register_hook(layer.keep_grad)

        return hook


class Diagnostic(L.Callback):
    captures_layers = False  # True: self.layers holds each hidden layer on watched steps
    charts = {}  # {chart title: [tag regex, ...]}: one TensorBoard custom-scalars chart each

    def __init__(self, every_n_steps: int = 500):
        if not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps={every_n_steps!r}: must be a positive whole number")
        self.every_n_steps = every_n_steps
        self._active = False
        self._capture = None

    @property
    def active(self) -> bool:
        """True from on_step_start to on_step_end of a step this diagnostic watches."""
        return self._active

    @active.setter
    def active(self, on: bool):
        self._active = on
        if self._capture is not None:
            self._capture.update()  # the layer hooks are attached only for watched steps

    def wants(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    @property
    def layers(self) -> dict:
        return self._capture.layers

    def setup(self, trainer, pl_module, stage):
        if self.captures_layers and self._capture is None:
            self._capture = LayerCapture.join(pl_module.net, self)
        diagnostics = [cb for cb in trainer.callbacks if isinstance(cb, Diagnostic)]
        if stage == "fit" and diagnostics[0] is self:  # TensorBoard keeps one layout per run: the first writes all
            write_layout(trainer, diagnostics)

    def teardown(self, trainer, pl_module, stage):
        if self._capture is not None:
            self._capture.leave(self)
            self._capture = None

    def on_exception(self, trainer, pl_module, exception):
        self.teardown(trainer, pl_module, None)  # Lightning skips teardown when fit stops on an error

    # Step hooks, called by the module on wanted steps only. `step` counts optimizer steps
    # done before this one, so step 0 sees the untrained model.
    def on_step_start(self, trainer, module, step):
        """Before the forward pass."""

    def on_after_backward(self, trainer, module, step):
        """Gradients are in .grad; the parameters are not yet updated."""

    def on_step_end(self, trainer, module, step):
        """After optimizer.step(): parameters are updated."""

    def log_scalars(self, trainer, scalars: dict, step: int) -> dict:
        return write_scalars(trainer, scalars, step)

    def log_histograms(self, trainer, tensors: dict, step: int):
        writers = tensorboard_writers(trainer)
        for tag, tensor in tensors.items():
            values = tensor.detach().float().flatten()
            values = values[torch.isfinite(values)]  # TensorBoard's histogram rejects NaN and inf
            if values.numel():
                for writer in writers:
                    writer.add_histogram(tag, values.cpu(), step)

    def log_figure(self, trainer, tag: str, figure, step: int):
        """Draw a matplotlib Figure once (Agg) and add it as an image to every TensorBoard logger."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported on the first figure only

        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        image = np.asarray(canvas.buffer_rgba())[..., :3]
        for writer in tensorboard_writers(trainer):
            writer.add_image(tag, image, step, dataformats="HWC")


def write_layout(trainer, diagnostics) -> None:
    """Every diagnostic's charts as one custom-scalars layout, one category per diagnostic."""
    layout = {type(d).__name__: {title: ["Multiline", list(tags)] for title, tags in d.charts.items()}
              for d in diagnostics if d.charts}
    if layout:
        for writer in tensorboard_writers(trainer):
            writer.add_custom_scalars(layout)
