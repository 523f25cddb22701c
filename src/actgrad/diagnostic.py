"""The base of every diagnostic in callbacks/: which steps it watches, what it reads, what it logs.

actgrad runs many optimizer steps per Lightning batch (see module.py), so a diagnostic is not
told about steps through Lightning's hooks. Instead the training loop, on every step that
some diagnostic watches (`step % every_n_steps == 0`, and the last step, `max_steps - 1`), records once what the watching
diagnostics declared they need and calls `observe(snapshot)` on each of them, after
`optimizer.step()`. A diagnostic reads the Snapshot (see actgrad.snapshot), attaches no
hooks and changes nothing; on the steps it does not watch it costs one modulo.

In a plain Lightning Trainer (the user's own LightningModule, `Trainer(callbacks=[Activations()])`)
Lightning's documented hooks record the same Snapshot (`Steps` below); actgrad's loop sets `driven`
and those hooks do nothing. A watched step is an optimizer step (Lightning's `global_step`):
- layer hooks are attached at `on_train_batch_start` of that step alone; with gradient accumulation
  every micro-batch restarts them, so the activations are the last micro-batch's, and their gradients
  d (that micro-batch's loss) / d output (unscaled, and not divided by accumulate_grad_batches);
- the loss is read in `on_before_backward`: under automatic optimization the sum of what the step
  backpropagates (with accumulate_grad_batches=k, loss/k per micro-batch: their mean loss), under
  manual optimization the loss given to the last `manual_backward` before the optimizer step;
- gradients (accumulated) and the parameters before the update are read in `on_before_optimizer_step`,
  which Lightning calls after its precision plugin unscaled them; a step that a GradScaler skips
  (non-finite gradients) is logged as `grad_scaler/skipped` = 1, not observed;
- the snapshot is observed at `on_train_batch_end`, once the optimizer step happened.
With several devices, rank 0 records and logs its own replica's values (the other ranks record nothing).
The watched layers are the nonlinearity modules called in the first watched step's forward (actgrad.layers).

A whole diagnostic, the gradient norm of each weight (README, "Write your own diagnostic"):

    class GradNorm(Diagnostic):
        needs = {"grads"}
        charts = {"grad_norm: L2 norm of each weight's gradient": ["grad_norm/.*"]}

        def compute(self, snapshot):
            return {f"grad_norm/{name}": g.norm() for name, g in matrices(snapshot.grads).items()}

`compute` returns {tag: tensor}: 0-d tensors are logged as scalars, larger ones as histograms,
at the snapshot's step. Override `observe` instead to keep state across steps (figures), and
use Lightning's own hooks (`on_train_end`: the end of training) for work that is not a step's.
`self.writer` (actgrad.writer.Writer) writes to the run's loggers; it is set when fit starts.

Tags read `quantity/statistic/where`, e.g. act/saturation/layer1 or param_grad/std/layer2.weight.
TensorBoard colours lines by run, so a tag whose `where` is a layer of the snapshot (or one of its
parameters) goes to that layer's own run, a subdirectory of the run dir, under the quantity:
act/saturation of run <run>/layer1, param_grad/std/weight of <run>/layer2 (actgrad.writer; other
loggers and actgrad.events keep the flat tags). A `charts` regex matches those tags, e.g.
"act/saturation$" or "grad_norm/.*": one custom-scalars chart per quantity, a colour per layer; one
written for the flat tags ("dead/.*" for dead/layer1) gets their tags in the layers' runs too (Writer.charts).
"""

import hashlib
import logging
import math
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from actgrad.layers import found, record_calls
from actgrad.snapshot import Recorder, Snapshot
from actgrad.writer import Writer

log = logging.getLogger(__name__)


