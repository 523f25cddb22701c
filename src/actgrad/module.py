"""The LightningModule: one fast training loop for a run, or for a stack of runs (actgrad.stacked).

A step of this model takes well under a millisecond, so Lightning's fixed cost per batch
(hooks, closures, data fetching: see docs/performance.md) would dominate.
We therefore use manual optimization and run a chunk of optimizer steps per Lightning batch
(`steps_per_batch`, cut at every logging, validation and checkpoint step). Lightning still
counts every optimizer step in `global_step`, so max_steps, checkpoints and the TensorBoard
x-axis are in real steps.

The loop trains `runs`: a single run is a list of one with its plain network; a stack
(actgrad.stacked.StackedModule) is the same loop with a leading member dimension, and overrides
only what that dimension changes: the losses of a batch, the lrs, the snapshot of one member,
a member's divergence. Each run keeps its writer, diagnostics, what it last wrote and, once it
ended early, its results.

Each step takes one of two paths, decided once when fit starts:
- Lightning's documented path (`manual_backward`, then `LightningOptimizer.step`), where
  Lightning calls every callback's `on_before_backward`, `on_after_backward` and
  `on_before_optimizer_step`, and a precision plugin scales and unscales: when a callback
  overrides one of those hooks, or the precision is not 32-bit. About half the speed (bench.py).
  A single run only: such jobs do not stack (actgrad.grouping.why_alone).
- the fast path otherwise: plain PyTorch, and the optimizer's own `clear_grads`/`update`
  (actgrad.optim: one flat buffer, no per-call wrapper), Lightning told the step count per chunk.
On the steps a diagnostic watches, both paths record one Snapshot (actgrad.snapshot) for them.
"""

import logging
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

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
EVAL_CHUNK = 4096  # examples per evaluation forward pass, shared by the runs of a stack
# The fast path steps the optimizer through `update`, so the scheduler never sees `step` called.
warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")


class Diverged(RuntimeError):
    pass


