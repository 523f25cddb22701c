"""The training of a stack of runs: one LightningModule over their stacked network (actgrad.stacking)
whose members each keep what a single run has: their diagnostics (fed `snapshot.member(i)`), their
writer, their checkpoints in a single run's format, their job log. actgrad.group decides which
runs stack and starts and ends each member as a single run's attempt.

The loop is module.LanguageModel's fast path with a leading member dimension: one forward, one
backward of the members' summed losses (member m's gradient is that of its own loss), one update
of actgrad.optim's flat buffers, where each member's numbers (lr, momentum, weight decay, betas,
eps) are spread over its part of the buffer when they differ. Its lr schedule runs on a proxy
optimizer with one parameter group per member, so torch's schedulers work unchanged.
"""

import contextlib
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from actgrad.checkpoint import AtomicCheckpointIO, load
from actgrad.data import RandomBatches
from actgrad.diagnostic import Diagnostic, start_here
from actgrad.keys import MEMBER_NUMBERS
from actgrad.layers import watched
from actgrad.module import LanguageModel, count_optimizer_steps, divergence, interval_ends, merge_written
from actgrad.rundir import RunDir, fault
from actgrad.snapshot import Recorder, Snapshot
from actgrad.stacking import member_state, stack, stack_states
from actgrad.writer import Writer

log = logging.getLogger(__name__)

EVAL_CHUNK = 4096  # examples per evaluation forward pass, shared by the members of a stack


@dataclass
class Member:
    """One run of the group: its config, dir, own (unstacked) module, loggers and state."""

    cfg: DictConfig  # the run's config (as train.py gets it)
    full: DictConfig  # with the `hydra` node: what HydraConfig holds while this member is handled
    run: RunDir
    module: LanguageModel  # its own network: built and initialised as a single run would, then stacked
    start: object
    data: object = None
    loggers: list = field(default_factory=list)  # as conf/logger/ makes them for a single run
    writer: Writer = None
    callbacks: list = field(default_factory=list)
    best: object = None  # its ModelCheckpoint (state only: the group saves best.ckpt itself)
    written: tuple = (None, {})
    results: dict | None = None  # set when the member ends early (diverged)
    alone: str | None = None  # why it cannot train in a stack (actgrad.group.why_alone); None: it can

    @property
    def diagnostics(self):
        return [c for c in self.callbacks if isinstance(c, Diagnostic)]


class MemberTrainer:
    """What a member's callbacks see of the trainer: the group's step, the member's data and loggers."""

    def __init__(self, trainer, member: Member):
        self.trainer, self.member = trainer, member

    @property
    def global_step(self):
        return self.trainer.global_step

    @property
    def max_steps(self):
        return self.trainer.max_steps

    @property
    def datamodule(self):
        return self.member.data

    @property
    def loggers(self):
        return self.member.loggers

    @property
    def logger(self):
        return self.member.loggers[0] if self.member.loggers else None

    @property
    def callbacks(self):
        return self.member.callbacks


