"""A progress bar in optimizer steps, for a loop that runs many of them per Lightning batch.

Lightning's TQDMProgressBar counts batches of an epoch ("Epoch 0: 12/2000"); actgrad's batches
are chunks of up to steps_per_batch optimizer steps (see module.py), so the bar here counts
`trainer.global_step` up to `trainer.max_steps` instead:

    train:   6%|▌         | 12,300/200,000 [00:07<01:50, 1,650 steps/s, loss 2.3456]

It is redrawn at most once every `refresh_seconds`, whatever the chunk size, and only looks at
Python numbers (global_step, the module's `recent_loss` float): no host sync, nothing per step.
"""

import os
import sys
import time

from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm

STEPS = "{desc}: {percentage:3.0f}%|{bar}| {n:,}/{total:,} [{elapsed}<{remaining}{postfix}]"
NO_TOTAL = "{desc}: {n:,} [{elapsed}{postfix}]"  # max_steps=-1: no end to show


def terminal_size() -> tuple[int, int] | None:
    """(columns, lines) that stdout's terminal reports, None when stdout is no terminal."""
    try:
        return tuple(os.get_terminal_size(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):
        return None


class StepProgressBar(TQDMProgressBar):
    def __init__(self, refresh_seconds: float = 0.25, process_position: int = 0, description: str = "train",
                 clock=time.monotonic):
        super().__init__(refresh_rate=1, process_position=process_position)
        self.refresh_seconds, self.description = refresh_seconds, description
        self.clock = clock  # a test gives a fake one
        self.shown = (0, 0.0)  # (step, time) of the last redraw: steps/s is measured between redraws
        self.rate = None

    @property
    def train_description(self) -> str:
        return self.description

    def init_train_tqdm(self):
        trainer = self.trainer
        # max(): tqdm drops a total below n, and the format needs one (a run resumed past a lowered max_steps)
        total = max(trainer.max_steps, trainer.global_step) if trainer.max_steps > 0 else None
        # initial: a resumed run starts at its step, and tqdm's ETA counts only this attempt's steps
        # a terminal that reports a size of 0 (a bare pty, as `script` makes it) hides every bar: say 100 x 24
        sized = terminal_size() != (0, 0)
        return tqdm(desc=self.train_description, initial=trainer.global_step, total=total,
                    bar_format=STEPS if total else NO_TOTAL, position=self.process_position,
                    disable=self.is_disabled, leave=True, dynamic_ncols=sized, ncols=None if sized else 100,
                    nrows=None if sized else 24, file=sys.stdout)

    # the module validates itself; a Lightning validation loop, if any, gets no bar of its own
    def init_sanity_tqdm(self):
        return tqdm(disable=True)

    def init_validation_tqdm(self):
        return tqdm(disable=True)

    def get_metrics(self, trainer, pl_module) -> dict:
        return {}  # no v_num: the postfix is steps/s and the loss, set by show()

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.shown, self.rate = (trainer.global_step, self.clock()), None

    def on_train_epoch_start(self, trainer, pl_module):
        pass  # the bar spans the whole run, not an epoch: nothing to reset

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = self.clock()
        done = trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if self.is_enabled and (now - self.shown[1] >= self.refresh_seconds or done):
            self.show(trainer, pl_module, now)
            self.train_progress_bar.refresh()

    def on_train_epoch_end(self, trainer, pl_module):
        pass  # the base class redraws here with Lightning's metrics

    def on_train_end(self, trainer, pl_module):
        if self.is_enabled:
            self.show(trainer, pl_module, self.clock())
        self.train_progress_bar.close()  # draws the bar a last time, and leaves it on screen

    def show(self, trainer, pl_module, now: float) -> None:
        """Put the step, steps/s and loss into the bar, without drawing it."""
        step, (last_step, last_time) = trainer.global_step, self.shown
        if now > last_time and step > last_step:
            self.rate = (step - last_step) / (now - last_time)
        self.shown = (step, now)
        bar = self.train_progress_bar
        bar.n = step
        loss = getattr(pl_module, "recent_loss", None)
        parts = ([f"{self.rate:,.0f} steps/s"] if self.rate is not None else []) + (
            [f"loss {loss:.4f}"] if loss is not None else [])
        bar.set_postfix_str(", ".join(parts), refresh=False)
