"""A sweep read at a glance: a TensorBoard run of the sweep itself, `<sweep dir>/compare`, whose figures
overlay the sweep's runs (TensorBoard cannot overlay histograms or images of several runs, and draws no
spread over repeated seeds).

    python -m actgrad.compare <sweep dir>     (a sweep writes it when it ends; scripts/report.py rewrites it)

Drawn only from what the runs logged (their event files), nothing retrained. Runs that differ only in
`seed` are one configuration (actgrad.configurations): its line is the seeds' mean, with a band of +- one
standard deviation where there are several. Figures (IMAGES, under compare/):
- each hidden layer's activation (and activation-gradient) distribution at step 0 and at the last step;
- saturation and the update:data ratio of each layer, and val loss, over the steps;
- the loss table as a TEXT card, with the runs that are missing (failed, diverged, not finished) named.
At most MAX_LINES configurations a figure: beyond that the best and the worst by val loss, said in a note.
"""

import argparse
import math
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from actgrad.configurations import configurations  # noqa: E402
from actgrad.events import read  # noqa: E402

MAX_LINES = 12
LINE_STYLES = ("-", "--")  # tab10's ten colours, then again dashed: twelve lines stay apart without hovering
MARKER = ".actgrad-compare"  # in a compare dir we made: only then is it ours to rewrite
WIDTH = 11.2  # inches at 100 dpi: 1,120 px, TensorBoard's IMAGES card at full width


class RunEvents:
    """What the comparison reads of one run: its scalar series and its histograms' distributions."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        events = read(run_dir)
        tags = events.Tags()
        self.scalars = {t: [(e.step, e.value) for e in events.Scalars(t)] for t in tags["scalars"]}
        self.histograms = {t: events.Histograms(t) for t in tags["histograms"]}

    def final(self, tag: str) -> float:
        points = self.scalars.get(tag)
        return points[-1][1] if points else math.nan


def density(histogram) -> tuple[np.ndarray, np.ndarray]:
    """(bucket centres, density) of one histogram event: its counts over the buckets' widths."""
    h = histogram.histogram_value
    edges = np.array([h.min, *h.bucket_limit[:-1], h.max], dtype=float)
    edges[-1] = max(edges[-1], edges[-2])
    widths = np.maximum(np.diff(edges), 1e-12)
    counts = np.array(h.bucket, dtype=float)
    return (edges[:-1] + edges[1:]) / 2, counts / max(counts.sum(), 1) / widths


def series_line(dirs: list, runs: dict, tag: str) -> tuple[list, list, list, int] | None:
    """(steps, means, standard deviations, n) of `tag` over a configuration's completed runs (its seeds), at
    the steps they all logged; None when none logged it."""
    series = [dict(runs[d].scalars[tag]) for d in dirs if d in runs and tag in runs[d].scalars]
    if not series:
        return None
    steps = sorted(set.intersection(*(set(points) for points in series)))
    values = [[points[s] for points in series] for s in steps]
    spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
    return steps, [statistics.fmean(v) for v in values], spread, len(series)


def pick_lines(configs: dict, runs: dict) -> tuple[list, str]:
    """The configurations drawn: all of them up to MAX_LINES, else the best and the worst by mean final
    val loss, with a note naming how many were left out."""
    def val(label):
        values = [runs[d].final("val/loss") for d in configs[label] if d in runs]
        values = [v for v in values if math.isfinite(v)]
        return statistics.fmean(values) if values else math.inf

    labels = sorted(configs, key=val)
    if len(labels) <= MAX_LINES:
        return labels, ""
    half = MAX_LINES // 2
    return labels[:half] + labels[-half:], (f"{len(labels) - MAX_LINES} of {len(labels)} configurations not drawn: "
                                            f"the {half} best and {half} worst by final val loss are")


def layers_of(runs: dict, prefix: str) -> list[str]:
    """The layer names of the histogram tags `<prefix>/layerN` the runs logged, in order."""
    names = {t.rsplit("/", 1)[1] for r in runs.values() for t in r.histograms if t.startswith(prefix + "/layer")}
    return sorted(names, key=lambda n: int(n.removeprefix("layer")))


