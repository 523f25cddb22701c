"""Activation statistics per hidden layer: is any layer saturated, or dead?

The lecture's first diagnostic: with a naive init most tanh outputs sit at +-1, where
tanh is flat and passes almost no gradient back.
"""

import torch
import torch.nn as nn

from actgrad.diagnostic import Diagnostic
from actgrad.layers import nonlinear


def saturated(layer, threshold: float = 0.97) -> torch.Tensor:
    """Where the layer's nonlinearity is flat, so it passes almost no gradient back (a bool per unit and example).

    For tanh this is the lecture's |t| > threshold. Any other nonlinearity gets the same test on
    its slope, |f'(x)| < 1 - threshold**2 (as tanh'(x) = 1 - t**2): for ReLU that is x <= 0.
    """
    if isinstance(layer.act, nn.Tanh):
        return layer.out.abs() > threshold
    if type(layer.act) is nn.ReLU:  # slope 1 where the output is > 0, else 0 (NaN too): autograd's answer, cheaper
        return ~(layer.out > 0)
    with torch.enable_grad():
        x = layer.pre.detach().requires_grad_()
        # an in-place nonlinearity (ReLU6(inplace=True)) may not write into a leaf: it gets a copy
        (slope,) = torch.autograd.grad(layer.act(x.clone() if getattr(layer.act, "inplace", False) else x).sum(), x)
    return slope.abs() < 1 - threshold**2


class Activations(Diagnostic):
    """act/{std,saturation}/layerN and preact/std/layerN; act/dead/layerN for nonlinearities that can
    die (not tanh, whose units are never saturated for every example at once in practice);
    act/mean/layerN and preact/mean/layerN with means=True.

    saturation: share of (example, unit) pairs where the nonlinearity is flat (|t| > threshold for tanh);
    dead: share of units saturated for every example of the batch (for ReLU: zero for all of them).
    """

    needs = {"layers"}

    def __init__(self, every_n_steps: int = 1000, threshold: float = 0.97, means: bool = False):
        super().__init__(every_n_steps)
        if not 0 < threshold < 1:
            raise ValueError(f"Activations.threshold={threshold!r}: must be between 0 and 1")
        self.threshold, self.means = threshold, means  # means: noise around 0 for tanh; the histograms show them
        self.charts = {
            f"act/saturation: share of units in the flat part of the nonlinearity (tanh: |t| > {threshold})": ["act/saturation$"],
            "act/dead: share of units saturated for the whole batch (ReLU: zero for every example)": ["act/dead$"],
            "act/std": ["act/std$"],
            "preact/std: the nonlinearity's input": ["preact/std$"],
        }
        if means:
            self.charts |= {"act/mean": ["act/mean$"], "preact/mean": ["preact/mean$"]}

    def setup(self, trainer, pl_module, stage):
        """No act/dead chart when every nonlinearity module is a tanh: no such tag is logged (the layout is
        written after this). Found by type, as the layers are (actgrad.layers)."""
        net = getattr(pl_module, "net", pl_module)
        if all(isinstance(m, nn.Tanh) for m in net.modules() if nonlinear(m)):
            self.charts = {title: tags for title, tags in self.charts.items() if not title.startswith("act/dead")}

    def compute(self, snapshot):
        stats = {}
        for name, layer in snapshot.layers.items():
            stats |= {f"act/std/{name}": layer.out.std(), f"preact/std/{name}": layer.pre.std()}
            if self.means:
                stats |= {f"act/mean/{name}": layer.out.mean(), f"preact/mean/{name}": layer.pre.mean()}
            if isinstance(layer.act, nn.Tanh):  # saturated(), as 0.0/1.0 in place: no bool tensor to convert
                stats[f"act/saturation/{name}"] = layer.out.abs().gt_(self.threshold).mean()
            else:
                flat = saturated(layer, self.threshold)
                stats[f"act/saturation/{name}"] = flat.float().mean()
                stats[f"act/dead/{name}"] = flat.all(0).float().mean()
        return stats
