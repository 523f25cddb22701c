"""Start-up and shut-down of one run and of a stacked sweep, from timestamps the runs log:
command -> the sweep's launch line -> "training ..." lines -> first train/loss event -> last one -> exit.

    python scripts/bench_startup.py --data names.txt --steps 20000 --rounds 3
    python scripts/bench_startup.py --data names.txt --before /tmp/before  # and another commit, in the same rounds

(`--before DIR`: a tree of that commit, e.g. `git archive <commit> | tar -x -C DIR`, run with DIR/src first
on PYTHONPATH; its callbacks/ is linked in as actgrad/callbacks, as the install does.)

The sweep is `-m init=naive,scaled,kaiming` (3 jobs; hydra/launcher=stacked, the default of -m). On a
2-core machine that is 2 groups trained at once: 2 runs stacked, and 1 trained alone. A sweep's figures
are its slowest job's: its first step is when every group trains, its last step the last one taken.
"First step" is the wall time of the first train/loss event, written after the first
`log_every_n_steps` (100) steps, less one such interval as timed between the first two events.
Each figure is the median over the rounds; the single run and the sweep alternate within a round.
"""

import argparse
import datetime
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ["-m", "init=naive,scaled,kaiming"]
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")  # Hydra's log lines: [%(asctime)s]...


def logged_at(line: str) -> float | None:
    """The time.time() of a log line's timestamp (local time, milliseconds), or None."""
    found = STAMP.match(line)
    return datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if found else None


def first_line(lines: list[str], pattern: str) -> float | None:
    return next((t for line in lines if re.search(pattern, line) and (t := logged_at(line)) is not None), None)


def loss_times(run_dir: Path) -> list[tuple[int, float]]:
    """(step, wall time) of each train/loss event of a run, by step."""
    from actgrad.events import accumulate

    return sorted((e.step, e.wall_time) for e in accumulate(run_dir).Scalars("train/loss"))


def steps_of(run_dirs: list[Path]) -> tuple[float, float]:
    """(first step, last step) over runs: the latest first step (every run training) and the latest last one."""
    firsts, lasts = [], []
    for run_dir in run_dirs:
        events = loss_times(run_dir)
        (s1, t1), (s2, t2) = events[0], events[1]
        firsts.append(t1 - (t2 - t1) * s1 / (s2 - s1))  # back to step 0 at the pace of the next interval
        lasts.append(events[-1][1])
    return max(firsts), max(lasts)


def measure(root: Path, args: list[str], out_dir: Path, sweep: bool) -> dict:
    """Seconds from the command to each mark, and from the last step to the exit."""
    command = [sys.executable, str(root / "train.py"), *args,
               f"hydra.{'sweep' if sweep else 'run'}.dir={out_dir}"]
    env = os.environ | ({"PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
                        if root != ROOT else {})
    start = time.time()
    out = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    end = time.time()
    if out.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    lines = (out.stdout + out.stderr).splitlines()
    run_dirs = sorted(p.parent for p in out_dir.glob("**/status.yaml")) if sweep else [out_dir]
    first, last = steps_of(run_dirs)
    launch = first_line(lines, r"Launching \d+ jobs")
    trains = [t for line in lines if re.search(r"\] - training |\] training \d+ runs stacked", line)
              and (t := logged_at(line)) is not None]
    return {"launch": launch - start if launch else float("nan"), "training line": max(trains) - start,
            "first step": first - start, "last step to exit": end - last, "total": end - start,
            "training": last - first}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="names file (data.path); default: the config's")
    parser.add_argument("--steps", type=int, default=20000, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="a tree of another commit, measured in the same rounds")
    args = parser.parse_args()
    common = [f"trainer.max_steps={args.steps}", "trainer.enable_progress_bar=false"]
    common += [f"data.path={Path(args.data).absolute()}"] if args.data else []
    kinds = {"single run": (ROOT, common, False), "stacked sweep, 3 jobs": (ROOT, [*SWEEP, *common], True)}
    if args.before:
        link = args.before / "src" / "actgrad" / "callbacks"
        if not link.exists() and (args.before / "callbacks").is_dir():
            link.symlink_to(Path("..", "..", "callbacks"))
        root = args.before.absolute()
        kinds |= {"single run, before": (root, common, False),
                  "stacked sweep, 3 jobs, before": (root, [*SWEEP, *common], True)}
    got = {kind: [] for kind in kinds}
    for r in range(args.rounds):
        for kind, (root, overrides, sweep) in kinds.items():
            with tempfile.TemporaryDirectory() as tmp:
                got[kind].append(measure(root, overrides, Path(tmp) / "out", sweep))
            shown = ", ".join(f"{k} {v:.2f} s" for k, v in got[kind][-1].items())
            print(f"round {r + 1}, {kind}: {shown}", file=sys.stderr)
    marks = list(next(iter(got.values()))[0])
    print(f"\n{args.steps:,} steps, median of {args.rounds} rounds, seconds from the command (last step to exit: "
          "from the last train/loss event)\n")
    print("| | " + " | ".join(marks) + " |")
    print("|---" * (len(marks) + 1) + "|")
    for kind, rows in got.items():
        print(f"| {kind} | " + " | ".join(f"{statistics.median(row[m] for row in rows):.2f}" for m in marks) + " |")
    for suffix in ("", ", before") if args.before else ("",):
        single, sweep = (statistics.median(row["first step"] for row in got[kind + suffix])
                         for kind in ("single run", "stacked sweep, 3 jobs"))
        print(f"\nsweep's command-to-first-step minus the single run's{suffix}: {sweep - single:+.2f} s")


if __name__ == "__main__":
    main()
