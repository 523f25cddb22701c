"""The training of a stack of runs: one LightningModule over their stacked network (actgrad.stacking)
whose members each keep what a single run has: their diagnostics (fed `snapshot.member(i)`), their
writer, their checkpoints in a single run's format, their job log. actgrad.group decides which
runs stack and starts and ends each member as a single run's attempt.

StackedModule is module.LanguageModel, whose one loop trains a list of runs, with a leading member
dimension: one forward, one backward of the members' summed losses (member m's gradient is that of
its own loss), one update of actgrad.optim's flat buffers, where each member's numbers (lr,
momentum, weight decay, betas, eps) are spread over its part of the buffer when they differ. Its lr
schedule runs on a proxy optimizer with one parameter group per member, so torch's schedulers work
unchanged. What a member's callbacks see is Lightning's own: the trainer, and the member's own
LanguageModel holding its weights (`member_hooks`); its best.ckpt is its own ModelCheckpoint's,
fed the member's val/loss through `self.log`.
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
from actgrad.diagnostic import Diagnostic
from actgrad.keys import MEMBER_NUMBERS
from actgrad.module import LanguageModel, saved_state
from actgrad.rundir import RunDir, fault
from actgrad.snapshot import Snapshot
from actgrad.stacking import member_state, stack, stack_states
from actgrad.writer import Writer

log = logging.getLogger(__name__)


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
    best: object = None  # its ModelCheckpoint (best.ckpt): StackedModule.on_train_batch_end drives it
    written: tuple = (None, {})  # what the loop keeps of it, as of a single run (module.Trained)
    results: dict | None = None  # set when the member ends early (diverged)
    alone: str | None = None  # why it cannot train in a stack (actgrad.group.why_alone); None: it can

    @property
    def diverge_above(self):
        return self.module.diverge_above

    @property
    def diagnostics(self):
        return [c for c in self.callbacks if isinstance(c, Diagnostic)]


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

    @property
    def block_size(self):
        return self.data.block_size

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


class StackedModule(LanguageModel):
    """module.LanguageModel's loop over a stack of members: what the leading member dimension changes."""

    def __init__(self, members: list[Member], stop=None, logs=None):
        first = members[0].cfg
        super().__init__(stack([m.module.net for m in members], members[0].data.block_size),
                         log_every_n_steps=first.log_every_n_steps, val_every_n_steps=first.val_every_n_steps, stop=stop)
        self.members = self.runs = members  # the loop's runs: each member keeps its writer, diagnostics, results
        self.logs, self.first = logs, first
        self.lrs_given = None  # the members' lrs last given to the optimizer
        self.validated = None  # the members' val losses of this batch, for their best checkpoints
        self.loaded = None  # members' optimizer values and scheduler states of a resumed group

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

    def lrs(self) -> list[float]:
        return [g["lr"] for g in self.proxy.param_groups]

    def set_lrs(self):
        lrs = [0.0 if m.results else lr for m, lr in zip(self.members, self.lrs())]
        if lrs != self.lrs_given:
            self.lrs_given = lrs
            self.optimizer.param_groups[0]["lr"] = self.spread(lrs)

    def schedule_step(self):
        if self.scheduler is None:
            return None

        def schedule():
            self.scheduler.step()
            self.set_lrs()

        return schedule

    # --- what the member dimension changes in the loop
    def losses_of(self, x, y, reduction: str = "mean") -> torch.Tensor:
        """Each member's loss: (members,). A batch of one run's shape (evaluation) is every member's."""
        members = len(self.members)
        if x.ndim == 2:
            x, y = x.expand(members, *x.shape), y.expand(members, -1)
        losses = F.cross_entropy(self.net(x), y, reduction="none")  # logits (members, vocab, batch)
        return losses.mean(1) if reduction == "mean" else losses.sum(1)

    def member_snapshot(self, snapshot, j: int):
        return batch_major(snapshot).member(j)

    def say(self, j: int, message: str):
        with self.logs.only(j) if self.logs else contextlib.nullcontext():
            log.error("%s", message)

    def freeze(self, j: int):
        """Member j ended (diverged, or its checkpoint could not be saved): its weights stay as they are,
        the other members train on."""
        params = self.optimizer.flat_params
        mask = self.index == j
        if self.frozen is None:
            self.frozen = (mask, params.detach().clone())
        else:
            self.frozen = (self.frozen[0] | mask, torch.where(mask, params, self.frozen[1]))
        self.set_lrs()

    def find_runs(self):
        pass  # each member has its writer and diagnostics (actgrad.group)

    def watched_net(self):
        return self.members[0].module.net  # the members are alike: their layers are member 0's

    # --- each member's best checkpoint: its own Lightning ModelCheckpoint, fed the member's val/loss
    def monitor(self, losses):
        self.validated = losses

    def on_train_batch_end(self, outputs, batch, batch_idx):
        validated, self.validated = self.validated, None
        if validated is None:
            return
        for j, m in enumerate(self.members):
            if m.results is None:
                self.log("val/loss", validated[j], logger=False, batch_size=1)  # what its monitor reads
                m.best.on_train_batch_end(self.trainer, self, outputs, batch, batch_idx)

    # --- the members' callbacks: their start and end hooks, with the trainer and the member's own module
    def member_hooks(self, hook: str, *args):
        """Call `hook` of every member's callbacks (those of a member that ended early: on_exception only), as
        Lightning calls a single run's: (trainer, the member's LanguageModel with its weights now, *args)."""
        state = self.net.state_dict()
        for j, m in enumerate(self.members):
            if m.results is not None and hook != "on_exception":
                continue
            m.module.net.load_state_dict(member_state(state, j))
            m.module.to(self.device)
            with self.logs.only(j) if self.logs else contextlib.nullcontext():
                for cb in m.callbacks + [m.best]:
                    getattr(cb, hook)(self.trainer, m.module, *args)

    def after_exception(self, exception: BaseException):
        self.member_hooks("on_exception", exception)

    def end_again(self):
        self.member_hooks("on_train_end")

    def setup(self, stage):
        self.member_hooks("setup", stage)

    def on_train_start(self):
        if self.loaded is not None:
            self.restore_members(*self.loaded)
        self.set_lrs()
        self.member_hooks("on_train_start")
        super().on_train_start()

    def on_train_end(self):
        self.member_hooks("on_train_end")
        fault("callbacks_end")  # after the members' figures and BatchNorm calibration
        super().on_train_end()

    # --- checkpoints: one per member, in a single run's format
    def on_save_checkpoint(self, checkpoint):
        pass  # each member's part is cut by StackedCheckpointIO (member_checkpoint)

    def on_load_checkpoint(self, checkpoint):
        pass  # the members' parts were glued by StackedCheckpointIO (merged_checkpoint)

    def member_checkpoint(self, checkpoint: dict, j: int) -> dict:
        m = self.members[j]
        opt = checkpoint["optimizer_states"][0]
        group = dict(opt["param_groups"][0])
        group.update(self.member_values[j])
        lrs = self.lrs()
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
        member["actgrad"] = saved_state(m.module.record, m.module.vocab, [losses[j] for losses in self.losses], m.written)
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
            for g, lr in zip(self.proxy.param_groups, state.get("_last_lr", self.lrs())):
                g["lr"] = lr
        self.lrs_given = None
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
    """Writes the stack's checkpoint as one checkpoint per member, into each member's run dir: `every`
    (last.ckpt) for every member still training; a file in one member's checkpoints/ (its best.ckpt, saved by
    its own ModelCheckpoint) for that member alone."""

    def __init__(self, module: StackedModule, every: Path):
        super().__init__()
        self.module, self.every = module, Path(every)

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        for j, m in enumerate(self.module.members):
            mine = path.parent == m.run.path / "checkpoints" if path != self.every else m.results is None
            if not mine:
                continue
            try:
                m.writer.flush()  # what a resume from this checkpoint will not log again must be on disk first
                super().save_checkpoint(self.module.member_checkpoint(checkpoint, j), m.run.path / "checkpoints" / path.name)
            except OSError as e:  # its disk or folder: this member fails alone, the stack trains on
                self.module.ended(j, f"could not save {path.name}: {type(e).__name__}: {e}", "failed")

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return self.module.merged_checkpoint()

    def remove_checkpoint(self, path):
        pass
