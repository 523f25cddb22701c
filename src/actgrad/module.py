"""The LightningModule: a fast training loop around any next-character model.

A step of this model takes well under a millisecond, so Lightning's fixed cost per batch
(hooks, closures, data fetching: ~400 us, see the lightning-overhead study) would dominate.
We therefore use manual optimization and run `steps_per_batch` optimizer steps per
Lightning batch, each step plain PyTorch. Lightning still counts every optimizer step in
`global_step`, so max_steps, checkpoints and the TensorBoard x-axis are in real steps.
With `lean_optimizer` the steps also skip torch.optim's own per-call wrapping (`lean_calls`).
"""

import functools
import logging
import math

import lightning as L
import torch
import torch.nn.functional as F
import torch.optim.optimizer as torch_optimizer

from actgrad.diagnostic import Diagnostic, write_scalars

log = logging.getLogger(__name__)


class Diverged(RuntimeError):
    pass


class LanguageModel(L.LightningModule):
    def __init__(self, net, optimizer, scheduler=None, log_every_n_steps=100, val_every_n_steps=5000,
                 lean_optimizer=True, config=None, diverge_above=math.inf, record=None, stop=None):
        super().__init__()
        self.net = net
        self.make_optimizer = optimizer  # partials from Hydra: this module never knows which optimizer
        self.make_scheduler = scheduler
        self.log_every_n_steps, self.val_every_n_steps = log_every_n_steps, val_every_n_steps
        self.lean_optimizer = lean_optimizer
        self.automatic_optimization = False
        self.diverge_above = diverge_above  # a finite loss this high has diverged too (1e4 x ln(V) by default)
        self.record = record or {}  # the run's config hash, stored in every checkpoint (see checkpoint.py)
        self.stop = stop  # a StopRequest: checked between chunks of steps
        self.diverged_at = None
        self._losses = []  # per-step losses on the device since the last write: no host sync per step
        self.written = (None, {})  # (step, scalars) last written by the loop: a resume writes them again
        if config is not None:
            self.save_hyperparameters(config)  # stored in checkpoints, so a run can be rebuilt from one

    def forward(self, idx):
        return self.net(idx)

    def configure_optimizers(self):
        optimizer = self.make_optimizer(self.net.parameters())
        if self.make_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.make_scheduler(optimizer), "interval": "step"}}

    def on_fit_start(self):
        self.diagnostics = [cb for cb in self.trainer.callbacks if isinstance(cb, Diagnostic)]

    def on_train_start(self):
        step, scalars = self.written
        if step is not None and step == self.global_step:  # resumed: what was written at this step before
            write_scalars(self.trainer, scalars, step)      # the checkpoint, as the purge removed it
        if self.stop is not None:
            self.stop.install()  # after Lightning's own handlers, which would end fit with an exception

    def on_train_end(self):
        if self.stop is not None:
            self.stop.restore()

    def on_save_checkpoint(self, checkpoint):
        step, scalars = self.written
        checkpoint["actgrad"] = {**self.record, "pending_losses": [float(l) for l in self._losses],
                                 "written_step": step if step is not None else -1,
                                 "written": {k: float(v) for k, v in scalars.items()}}

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("actgrad", {})
        self._losses = [torch.tensor(l, device=self.device) for l in state.get("pending_losses", [])]
        self.written = (state.get("written_step", -1), state.get("written", {}))

    def training_step(self, batch, batch_idx):
        xs, ys = batch
        # the raw torch optimizer: LightningOptimizer.step's wrappers cost ~100 us a step
        optimizer = self.optimizers().optimizer
        clear_grads, optimizer_step = lean_calls(optimizer) if self.lean_optimizer else (
            functools.partial(optimizer.zero_grad, set_to_none=True), optimizer.step)
        scheduler = self.lr_schedulers()
        first = self.global_step
        for i in range(len(xs)):
            step = first + i
            watching = [d for d in self.diagnostics if d.wants(step)]
            for d in watching:
                d.active = True
                d.on_step_start(self.trainer, self, step)
            loss = F.cross_entropy(self.net(xs[i]), ys[i])
            clear_grads()
            loss.backward()
            for d in watching:
                d.on_after_backward(self.trainer, self, step)
            optimizer_step()
            if scheduler is not None:
                scheduler.step()
            for d in watching:
                d.on_step_end(self.trainer, self, step)
                d.active = False
            self._losses.append(loss.detach())
        count_optimizer_steps(self.trainer, len(xs))
        self._write_train_loss()
        if self.global_step % self.val_every_n_steps == 0:
            self._validate()
        if self.stop is not None and self.stop.requested():
            self.trainer.should_stop = True  # Lightning ends the loop after this batch; last.ckpt is saved then

    def _validate(self):
        """val/loss on the whole validation split, at multiples of val_every_n_steps whatever the resume step."""
        loss = self.evaluate(*self.trainer.datamodule.splits["val"])
        self.log("val/loss", loss, logger=False, batch_size=1)  # for the best checkpoint's monitor
        self._write({"val/loss": loss}, self.global_step)

    def _write(self, scalars: dict, step: int) -> dict:
        written = write_scalars(self.trainer, scalars, step)
        previous = self.written[1] if self.written[0] == step else {}
        self.written = (step, previous | written)
        return written

    def _write_train_loss(self):
        """Write the mean loss of every whole `log_every_n_steps` interval that has just ended."""
        n, now = self.log_every_n_steps, self.global_step
        first = now - len(self._losses)
        ends = range((first // n + 1) * n, now + 1, n)
        if not ends:
            return
        losses = torch.stack(self._losses)
        lr = self.optimizers().optimizer.param_groups[0]["lr"]
        for end in ends:
            mean = losses[max(end - n, first) - first : end - first].mean()
            written = self._write({"train/loss": mean, "lr": lr}, end)
            loss = written["train/loss"]
            if not math.isfinite(loss) or loss > self.diverge_above:
                self.diverged_at = end
                raise Diverged(f"train/loss is {loss:.4g} at step {end}: the run diverged"
                               + ("" if not math.isfinite(loss) else f" (above {self.diverge_above:.4g})"))
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


def count_optimizer_steps(trainer, n: int) -> None:
    """Tell Lightning that n optimizer steps completed (what LightningOptimizer.step does for one)."""
    trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress.increment_by(n)


def lean_calls(optimizer):
    """(clear_grads, step): what optimizer.zero_grad(set_to_none=True) and optimizer.step() do,
    without the profiler range and hook dispatch torch wraps around each call. On a CPU that
    wrapping costs ~80 us of a ~630 us step of this model, more than Lightning's own overhead.
    When an optimizer step hook is registered, the step keeps its wrapper so the hook runs.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clear_grads():
        for p in params:
            p.grad = None

    step = getattr(type(optimizer).step, "__wrapped__", None)  # the optimizer's own step, unwrapped
    hooks = [getattr(owner, name, None) for owner, name in [
        (optimizer, "_optimizer_step_pre_hooks"), (optimizer, "_optimizer_step_post_hooks"),
        (torch_optimizer, "_global_optimizer_pre_hooks"), (torch_optimizer, "_global_optimizer_post_hooks")]]
    if step is None or any(h is None or h for h in hooks):  # hooks to run, or a torch that keeps them elsewhere
        return clear_grads, optimizer.step
    optimizer._opt_called = True  # what a scheduler's wrapper around step records; it warns without it
    return clear_grads, functools.partial(step, optimizer)
