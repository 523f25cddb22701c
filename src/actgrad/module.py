"""The LightningModule: a fast training loop around any next-character model.

A step of this model takes well under a millisecond, so Lightning's fixed cost per batch
(hooks, closures, data fetching: see docs/performance.md) would dominate.
We therefore use manual optimization and run a chunk of optimizer steps per Lightning batch
(`steps_per_batch`, cut at every logging, validation and checkpoint step). Lightning still
counts every optimizer step in `global_step`, so max_steps, checkpoints and the TensorBoard
x-axis are in real steps.

Each step takes one of two paths, decided once when fit starts:
- Lightning's documented path (`manual_backward`, then `LightningOptimizer.step`), where
  Lightning calls every callback's `on_before_backward`, `on_after_backward` and
  `on_before_optimizer_step`, and a precision plugin scales and unscales: when a callback
  overrides one of those hooks, or the precision is not 32-bit. About half the speed (bench.py).
- the fast path otherwise: plain PyTorch, and the optimizer's own `clear_grads`/`update`
  (actgrad.optim: one flat buffer, no per-call wrapper), Lightning told the step count per chunk.
On the steps a diagnostic watches, both paths record one Snapshot (actgrad.snapshot) for them.
"""

import logging
import math
import warnings

import lightning as L
import torch
import torch.nn.functional as F

from actgrad.checks import ConfigError, first_line
from actgrad.diagnostic import Diagnostic, overrides, start_here
from actgrad.keys import PLAIN_PRECISION
from actgrad.layers import watched
from actgrad.snapshot import Recorder
from actgrad.writer import Writer

log = logging.getLogger(__name__)

LIGHTNING_STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")
# The fast path steps the optimizer through `update`, so the scheduler never sees `step` called.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


class Diverged(RuntimeError):
    pass


def from_settings(group: str, make, *args):
    """make(*args), a partial of the user's `group` settings: what its constructor refuses (a ValueError or
    TypeError: momentum=-0.5, a key it does not take) is a one-line ConfigError, for a refusal before
    anything is written (experiment.prepare and group.prepare_member build the optimizer to check it)."""
    try:
        return make(*args)
    except (ValueError, TypeError) as e:
        reason = first_line(e)
        if reason.startswith(f"{group}.params"):  # the model's parameters, not a setting: a programming error
            raise
        raise ConfigError(reason if reason.startswith(f"{group}.") else f"{group}: {reason}") from e


