"""Histograms per layer for TensorBoard's HISTOGRAMS and DISTRIBUTIONS tabs.

act/layerN, preact/layerN, act_grad/layerN and param_grad/<param>: the same quantities as
the scalar diagnostics, whole. actgrad.writer bins each on its device into 30 buckets and
writes them in one event (about 0.6 KB of event file for the default model), so
every_n_steps=1 is affordable for a short run; the default cadence keeps files small.
"""

from actgrad.diagnostic import Diagnostic
from actgrad.snapshot import matrices


class Histograms(Diagnostic):
    needs = {"layers", "grads"}

    def __init__(self, every_n_steps: int = 10000, weights_only: bool = True):
        super().__init__(every_n_steps)
        self.weights_only = weights_only

    def compute(self, snapshot):
        tensors = {}
        for name, layer in snapshot.layers.items():
            tensors |= {f"act/{name}": layer.out, f"preact/{name}": layer.pre}
            if layer.grad is not None:
                tensors[f"act_grad/{name}"] = layer.grad
        grads = matrices(snapshot.grads) if self.weights_only else snapshot.grads
        return tensors | {f"param_grad/{name}": g for name, g in grads.items()}
