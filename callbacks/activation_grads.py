"""The gradient at each hidden layer's output: does it shrink or explode with depth?"""

from actgrad.diagnostic import Diagnostic


class ActivationGrads(Diagnostic):
    """act_grad/{mean,std}/layerN: mean and std of d loss / d (layer output)."""

    needs = {"layers"}
    charts = {
        "act_grad/mean: gradient at each layer's output": ["act_grad/mean/.*"],
        "act_grad/std: similar across layers is healthy": ["act_grad/std/.*"],
    }

    def __init__(self, every_n_steps: int = 1000):
        super().__init__(every_n_steps)

    def compute(self, snapshot):
        stats = {}
        for name, layer in snapshot.layers.items():
            if layer.grad is not None:  # None if the output did not reach the loss
                stats |= {f"act_grad/mean/{name}": layer.grad.mean(), f"act_grad/std/{name}": layer.grad.std()}
        return stats