@dataclass
class Trained:
    """What the loop keeps of a run it trains (a stack's members keep the same: actgrad.stacked.Member)."""

    diverge_above: float = math.inf  # a finite loss this high has diverged too (1e4 x ln(V) by default)
    writer: Writer = field(default_factory=lambda: Writer([]))
    diagnostics: list = field(default_factory=list)
    written: tuple = (None, {})  # (step, scalars) last written: a resume writes them again
    results: dict | None = None  # set when the run ends before the others (diverged, failed)


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
    def __init__(self, net, optimizer=None, scheduler=None, log_every_n_steps=100, val_every_n_steps=5000,
                 config=None, diverge_above=math.inf, record=None, stop=None, vocab=None):
        super().__init__()
        self.net = net
        self.vocab = vocab  # the data's symbols in index order ('.' first), stored in every checkpoint
        self.make_optimizer = optimizer  # partials from Hydra: this module never knows which optimizer
        self.make_scheduler = scheduler
        self.log_every_n_steps, self.val_every_n_steps = log_every_n_steps, val_every_n_steps
        self.automatic_optimization = False
        self.diverge_above = diverge_above
        self.record = record or {}  # the run's config hash, stored in every checkpoint (see checkpoint.py)
        self.stop = stop  # a StopRequest: checked between chunks of steps
        self.runs = [Trained(diverge_above)]  # its writer and diagnostics are the trainer's, found when fit starts
        self.lightning_path = False
        self.recent_loss = None  # the last train/loss written, for the progress bar
        self.losses = []  # each step's losses on the device since the last write: no host sync per step
        self.frozen = None  # a stack's members that ended early (actgrad.stacked)
        self.cadences = None  # {cadence: (a diagnostic to ask, [(run index, diagnostic)])}, when fit starts
        self.started = False  # Lightning skips the loop, and its start hooks, when resumed at max_steps
        self.layers = None  # the layers the diagnostics watch (actgrad.layers.watched), found when fit starts
        if config is not None:
            self.save_hyperparameters(config, logger=False)  # in checkpoints; HPARAMS gets our columns (hparams.py)

    @property
    def writer(self) -> Writer:
        return self.runs[0].writer

    def forward(self, idx):
        return self.net(idx)

    def configure_optimizers(self):
        optimizer = from_settings("optimizer", self.make_optimizer, self.net.parameters())
        if self.make_scheduler is None:
            return optimizer
        scheduler = from_settings("scheduler", self.make_scheduler, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --- the start and end of fit
    def on_fit_start(self):
        self.find_runs()
        block_size = getattr(self.trainer.datamodule, "block_size", None)  # what the diagnostics watch; logged
        self.layers = watched(self.watched_net(), block_size) if block_size else None
        sweep = sweep_dir()  # a sweep's runs that share a start-here card write it once
        for run in self.runs:
            for d in run.diagnostics:
                d.writer, d.last_step = run.writer, self.trainer.max_steps - 1
                d.driven = True  # this loop records their snapshots: their plain-Trainer hooks do nothing
            if self.global_step == 0:  # TensorBoard keeps one layout per run
                start_here(run.writer, run.diagnostics, self.layers, once_in=sweep)
        self.lightning_path = needs_lightning_path(self.trainer)
        if self.lightning_path:
            log.info("a callback overrides %s, or precision is %s: every step takes Lightning's documented path "
                     "(about half the speed of the fast path)", "/".join(LIGHTNING_STEP_HOOKS), self.trainer.precision)

    def find_runs(self):
        """A single run writes to the trainer's loggers and is watched by the trainer's diagnostics."""
        run = self.runs[0]
        run.writer = Writer.of(self.trainer)
        run.diagnostics = [cb for cb in self.trainer.callbacks if isinstance(cb, Diagnostic)]

    def watched_net(self):
        return self.net

    def on_train_start(self):
        self.started = True
        for j in range(len(self.runs)):
            self.write_again(j)
        if self.stop is not None:
            self.stop.install()  # after Lightning's own handlers, which would end fit with an exception

    def write_again(self, j: int = 0):
        """Resumed: what run j wrote at this step before the checkpoint, as its logger's purge removed it."""
        step, scalars = self.runs[j].written
        if step is not None and step == self.global_step:
            self.runs[j].writer.scalars(scalars, step)

    def on_train_end(self):
        if self.stop is not None:
            self.stop.restore()

    # --- checkpoints
    def on_save_checkpoint(self, checkpoint):
        self.writer.flush()  # what a resume from this checkpoint will not log again must be on disk first
        checkpoint["actgrad"] = saved_state(self.record, self.vocab, self.losses, self.runs[0].written)

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("actgrad", {})
        self.losses = [torch.tensor(l, device=self.device) for l in state.get("pending_losses", [])]
        self.runs[0].written = (state.get("written_step", -1), state.get("written", {}))
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

    # --- the loop
    def training_step(self, batch, batch_idx):
        xs, ys = batch
        first = self.global_step
        step_once = self.lightning_step if self.lightning_path else self.fast_step()
        for i in range(len(xs)):
            step = first + i
            watching = self.watching(step)
            recorder = Recorder(self.net, set().union(*(d.needs for _, ds in watching for d in ds)),
                                self.layers) if watching else None
            losses = step_once(xs[i], ys[i], recorder)
            if watching:
                self.observe(recorder.snapshot(step, losses, 0.0), watching)
            self.losses.append(losses.detach())
        if not self.lightning_path:
            count_optimizer_steps(self.trainer, len(xs))
        self.write_train_loss()
        if self.global_step % self.val_every_n_steps == 0:
            self.validate()
        if self.stop is not None and self.stop.requested():
            self.trainer.should_stop = True  # Lightning ends the loop after this batch; last.ckpt is saved then

    def losses_of(self, x, y, reduction: str = "mean") -> torch.Tensor:
        """Each run's loss on its batch: a 0-d tensor for a single run ((members,) for a stack)."""
        return F.cross_entropy(self.net(x), y, reduction=reduction)

    def fast_step(self):
        """One optimizer step in plain PyTorch: (x, y, recorder) -> losses."""
        optimizer = self.optimizers().optimizer  # the raw optimizer: LightningOptimizer.step's wrappers cost a step
        clear, update = getattr(optimizer, "clear_grads", None), getattr(optimizer, "update", None)
        if clear is None or update is None:  # a torch.optim optimizer: its public calls
            clear, update = lambda: optimizer.zero_grad(set_to_none=True), optimizer.step
        schedule = self.schedule_step()

        def step_once(x, y, recorder):
            if recorder:
                recorder.start()
            losses = self.losses_of(x, y)
            clear()
            (losses.sum() if losses.ndim else losses).backward()  # a member's gradient is that of its own loss
            if recorder:
                recorder.before_update()
            update()
            if self.frozen is not None:  # a member that ended keeps the weights it had then (actgrad.stacked)
                mask, values = self.frozen
                optimizer.flat_params.copy_(torch.where(mask, values, optimizer.flat_params))
            if schedule is not None:
                schedule()
            return losses

        return step_once

    def schedule_step(self):
        """What steps the lr schedule after an update, or None."""
        scheduler = self.lr_schedulers()
        return scheduler.step if scheduler is not None else None

    def lightning_step(self, x, y, recorder):
        """One optimizer step the way Lightning documents manual optimization: its hooks and plugins run."""
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        if recorder:
            recorder.start()
        loss = self.losses_of(x, y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if recorder:
            recorder.before_update()
        optimizer.step()  # advances global_step
        if scheduler is not None:
            scheduler.step()
        return loss

    def lrs(self) -> list[float]:
        """Each run's lr now."""
        return [self.optimizers().optimizer.param_groups[0]["lr"]]

    def watching(self, step: int) -> list:
        """[(run index, its diagnostics watching this step)]: each cadence the runs share asked once."""
        if self.cadences is None:
            self.cadences = {}
            for j, run in enumerate(self.runs):
                for d in run.diagnostics:
                    shared = type(d).wants is Diagnostic.wants  # the same cadence answers the same
                    key = (type(d), d.every_n_steps, d.last_step) if shared else id(d)
                    self.cadences.setdefault(key, (d, []))[1].append((j, d))
        out = {}
        for asked, pairs in self.cadences.values():
            if asked.wants(step):
                for j, d in pairs:
                    if self.runs[j].results is None:
                        out.setdefault(j, []).append(d)
        return list(out.items())

    def observe(self, snapshot, watching: list) -> None:
        lrs = self.lrs()
        for j, diagnostics in watching:
            mine = replace(self.member_snapshot(snapshot, j), lr=lrs[j])
            with self.runs[j].writer.batch():  # one TensorBoard event for every diagnostic of the step
                for d in diagnostics:
                    d.observe(mine)

    def member_snapshot(self, snapshot, j: int):
        """Run j's part of a step's snapshot: a single run's is all of it."""
        return snapshot

    def write(self, j: int, scalars: dict, step: int) -> dict:
        run = self.runs[j]
        written = run.writer.scalars(scalars, step)
        run.written = merge_written(run.written, step, written)
        return written

    def write_train_loss(self):
        """Each run's mean loss of every whole `log_every_n_steps` interval that has just ended."""
        n, now = self.log_every_n_steps, self.global_step
        first = now - len(self.losses)
        ends = interval_ends(first, now, n)
        if not ends:
            return
        losses, lrs = torch.stack(self.losses).reshape(len(self.losses), -1), self.lrs()  # (steps, runs)
        for end in ends:
            means = losses[max(end - n, first) - first : end - first].mean(0)
            for j, run in enumerate(self.runs):
                if run.results is not None:
                    continue
                loss = self.write(j, {"train/loss": means[j], "lr": lrs[j]}, end)["train/loss"]
                if j == 0:
                    self.recent_loss = loss  # the progress bar's (a stack's bar is named after its first run)
                error = divergence(loss, end, run.diverge_above)
                if error:
                    self.ended(j, error)
        self.losses = self.losses[ends[-1] - first :]

    def ended(self, j: int, error: str, status: str = "diverged"):
        """Run j diverged (or failed): recorded in its results. When every run has ended, the loop ends with
        Diverged; until then a stack's member is said and frozen (StackedModule.freeze) and the others go on."""
        run = self.runs[j]
        if run.results is not None:
            return  # it ended already: its first reason stands
        run.results = {"status": status, "error": error, "steps": self.global_step}
        self.say(j, error)
        if all(r.results is not None for r in self.runs):
            raise Diverged(error)
        self.freeze(j)

    def say(self, j: int, message: str):
        log.error("%s", message)

    def freeze(self, j: int):
        raise NotImplementedError("a single run has no other runs to go on with")

    def after_exception(self, exception: BaseException):
        """fit ended with an exception: Lightning has called the trainer's callbacks' on_exception."""

    def end_again(self):
        """The diagnostics' end (figures, calibration) again: resumed at max_steps, Lightning skips it."""
        for cb in self.trainer.callbacks:
            if type(cb).__module__.startswith("actgrad.callbacks."):
                cb.on_train_end(self.trainer, self)

    def validate(self):
        """val/loss on the whole validation split, at multiples of val_every_n_steps whatever the resume step."""
        losses = self.evaluate(*self.trainer.datamodule.splits["val"]).reshape(-1)
        for j, run in enumerate(self.runs):
            if run.results is None:
                self.write(j, {"val/loss": losses[j]}, self.global_step)
        self.monitor(losses)

    def monitor(self, losses):
        """Hand the val losses to the best checkpoint's monitor (conf/config.yaml: checkpoints.best)."""
        self.log("val/loss", losses[0], logger=False, batch_size=1)

    @torch.no_grad()
    def evaluate(self, x, y) -> torch.Tensor:
        """Each run's mean loss over a whole split, in eval mode (BatchNorm uses its running statistics):
        0-d for a single run, (members,) for a stack."""
        was_training = self.net.training
        self.net.eval()
        chunk = max(64, EVAL_CHUNK // len(self.runs))  # the runs' activations together stay bounded
        # chunk by chunk: the split is stored in a compact integer type, the model takes int64
        total = sum(self.losses_of(xc.to(self.device).long(), yc.to(self.device).long(), reduction="sum")
                    for xc, yc in zip(x.split(chunk), y.split(chunk)))
        self.net.train(was_training)
        return total / len(y)


def sweep_dir() -> Path | None:
    """The dir of the sweep this run is a job of (Hydra's multirun), else None."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        return Path(HydraConfig.get().sweep.dir)
    return None


def saved_state(record: dict, vocab, losses: list, written: tuple) -> dict:
    """What a run's checkpoint keeps for actgrad: its record, the losses of the interval not yet written,
    what it wrote last (a resume writes it again), its vocabulary (actgrad.load samples with it)."""
    step, scalars = written
    state = {**record, "pending_losses": [float(l) for l in losses],
             "written_step": step if step is not None else -1,
             "written": {k: float(v) for k, v in scalars.items()}}
    if vocab is not None:
        state["vocab"] = str(vocab)
    return state


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
