"""The gradient at each hidden layer's output: does it shrink or explode with depth?"""

from actgrad.diagnostic import Diagnostic


class ActivationGrads(Diagnostic):
    """act_grad/std/layerN: the std of d loss / d (layer output); act_grad/mean/layerN with means=True."""

    needs = {"layers"}

    def __init__(self, every_n_steps: int = 1000, means: bool = False):
        super().__init__(every_n_steps)
        self.means = means  # a gradient's mean is noise around 0; the histograms show it
        self.charts = {"act_grad/std: the gradient at each layer's output; similar across layers is healthy": ["act_grad/std$"]}
        if means:
            self.charts["act_grad/mean"] = ["act_grad/mean$"]

    def compute(self, snapshot):
        stats = {}
        for name, layer in snapshot.layers.items():
            if layer.grad is not None:  # None if the output did not reach the loss
                stats[f"act_grad/std/{name}"] = layer.grad.std()
                if self.means:
                    stats[f"act_grad/mean/{name}"] = layer.grad.mean()
        return stats
