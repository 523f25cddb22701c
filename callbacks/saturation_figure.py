"""The lecture's saturation picture: one batch's hidden units, white where the nonlinearity is flat.

figures/saturation (IMAGES tab): for each layer, the batch of step 0 beside the batch of the last
step; rows are the batch's examples, columns the layer's units, white where |t| > threshold (the
lecture's `plt.imshow(h.abs() > 0.99, cmap='gray', interpolation='nearest')`; other nonlinearities
get activations.saturated's test on the slope). A column white from top to bottom is a unit flat for
every example: it passes back no gradient from this batch. The two batches are kept as bools (32 x
200 for the lecture's MLP: kilobytes) and drawn when training ends, is stopped or stops on an error.
"""

import torch

from actgrad.diagnostic import Diagnostic
from actgrad.callbacks.activations import saturated
from actgrad.callbacks.figures import new_figure


class SaturationFigure(Diagnostic):
    needs = {"layers"}

    def __init__(self, threshold: float = 0.99):
        super().__init__(every_n_steps=1)  # unused: `wants` picks step 0 and the last step
        if not 0 < threshold < 1:
            raise ValueError(f"SaturationFigure.threshold={threshold!r}: must be between 0 and 1")
        self.threshold = threshold
        self.batches = []  # (step, {"layer1 (Tanh)": bool tensor (examples, units)}) of step 0, then of the last step

    def wants(self, step: int) -> bool:
        return step == 0 or step == self.last_step

    def observe(self, snapshot):
        flat = {f"{name} ({type(layer.act).__name__})": saturated(layer, self.threshold).reshape(-1, layer.out.shape[-1])
                for name, layer in snapshot.layers.items()}  # (batch, ..., units): a row per example and position
        if flat:
            self.batches = self.batches[:1] + [(snapshot.step, flat)]  # kept on the device until drawn

    def on_train_end(self, trainer, pl_module):
        self.draw()  # before last.ckpt is saved, so a resumed run does not draw it again

    def on_exception(self, trainer, pl_module, exception):
        self.draw()  # step 0 alone, if the run stops before its last step

    # step 0's batch goes into checkpoints: a resumed run draws it beside its last step
    def state_dict(self):
        return {"batches": [(step, {k: v.cpu() for k, v in flat.items()}) for step, flat in self.batches]}

    def load_state_dict(self, state_dict):
        self.batches = state_dict.get("batches", [])

    def draw(self):
        if self.batches:
            last_step = self.batches[-1][0]
            self.writer.figure("figures/saturation", picture(self.batches, self.threshold), last_step)
        self.batches = []


def picture(batches: list, threshold: float):
    """A row of panels per layer, one per (step, {layer: bools}) in `batches`: white where True."""
    layers = list(batches[0][1])
    figure = new_figure()  # 1,120 px wide, 80 dpi
    height = 0.5 + 2.9 * len(layers)  # inches: a layer's row ~230 px, its panels ~190 px high
    figure.set_size_inches(14, height)
    axes = figure.subplots(len(layers), len(batches), squeeze=False)  # not shared: layers may differ in width
    for row, layer in zip(axes, layers):
        for ax, (step, flat) in zip(row, batches):
            white = flat[layer].cpu()
            ax.imshow(white.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
            ax.set_title(f"{layer}, step {step}: {white.float().mean().item():.1%} of outputs flat (white)", fontsize=11)
        row[0].set_ylabel("example", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("unit", fontsize=10)
    figure.suptitle(f"saturation: one batch's hidden units, white where |t| > {threshold} (other nonlinearities: "
                    f"|slope| < {1 - threshold**2:.3g})", fontsize=12)
    figure.subplots_adjust(left=0.7 / 14, right=1 - 0.15 / 14, bottom=0.5 / height, top=1 - 0.65 / height,
                           wspace=0.06, hspace=0.55 / 2.4)
    return figure
