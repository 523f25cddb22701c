"""The step progress bar, driven through a real Lightning fit whose batches are chunks of optimizer steps."""

import re

import lightning as L
import pytest
import torch

from actgrad.progress import StepProgressBar

STEPS_PER_BATCH = 300


class Clock:
    """A fake time.monotonic: the module moves it on by `tick` seconds a batch."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        return self.now


class Chunks(L.LightningModule):
    """STEPS_PER_BATCH optimizer steps per batch, as actgrad's module; recent_loss set from the third batch on."""

    def __init__(self, clock, start_step=0):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))
        self.automatic_optimization = False
        self.clock, self.start_step = clock, start_step
        self.recent_loss = None

    def on_fit_start(self):
        # as a run resumed at start_step (what actgrad.module.count_optimizer_steps does)
        self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(self.start_step)

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        for _ in range(STEPS_PER_BATCH):
            optimizer.zero_grad()
            self.manual_backward((self.w ** 2).sum())
            optimizer.step()  # Lightning counts each one in global_step
        if batch_idx >= 2:
            self.recent_loss = 3.0 - batch_idx / 10
        self.clock.now += self.clock.tick

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(10), batch_size=1)  # one epoch of 10 batches: fit ends there, long before max_steps


def run(capsys, tick, refresh_seconds, start_step=0):
    """The bar as each redraw showed it, in order."""
    clock = Clock(tick)
    trainer = L.Trainer(max_steps=200_000, max_epochs=1, callbacks=[StepProgressBar(refresh_seconds, clock=clock)],
                        logger=False, enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Chunks(clock, start_step))
    assert trainer.global_step == start_step + 10 * STEPS_PER_BATCH
    out = capsys.readouterr().out
    assert "Epoch" not in out and "Validation" not in out and "v_num" not in out
    return [line.strip() for line in out.split("\r") if line.startswith("train:")]


def test_bar_counts_optimizer_steps_from_the_resume_step(capsys):
    # a batch every 1/8 s, a redraw at most every 0.3 s: after batches 3, 6 and 9, and at the end
    lines = run(capsys, tick=0.125, refresh_seconds=0.3, start_step=5000)
    shown = [re.search(r"\| ([\d,]+)/([\d,]+) ", line).groups() for line in lines]
    assert shown == [("5,000", "200,000"), ("5,900", "200,000"), ("6,800", "200,000"), ("7,700", "200,000"),
                     ("8,000", "200,000")]
    assert "steps/s" not in lines[0] and "loss" not in lines[0]  # nothing measured yet
    # 900 steps in 3/8 s: 2,400 steps/s; the loss the module last exposed
    assert lines[1].endswith("2,400 steps/s, loss 2.8000]")
    assert lines[2].endswith("2,400 steps/s, loss 2.5000]")
    assert lines[4].endswith("2,400 steps/s, loss 2.1000]")  # the end: 300 steps in the last 1/8 s


@pytest.mark.parametrize("tick, redraws", [(1 / 64, 0), (1 / 16, 2), (1.0, 10)])
def test_redraws_are_rate_limited_in_time_not_batches(capsys, tick, redraws):
    lines = run(capsys, tick=tick, refresh_seconds=0.25)
    assert len(lines) == 1 + redraws + 1  # at the start, every 0.25 s of batches, at the end
    assert lines[-1].startswith("train: ") and "3,000/200,000" in lines[-1]


def test_bar_keeps_actgrad_on_its_fast_path():
    # actgrad.module takes Lightning's slower step path when a callback overrides one of these step hooks
    for hook in ("on_before_backward", "on_after_backward", "on_before_optimizer_step"):
        assert getattr(StepProgressBar, hook) is getattr(L.Callback, hook)


def test_a_sweeps_jobs_show_their_bars_under_a_terminal(small_names, tmp_path):
    """A pty that reports a size of 0 x 0 (what `script` gives without a terminal) hid every bar: each job of a
    sweep (here two groups of one, one per worker) draws its own, named after it."""
    import os
    import pty
    import subprocess
    import sys

    from conftest import ROOT

    master, child_end = pty.openpty()
    args = ["-m", "init=naive,kaiming", "trainer.max_steps=200", "steps_per_batch=20", "log_every_n_steps=20",
            "val_every_n_steps=100", "callbacks=none", f"data.path={small_names}", f"hydra.sweep.dir={tmp_path}"]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdin=child_end, stdout=child_end,
                            stderr=child_end)
    os.close(child_end)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the pty closed: every process writing to it has exited
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait() == 0, out.decode(errors="replace")[-3000:]
    screen = out.decode(errors="replace").replace("\r", "\n")
    for job in ("init=naive", "init=kaiming"):
        assert re.search(rf"{job}: 100%\|.*\| 200/200 \[.*steps/s", screen), screen[-3000:]
