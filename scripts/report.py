"""The lecture's "loss log" for a sweep, read back from its runs' event files.

    python scripts/report.py outputs/multirun/<date>_<time>

Runs that differ only in `seed` are repeats of one configuration (actgrad.configurations): with
several seeds, one row per configuration, each number the mean +- standard deviation over its
completed runs, n of them, the others named; pairs of rows whose val losses differ by less than the
seed spread are listed under the table. With one seed each, one row per run. The lecture's own rows
come first, in its order, beside its published losses. Prints the table and writes report.md,
report.csv (one row per run), loss_curves.png and saturation.png into the sweep directory.
"""

import argparse
import collections
import csv
import itertools
import math
import shlex
import statistics
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from actgrad.configurations import configurations, seed_of  # noqa: E402
from actgrad.compare import compare  # noqa: E402
from actgrad.events import scalars as read_scalars  # noqa: E402

COLUMNS = ["run", "status", "initial loss", "ln(V)", "train loss", "val loss", "test loss", "peak saturation",
           "final update ratio (log10, weights)"]
NUMBERS = ["initial loss", "ln(V)", "train loss", "val loss", "test loss", "peak saturation"]
RATIOS = "final update ratio (log10, weights)"

# The lecture's loss table (makemore part 3, notebook makemore_part3_bn: 1 hidden layer of 200 tanh units,
# n_embd 10, block_size 3, 200,000 SGD steps of batch 32, lr 0.1 then 0.01 from step 100,000), in its order:
# (init, norm, the lecture's name for the row, its train loss, its val loss as it prints them: 2.07 is not 2.0700).
LECTURE = [
    ("naive", "none", "original", "2.1245", "2.1682"),
    ("scaled_output", "none", "output layer scaled", "2.07", "2.13"),
    ("scaled", "none", "hidden layer also scaled", "2.0356", "2.1027"),
    ("kaiming", "none", "kaiming init", "2.0377", "2.1070"),
    ("kaiming", "batchnorm", "kaiming + batchnorm", "2.0668", "2.1048"),
]
# What a run shares with the lecture's to be one of its rows (any number of steps: a short run is compared too)
LECTURE_SETTINGS = {"model._target_": "actgrad.model.MLP", "model.n_layers": 1, "model.n_hidden": 200,
                    "model.n_embd": 10, "model.activation": "tanh", "data.block_size": 3, "data.batch_size": 32,
                    "optimizer._target_": "actgrad.optim.SGD", "optimizer.lr": 0.1, "optimizer.momentum": 0.0,
                    "optimizer.weight_decay": 0.0, "scheduler._target_": "actgrad.schedule.step_decay",
                    "scheduler.at": [0.5], "scheduler.gamma": 0.1}


def last(series, tag):
    return series[tag][-1][1] if tag in series else math.nan


def read_yaml(path: Path) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def summarise(run_dir: Path, sweep_dir: Path) -> tuple[dict, dict]:
    status = read_yaml(run_dir / "status.yaml")
    series = read_scalars(run_dir) if any(run_dir.glob("events.out.tfevents.*")) else {}
    saturation = [v for tag, points in series.items() if tag.startswith("act/saturation/") for _, v in points]
    ratios = {tag.removeprefix("update_ratio/"): points[-1][1] for tag, points in series.items()
              if tag.startswith("update_ratio/") and tag.endswith(".weight")}
    row = {
        "run": str(run_dir.relative_to(sweep_dir)),
        "status": status.get("status", "not started") + (f" ({status['error']})" if status.get("status") == "failed" else ""),
        "initial loss": series["init/loss"][0][1] if "init/loss" in series else math.nan,
        "ln(V)": last(series, "init/uniform_loss"),
        "train loss": last(series, "final/train_loss"),
        "val loss": last(series, "final/val_loss"),
        "test loss": last(series, "final/test_loss"),
        "peak saturation": max(saturation) if saturation else math.nan,
        RATIOS: " ".join(f"{k}:{v:.2f}" for k, v in ratios.items()),
        "ratios": ratios,
        "completed": status.get("status") == "completed",
        "lecture": lecture_row(run_dir),
    }
    return row, series


