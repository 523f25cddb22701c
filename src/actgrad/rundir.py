"""A run directory: who may write into it, what an attempt created there, and its status.

The one rule: an attempt removes only what it created itself, and a directory only if it
created it and it is empty again. A user's folder given as `hydra.run.dir` stays theirs.

Files of a run, all written here:
    run.yaml       what defines the run (config hash, run-defining settings), by its first attempt
    status.yaml    the run's status: training, completed, diverged, failed, interrupted
    attempts.jsonl one line per attempt (started, outcome, steps, error): a log, only appended
    .lock          held while an attempt runs (pid inside); removed at the end
"""

import datetime
import fcntl
import json
import os
import signal
import socket
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from actgrad.stop import SWEEP_ID

# Set by train.py's Hydra callback before Hydra creates the run dir (single runs only):
# the directories that did not exist, and the names already in the run dir.
BEFORE_HYDRA: dict = {}
# Directories the config's own resolver made while Hydra composed it (sweep.fresh_dir: the dated folder
# of outputs/runs/), before the callback could see them missing: a refused attempt removes them too.
MADE_BY_RESOLVER: list[Path] = []


def fault(phase: str) -> None:
    """For the fault-injection tests: ACTGRAD_FAULT=<phase> kills this process (SIGKILL) at that phase
    of a run's end, as the OOM killer or a kill -9 would (tests/test_faults.py)."""
    if os.environ.get("ACTGRAD_FAULT") == phase:
        os.kill(os.getpid(), signal.SIGKILL)


class Busy(RuntimeError):
    """Another attempt holds the run dir."""


def missing_dirs(path: Path) -> list[Path]:
    """The ancestors of path (path included) that do not exist yet, deepest first."""
    path, missing = Path(path).absolute(), []
    while not path.exists():
        missing.append(path)
        path = path.parent
    return missing


def note_before_hydra(run_dir) -> None:
    """Record what exists before Hydra creates the run dir, so a refused attempt can undo only its own."""
    run_dir = Path(run_dir).absolute()
    missing = missing_dirs(run_dir)
    missing += [d for d in MADE_BY_RESOLVER if run_dir.is_relative_to(d) and d not in missing]  # deepest first
    BEFORE_HYDRA.update(dir=run_dir, missing=missing,
                        names=set(os.listdir(run_dir)) if run_dir.is_dir() else set())


def write_atomic(path: Path, text: str) -> None:
    """Write next to the target and rename over it: readers see the old file or the new, never half."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class RunDir:
    def __init__(self, path):
        self.path = Path(path).absolute()
        record = BEFORE_HYDRA if BEFORE_HYDRA.get("dir") == self.path else {}
        self.created_dirs = record.get("missing", missing_dirs(self.path))  # deepest first
        self.path.mkdir(parents=True, exist_ok=True)
        self.names_before = record.get("names", set(os.listdir(self.path)))
        self.started = datetime.datetime.now().isoformat(timespec="seconds")
        self.lock_file = None

    # --- one attempt at a time -------------------------------------------------------------
    def lock(self) -> None:
        """Take the run dir for this attempt, or raise Busy naming the attempt that holds it.

        An OS lock (flock), not just a pid file: it is released by the kernel when its process
        dies however it dies, so a lock left by a killed run is never mistaken for a live one."""
        path = self.path / ".lock"
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise Busy(f"{self.path}: a run is already training there ({holder}); wait for it to end, "
                       f"or give another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {self.started}\n")
        handle.flush()
        self.lock_file = handle

    def unlock(self) -> None:
        if self.lock_file is not None:
            if ".lock" not in self.names_before:
                (self.path / ".lock").unlink(missing_ok=True)  # while still holding it
            self.lock_file.close()
            self.lock_file = None

    # --- what is there -----------------------------------------------------------------------
    def read_yaml(self, name: str) -> dict | None:
        path = self.path / name
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else None

    def status(self) -> dict | None:
        return self.read_yaml("status.yaml")

    def has_events(self) -> bool:
        return any(self.path.glob("events.out.tfevents.*"))

    # --- writing -----------------------------------------------------------------------------
    def write_yaml(self, name: str, content: dict) -> None:
        write_atomic(self.path / name, yaml.safe_dump(content, sort_keys=False))

    def write_status(self, results: dict) -> None:
        self.write_yaml("status.yaml", results)

    def log_attempt(self, outcome: dict) -> None:
        """Append this attempt's outcome, with the sweep invocation it belongs to: a sweep's summary
        counts its own jobs' lines (see attempts_of_this_sweep)."""
        sweep = {"sweep": os.environ[SWEEP_ID]} if SWEEP_ID in os.environ else {}
        line = json.dumps({"started": self.started, "pid": os.getpid(), **sweep, **outcome}, default=str)
        with open(self.path / "attempts.jsonl", "a") as f:
            f.write(line + "\n")

    # --- a refused attempt leaves nothing of its own -------------------------------------------
    def discard(self) -> None:
        """Remove the files this attempt created and the directories it created, if empty.
        Never anything that was there before it started."""
        self.unlock()
        for name in set(os.listdir(self.path)) - self.names_before:
            entry = self.path / name
            if entry.is_file() or entry.is_symlink():
                entry.unlink(missing_ok=True)
            else:
                try:
                    entry.rmdir()  # a directory we created and left empty
                except OSError:
                    pass
        for directory in self.created_dirs:  # deepest first: the run dir, then the parents we made
            try:
                directory.rmdir()
            except OSError:
                break  # not empty: something else lives there now


def attempts(run_dir: Path) -> list[dict]:
    """The lines of a run dir's attempts.jsonl (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / "attempts.jsonl"
    found = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            found.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return found


def last_attempt(run_dir: Path) -> dict | None:
    """The newest line of a run dir's attempts.jsonl."""
    found = attempts(run_dir)
    return found[-1] if found else None


def attempts_of_this_sweep(run_dir: Path) -> list[dict]:
    """The attempts.jsonl lines the current sweep invocation wrote into run_dir."""
    sweep = os.environ.get(SWEEP_ID)
    return [a for a in attempts(run_dir) if sweep is not None and a.get("sweep") == sweep]


class NoteRunDir(Callback):
    """Hydra callback: before a single run's directory is created, note what is already there."""

    def on_run_start(self, config, **kwargs):
        note_before_hydra(config.hydra.run.dir)