class MemberLogs:
    """Each member's job log, where Hydra would write it (<run dir>/train.log, Hydra's job_logging
    format): the group's own lines go to every member's log, a member's lines to its log alone."""

    def __init__(self, members: list[Member]):
        self.handlers = []
        for m in members:
            name = OmegaConf.select(m.full, "hydra.job.name", default="train")
            fmt = OmegaConf.select(m.full, "hydra.job_logging.formatters.simple.format",
                                   default="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
            handler = logging.FileHandler(m.run.path / f"{name}.log", delay=True)
            handler.setFormatter(logging.Formatter(fmt))
            self.handlers.append(handler)

    def __enter__(self):
        for h in self.handlers:
            logging.getLogger().addHandler(h)
        return self

    def __exit__(self, *exc):
        for h in self.handlers:
            logging.getLogger().removeHandler(h)
            h.close()

    @contextlib.contextmanager
    def only(self, j: int):
        others = [h for i, h in enumerate(self.handlers) if i != j]
        for h in others:
            logging.getLogger().removeHandler(h)
        try:
            yield
        finally:
            for h in others:
                logging.getLogger().addHandler(h)


class StackedData(L.LightningDataModule):
    """Every member's minibatches of a step, stacked: (steps, members, batch, block)."""

    def __init__(self, members: list[Member], steps_per_batch: int, max_steps: int, cadences: tuple):
        super().__init__()
        self.members, self.data = members, members[0].data  # one data config for the group
        self.steps_per_batch, self.max_steps, self.cadences = steps_per_batch, max_steps, cadences

    @property
    def splits(self):
        return self.data.splits

    def train_dataloader(self):
        x, y = self.splits["train"]
        if self.data.train_examples:  # debug=overfit, as NamesData.train_dataloader cuts it
            x, y = x[: self.data.train_examples], y[: self.data.train_examples]
        seeds = sorted({m.cfg.seed for m in self.members})  # members of one seed draw the same batches: once
        batches = {s: RandomBatches(x, y, self.data.batch_size, self.steps_per_batch, self.max_steps, s,
                                    first_step=lambda: self.trainer.global_step, cadences=self.cadences)
                   for s in seeds}
        where = torch.tensor([seeds.index(m.cfg.seed) for m in self.members])
        return StackedBatches(batches[seeds[0]], [batches[s] for s in seeds], where)


class StackedBatches:
    def __init__(self, first, loaders, where):
        self.first, self.loaders, self.where = first, loaders, where

    def __len__(self):
        return len(self.first)

    def __iter__(self):
        for chunks in zip(*self.loaders):
            xs = torch.stack([c[0] for c in chunks], 1)[:, self.where]
            ys = torch.stack([c[1] for c in chunks], 1)[:, self.where]
            yield xs, ys


def batch_major(snapshot: Snapshot) -> Snapshot:
    """The layers of a stacked snapshot as a single run has them, (members, batch, ...): the stack holds a
    member's batch last (actgrad.stacking). Views, no copies."""
    t = lambda x: None if x is None else x.movedim(-1, 1)  # noqa: E731
    return replace(snapshot, layers={name: replace(layer, pre=t(layer.pre), out=t(layer.out), grad=t(layer.grad))
                                     for name, layer in snapshot.layers.items()})


class StackedModule(L.LightningModule):
    """The training loop of module.LanguageModel (its fast path), for a stack of members."""

    def __init__(self, members: list[Member], stop=None, logs=None):
        super().__init__()
        self.members, self.logs = members, logs
        self.net = stack([m.module.net for m in members], members[0].data.block_size)
        self.first = members[0].cfg
        self.layers = None  # member 0's watched layers and parameter tags (actgrad.layers.watched): every member's
        self.log_every_n_steps, self.val_every_n_steps = self.first.log_every_n_steps, self.first.val_every_n_steps
        self.automatic_optimization = False
        self.stop = stop
        self.lrs = None  # the members' lrs last given to the optimizer
        self.frozen = None  # (mask over the flat buffer, values) of members that diverged
        self.pending_best = []
        self.losses = []  # each step's (members,) losses since the last train/loss write
        self.cadences = None  # {cadence: (a diagnostic to ask, [(member index, diagnostic)])}, when fit starts
        self.loaded = None  # members' optimizer values and scheduler states of a resumed group
        self.started = False  # Lightning skips the loop, and its start hooks, when resumed at max_steps

    # --- optimizer: member 0's optimizer over the stack, with each member's own numbers as tensors
    def configure_optimizers(self):
        self.optimizer = optimizer = instantiate(self.first.optimizer)(self.net.parameters())
        self.index = optimizer.member_index(len(self.members))
        group = optimizer.param_groups[0]
        # each member's own numbers (the optimizer's default where its config has none), as a single run has them
        number = lambda key, v: tuple(float(b) for b in v) if key == "betas" else float(v)  # noqa: E731
        self.member_values = [{key: number(key, m.cfg.optimizer.get(key, group[key]))
                               for key in MEMBER_NUMBERS if key in group and key != "lr"} for m in self.members]
        self.spread_values(self.member_values)
        # the schedule of each member's lr, stepped as one: one parameter group per member
        self.proxy = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": float(m.cfg.optimizer.lr)}
                                      for m in self.members])
        self.scheduler = instantiate(self.first.scheduler)(self.proxy) if self.first.scheduler else None
        return optimizer

    def spread(self, values):
        """Equal values stay a number (the single run's arithmetic); others become a tensor over the flat buffer."""
        values = [float(v) for v in values]
        if len(set(values)) == 1:
            return values[0]
        return torch.tensor(values, dtype=self.optimizer_dtype(), device=self.device)[self.index]

    def optimizer_dtype(self):
        return next(self.net.parameters()).dtype

    def member_lrs(self) -> list[float]:
        return [g["lr"] for g in self.proxy.param_groups]

    def set_lrs(self):
        lrs = [0.0 if m.results else lr for m, lr in zip(self.members, self.member_lrs())]
        if lrs != self.lrs:
            self.lrs = lrs
            self.optimizer.param_groups[0]["lr"] = self.spread(lrs)

    # --- hooks
    def on_fit_start(self):
        first = self.members[0]
        self.layers = watched(first.module.net, first.data.block_size)  # one line a group: the members are alike
        for m in self.members:
            for d in m.diagnostics:
                d.writer, d.last_step = m.writer, self.trainer.max_steps - 1
                d.driven = True  # this loop records their snapshots
            if self.global_step == 0:
                start_here(m.writer, m.diagnostics, self.layers)

    def on_train_start(self):
        self.started = True
        if self.loaded is not None:
            self.restore_members(*self.loaded)
        self.set_lrs()
        for m in self.members:
            self.write_again(m)
        if self.stop is not None:
            self.stop.install()

    def write_again(self, m: Member):
        """What a member's earlier attempt wrote at the step this one resumes from: its logger purged it."""
        step, scalars = m.written
        if step is not None and step == self.global_step:
            m.writer.scalars(scalars, step)

    def on_train_end(self):
        if self.stop is not None:
            self.stop.restore()

    def watching(self, step: int) -> list:
        """[(member index, its diagnostics watching this step)]: each cadence shared by members asked once."""
        if self.cadences is None:
            self.cadences = {}
            for j, m in enumerate(self.members):
                for d in m.diagnostics:
                    shared = type(d).wants is Diagnostic.wants  # the same cadence answers the same
                    key = (type(d), d.every_n_steps, d.last_step) if shared else id(d)
                    self.cadences.setdefault(key, (d, []))[1].append((j, d))
        out = {}
        for asked, pairs in self.cadences.values():
            if asked.wants(step):
                for j, d in pairs:
                    if self.members[j].results is None:
                        out.setdefault(j, []).append(d)
        return list(out.items())

    def training_step(self, batch, batch_idx):
        xs, ys = batch
        first = self.global_step
        for i in range(len(xs)):
            step = first + i
            watching = self.watching(step)
            needs = set().union(*(d.needs for _, ds in watching for d in ds))
            recorder = Recorder(self.net, needs, self.layers) if watching else None
            losses = self.step_once(xs[i], ys[i], recorder)
            if watching:
                snapshot = batch_major(recorder.snapshot(step, losses, 0.0))
                lrs = self.member_lrs()
                for j, ds in watching:
                    mine = replace(snapshot.member(j), lr=lrs[j])
                    with self.members[j].writer.batch():
                        for d in ds:
                            d.observe(mine)
            self.losses.append(losses.detach())  # (members,) on the device: no host sync per step
        count_optimizer_steps(self.trainer, len(xs))
        self.write_train_loss()
        if self.global_step % self.val_every_n_steps == 0:
            self.validate()
        if self.stop is not None and self.stop.requested():
            self.trainer.should_stop = True
        if all(m.results for m in self.members):
            self.trainer.should_stop = True  # every member diverged

    def step_once(self, x, y, recorder):
        optimizer = self.optimizer
        if recorder:
            recorder.start()
        logits = self.net(x)
        losses = F.cross_entropy(logits, y, reduction="none").mean(1)  # logits (members, vocab, batch)
        optimizer.clear_grads()
        losses.sum().backward()  # member m's gradient is that of its own mean loss
        if recorder:
            recorder.before_update()
        optimizer.update()
        if self.frozen is not None:  # a diverged member keeps the weights it had when it was found
            mask, values = self.frozen
            optimizer.flat_params.copy_(torch.where(mask, values, optimizer.flat_params))
        if self.scheduler is not None:
            self.scheduler.step()
            self.set_lrs()
        return losses

    def write_train_loss(self):
        """Each member's mean loss of every whole `log_every_n_steps` interval that has just ended."""
        n, now = self.log_every_n_steps, self.global_step
        first = now - len(self.losses)
        ends = interval_ends(first, now, n)
        if not ends:
            return
        losses, lrs = torch.stack(self.losses), self.member_lrs()  # (steps, members)
        for end in ends:
            means = losses[max(end - n, first) - first : end - first].mean(0)
            for j, m in enumerate(self.members):
                if m.results is not None:
                    continue
                loss = self.write(m, {"train/loss": means[j], "lr": lrs[j]}, end)["train/loss"]
                error = divergence(loss, end, m.module.diverge_above)
                if error:
                    self.diverged(j, error)
        self.losses = self.losses[ends[-1] - first :]

    def write(self, m: Member, scalars: dict, step: int) -> dict:
        written = m.writer.scalars(scalars, step)
        m.written = merge_written(m.written, step, written)
        return written

    def diverged(self, j: int, error: str, status: str = "diverged"):
        """Record member j as diverged (or failed) and freeze its weights: the other members train on."""
        m = self.members[j]
        if m.results is not None:
            return  # it ended already: its first reason stands
        with self.logs.only(j) if self.logs else contextlib.nullcontext():
            log.error("%s", error)
        m.results = {"status": status, "error": error, "steps": self.global_step}
        params = self.optimizer.flat_params
        mask = self.index == j
        if self.frozen is None:
            self.frozen = (mask, params.detach().clone())
        else:
            self.frozen = (self.frozen[0] | mask, torch.where(mask, params, self.frozen[1]))
        self.set_lrs()

    @torch.no_grad()
    def evaluate(self, x, y) -> torch.Tensor:
        """Every member's mean loss over a whole split, in eval mode: (members,)."""
        was_training = self.net.training
        self.net.eval()
        members = len(self.members)
        chunk = max(64, EVAL_CHUNK // members)  # examples per forward: the members' activations together stay bounded
        total = 0
        for xc, yc in zip(x.split(chunk), y.split(chunk)):
            xc, yc = xc.to(self.device).long(), yc.to(self.device).long()
            logits = self.net(xc.expand(members, *xc.shape))  # (members, vocab, chunk)
            total = total + F.cross_entropy(logits, yc.expand(members, -1), reduction="none").sum(1)
        self.net.train(was_training)
        return total / len(y)

    def validate(self):
        losses = self.evaluate(*self.trainer.datamodule.splits["val"])
        for j, m in enumerate(self.members):
            if m.results is not None:
                continue
            loss = self.write(m, {"val/loss": losses[j]}, self.global_step)["val/loss"]
            best = m.best.best_model_score
            if best is None or loss < float(best):
                self.pending_best.append((j, loss))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        for j, loss in self.pending_best:  # best.ckpt where the single run's ModelCheckpoint would write it
            best = self.members[j].best
            path = str(self.members[j].run.path / "checkpoints" / "best.ckpt")
            score = torch.tensor(loss)
            best.best_model_score = best.current_score = best.kth_value = score
            best.best_model_path = best.kth_best_model_path = path
            best.best_k_models = {path: score}
            self.trainer.save_checkpoint("best.ckpt", weights_only=False, storage_options={"members": [j]})
        self.pending_best = []

    # --- checkpoints: one per member, in a single run's format
    def member_checkpoint(self, checkpoint: dict, j: int) -> dict:
        m = self.members[j]
        opt = checkpoint["optimizer_states"][0]
        group = dict(opt["param_groups"][0])
        group.update(self.member_values[j])
        lrs = self.member_lrs()
        group["lr"] = lrs[j]
        if self.scheduler is not None:
            group["initial_lr"] = self.proxy.param_groups[j]["initial_lr"]
        state = {p: {k: (v[j].clone() if v.ndim else v.clone()) for k, v in s.items()} for p, s in opt["state"].items()}
        member = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states", "lr_schedulers",
                                                                  "callbacks", "hyper_parameters", "hparams_name")}
        member["state_dict"] = {f"net.{k}": v for k, v in member_state(
            {k[len("net."):]: v for k, v in checkpoint["state_dict"].items()}, j).items()}
        member["optimizer_states"] = [{"state": state, "param_groups": [group]}]
        member["lr_schedulers"] = [self.member_scheduler_state(j)] if self.scheduler is not None else []
        member["callbacks"] = {cb.state_key: cb.state_dict() for cb in m.callbacks + [m.best] if cb.state_dict()}
        member["hparams_name"], member["hyper_parameters"] = "config", dict(m.module.hparams)
        m.module._losses, m.module.written = [losses[j] for losses in self.losses], m.written
        m.module.on_save_checkpoint(member)
        return member

    def member_scheduler_state(self, j: int) -> dict:
        state = self.scheduler.state_dict()
        return {k: ([v[j]] if isinstance(v, list) and len(v) == len(self.members) else v) for k, v in state.items()}

    def restore_members(self, optimizer_values, scheduler_states):
        """On a resume, after Lightning restored the stacked optimizer: each member's own values again."""
        if self.scheduler is not None:
            state = dict(scheduler_states[0])
            for k, v in state.items():
                if isinstance(v, list) and len(v) == 1:
                    state[k] = [s[k][0] for s in scheduler_states]
            self.scheduler.load_state_dict(state)
            for g, lr in zip(self.proxy.param_groups, state.get("_last_lr", self.member_lrs())):
                g["lr"] = lr
        self.lrs = None
        self.spread_values([{key: v[key] for key in values} for v, values in zip(optimizer_values, self.member_values)])

    def spread_values(self, member_values: list[dict]):
        """Each member's optimizer numbers into the stacked optimizer's group, as numbers or tensors."""
        group = self.optimizer.param_groups[0]
        for key in member_values[0]:
            values = [v[key] for v in member_values]
            group[key] = (tuple(self.spread([v[i] for v in values]) for i in range(2)) if key == "betas"
                          else self.spread(values))

    def merged_checkpoint(self) -> dict:
        """The members' last checkpoints as one checkpoint of the stack (a resumed group)."""
        loaded = [load(m.start.ckpt_path) for m in self.members]
        merged = {k: v for k, v in loaded[0].items() if k not in ("state_dict", "optimizer_states", "lr_schedulers",
                                                                  "callbacks", "actgrad")}
        merged["state_dict"] = {f"net.{k}": v for k, v in stack_states(
            [{k[len("net."):]: v for k, v in c["state_dict"].items()} for c in loaded]).items()}
        states = [c["optimizer_states"][0] for c in loaded]
        merged["optimizer_states"] = [{
            "state": {p: {k: (torch.stack([s["state"][p][k] for s in states]) if v.ndim else v) for k, v in st.items()}
                      for p, st in states[0]["state"].items()},
            "param_groups": states[0]["param_groups"]}]
        merged["lr_schedulers"], merged["callbacks"] = [], {}
        for m, c in zip(self.members, loaded):
            for cb in m.callbacks + [m.best]:
                if cb.state_key in c.get("callbacks", {}):
                    cb.load_state_dict(c["callbacks"][cb.state_key])
            state = c.get("actgrad", {})
            m.written = (state.get("written_step", -1), state.get("written", {}))
        pending = [c.get("actgrad", {}).get("pending_losses", []) for c in loaded]
        self.losses = [torch.tensor(step) for step in zip(*pending)]  # the members resume from one step
        self.loaded = ([s["param_groups"][0] for s in states],
                       [c["lr_schedulers"][0] for c in loaded if c["lr_schedulers"]])
        return merged


