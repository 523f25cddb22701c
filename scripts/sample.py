"""Sample names from a trained run, like the lecture.

    python scripts/sample.py outputs/runs/<date>_<time>                 # the run's checkpoints/last.ckpt
    python scripts/sample.py outputs/runs/<date>_<time>/checkpoints/best.ckpt --n 20 --seed 42
    PYTHONPATH=~/mine python scripts/sample.py <run of model=custom model._target_=mynets.Net> --allow mynets

Needs nothing but the checkpoint: the model is rebuilt from the config and the vocabulary
stored in it (actgrad.load), not from the data file. A checkpoint may name only actgrad's and
torch's classes; `--allow mynets` lets your own package's through (its code runs: allow only yours).
"""

import argparse
import shlex
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT",
                        help="a run dir (its checkpoints/last.ckpt, the final weights) or a .ckpt file")
    parser.add_argument("--n", type=int, default=20, help="how many names (default: 20)")
    parser.add_argument("--seed", type=int, default=2147483647, help="the same seed gives the same names")
    parser.add_argument("--allow", action="append", default=[], metavar="NAME",
                        help="a package or module of yours the checkpoint may build from (repeatable)")
    args = parser.parse_args(argv)

    import actgrad  # after parsing: --help answers without loading torch
    from actgrad.run import ALLOW_HINT

    try:
        run = actgrad.load(args.run, allow=tuple(args.allow))
    except ValueError as e:
        if ALLOW_HINT in str(e):  # the config names code of its own: say this script's way to allow it
            print(f"error: {str(e).replace(ALLOW_HINT, 'or pass --allow NAME')}", file=sys.stderr)
            return 1
        runs = runs_below(Path(args.run))  # outputs/runs/<date>_<time> of a run with overrides: the run is inside it
        inside = "the run is inside it" if len(runs) == 1 else f"{len(runs)} runs are inside it"
        said = f"{shlex.quote(args.run)}: not a run dir; {inside}: " + " ".join(map(shlex.quote, map(str, runs)))
        print(f"error: {said if runs else e}", file=sys.stderr)
        return 1
    print("\n".join(run.sample(args.n, args.seed)))
    return 0


def runs_below(folder: Path) -> list[Path]:
    """The run dirs just inside `folder` that hold a final checkpoint, as one would type them."""
    return sorted(p.parent.parent for p in folder.glob("*/checkpoints/last.ckpt"))


if __name__ == "__main__":
    sys.exit(main())
