"""Which runs of a sweep are one configuration: those that differ only in `seed` are repeats of it.

    from actgrad.configurations import configurations
    configurations(sweep_dir)  # {"init=naive,norm=none": [<sweep>/init=naive,norm=none,seed=1, ...,seed=2], ...}

A run's settings are the overrides it was started with (its .hydra/overrides.yaml). A sweep's job
that was refused before it started has none: its dir name is the overrides that vary across the
sweep (`init=naive,seed=3`), which is all a configuration needs. A run with neither (trained by
`actgrad.experiment.train` into a dir of any name) is a configuration of its own: nothing says which
runs it repeats. Nothing here imports torch.
"""

import re
from pathlib import Path

import yaml

SEED = "seed"
# a dir name's overrides are joined by commas; a comma inside a value (`callbacks=[a,b]`) is not followed by `key=`
NEXT_OVERRIDE = re.compile(r",(?=[+~]*[\w./-]+=)")


def settings(run_dir: Path) -> tuple[dict, bool]:
    """({key: value} of a run's overrides, whether that is all of them): from .hydra/overrides.yaml (all),
    else from its dir name (the swept ones), else {} (nothing known)."""
    run_dir = Path(run_dir)
    recorded = run_dir / ".hydra" / "overrides.yaml"
    if recorded.is_file():
        return parse(yaml.safe_load(recorded.read_text()) or []), True
    if "=" in run_dir.name:
        return parse(NEXT_OVERRIDE.split(run_dir.name)), False
    return {}, False


def parse(overrides: list[str]) -> dict:
    """["+tag=a", "seed=1"] -> {"tag": "a", "seed": "1"}: the value as it was typed."""
    pairs = (line.split("=", 1) if "=" in line else (line, None) for line in overrides)
    return {key.lstrip("+~"): value for key, value in pairs}


def run_dirs(sweep_dir: Path) -> list[Path]:
    """Every run dir below `sweep_dir` (or itself), sorted: a dir with a status or a record of an attempt
    (a job whose sweep was stopped before it began has only the latter)."""
    found = {p.parent for name in ("status.yaml", "attempts.jsonl") for p in Path(sweep_dir).glob(f"**/{name}")}
    return sorted(found)


def configurations(sweep_dir: Path) -> dict[str, list[Path]]:
    """{label: its run dirs} for the runs below `sweep_dir` that differ only in `seed`, in path order.

    The label is the configuration's values of the keys that vary across the runs (`init=naive,norm=none`),
    or a run's dir name when nothing is known of it (see the module docstring); "all runs" when the runs
    are all one configuration."""
    known = {d: settings(d) for d in run_dirs(sweep_dir)}
    keys = list(dict.fromkeys(key for found, _ in known.values() for key in found))  # command-line order
    # the values each key takes; a run that records all its overrides and lacks a key holds its default (None)
    values = {key: {found.get(key) for found, complete in known.values() if complete or key in found} for key in keys}
    varying = [key for key in keys if len(values[key]) > 1 and key != SEED]
    groups = {}
    for run_dir, (found, _) in known.items():
        label = ",".join(f"{key}={found[key]}" for key in varying if found.get(key) is not None) if found else run_dir.name
        groups.setdefault(label, []).append(run_dir)
    if "" in groups:  # the runs that set none of the varying keys
        groups["all runs" if len(groups) == 1 else "defaults"] = groups.pop("")
    return groups


def seed_of(run_dir: Path) -> str:
    """`seed=3`, how a run is told apart from the other repeats of its configuration; its dir name
    when its seed is not known."""
    found, _ = settings(run_dir)
    return f"{SEED}={found[SEED]}" if found.get(SEED) is not None else Path(run_dir).name
