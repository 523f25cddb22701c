"""The lecture's "loss log" for a sweep: one row per run, read back from its event files.

    python scripts/report.py outputs/multirun/<date>_<time>

Prints the table and writes report.md, report.csv, loss_curves.png and saturation.png into
the sweep directory.
"""

import argparse
import collections
import csv
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from actgrad.events import scalars as read_scalars  # noqa: E402

COLUMNS = ["run", "status", "initial loss", "ln(V)", "train loss", "val loss", "test loss", "peak saturation",
           "final update ratio (log10, weights)"]




def last(series, tag):
    return series[tag][-1][1] if tag in series else math.nan


def summarise(run_dir: Path, sweep_dir: Path) -> tuple[dict, dict]:
    status = yaml.safe_load((run_dir / "status.yaml").read_text()) or {}
    series = read_scalars(run_dir) if any(run_dir.glob("events.out.tfevents.*")) else {}
    saturation = [v for tag, points in series.items() if tag.startswith("act/saturation/") for _, v in points]
    ratios = {tag.removeprefix("update_ratio/"): points[-1][1] for tag, points in series.items()
              if tag.startswith("update_ratio/") and tag.endswith(".weight")}
    row = {
        "run": str(run_dir.relative_to(sweep_dir)),
        "status": status.get("status", "?") + (f" ({status['error']})" if status.get("status") == "failed" else ""),
        "initial loss": series["init/loss"][0][1] if "init/loss" in series else math.nan,
        "ln(V)": last(series, "init/uniform_loss"),
        "train loss": last(series, "final/train_loss"),
        "val loss": last(series, "final/val_loss"),
        "test loss": last(series, "final/test_loss"),
        "peak saturation": max(saturation) if saturation else math.nan,
        "final update ratio (log10, weights)": " ".join(f"{k}:{v:.2f}" for k, v in ratios.items()),
    }
    return row, series


def fmt(value):
    """2.0712 as a loss reads; 3.8e+31 (a diverged run's loss) rather than 32 digits; nan as -."""
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4f}" if value == 0 or 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def markdown(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def plot(all_series, tags, title, ylabel, path, reduce=None, clip=False):
    """One line per run; `reduce` merges several tags of a run (e.g. the layers) into one series;
    `clip` cuts the y axis at 1.5x the highest run median, so one run's early spike (naive init
    starts at ~26) does not flatten the others."""
    fig, ax = plt.subplots(figsize=(9, 5))
    medians = []
    for run, series in all_series.items():
        matching = [series[t] for t in series if any(t.startswith(prefix) for prefix in tags)]
        if not matching:
            continue
        if reduce:
            by_step = collections.defaultdict(list)
            for points in matching:
                for step, value in points:
                    by_step[step].append(value)
            steps = sorted(by_step)
            values = [reduce(by_step[s]) for s in steps]
        else:
            steps, values = zip(*matching[0])
        ax.plot(steps, values, label=run)
        finite = [v for v in values if math.isfinite(v)]  # a diverged run ends in nan
        if finite:
            medians.append(statistics.median(finite))
    if clip and medians:
        ax.set_ylim(top=1.5 * max(medians))
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(sweep_dir: Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    run_dirs = sorted(p.parent for p in sweep_dir.glob("**/status.yaml"))
    if not run_dirs:
        raise SystemExit(f"error: {sweep_dir}: no runs (no status.yaml below it); give a sweep directory")
    rows, all_series = [], {}
    for run_dir in run_dirs:
        row, series = summarise(run_dir, sweep_dir)
        rows.append(row)
        all_series[row["run"]] = series
    (sweep_dir / "report.md").write_text(markdown(rows) + "\n")
    with open(sweep_dir / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(all_series, ["train/loss"], "training loss (mean over each logging interval)", "loss",
         sweep_dir / "loss_curves.png", clip=True)
    plot(all_series, ["act/saturation/"], "tanh saturation, worst layer", "share of saturated units",
         sweep_dir / "saturation.png", reduce=max)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args()
    rows = report(args.sweep_dir)
    print(markdown(rows))
    print(f"\nwritten: {args.sweep_dir}/report.md, report.csv, loss_curves.png, saturation.png")


if __name__ == "__main__":
    main()