def distribution_figure(configs, runs, labels, quantity: str, title: str, note: str, log_density: bool = False):
    """Rows: the hidden layers; columns: step 0 and the last step; one line per configuration (the
    seeds' densities averaged on a common grid), shared axes. `log_density`: a log y axis, for quantities
    whose scale differs by orders of magnitude between configurations (gradients: a linear axis shows the
    narrowest as a spike and flattens every other line to zero)."""
    layers = layers_of(runs, quantity)
    if not layers:
        return None
    fig, axes = plt.subplots(len(layers), 2, figsize=(WIDTH, 2.4 * len(layers) + 1), sharex=True, sharey="row",
                             squeeze=False)
    for row, layer in enumerate(layers):
        tag = f"{quantity}/{layer}"
        for col, which in enumerate(("first", "last")):
            ax = axes[row][col]
            for i, label in enumerate(labels):
                events = [runs[d].histograms[tag] for d in configs[label] if d in runs and tag in runs[d].histograms]
                if not events:
                    continue
                picked = [e[0] if which == "first" else e[-1] for e in events]
                curves = [density(h) for h in picked]
                lo = min(c[0].min() for c in curves)
                hi = max(c[0].max() for c in curves)
                grid = np.linspace(lo, hi, 200)
                y = np.mean([np.interp(grid, x, d, left=0, right=0) for x, d in curves], axis=0)
                ax.plot(grid, y, lw=1.4, label=label, **style(i))
                ax.set_title(f"{layer}, step {picked[0].step:,}" if which == "first" else f"{layer}, last step "
                             f"({picked[0].step:,})", fontsize=9)
            ax.set_ylabel(("density (log)" if log_density else "density") if col == 0 else "", fontsize=8)
            ax.grid(alpha=0.3)
        lines = [line for ax in axes[row] for line in ax.get_lines()]
        if log_density and lines:  # the row shares its y axis: from its highest peak down four decades
            top = max(line.get_ydata().max() for line in lines)
            axes[row][0].set_yscale("log")
            axes[row][0].set_ylim(top * 1e-4, top * 2)
    return finish(fig, axes, title, note)