class LanguageModel(L.LightningModule):
    def __init__(self, net, optimizer, scheduler=None, log_every_n_steps=100, val_every_n_steps=5000,
                 config=None, diverge_above=math.inf, record=None, stop=None, vocab=None):
        super().__init__()
        self.net = net
        self.vocab = vocab  # the data's symbols in index order ('.' first), stored in every checkpoint
        self.make_optimizer = optimizer  # partials from Hydra: this module never knows which optimizer
        self.make_scheduler = scheduler
        self.log_every_n_steps, self.val_every_n_steps = log_every_n_steps, val_every_n_steps
        self.automatic_optimization = False
        self.diverge_above = diverge_above  # a finite loss this high has diverged too (1e4 x ln(V) by default)
        self.record = record or {}  # the run's config hash, stored in every checkpoint (see checkpoint.py)
        self.stop = stop  # a StopRequest: checked between chunks of steps
        self.diagnostics, self.lightning_path, self.writer = [], False, Writer([])
        self.recent_loss = None  # the last train/loss written, for the progress bar
        self._losses = []  # per-step losses on the device since the last write: no host sync per step
        self.written = (None, {})  # (step, scalars) last written by the loop: a resume writes them again
        self.started = False  # Lightning skips the loop, and its start hooks, when resumed at max_steps
        self.layers = None  # the layers the diagnostics watch (actgrad.layers.watched), found when fit starts
        if config is not None:
            self.save_hyperparameters(config, logger=False)  # in checkpoints; HPARAMS gets our columns (hparams.py)

    def forward(self, idx):
        return self.net(idx)

    def configure_optimizers(self):
        optimizer = from_settings("optimizer", self.make_optimizer, self.net.parameters())
        if self.make_scheduler is None:
            return optimizer
        scheduler = from_settings("scheduler", self.make_scheduler, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_start(self):
        self.writer = Writer.of(self.trainer)
        block_size = getattr(self.trainer.datamodule, "block_size", None)  # what the diagnostics watch; logged
        self.layers = watched(self.net, block_size) if block_size else None
        self.diagnostics = [cb for cb in self.trainer.callbacks if isinstance(cb, Diagnostic)]
        for d in self.diagnostics:
            d.writer, d.last_step = self.writer, self.trainer.max_steps - 1
            d.driven = True  # this loop records their snapshots: their plain-Trainer hooks do nothing
        self.lightning_path = needs_lightning_path(self.trainer)
        if self.lightning_path:
            log.info("a callback overrides %s, or precision is %s: every step takes Lightning's documented path "
                     "(about half the speed of the fast path)", "/".join(LIGHTNING_STEP_HOOKS), self.trainer.precision)
        if self.global_step == 0:  # TensorBoard keeps one layout per run
            start_here(self.writer, self.diagnostics, self.layers)

    def on_train_start(self):
        self.started = True
        self.write_again()
        if self.stop is not None:
            self.stop.install()  # after Lightning's own handlers, which would end fit with an exception

    def write_again(self):
        """Resumed: what was written at this step before the checkpoint, as the logger's purge removed it."""
        step, scalars = self.written
        if step is not None and step == self.global_step:
            self.writer.scalars(scalars, step)

    def on_train_end(self):
        if self.stop is not None:
            self.stop.restore()

    def on_save_checkpoint(self, checkpoint):
        self.writer.flush()  # what a resume from this checkpoint will not log again must be on disk first
        step, scalars = self.written
        checkpoint["actgrad"] = {**self.record, "pending_losses": [float(l) for l in self._losses],
                                 "written_step": step if step is not None else -1,
                                 "written": {k: float(v) for k, v in scalars.items()}}
        if self.vocab is not None:  # a plain string: what actgrad.load needs, besides the config, to sample
            checkpoint["actgrad"]["vocab"] = str(self.vocab)

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("actgrad", {})
        self._losses = [torch.tensor(l, device=self.device) for l in state.get("pending_losses", [])]
        self.written = (state.get("written_step", -1), state.get("written", {}))
        self.vocab = state.get("vocab", self.vocab)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, **kwargs):
        """The trained module of a run dir (its checkpoints/last.ckpt) or of a checkpoint file, in eval
        mode on CPU (or map_location), rebuilt from the config and vocabulary the checkpoint stores:
        what actgrad.load(path).model is. Lightning's own would need `net` and `optimizer` given."""
        from actgrad.run import load_module  # actgrad.run imports this module

        if kwargs:
            raise TypeError(f"LanguageModel.load_from_checkpoint: unexpected {', '.join(sorted(kwargs))}; the model "
                            "is rebuilt from the config stored in the checkpoint")
        module = load_module(checkpoint_path)[0]
        return module.to(map_location) if map_location is not None else module

    def training_step(self, batch, batch_idx):
        xs, ys = batch
        first = self.global_step
        step_once = self.lightning_step if self.lightning_path else self.fast_step()
        for i in range(len(xs)):
            step = first + i
            watching = [d for d in self.diagnostics if d.wants(step)]
            recorder = Recorder(self.net, set().union(*(d.needs for d in watching)), self.layers) if watching else None
            loss = step_once(xs[i], ys[i], recorder)
            if watching:
                snapshot = recorder.snapshot(step, loss, self.lr())
                with self.writer.batch():  # one TensorBoard event for every diagnostic of the step
                    for d in watching:
                        d.observe(snapshot)
            self._losses.append(loss.detach())
        if not self.lightning_path:
            count_optimizer_steps(self.trainer, len(xs))
        self._write_train_loss()
        if self.global_step % self.val_every_n_steps == 0:
            self._validate()
        if self.stop is not None and self.stop.requested():
            self.trainer.should_stop = True  # Lightning ends the loop after this batch; last.ckpt is saved then

    def fast_step(self):
        """One optimizer step in plain PyTorch: (x, y, recorder) -> loss."""
        optimizer = self.optimizers().optimizer  # the raw optimizer: LightningOptimizer.step's wrappers cost a step
        clear, update = getattr(optimizer, "clear_grads", None), getattr(optimizer, "update", None)
        if clear is None or update is None:  # a torch.optim optimizer: its public calls
            clear, update = lambda: optimizer.zero_grad(set_to_none=True), optimizer.step
        scheduler = self.lr_schedulers()

        def step_once(x, y, recorder):
            if recorder:
                recorder.start()
            loss = F.cross_entropy(self.net(x), y)
            clear()
            loss.backward()
            if recorder:
                recorder.before_update()
            update()
            if scheduler is not None:
                scheduler.step()
            return loss

        return step_once

    def lightning_step(self, x, y, recorder):
        """One optimizer step the way Lightning documents manual optimization: its hooks and plugins run."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        if recorder:
            recorder.start()
        loss = F.cross_entropy(self.net(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if recorder:
            recorder.before_update()
        optimizer.step()  # advances global_step
        if scheduler is not None:
            scheduler.step()
        return loss

    def lr(self) -> float:
        return self.optimizers().optimizer.param_groups[0]["lr"]

    def _validate(self):
        """val/loss on the whole validation split, at multiples of val_every_n_steps whatever the resume step."""
        loss = self.evaluate(*self.trainer.datamodule.splits["val"])
        self.log("val/loss", loss, logger=False, batch_size=1)  # for the best checkpoint's monitor
        self._write({"val/loss": loss}, self.global_step)

    def _write(self, scalars: dict, step: int) -> dict:
        written = self.writer.scalars(scalars, step)
        self.written = merge_written(self.written, step, written)
        return written

    def _write_train_loss(self):
        """Write the mean loss of every whole `log_every_n_steps` interval that has just ended."""
        n, now = self.log_every_n_steps, self.global_step
        first = now - len(self._losses)
        ends = interval_ends(first, now, n)
        if not ends:
            return
        losses = torch.stack(self._losses)
        for end in ends:
            mean = losses[max(end - n, first) - first : end - first].mean()
            written = self._write({"train/loss": mean, "lr": self.lr()}, end)
            loss = self.recent_loss = written["train/loss"]
            error = divergence(loss, end, self.diverge_above)
            if error:
                raise Diverged(error)
        self._losses = self._losses[ends[-1] - first :]

    @torch.no_grad()
    def evaluate(self, x, y, chunk=4096) -> torch.Tensor:
        """Mean loss over a whole split, in eval mode (BatchNorm uses its running statistics)."""
        was_training = self.net.training
        self.net.eval()
        # chunk by chunk: the split is stored in a compact integer type, the model takes int64
        total = sum(F.cross_entropy(self.net(xc.to(self.device).long()), yc.to(self.device).long(), reduction="sum")
                    for xc, yc in zip(x.split(chunk), y.split(chunk)))
        self.net.train(was_training)
        return total / len(y)


def interval_ends(first: int, now: int, n: int) -> range:
    """The last steps of the whole `n`-step logging intervals that ended after step `first`, up to `now`."""
    return range((first // n + 1) * n, now + 1, n)


def divergence(loss: float, step: int, limit: float) -> str | None:
    """Why a logged train/loss means the run diverged, or None."""
    if math.isfinite(loss) and loss <= limit:
        return None
    return f"train/loss is {loss:.4g} at step {step}: the run diverged" + (
        "" if not math.isfinite(loss) else f" (above {limit:.4g})")


def merge_written(written: tuple, step: int, scalars: dict) -> tuple:
    """(step, scalars) written at the latest step: what a resumed attempt writes again (see on_train_start)."""
    previous = written[1] if written[0] == step else {}
    return step, previous | scalars


def needs_lightning_path(trainer) -> bool:
    """Whether some callback overrides a step hook Lightning documents, or precision needs its plugin."""
    overridden = any(overrides(cb, hook) for cb in trainer.callbacks for hook in LIGHTNING_STEP_HOOKS)
    return overridden or str(trainer.precision) not in PLAIN_PRECISION


def count_optimizer_steps(trainer, n: int) -> None:
    """Tell Lightning that n optimizer steps completed, what LightningOptimizer.step does for one.

    The one Lightning internal actgrad uses (Lightning has no public way to advance global_step
    other than one LightningOptimizer.step per step, each as costly as a step): tests/test_fast_path.py fails
    loudly if a Lightning release moves it."""
    trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(n)