class StackedCheckpointIO(AtomicCheckpointIO):
    """Writes the stack's checkpoint as one checkpoint per member, into each member's run dir."""

    def __init__(self, module: StackedModule):
        super().__init__()
        self.module = module

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        members = (storage_options or {}).get("members")
        for j, m in enumerate(self.module.members):
            if (members is None and m.results is None) or (members is not None and j in members):
                try:
                    m.writer.flush()  # what a resume from this checkpoint will not log again must be on disk first
                    super().save_checkpoint(self.module.member_checkpoint(checkpoint, j),
                                            m.run.path / "checkpoints" / Path(path).name)
                except OSError as e:  # its disk or folder: this member fails alone, the stack trains on
                    self.module.diverged(j, f"could not save {Path(path).name}: {type(e).__name__}: {e}", "failed")

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return self.module.merged_checkpoint()

    def remove_checkpoint(self, path):
        pass


class MemberHooks(L.Callback):
    """Each member's callbacks' start and end hooks, with the member's own view and weights."""

    def __init__(self, module: StackedModule):
        self.module = module

    def call(self, hook, trainer, *args):
        state = self.module.net.state_dict()
        for j, m in enumerate(self.module.members):
            if m.results is not None and hook != "on_exception":
                continue
            m.module.net.load_state_dict(member_state(state, j))
            m.module.to(self.module.device)
            with self.module.logs.only(j) if self.module.logs else contextlib.nullcontext():
                for cb in m.callbacks:
                    getattr(cb, hook)(MemberTrainer(trainer, m), m.module, *args)

    def setup(self, trainer, pl_module, stage):
        self.call("setup", trainer, stage)

    def on_train_start(self, trainer, pl_module):
        self.call("on_train_start", trainer)

    def on_train_end(self, trainer, pl_module):
        self.call("on_train_end", trainer)
        fault("callbacks_end")  # after the members' figures and BatchNorm calibration

    def on_exception(self, trainer, pl_module, exception):
        self.call("on_exception", trainer, exception)