def series_figure(configs, runs, labels, tags: list[str], title: str, note: str, ylabel: str, guide=None):
    """One panel per tag, one line per configuration over the steps: the seeds' mean, a band of +- one
    standard deviation where there are several seeds."""
    tags = [t for t in tags if any(t in r.scalars for r in runs.values())]
    if not tags:
        return None
    cols = min(len(tags), 3)
    rows = math.ceil(len(tags) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(WIDTH, 3.2 * rows + 1), squeeze=False)
    for k, tag in enumerate(tags):
        ax = axes[k // cols][k % cols]
        for i, label in enumerate(labels):
            drawn = series_line(configs[label], runs, tag)
            if drawn is None:
                continue
            steps, means, spread, n = drawn
            line, = ax.plot(steps, means, lw=1.4, label=f"{label} (n={n})", **style(i))
            if n > 1:
                ax.fill_between(steps, np.subtract(means, spread), np.add(means, spread), color=line.get_color(),
                                alpha=0.2, lw=0)
        if guide is not None:
            ax.axhline(guide, color="black", ls=":", lw=1)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(tags), rows * cols):
        axes[k // cols][k % cols].axis("off")
    return finish(fig, axes, title, note)


def style(i: int) -> dict:
    """Configuration i's colour and line style, the same in every figure."""
    return {"color": plt.cm.tab10(i % 10), "ls": LINE_STYLES[i // 10 % len(LINE_STYLES)]}


def finish(fig, axes, title: str, note: str):
    """One legend for the whole figure, below the panels (it names each configuration by its swept values)."""
    handles, labels = axes[0][0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * math.ceil(len(labels) / 3), 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    return fig


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def loss_table(configs: dict, runs: dict, missing: dict) -> str:
    """The loss table as markdown: per configuration n, train and val loss (mean ± sd over seeds)."""
    lines = ["| configuration | n | train loss | val loss |", "|---|---|---|---|"]
    for label, dirs in configs.items():
        done = [runs[d] for d in dirs if d in runs]
        lines.append(f"| {label} | {len(done)} | {mean_sd([r.final('final/train_loss') for r in done])} | "
                     f"{mean_sd([r.final('final/val_loss') for r in done])} |")
    if missing:
        lines += ["", "**Not drawn** (no completed run to read): " + ", ".join(
            f"`{Path(d).name}` ({why})" for d, why in missing.items())]
    return "\n".join(lines)


def status_of(run_dir: Path) -> str:
    import yaml

    path = run_dir / "status.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("status", "unknown") if path.exists() else "not started"


def compare_dir(sweep_dir: Path) -> Path:
    """<sweep dir>/compare, emptied of what an earlier comparison wrote; a folder there that is not ours is refused."""
    out = sweep_dir / "compare"
    if out.exists():
        if not (out / MARKER).exists():
            raise SystemExit(f"error: {out} exists and was not written by actgrad.compare: move it away to write "
                             "the comparison there")
        for f in out.glob("events.out.tfevents.*"):
            f.unlink()
    out.mkdir(exist_ok=True)
    (out / MARKER).write_text("written by actgrad.compare; rewritten on each comparison\n")
    return out


def compare(sweep_dir) -> Path | None:
    """Write <sweep dir>/compare from the runs' event files; None when no run completed."""
    sweep_dir = Path(sweep_dir)
    configs = configurations(sweep_dir)
    missing, runs = {}, {}
    for dirs in configs.values():
        for d in dirs:
            status = status_of(d)
            if status == "completed":
                runs[d] = RunEvents(d)
            else:
                missing[d] = status
    if not runs:
        return None
    labels, note = pick_lines(configs, runs)
    figures = {
        "compare/activations": distribution_figure(configs, runs, labels, "act", "activation distribution per layer "
                                                   "(lecture's histogram figure, across the sweep)", note),
        "compare/activation_gradients": distribution_figure(configs, runs, labels, "act_grad",
                                                            "activation gradient distribution per layer", note,
                                                            log_density=True),
        "compare/saturation": series_figure(configs, runs, labels, sorted_tags(runs, "act/saturation/"),
                                            "saturation: share of units in the flat part of the nonlinearity", note,
                                            "share"),
        "compare/val_loss": series_figure(configs, runs, labels, ["val/loss"], "val loss", note, "loss"),
        "compare/update_ratio": series_figure(configs, runs, labels, [t for t in sorted_tags(runs, "update_ratio/")
                                                                      if not t.endswith("/guide")],
                                              "update:data ratio, log10(std(update) / std(param)); healthy near -3",
                                              note, "log10", guide=-3.0),
    }
    from torch.utils.tensorboard import SummaryWriter  # here: the sweep's parent imports no torch

    out = compare_dir(sweep_dir)
    writer = SummaryWriter(str(out))
    for tag, fig in figures.items():
        if fig is not None:
            writer.add_figure(tag, fig, 0)  # closes the figure
    writer.add_text("Sweep loss table", loss_table(configs, runs, missing), 0)  # in TEXT after "Start here"
    writer.close()
    return out


def sorted_tags(runs: dict, prefix: str) -> list[str]:
    """The runs' tags under `prefix` in the network's order: the embedding, layer1, layer2, ..., the output."""
    def order(tag):
        where = tag.removeprefix(prefix).split(".")[0]
        if where.startswith("layer") and where[5:].isdigit():
            return 1, int(where[5:]), tag
        return (0 if where == "embedding" else 2), 0, tag

    return sorted({t for r in runs.values() for t in r.scalars if t.startswith(prefix)}, key=order)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write a sweep's comparison run, <sweep dir>/compare.")
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        sys.exit(f"error: {args.sweep_dir}: not a directory")
    out = compare(args.sweep_dir)
    print(f"comparison: {out}" if out else f"no completed run in {args.sweep_dir}: nothing to compare")


if __name__ == "__main__":
    main()