class Diagnostic(L.Callback):
    needs = frozenset()  # what of the step it reads: any of "layers", "params", "grads", "updates"
    charts = {}  # {chart title: [tag regex, ...]}: one TensorBoard custom-scalars chart each

    def __init__(self, every_n_steps: int = 500):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps={every_n_steps!r}: must be a positive whole number")
        self.every_n_steps = every_n_steps
        self.writer = Writer([])
        self.last_step = None  # max_steps - 1, set when fit starts
        self.driven = False  # set by actgrad's loop, which records the snapshots itself
        self.plain = None  # in a plain Lightning Trainer: what records the snapshots (Steps)

    def wants(self, step: int) -> bool:
        """Multiples of every_n_steps (step 0 included), and the last step of training, so the end is always there."""
        return step % self.every_n_steps == 0 or step == self.last_step

    def needs_at(self, step: int) -> set:
        """What to record on a step it watches."""
        return set(self.needs)

    def observe(self, snapshot: Snapshot) -> None:
        """Called on each watched step, after optimizer.step(), with that step's snapshot."""
        values = self.compute(snapshot)
        self.writer.write({k: v for k, v in values.items() if v.ndim == 0},
                          {k: v for k, v in values.items() if v.ndim > 0}, snapshot.step, layer_names(snapshot))

    def compute(self, snapshot: Snapshot) -> dict:
        """{tag: tensor} from one step's snapshot."""
        return {}

    # A plain Lightning Trainer: these hooks record the snapshot (see the module's docstring). An idle step
    # costs a modulo. actgrad's own loop sets `driven`: they return at once (its Lightning path calls them).
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.driven:
            return
        if self.plain is None:
            self.plain = Steps(self, trainer, pl_module)
        self.plain.batch_start(trainer)

    def on_before_backward(self, trainer, pl_module, loss):
        if self.plain is not None and self.plain.recorder is not None:
            self.plain.backward(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.plain is not None and self.plain.recorder is not None:
            self.plain.before_update(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.plain is not None and self.plain.recorder is not None:
            self.plain.batch_end(trainer)


class Steps:
    """Records a diagnostic's snapshots in a plain Lightning Trainer, through Lightning's hooks."""

    def __init__(self, diagnostic: Diagnostic, trainer, pl_module):
        self.diagnostic, self.net = diagnostic, pl_module
        self.rank_zero = trainer.is_global_zero  # the other ranks record nothing
        self.scaler = getattr(trainer.precision_plugin, "scaler", None)  # a GradScaler (16-mixed), or None
        self.automatic = pl_module.automatic_optimization
        self.accumulate = trainer.accumulate_grad_batches
        diagnostic.writer = Writer.of(trainer)
        diagnostic.last_step = trainer.max_steps - 1 if trainer.max_steps > 0 else None
        self.layers, self.calls, self.call_hooks = None, [], []  # found on the first watched step
        self.recorder, self.step, self.loss, self.lr, self.finite, self.stepped = None, None, None, 0.0, None, False
        self.factor = None  # what the last backward's gradients are multiplied by to be d (its loss) / d ...

    def batch_start(self, trainer) -> None:
        step = trainer.global_step
        if self.recorder is None or self.step != step:  # a new optimizer step
            if not self.rank_zero or not self.diagnostic.wants(step):
                self.recorder = None
                return
            self.recorder = Recorder(self.net, self.diagnostic.needs_at(step), self.layers)
            self.step, self.loss, self.stepped = step, None, False
        self.recorder.start()  # again at each micro-batch: the last one's layers stay
        if self.layers is None:  # the call order of this forward finds them
            self.stop_calls()
            self.calls, self.call_hooks = record_calls(self.net, "start")

    def stop_calls(self) -> None:
        for handle in self.call_hooks:
            handle.remove()
        self.call_hooks = []

    def backward(self, loss) -> None:
        """The loss as backpropagated: scaled by a GradScaler, and divided by accumulate_grad_batches under
        automatic optimization; `self.factor` undoes both for the activation gradients of this backward."""
        loss = loss.detach()
        factor = self.accumulate if self.automatic else 1
        if self.scaler is not None:  # the precision plugin scaled it before this hook
            scale = self.scaler.scale(torch.ones((), device=loss.device))
            loss, factor = loss / scale, factor / scale
        self.loss = loss if self.loss is None or not self.automatic else self.loss + loss  # the micro-batches' mean
        self.factor = None if isinstance(factor, int) and factor == 1 else factor

    def before_update(self, optimizer) -> None:
        if self.stepped:  # a second optimizer step in this batch: the snapshot is of the first
            return
        self.stepped = True
        if self.layers is None:
            self.stop_calls()
            self.layers = found(self.net, self.calls)
            self.recorder.named(self.layers)
            log.info("%s: %s", type(self.diagnostic).__name__, self.layers.line())
        self.recorder.before_update()
        self.lr = optimizer.param_groups[0]["lr"]
        if self.scaler is not None:  # what GradScaler checks to skip the step, as a tensor: no host sync here
            grads = [p.grad for p in self.net.parameters() if p.grad is not None]
            self.finite = torch.stack([g.isfinite().all() for g in grads]).all() if grads else None

    def batch_end(self, trainer) -> None:
        if trainer.global_step == self.step:  # accumulating: no optimizer step yet
            self.recorder.stop()  # nothing else (validation) is recorded; the next micro-batch restarts the hooks
            self.stop_calls()
            return
        recorder, self.recorder = self.recorder, None
        d, writer = self.diagnostic, self.diagnostic.writer
        if not self.stepped:  # manual optimization without an optimizer step in this batch
            recorder.stop()
            return
        if self.finite is not None and not bool(self.finite):
            log.warning("step %d: the GradScaler skipped this optimizer step (non-finite gradients after unscaling): "
                        "logged as grad_scaler/skipped, no diagnostics", self.step)
            writer.scalars({"grad_scaler/skipped": 1.0}, self.step)
        else:
            loss = self.loss if self.loss is not None else torch.tensor(math.nan)
            snapshot = recorder.snapshot(self.step, loss, self.lr)
            if self.factor is not None and snapshot.layers:  # the last micro-batch's own loss, unscaled
                snapshot = replace(snapshot, layers={name: replace(layer, grad=None if layer.grad is None else layer.grad * self.factor)
                                                     for name, layer in snapshot.layers.items()})
            with writer.batch():
                d.observe(snapshot)
        if self.step == 0 and d is first_diagnostic(trainer):  # TensorBoard keeps one layout per run
            start_here(writer, [cb for cb in trainer.callbacks if isinstance(cb, Diagnostic)], self.layers)


def first_diagnostic(trainer):
    return next(cb for cb in trainer.callbacks if isinstance(cb, Diagnostic))


class Bundle(Diagnostic):
    """Several diagnostics as one callback (actgrad.callbacks.default()): Lightning's cost per hook and
    callback is paid once, one Recorder records the union of their needs, one snapshot per watched step.
    Their other hooks (figures drawn at the end, calibration, state in checkpoints) are passed on."""

    def __init__(self, diagnostics: list):
        self.diagnostics = list(diagnostics)
        super().__init__(min((d.every_n_steps for d in self.diagnostics if isinstance(d, Diagnostic)), default=1))
        self.needs = set().union(*(d.needs for d in self.watching()))  # what actgrad's own loop records for it

    @property
    def state_key(self):
        return "Bundle[" + ",".join(cb.state_key for cb in self.diagnostics) + "]"

    # writer and last_step are the bundle's members' too
    @property
    def writer(self):
        return self.shared[0]

    @writer.setter
    def writer(self, writer):
        self.shared = (writer, getattr(self, "shared", (None, None))[1])
        for d in self.watching():
            d.writer = writer

    @property
    def last_step(self):
        return self.shared[1]

    @last_step.setter
    def last_step(self, step):
        self.shared = (self.shared[0], step)
        for d in self.watching():
            d.last_step = step

    def watching(self):
        return [d for d in self.diagnostics if isinstance(d, Diagnostic)]

    def wants(self, step):
        return any(d.wants(step) for d in self.watching())

    def needs_at(self, step):
        return set().union(*(d.needs_at(step) for d in self.watching() if d.wants(step)))

    def observe(self, snapshot):
        for d in self.watching():
            if d.wants(snapshot.step):
                d.observe(snapshot)

    def call(self, hook, *args):
        for cb in self.diagnostics:
            getattr(cb, hook)(*args)

    def setup(self, trainer, pl_module, stage):
        self.call("setup", trainer, pl_module, stage)

    def on_train_start(self, trainer, pl_module):
        self.call("on_train_start", trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.call("on_train_end", trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        self.call("on_exception", trainer, pl_module, exception)

    def state_dict(self):
        return {cb.state_key: cb.state_dict() for cb in self.diagnostics}

    def load_state_dict(self, state_dict):
        for cb in self.diagnostics:
            if cb.state_key in state_dict:
                cb.load_state_dict(state_dict[cb.state_key])


def overrides(callback, hook: str) -> bool:
    """Whether `callback` overrides Lightning hook `hook`: a Diagnostic against Diagnostic's own hooks
    (which serve a plain Lightning Trainer and do nothing in actgrad's loop), any other callback against
    L.Callback's. An instance attribute counts too (a LambdaCallback's)."""
    base = Diagnostic if isinstance(callback, Diagnostic) else L.Callback
    return getattr(getattr(callback, hook), "__func__", None) is not getattr(base, hook)


def layer_names(snapshot: Snapshot) -> set:
    """The layers a snapshot holds (layer1, ...; embedding and output through their parameters): a tag
    ending in one of them, or in one of their parameters, is that layer's series (actgrad.writer)."""
    names = set(snapshot.layers)
    for tensors in (snapshot.params, snapshot.grads, snapshot.updates):
        names.update(name.partition(".")[0] for name in tensors)
    return names


# The loss first: custom scalars shows the categories in this order. TensorBoard matches a regex at the start of a tag.
LOSS_CHART = {"loss: train/loss (mean of each logging interval) and val/loss (the whole validation split)":
              ["train/loss$", "val/loss$"]}


def layout(diagnostics) -> dict:
    """The loss chart, then every diagnostic's charts (a Bundle's: its members'): one custom-scalars category per diagnostic."""
    diagnostics = [m for d in diagnostics for m in (d.watching() if isinstance(d, Bundle) else [d])]
    return {"Loss": LOSS_CHART} | {type(d).__name__: d.charts for d in diagnostics if d.charts}


def start_here(writer: Writer, diagnostics: list, layers, once_in: Path | None = None) -> None:
    """What a run writes when it starts from step 0 (TensorBoard keeps one layout per run): the custom-scalars
    layout, written once the first watched step has logged its tags (Writer.charts), and the start-here card.
    `once_in` (a sweep's dir): the card is written by the first run that has it, not again by each run that
    shares it (TensorBoard's TEXT tab shows a card once per run)."""
    writer.charts(layout(diagnostics), wait=bool(diagnostics))
    if not diagnostics:
        return
    card = START_HERE + watched_table(layers)
    if once_in is not None:
        marker = Path(once_in) / f".actgrad-start-here-{hashlib.sha256(card.encode()).hexdigest()[:12]}"
        try:
            marker.open("x").close()  # atomic: of the runs starting at once, one creates it
        except FileExistsError:
            return
        except OSError:
            pass  # no marker, no harm: this run writes the card
    writer.text(START_TAG, card, 0)


# TensorBoard's TEXT tab sorts tags by name, capitals before lower case: this card comes before provenance and status.
START_TAG = "Start here"

# Short enough to show whole in TensorBoard's text card (500 px high); the long version is docs/tensorboard.md.
START_HERE = """Each layer is a run of its own (`<this run>/layer1`): a card or chart per quantity, a colour per layer.
The lecture's rules of thumb:

| look at | healthy |
|---|---|
| `init/loss` against `init/uniform_loss` = ln(V) | about equal (ln 27 = 3.30); far higher: confidently wrong |
| `train/loss`, `val/loss` | falling together |
| `act/saturation` (tanh: abs(t) > 0.97) | a few percent, not tens |
| `act/std`, `act_grad/std` | similar across layers |
| `update_ratio/weight` | about -3 (the `update_ratio/guide` line) |
| IMAGES: `figures/*` | each distribution at the start beside the end |

TensorBoard's defaults hide a bad start and no event file can change them: set Smoothing to 0 and untick "Ignore
outliers in chart scaling" (SCALARS, CUSTOM SCALARS: the left pane; TIME SERIES: Settings). More: docs/tensorboard.md."""


def watched_table(layers) -> str:
    """The start-here card's line of the watched layers: which module each layerN is."""
    if layers is None:
        return ""
    if not layers.paths:
        return "\n\n**Layers watched:** none. " + layers.line()
    return "\n\n**Layers watched** (each call of a nonlinearity module): " + ", ".join(
        f"{name} `{path}` ({type(layers.modules[name]).__name__})" for name, path in layers.paths.items())
