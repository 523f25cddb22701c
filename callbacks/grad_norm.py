"""Worked example (README, "Write your own diagnostic"): the gradient norm of each weight matrix.

A layer whose gradient norm is far from the others' learns at another speed; one that grows
step after step is heading for an explosion.
"""

from actgrad.diagnostic import Diagnostic
from actgrad.snapshot import matrices


class GradNorm(Diagnostic):
    needs = {"grads"}  # what the loop records for it on the steps it watches
    charts = {"grad_norm: L2 norm of each weight's gradient": ["grad_norm/.*"]}

    def __init__(self, every_n_steps: int = 1000):
        super().__init__(every_n_steps)

    def compute(self, snapshot):
        return {f"grad_norm/{name}": g.norm() for name, g in matrices(snapshot.grads).items()}
