"""Update-to-data ratio: how much one optimizer step changes each parameter, relative to its size.

Measured from the parameters before and after optimizer.step(), so it is the update that
really happened, whatever the optimizer (Adam, momentum) and the learning-rate schedule.
The lecture's rule of thumb: about 1e-3, i.e. -3 on this log10 scale.
"""

import torch

from actgrad.diagnostic import Diagnostic, named_params

GUIDE = -3.0


def snapshot(params: dict) -> dict:
    return {name: p.detach().clone() for name, p in params.items()}


def update_ratios(before: dict, params: dict) -> dict:
    """{name: log10(std(after - before) / std(before))}, as tensors on the device."""
    return {name: ((params[name].detach() - old).std() / old.std()).log10() for name, old in before.items()}


class UpdateRatio(Diagnostic):
    """update_ratio/<param> = log10(std(update) / std(param)), and update_ratio/guide = -3."""

    charts = {"update_ratio: log10(std(update) / std(param)); about -3 is healthy": ["update_ratio/.*"]}

    def __init__(self, every_n_steps: int = 1000, weights_only: bool = True):
        super().__init__(every_n_steps)
        self.weights_only = weights_only  # a parameter that starts constant (norm gains, zero biases) has std 0
        self.before = None

    def on_after_backward(self, trainer, module, step):
        self.before = snapshot(named_params(module.net, self.weights_only))

    def on_step_end(self, trainer, module, step):
        ratios = update_ratios(self.before, named_params(module.net, self.weights_only))
        self.before = None
        self.log_scalars(trainer, {f"update_ratio/{n}": r for n, r in ratios.items()}
                         | {"update_ratio/guide": torch.tensor(GUIDE)}, step)
