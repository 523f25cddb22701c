"""Update-to-data ratio: how much one optimizer step changes each parameter, relative to its size.

Measured from the parameters before and after optimizer.step(), so it is the update that
really happened, whatever the optimizer (Adam, momentum) and the learning-rate schedule.
The lecture's rule of thumb: about 1e-3, i.e. -3 on this log10 scale.
"""

import torch

from actgrad.diagnostic import Diagnostic
from actgrad.snapshot import matrices

GUIDE = -3.0


def update_ratios(snapshot, weights_only: bool = True) -> dict:
    """{name: log10(std(after - before) / std(before))}, as tensors on the device.

    Computed once per snapshot: UpdateRatio and UpdateRatioFigure watching the same step share them."""
    key = ("update_ratios", weights_only)
    if key not in snapshot.derived:
        updates = matrices(snapshot.updates) if weights_only else snapshot.updates
        snapshot.derived[key] = {name: (u.std() / snapshot.params[name].std()).log10() for name, u in updates.items()}
    return dict(snapshot.derived[key])


class UpdateRatio(Diagnostic):
    """update_ratio/<param> = log10(std(update) / std(param)); update_ratio/guide = -3 at the first and the last step."""

    needs = {"params", "updates"}
    charts = {"update_ratio: log10(std(update) / std(param)); the guide at -3 is healthy": ["update_ratio/.*"]}

    def __init__(self, every_n_steps: int = 1000, weights_only: bool = True):
        super().__init__(every_n_steps)
        self.weights_only = weights_only  # a parameter that starts constant (norm gains, zero biases) has std 0

    def compute(self, snapshot):
        values = {f"update_ratio/{n}": r for n, r in update_ratios(snapshot, self.weights_only).items()}
        if snapshot.step in (0, self.last_step):  # two points draw the guide across the chart, one line per run
            values["update_ratio/guide"] = torch.tensor(GUIDE)
        return values
