"""Wall time of the mission's six-run sweep in parallel (the default launcher) against the
same six runs one after another (hydra/launcher=local), alternated, median of several rounds.

    python scripts/bench_sweep.py --steps 20000 --rounds 3
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NAMES_TXT = ROOT.parent / "shared" / "data" / "names.txt"


def sweep_seconds(launcher: str, steps: int) -> float:
    with tempfile.TemporaryDirectory() as sweep_dir:
        args = [sys.executable, str(ROOT / "train.py"), "-m", "init=naive,scaled,kaiming", "norm=none,batchnorm",
                f"trainer.max_steps={steps}", "trainer.enable_progress_bar=false", f"hydra/launcher={launcher}",
                f"hydra.sweep.dir={sweep_dir}"] + ([f"data.path={NAMES_TXT}"] if NAMES_TXT.is_file() else [])
        start = time.perf_counter()
        subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20000, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for r in range(args.rounds):
        sequential, parallel = sweep_seconds("local", args.steps), sweep_seconds("parallel", args.steps)
        rows.append((sequential, parallel))
        print(f"round {r + 1}: one after another {sequential:.1f} s, parallel {parallel:.1f} s", file=sys.stderr)
    seq = statistics.median(s for s, _ in rows)
    par = statistics.median(p for _, p in rows)
    speedup = statistics.median(s / p for s, p in rows)
    print(f"six runs of {args.steps} steps, median of {args.rounds} rounds: one after another {seq:.1f} s, "
          f"parallel {par:.1f} s, speed-up {speedup:.2f}x")


if __name__ == "__main__":
    main()