def lecture_row(run_dir: Path) -> int | None:
    """Which of the lecture's rows a run is (its index in LECTURE): its init and norm options, with the lecture's
    net, data and optimizer."""
    choices = read_yaml(run_dir / ".hydra" / "hydra.yaml").get("hydra", {}).get("runtime", {}).get("choices", {})
    config = read_yaml(run_dir / "run.yaml").get("run_config", {})
    if any(config.get(key) != value for key, value in LECTURE_SETTINGS.items()):
        return None
    return next((i for i, (init, norm, *_) in enumerate(LECTURE)
                 if choices.get("init") == init and choices.get("norm") == norm), None)


def fmt(value):
    """2.0712 as a loss reads; 3.8e+31 (a diverged run's loss) rather than 32 digits; nan as -."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def spread(values: list[float]) -> str:
    """mean +- sample standard deviation of a configuration's runs; one run's value as it is."""
    if len(set(values)) < 2:  # one run, or a number every run shares (ln(V))
        return fmt(values[0]) if values else "-"
    sd = statistics.stdev(values)
    return f"{fmt(statistics.fmean(values))} ± " + (f"{sd:.4f}" if sd < 1e4 else f"{sd:.4g}")


def configuration_row(label: str, runs: list[dict]) -> dict:
    """One configuration's row: its completed runs' numbers averaged, n of them; the other runs named, not averaged."""
    done = [r for r in runs if r["completed"]]
    row = {"configuration": label, "n": len(done),
           "lecture": next((r["lecture"] for r in runs if r["lecture"] is not None), None),
           "missing": "; ".join(f"{r['seed']}: {r['status']}" for r in runs if not r["completed"]) or "-",
           "values": {c: [r[c] for r in done if not math.isnan(r[c])] for c in NUMBERS}}
    row.update({c: spread(values) for c, values in row["values"].items()})
    ratios = collections.defaultdict(list)
    for r in done:
        for weight, value in r["ratios"].items():
            ratios[weight].append(value)
    row[RATIOS] = " ".join(f"{k}:{statistics.fmean(v):.2f}" for k, v in ratios.items())
    return row


def with_lecture(columns: list[str], rows: list[dict]) -> list[str]:
    """The columns, with the lecture's row name and published losses beside ours when a row is one of its rows."""
    for row in rows:
        _, _, row["lecture row"], row["lecture train"], row["lecture val"] = (
            LECTURE[row["lecture"]] if row["lecture"] is not None else ("", "", "-", "-", "-"))
    if all(row["lecture"] is None for row in rows):
        return columns
    columns = list(columns)
    columns.insert(columns.index("initial loss"), "lecture row")
    for ours, theirs in (("train loss", "lecture train"), ("val loss", "lecture val")):
        columns.insert(columns.index(ours) + 1, theirs)
    return columns


def lecture_first(rows: list[dict]) -> list[dict]:
    """The lecture's rows first, in its order; then the others as they came."""
    return sorted(rows, key=lambda row: len(LECTURE) if row["lecture"] is None else row["lecture"])


