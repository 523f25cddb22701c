"""The lecture's distribution plots: every layer's distribution overlaid in one image (IMAGES tab).

figures/act (each hidden layer's output), figures/act_grad (the gradient at each layer's
output) and figures/param_grad (each weight's gradient), with each line's statistics in the
legend, as in the lecture. Drawing an image costs ~0.09 s, some 200 training steps, so the
tensors are kept (on the device, and in checkpoints) at every watched step and the images are
drawn when training ends, is stopped or stops on an error, each at the step its data came from.
"""

import torch

from actgrad.diagnostic import Diagnostic
from actgrad.snapshot import matrices
from actgrad.callbacks.activations import saturated

FIGURES = {  # tag: (title, x axis, legend statistics)
    "figures/act": ("activation distribution", "layer output", "mean {:+.2f}, std {:.2f}, saturated {:.1%}"),
    "figures/act_grad": ("gradient distribution", "d loss / d layer output", "mean {:+.2e}, std {:.2e}"),
    "figures/param_grad": ("weight gradient distribution", "d loss / d weight", "mean {:+.2e}, std {:.2e}, grad:data {:.2e}"),
}


def overlay(title: str, xlabel: str, curves: dict, start=None, kept: dict | None = None):
    """One density-histogram line per {legend label: tensor}, as the lecture draws them; with
    `start` = (title, curves) of the first step, the two side by side on shared axes. With `kept`
    ({shape: Figure}, the caller's), a Figure of this shape is made once and redrawn (building one
    costs a third of drawing it): valid until the next call with the same shape."""
    panels = ([start] if start else []) + [(title, curves)]
    shape = tuple(len(lines) for _, lines in panels)
    kept = {} if kept is None else kept
    if shape not in kept:
        kept[shape] = blank(shape)
    figure = kept[shape]
    for ax, (panel_title, panel) in zip(figure.axes, panels):
        for line, text, (label, values) in zip(ax.get_lines(), ax.get_legend().get_texts(), panel.items()):
            label, x, y = density(label, values)
            line.set_data(x, y)
            line.set_label(label)
            text.set_text(label)
        ax.set_title(panel_title, fontsize=12)
        ax.set_xlabel(xlabel, fontsize=11)
        ax.relim()  # limits from this data alone, found when drawn, over both panels: as a new figure's
        ax.autoscale()
    return figure


def density(label: str, values: torch.Tensor):
    """(label, bin centres, density) of a 50-bin histogram; NaN and inf left out, and said so."""
    values = values.detach().float().flatten().cpu()
    finite = values[torch.isfinite(values)]
    if len(finite) < len(values):
        label += f" ({len(values) - len(finite)} NaN/inf left out)"
    if not finite.numel():
        return label, [], []
    density, edges = torch.histogram(finite, bins=50, density=True)
    return label, ((edges[:-1] + edges[1:]) / 2).numpy(), density.numpy()


def blank(shape: tuple):
    """A Figure of `shape` (one or two panels, sharing axes), its lines and legends made, data not set."""
    figure = new_figure()
    axes = figure.subplots(1, len(shape), sharex=True, sharey=True, squeeze=False)[0]
    for ax, n in zip(axes, shape):
        for i in range(n):
            ax.plot([], [], label=str(i))
        ax.legend(fontsize=10, loc="upper right")
    axes[0].set_ylabel("density", fontsize=11)
    return with_margins(figure)


def new_figure():
    """1,120 x 360 px, one panel or two: legible in TensorBoard. No pyplot (no global state, no window);
    an Agg canvas of its own, which keeps its renderer and text sizes between draws."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(14, 4.5), dpi=80)
    FigureCanvasAgg(figure)
    return figure


def with_margins(figure):
    """Fixed margins in inches: drawn in ~60% of the time of a layout engine's (several figures a run)."""
    width, height = figure.get_size_inches()
    figure.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.35 / height,
                           wspace=0.35 / (width / len(figure.axes)))
    return figure


class DistributionFigures(Diagnostic):
    needs = {"layers", "params", "grads"}

    def __init__(self, every_n_steps: int = 50000, threshold: float = 0.97, weights_only: bool = True):
        super().__init__(every_n_steps)
        self.threshold, self.weights_only = threshold, weights_only
        self.pending = []  # (step, {tag: {label: (tensor, [statistics as 0-d tensors])}}) not drawn yet
        self.start = {}  # tag -> (title, {label: tensor}) of the first figure drawn
        self.figures = {}  # (lines per panel, ...) -> the Figure redrawn for every figure of that shape

    def observe(self, snapshot):
        curves = {tag: {} for tag in FIGURES}
        for name, layer in snapshot.layers.items():
            out, grad = layer.out.clone(), layer.grad  # kept past this step: copies of what the loop reuses
            sat = saturated(layer, self.threshold).float().mean()
            curves["figures/act"][f"{name} ({type(layer.act).__name__})"] = (out, [out.mean(), out.std(), sat])
            if grad is not None:
                curves["figures/act_grad"][name] = (grad.clone(), [grad.mean(), grad.std()])
        grads = matrices(snapshot.grads) if self.weights_only else snapshot.grads
        for name, g in grads.items():
            p = snapshot.params[name]
            curves["figures/param_grad"][f"{name} {tuple(p.shape)}"] = (g.clone(), [g.mean(), g.std(), g.std() / p.std()])
        self.pending.append((snapshot.step, curves))

    def on_train_end(self, trainer, pl_module):
        self.draw()  # before last.ckpt is saved, so a resumed run does not draw these again

    # the data of figures not yet drawn goes into checkpoints: a killed run's resume draws them
    def state_dict(self):
        return {"pending": self.pending, "start": self.start}

    def load_state_dict(self, state_dict):
        self.pending, self.start = state_dict.get("pending", []), state_dict.get("start", {})

    def on_exception(self, trainer, pl_module, exception):
        self.draw()  # a run that diverged is the one whose figures matter

    def draw(self):
        stats = [[s for _, s in lines.values()] for _, curves in self.pending for lines in curves.values()]
        stats = iter(to_host(stats))  # every legend of every pending figure in one transfer
        for step, curves in self.pending:
            for tag, lines in curves.items():
                title, xlabel, legend = FIGURES[tag]
                labels = [f"{label}: {legend.format(*values)}" for label, values in zip(lines, next(stats))]
                labelled = dict(zip(labels, (t.cpu() for t, _ in lines.values())))
                if self.start.get(tag) is None:
                    self.start[tag] = (f"{title}, step {step}", labelled)  # the start, beside every later figure
                    start = None
                else:
                    start = self.start[tag]
                figure = overlay(f"{title}, step {step}", xlabel, labelled, start=start, kept=self.figures)
                self.writer.figure(tag, figure, step)
        self.pending = []


def to_host(groups: list) -> list:
    """Groups of rows of 0-d tensors -> the same of floats, in one device-to-host transfer."""
    leaves = [t.float() for rows in groups for row in rows for t in row]
    flat = iter(torch.stack(leaves).tolist() if leaves else [])
    return [[[next(flat) for _ in row] for row in rows] for rows in groups]
