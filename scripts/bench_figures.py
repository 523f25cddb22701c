"""CPU time of drawing one diagnostic figure into TensorBoard: the two-panel distribution figure
(figures/act, act_grad, param_grad: the first step beside the current one) and figures/update_ratio.

    python scripts/bench_figures.py                          # this checkout
    python scripts/bench_figures.py --before /tmp/wt_before  # another checkout too (git worktree add /tmp/wt_before <commit>)
    python scripts/bench_figures.py --layers 5                # 5 hidden layers: 5-7 lines a panel, longer legends

Each checkout is measured in a fresh process (its own imports, one torch thread), in turn, round
after round, so slow spells of a shared machine hit both alike. The data is that of the default
model (--layers 1: one tanh layer of 200, batch 32; 2,000 update ratios, 200k steps every 100).
A figure's time is process CPU time (the event writer's thread included, flushed), the first
figure of a process apart (imports and font caches), then the median over the rest.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def curves(seed: int, layers: int = 1, hidden: int = 200) -> dict:
    """One watched step of DistributionFigures.pending: {tag: {label: (tensor, [statistics])}}."""
    import torch

    g = torch.Generator().manual_seed(seed)
    shapes = {"embedding.weight": (27, 10), "layer1.linear.weight": (30, hidden), **{
        f"layer{i}.linear.weight": (hidden, hidden) for i in range(2, layers + 1)}, "output.weight": (hidden, 27)}
    act, act_grad, param_grad = {}, {}, {}
    for i in range(1, layers + 1):
        out = torch.tanh(torch.randn(32, hidden, generator=g) * (1 + i / 2))
        grad = torch.randn(32, hidden, generator=g) * 1e-3 / i
        act[f"layer{i} (Tanh)"] = (out, [out.mean(), out.std(), (out.abs() > 0.97).float().mean()])
        act_grad[f"layer{i}"] = (grad, [grad.mean(), grad.std()])
    for name, shape in shapes.items():
        g_ = torch.randn(*shape, generator=g) * 1e-3
        param_grad[f"{name} {shape}"] = (g_, [g_.mean(), g_.std(), g_.std() / 0.1])
    return {"figures/act": act, "figures/act_grad": act_grad, "figures/param_grad": param_grad}


def measure(repeats: int, layers: int) -> dict:
    """In this process: seconds of CPU per figure, {"distribution"|"update_ratio": [first, rest...]}."""
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    from actgrad.writer import Writer
    from actgrad.callbacks.figures import DistributionFigures
    from actgrad.callbacks.update_ratio_figure import UpdateRatioFigure

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        logger = TensorBoardLogger(save_dir=tmp, name="", version="")
        times = {"distribution": [], "update_ratio": []}
        figures = DistributionFigures(every_n_steps=1)
        figures.writer = Writer([logger])
        figures.pending = [(0, curves(0, layers))]
        figures.draw()  # the start: one-panel figures, not timed
        for r in range(repeats):
            figures.pending = [(1000 * (r + 1), curves(r + 1, layers))]
            start = time.process_time()
            figures.draw()
            logger.experiment.flush()
            times["distribution"].append((time.process_time() - start) / len(FIGURE_TAGS))
        ratios = UpdateRatioFigure(every_n_steps=100)
        ratios.writer = Writer([logger])
        g = torch.Generator().manual_seed(0)
        ratios.names = ["embedding.weight", *(f"layer{i}.linear.weight" for i in range(1, layers + 1)), "output.weight"]
        ratios.steps = list(range(0, 200_000, 100))
        ratios.history = list((-3 + 0.01 * torch.randn(len(ratios.steps), len(ratios.names), generator=g).cumsum(0)).unbind(0))
        for r in range(repeats):
            ratios.history[-1] = ratios.history[-1] + 0.01  # a different figure each time
            start = time.process_time()
            ratios.draw(200_000 + r)
            logger.experiment.flush()
            times["update_ratio"].append(time.process_time() - start)
        logger.experiment.close()
    return times


FIGURE_TAGS = ("figures/act", "figures/act_grad", "figures/param_grad")


def run(tree: Path, repeats: int, layers: int) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{tree / 'src'}{os.pathsep}{tree}", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--child", str(repeats), "--layers", str(layers)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="figures of each kind per process")
    parser.add_argument("--layers", type=int, default=1, help="hidden layers (of 200 units): 1 the default model, 5 the deep one")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.layers)))
        return
    trees = {"before": args.before, "after": ROOT} if args.before else {"this": ROOT}
    results = {name: {"distribution": [], "update_ratio": [], "first": []} for name in trees}
    for _ in range(args.rounds):
        for name, tree in trees.items():
            times = run(tree, args.repeats, args.layers)
            results[name]["first"].append(times["distribution"][0])
            for kind in ("distribution", "update_ratio"):
                results[name][kind] += times[kind][1:]
    print(f"{args.layers} hidden layer(s); ms of CPU per figure, median of {args.rounds} rounds x {args.repeats - 1} figures (a process's first apart)")
    print(f"{'':8} {'two-panel distribution':>24} {'update ratio':>14} {'first distribution':>20}")
    for name, r in results.items():
        print(f"{name:8} {1000 * statistics.median(r['distribution']):24.1f} {1000 * statistics.median(r['update_ratio']):14.1f}"
              f" {1000 * statistics.median(r['first']):20.1f}")


if __name__ == "__main__":
    main()