def markdown(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def indistinguishable(rows: list[dict], metric: str = "val loss") -> list[tuple[str, str, float, float]]:
    """(a, b, |difference of means|, 2 sqrt(s_a^2/n_a + s_b^2/n_b)) for each pair of configurations with
    2 or more completed runs whose `metric` differs by less than that: the seeds' spread could make it."""
    pairs = []
    for a, b in itertools.combinations([r for r in rows if len(r["values"][metric]) >= 2], 2):
        x, y = a["values"][metric], b["values"][metric]
        difference = abs(statistics.fmean(x) - statistics.fmean(y))
        threshold = 2 * math.sqrt(statistics.variance(x) / len(x) + statistics.variance(y) / len(y))
        if difference < threshold:
            pairs.append((a["configuration"], b["configuration"], difference, threshold))
    return pairs


def footnote(rows: list[dict], metric: str = "val loss") -> str:
    pairs = indistinguishable(rows, metric)
    head = f"Not distinguishable by {metric} (|difference of means| < 2 sqrt(s1^2/n1 + s2^2/n2)): "
    lines = [head + ("none: every pair of rows differs by more than its seeds' spread" if not pairs else
                     "; ".join(f"{a} and {b} ({d:.4f} < {t:.4f})" for a, b, d, t in pairs))]
    alone = [r["configuration"] for r in rows if len(r["values"][metric]) < 2]
    if alone:
        lines.append(f"Not compared (fewer than 2 completed seeds, no spread to judge by): {', '.join(alone)}")
    return "\n\n".join(lines)


def plot(groups, tags, title, ylabel, path, reduce=None, start=None):
    """One line per run, one colour and legend entry per configuration (`groups`: {label: its runs' series});
    `reduce` merges several tags of a run (e.g. the layers) into one series. `start`: the tag of the loss
    before training (init/loss), drawn at step 0 on a log axis, as the lecture plots log10 of the loss:
    the naive run's start (~27) shows, and the runs' ends stay apart. A diverged run's 1e31 is cut off."""
    fig, ax = plt.subplots(figsize=(9, 5))
    colours = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20")
    highest = []
    for i, (label, runs) in enumerate(groups.items()):
        drawn = False
        for series in runs:
            matching = [series[t] for t in series if any(t.startswith(prefix) for prefix in tags)]
            if not matching:
                continue
            by_step = collections.defaultdict(list)
            for points in matching if reduce else matching[:1]:
                for step, value in points:
                    by_step[step].append(value)
            if start in series:
                by_step[0] = [series[start][0][1]]
            steps = sorted(by_step)
            values = [reduce(by_step[s]) if reduce else by_step[s][0] for s in steps]
            ax.plot(steps, values, color=colours(i % colours.N), label=None if drawn else label, lw=1)
            drawn = True
            highest += [v for v in values[:2] if math.isfinite(v)]  # the start, where a loss is highest
    if start and highest:
        ax.set_yscale("log")
        ax.set_ylim(top=1.2 * max(highest))
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FormatStrFormatter("%g"))  # 2, 3, 20, not 2 x 10^0
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, f"no run logged {', '.join(tags)}", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep_dir: Path) -> list[dict]:
    """Write report.md (the table; with several seeds, the footnote), report.csv and the plots; each run's row."""
    sweep_dir = Path(sweep_dir)
    groups = configurations(sweep_dir)
    if not groups:
        raise SystemExit(f"error: {shlex.quote(str(sweep_dir))}: no runs (no status.yaml below it); "
                         "give a sweep directory")
    runs, series = {}, {}
    for label, dirs in groups.items():
        for run_dir in dirs:
            runs[run_dir], series[run_dir] = summarise(run_dir, sweep_dir)
            runs[run_dir].update(configuration=label, seed=seed_of(run_dir))
    if all(len(dirs) == 1 for dirs in groups.values()):  # one seed each: a row per run
        rows = lecture_first(list(runs.values()))
        text = markdown(rows, with_lecture(COLUMNS, rows))
    else:
        rows = lecture_first([configuration_row(label, [runs[d] for d in dirs]) for label, dirs in groups.items()])
        columns = ["configuration", "n", "missing", *NUMBERS, RATIOS]
        text = markdown(rows, with_lecture(columns, rows)) + "\n\n" + footnote(rows)
    (sweep_dir / "report.md").write_text(text + "\n")
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["configuration", *COLUMNS], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(runs.values())
    by_label = {label: [series[d] for d in groups[label]] for label in dict.fromkeys(r["configuration"] for r in rows)}
    plot(by_label, ["train/loss"], "training loss (mean over each logging interval; step 0: the initial loss)",
         "loss (log scale)", sweep_dir / "loss_curves.png", start="init/loss")
    plot(by_label, ["act/saturation/"], "tanh saturation, worst layer", "share of saturated units",
         sweep_dir / "saturation.png", reduce=max)
    return list(runs.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    report(args.sweep_dir)
    print((args.sweep_dir / "report.md").read_text(), end="")
    print(f"\nwritten into {shlex.quote(str(args.sweep_dir))}: report.md, report.csv, loss_curves.png, saturation.png")
    out = compare(args.sweep_dir)  # the sweep's comparison run, rewritten from what the runs logged
    if out is not None:
        print(f"comparison figures: tensorboard --logdir {shlex.quote(str(out))}")


if __name__ == "__main__":
    main()
