"""Parameter gradients against the parameters themselves: which layer would learn too fast?"""

from actgrad.diagnostic import Diagnostic
from actgrad.snapshot import matrices


class ParamGrads(Diagnostic):
    """param_grad/{std,data_ratio}/<param>, e.g. param_grad/data_ratio/layer1.weight; param_grad/mean/<param>
    with means=True.

    data_ratio = std(grad) / std(param): a step of lr * grad changes a parameter with a large
    ratio much more, relative to its size, than the others.
    """

    needs = {"params", "grads"}

    def __init__(self, every_n_steps: int = 1000, weights_only: bool = True, means: bool = False):
        super().__init__(every_n_steps)
        self.weights_only = weights_only  # the lecture looks at the weight matrices only
        self.means = means  # a gradient's mean is noise around 0; the histograms show it
        self.charts = {"param_grad/data_ratio: std(grad) / std(param)": ["param_grad/data_ratio/.*"],
                       "param_grad/std": ["param_grad/std/.*"]}
        if means:
            self.charts["param_grad/mean"] = ["param_grad/mean/.*"]

    def compute(self, snapshot):
        grads = matrices(snapshot.grads) if self.weights_only else snapshot.grads
        stats = {}
        for name, g in grads.items():
            grad_std = g.std()
            stats |= {f"param_grad/std/{name}": grad_std, f"param_grad/data_ratio/{name}": grad_std / snapshot.params[name].std()}
            if self.means:
                stats[f"param_grad/mean/{name}"] = g.mean()
        return stats
