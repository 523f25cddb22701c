"""Wall time and peak memory of sweeps under each launcher, against one single run measured in
the same round (median of the rounds' ratios), plus the bare stacked step against a single step.

    python scripts/bench_sweep.py --data names.txt --steps 20000 --rounds 3
    python scripts/bench_sweep.py --data names.txt --steps 200000 --rounds 1 --sweeps lecture --launchers parallel stacked
    python scripts/bench_sweep.py --data names.txt --steps 100000 --rounds 5 --sweeps custom --launchers stacked --check

Sweeps: `lecture` is the lecture's six runs (init=naive,scaled,kaiming norm=none,batchnorm);
`grid` is 24 runs, init (naive, scaled, kaiming, xavier) x lr (0.02 ... 0.5); `custom` is 4 seeds of a
user's nn.Sequential (`custom_mlp` below: Embedding, Flatten, Linear, BatchNorm1d, Tanh, Linear) given as
`model=custom model._target_=bench_sweep.custom_mlp`, against one run of that model. Launchers: `local`
(one job after another), `parallel` (joblib processes), `stacked` (the default of -m). `--check`: each
member's final val loss against its own single run's (the last round's sweep; one single run per member).
Peak memory is the largest process's peak RSS (a stacked group's process holds all its members).
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = {
    "lecture": ["init=naive,scaled,kaiming", "norm=none,batchnorm"],
    "grid": ["init=naive,scaled,kaiming,xavier", "optimizer.lr=0.02,0.05,0.1,0.2,0.3,0.5"],
    "custom": ["seed=1,2,3,4"],
}
MODEL = {"custom": ["model=custom", "model._target_=bench_sweep.custom_mlp"]}  # a sweep's model, and its single run's
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))}


def custom_mlp(vocab_size, block_size, n_embd=10, n_hidden=200):
    """A user's network of torch.nn blocks, the lecture's MLP written as one nn.Sequential."""
    import torch.nn as nn

    return nn.Sequential(nn.Embedding(vocab_size, n_embd), nn.Flatten(), nn.Linear(block_size * n_embd, n_hidden, bias=False),
                         nn.BatchNorm1d(n_hidden, momentum=0.001), nn.Tanh(), nn.Linear(n_hidden, vocab_size))

# Runs train.py as its only child and prints the largest peak RSS among it and its descendants.
MEASURE = ("import resource, subprocess, sys; out = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
           "sys.stderr.write(out.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.exit(out.returncode)")


def timed(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `python train.py *args`."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, str(ROOT / "train.py"), *args],
                         cwd=ROOT, capture_output=True, text=True, env=ENV)
    if out.returncode:
        raise SystemExit(f"train.py {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, int(out.stdout.split()[-1]) / 1024


def single(data: list[str], steps: int, model: list[str], run_dir: str | None = None) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as temporary:
        return timed([f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false",
                      f"hydra.run.dir={run_dir or temporary}", *model, *data])


def sweep(name: str, launcher: str, data: list[str], steps: int, sweep_dir: str) -> tuple[float, float]:
    return timed(["-m", *SWEEPS[name], *MODEL.get(name, []), f"trainer.max_steps={steps}",
                  "trainer.enable_progress_bar=false", f"hydra/launcher={launcher}", f"hydra.sweep.dir={sweep_dir}", *data])


def final_val_loss(run_dir: Path) -> float:
    import yaml

    return float(yaml.safe_load((run_dir / "status.yaml").read_text())["final/val_loss"])


def check_members(name: str, data: list[str], steps: int, sweep_dir: Path) -> float:
    """The largest difference between a member's final val loss and its own single run's."""
    worst = 0.0
    for member in sorted(p.parent for p in sweep_dir.glob("*/status.yaml")):
        with tempfile.TemporaryDirectory() as run_dir:
            single(data, steps, [*MODEL.get(name, []), *member.name.split(",")], run_dir)
            alone = final_val_loss(Path(run_dir))
        mine = final_val_loss(member)
        print(f"{name}, {member.name}: stacked {mine:.7f}, single {alone:.7f}", file=sys.stderr)
        worst = max(worst, abs(mine - alone))
    return worst


def us_per_step(step, steps: int) -> float:
    """us per call of `step` over `steps` calls, after 200 to warm up."""
    for _ in range(200):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e6


def bare_steps(members: int, norm: bool, steps: int = 2000) -> tuple[float, float]:
    """us per step of one single model and of `members` stacked, hand-written loops, one thread."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from actgrad import init
    from actgrad.model import MLP
    from actgrad.optim import SGD
    from actgrad.stacking import stack

    torch.set_num_threads(1)

    def nets(n):
        out = []
        for seed in range(n):
            torch.manual_seed(seed)
            net = MLP(27, 3, 10, 200, 1, norm=(lambda h: nn.BatchNorm1d(h, momentum=0.001)) if norm else None)
            init.kaiming(net)
            out.append(net)
        return out

    def loop(net, m):
        shape = (m, 32) if m else (32,)
        x, y = torch.randint(0, 27, (*shape, 3)), torch.randint(0, 27, shape)
        optimizer = SGD(net.parameters(), lr=0.1)

        def step():
            logits = net(x)  # one model: (batch, vocab); stacked: (members, vocab, batch)
            loss = F.cross_entropy(logits, y, reduction="none").mean(-1).sum()
            optimizer.clear_grads()
            loss.backward()
            optimizer.update()

        return us_per_step(step, steps)

    return loop(nets(1)[0], 0), loop(stack(nets(members), 3), members)


