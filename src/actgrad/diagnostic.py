"""The base of every diagnostic in callbacks/: which steps it watches, what it reads, what it logs.

actgrad runs many optimizer steps per Lightning batch (see module.py), so a diagnostic is not
told about steps through Lightning's hooks. Instead the training loop, on every step that
some diagnostic watches (`step % every_n_steps == 0`, and the last step, `max_steps - 1`), records once what the watching
diagnostics declared they need and calls `observe(snapshot)` on each of them, after
`optimizer.step()`. A diagnostic reads the Snapshot (see actgrad.snapshot), attaches no
hooks and changes nothing; on the steps it does not watch it costs one modulo.

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
"act/saturation$" or "grad_norm/.*": one custom-scalars chart per quantity, a colour per layer.
"""

import lightning as L

from actgrad.snapshot import Snapshot
from actgrad.writer import Writer


class Diagnostic(L.Callback):
    needs = frozenset()  # what of the step it reads: any of "layers", "params", "grads", "updates"
    charts = {}  # {chart title: [tag regex, ...]}: one TensorBoard custom-scalars chart each

    def __init__(self, every_n_steps: int = 500):
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"{type(self).__name__}.every_n_steps={every_n_steps!r}: must be a positive whole number")
        self.every_n_steps = every_n_steps
        self.writer = Writer([])
        self.last_step = None  # max_steps - 1, set when fit starts

    def wants(self, step: int) -> bool:
        """Multiples of every_n_steps (step 0 included), and the last step of training, so the end is always there."""
        return step % self.every_n_steps == 0 or step == self.last_step

    def observe(self, snapshot: Snapshot) -> None:
        """Called on each watched step, after optimizer.step(), with that step's snapshot."""
        values = self.compute(snapshot)
        self.writer.write({k: v for k, v in values.items() if v.ndim == 0},
                          {k: v for k, v in values.items() if v.ndim > 0}, snapshot.step, layer_names(snapshot))

    def compute(self, snapshot: Snapshot) -> dict:
        """{tag: tensor} from one step's snapshot."""
        return {}


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
    """The loss chart, then every diagnostic's charts: one custom-scalars category per diagnostic."""
    return {"Loss": LOSS_CHART} | {type(d).__name__: d.charts for d in diagnostics if d.charts}


START_HERE = """**What this run logs, and what healthy looks like** (the lecture's rules of thumb)

| tags | what they show | healthy |
|---|---|---|
| `init/loss`, `init/uniform_loss` | the loss before the first step, and ln(V) | about equal (ln 27 = 3.30); far higher: the output layer starts confidently wrong |
| `train/loss`, `val/loss` | mean of each logging interval; the whole validation split | going down together; val far above train: overfitting |
| `act/saturation` | share of outputs where the nonlinearity is flat (tanh: abs(t) > 0.97) | a few percent; tens of percent: the layer's input is too large |
| `act/std`, `preact/std` | spread of each layer's output and input | similar across layers (tanh with gain 5/3 keeps it near 1 at init) |
| `act_grad/std` | the gradient at each layer's output | similar across layers: nothing vanishes or explodes with depth |
| `param_grad/data_ratio` | std(grad) / std(weight) | similar across weights |
| `update_ratio/weight` | log10(std(update) / std(weight)) per step; `update_ratio/guide` is the -3 line | about -3; far below: learns too slowly; above -2: too fast |
| HISTOGRAMS, IMAGES | whole distributions per layer, the start beside later steps | no pile-up at +-1 (tanh), no collapse to 0 |

Each layer is a run of its own, `<this run>/layer1`, `<this run>/embedding`, ... (a subdirectory),
so a card or chart per quantity draws a line, and a colour, per layer: type this run's name in the
runs filter to see its layers alone. The losses, `init/*`, `final/*` and the guide are this run's own.
Set smoothing to 0 and untick "Ignore outliers in chart scaling" (TIME SERIES: Settings; SCALARS and
CUSTOM SCALARS: the left pane): both hide a bad start. CUSTOM SCALARS has one chart per quantity, the
loss first. The IMAGES figures draw each layer's whole distribution, the start beside later steps.
The HPARAMS tab compares runs by the choices made (init, norm, optimizer, overridden values)."""
