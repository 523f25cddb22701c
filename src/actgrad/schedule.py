"""Learning-rate schedules, stepped once per optimizer step (conf/scheduler/*.yaml)."""

from torch.optim.lr_scheduler import MultiStepLR


def step_decay(optimizer, max_steps, at=(0.5,), gamma=0.1):
    """The lecture's schedule: multiply the lr by `gamma` at each fraction `at` of the run (0.1 -> 0.01 at half)."""
    bad = [a for a in at if not 0 < a < 1]
    if bad:
        raise ValueError(f"scheduler.at={list(at)}: each decay point must be a fraction of the run in (0, 1)")
    return MultiStepLR(optimizer, milestones=[int(a * max_steps) for a in at], gamma=gamma)