def by_hand(members: int, steps: int = 2000) -> tuple[float, float, float]:
    """us per step of one `custom_mlp` (the custom sweep's model), of `members` of it stacked in plain torch
    ops without actgrad (batched matmuls, one BatchNorm over members x features: the floor of the stacked
    form) and of `members` of it stacked by actgrad.stack, to tell actgrad's cost from the form's. The three
    loops update the parameters alike, one thread."""
    import torch
    import torch.nn.functional as F

    from actgrad.stacking import stack

    torch.set_num_threads(1)
    m, batch, block, vocab, n_embd, hidden = members, 32, 3, 27, 10, 200
    one = custom_mlp(vocab, block)
    shapes = [(m, *p.shape) for p in one.parameters()]  # table, w1, gain, shift, w2, b2
    params = [(torch.randn(*shape) * 0.1).requires_grad_() for shape in shapes]
    table, w1, gain, shift, w2, b2 = params
    mean, var = torch.zeros(m * hidden), torch.ones(m * hidden)
    offsets = torch.arange(m).view(-1, 1) * vocab
    x, y = torch.randint(0, vocab, (m, batch, block)), torch.randint(0, vocab, (m, batch))

    def stacked_loss():
        rows = table.view(m * vocab, n_embd).index_select(0, (x.view(m, -1) + offsets).view(-1))
        h = torch.bmm(w1, rows.view(m, batch, -1).transpose(1, 2))  # (members, hidden, batch)
        h = F.batch_norm(h.reshape(1, m * hidden, batch), mean, var, gain.view(-1), shift.view(-1), True, 0.001, 1e-5)
        logits = torch.baddbmm(b2.unsqueeze(2), w2, torch.tanh(h).view(m, hidden, batch))
        return F.cross_entropy(logits, y, reduction="none").mean(1).sum()

    def timed_loop(loss_of, weights):
        def step():
            loss = loss_of()
            for p in weights:
                p.grad = None
            loss.backward()
            with torch.no_grad():
                for p in weights:
                    p.sub_(p.grad, alpha=0.1)

        return us_per_step(step, steps)

    single = timed_loop(lambda: F.cross_entropy(one(x[0]), y[0]), list(one.parameters()))
    net = stack([custom_mlp(vocab, block) for _ in range(m)], block)
    ours = timed_loop(lambda: F.cross_entropy(net(x), y, reduction="none").mean(1).sum(), list(net.parameters()))
    return single, timed_loop(stacked_loss, params), ours


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="names file (data.path); default: the config's")
    parser.add_argument("--steps", type=int, nargs="+", default=[20000], help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--launchers", nargs="+", default=["local", "parallel", "stacked"],
                        choices=["local", "parallel", "stacked"])
    parser.add_argument("--check", action="store_true", help="each member's final val loss against its single run's")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare stacked step")
    args = parser.parse_args()
    data = [f"data.path={Path(args.data).absolute()}"] if args.data else []
    print("| sweep | steps | launcher | wall time (median) | vs one single run | peak RSS, largest process |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        for name in args.sweeps:
            rows = {launcher: [] for launcher in args.launchers}
            singles = []
            for r in range(args.rounds):
                one = single(data, steps, MODEL.get(name, []))
                singles.append(one)
                for launcher in args.launchers:
                    with tempfile.TemporaryDirectory() as sweep_dir:
                        seconds, rss = sweep(name, launcher, data, steps, sweep_dir)
                        if args.check and r == args.rounds - 1:
                            worst = check_members(name, data, steps, Path(sweep_dir))
                            print(f"{name}, {launcher}: largest |member - its single run| of final val loss "
                                  f"{worst:.2g}", file=sys.stderr)
                    rows[launcher].append((seconds, rss, seconds / one[0]))
                    print(f"round {r + 1}, {name}, {steps} steps: single {one[0]:.1f} s, {launcher} {seconds:.1f} s "
                          f"({seconds / one[0]:.2f}x)", file=sys.stderr)
            one_s, one_rss = statistics.median(s for s, _ in singles), statistics.median(m for _, m in singles)
            print(f"| {name} ({runs(name)} runs) | {steps:,} | one single run | {one_s:.1f} s | 1.00x | "
                  f"{one_rss:.0f} MB |")
            for launcher, got in rows.items():
                print(f"| {name} ({runs(name)} runs) | {steps:,} | {launcher} | "
                      f"{statistics.median(s for s, _, _ in got):.1f} s | {statistics.median(x for _, _, x in got):.2f}x | "
                      f"{statistics.median(m for _, m, _ in got):.0f} MB |")
    if args.no_bare:
        return
    print("\nbare step, hand-written loops, one thread (no Lightning, no logging):")
    for norm in (False, True):
        for members in (3, 6, 12, 24):
            one, stacked = bare_steps(members, norm)
            print(f"  {'BatchNorm' if norm else 'no norm'}, {members} stacked: {stacked:.0f} us against {one:.0f} us "
                  f"for one ({stacked / one:.2f}x the time for {members}x the runs; {stacked / members:.0f} us per run)")
    print("the custom sweep's model (an nn.Sequential), stacked in plain torch ops and by actgrad.stack, against one:")
    for members in (1, 2, 4):
        one, by_hand_us, ours = by_hand(members)
        print(f"  {members} stacked: by hand {by_hand_us:.0f} us ({by_hand_us / one:.2f}x one), actgrad.stack {ours:.0f} us "
              f"({ours / one:.2f}x), one {one:.0f} us")


def runs(name: str) -> int:
    return math.prod(len(part.split("=", 1)[1].split(",")) for part in SWEEPS[name])


if __name__ == "__main__":
    main()
