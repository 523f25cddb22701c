"""Time and memory of preparing the names data, against a plain reading of the same file.

    python scripts/bench_data.py --data /work/shared/data/names.txt --rounds 5
    python scripts/bench_data.py --mb 10          # a synthetic names file of 10 MB (1.4M names)

The synthetic file (the default, 1 MB) is the 1990 US Census first names (actgrad.data.census_names()),
sampled with a fixed seed until it has N MB: real-looking names, as many as you like.
Every measurement runs in a fresh process, on one thread, so its peak RSS is its own; each
round runs the reference and then the preparation. "prepare" is NamesData(path).prepare():
reading and checking the file, the seeded split of the names, the examples of all splits.
The reference is `len(open(path).read().splitlines())`: what reading the file costs at all.
The table gives medians over rounds and prepare's figures as a ratio of the reference's; the
memory grown per byte of the file is what actgrad.data.PREPARE_BYTES_PER_BYTE estimates.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1_000_000


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux gives KiB


def child_prepare(path: str, block_size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from actgrad.data import NamesData

    start_rss = peak_rss_mb()
    start = time.perf_counter()
    data = NamesData(path=path, block_size=block_size)
    data.prepare()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    stored = sum(t.numel() * t.element_size() for xy in data.splits.values() for t in xy)
    x = data.splits["train"][0]
    return {"seconds": seconds, "peak_rss_mb": peak, "start_rss_mb": start_rss,
            "bytes_per_char": stored / os.path.getsize(path), "dtype": str(x.dtype),
            "bound": (block_size + 1) * x.element_size() + 8, "names": data.words.count}


def child_reference(path: str) -> dict:
    start_rss = peak_rss_mb()
    start = time.perf_counter()
    with open(path) as f:
        lines = len(f.read().splitlines())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "start_rss_mb": start_rss, "names": lines}


def measure(kind: str, path: str, block_size: int) -> dict:
    """Run one measurement in a fresh single-threaded process; its figures come back as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--data", path, "--block-size", str(block_size)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"the {kind} process failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def synthetic_names(path: Path, mb: float, seed: int = 0) -> None:
    """Census first names, drawn with replacement and a fixed seed, one a line, until the file has mb MB."""
    from actgrad.data import census_names

    names = census_names()
    rng = random.Random(seed)
    written = 0
    with open(path, "w") as f:
        while written < mb * MB:
            chunk = "\n".join(rng.choices(names, k=10_000)) + "\n"
            f.write(chunk)
            written += len(chunk)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--data", help="names file to prepare (default: a synthetic one of --mb MB in a temp dir)")
    parser.add_argument("--mb", type=float, default=1, help="size of the synthetic names file in MB (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="measurements of each kind, medians shown (default 5)")
    parser.add_argument("--block-size", type=int, default=3, help="context length of the examples (default 3)")
    parser.add_argument("--child", choices=["prepare", "reference", "synthetic"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "prepare":
        print(json.dumps(child_prepare(args.data, args.block_size)))
        return
    if args.child == "reference":
        print(json.dumps(child_reference(args.data)))
        return
    if args.child == "synthetic":
        synthetic_names(Path(args.data), args.mb)
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.data:
            path, origin = args.data, "given"
        else:
            path, origin = str(Path(tmp) / "names.txt"), "synthetic: census names sampled with seed 0"
            start = time.perf_counter()
            # in a child too: a parent that imported torch would pass its RSS on as the children's peak
            subprocess.run([sys.executable, __file__, "--child", "synthetic", "--data", path, "--mb", str(args.mb)],
                           check=True)
            print(f"wrote {path} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        runs = {"reference": [], "prepare": []}
        for r in range(args.rounds):
            for kind in runs:
                runs[kind].append(measure(kind, path, args.block_size))
                print(f"round {r + 1} {kind}: {runs[kind][-1]}", file=sys.stderr)
        report(path, origin, args.block_size, runs)


def report(path: str, origin: str, block_size: int, runs: dict) -> None:
    med = {kind: {k: statistics.median(run[k] for run in results) for k in ("seconds", "peak_rss_mb", "start_rss_mb")}
           for kind, results in runs.items()}
    prepared = runs["prepare"][0]
    size = os.path.getsize(path)
    print(f"\n{path} ({origin}): {size / MB:.1f} MB, {prepared['names']:,} names; block_size {block_size}; "
          f"medians of {len(runs['prepare'])} rounds, one thread")
    print(f"{'':34}{'ms':>10}{'peak RSS MB':>14}{'RSS at start MB':>17}{'bytes/char':>12}")
    for label, kind, per_char in (("reference: read + splitlines", "reference", ""),
                                  ("NamesData(path).prepare()", "prepare", f"{prepared['bytes_per_char']:12.2f}")):
        m = med[kind]
        print(f"{label:34}{m['seconds'] * 1e3:10.1f}{m['peak_rss_mb']:14.0f}{m['start_rss_mb']:17.0f}{per_char}")
    grown = {k: med[k]["peak_rss_mb"] - med[k]["start_rss_mb"] for k in med}
    print(f"{'prepare / reference':34}{med['prepare']['seconds'] / med['reference']['seconds']:9.1f}x"
          f"{med['prepare']['peak_rss_mb'] / med['reference']['peak_rss_mb']:13.1f}x")
    print(f"memory grown while preparing: {grown['prepare']:.0f} MB = {grown['prepare'] * 2**20 / size:.1f} bytes per "
          f"byte of the file (reference: {grown['reference'] * 2**20 / size:.1f}); examples stored in "
          f"{prepared['dtype']}: {prepared['bytes_per_char']:.2f} bytes per character (bound {prepared['bound']})")


if __name__ == "__main__":
    main()
