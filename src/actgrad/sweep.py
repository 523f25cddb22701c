"""What a sweep needs beyond one run: readable job names, how many jobs fit, and a summary when
it ends (which GPU a job gets: actgrad.gpus).

`${swept:}` and `${parallel_jobs:}` are resolvers used in conf/config.yaml; importing this
module registers them (actgrad.experiment imports it, so every launcher's worker has them).
"""

import datetime
import itertools
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from actgrad.gpus import visible_gpus as gpu_count  # the driver's count: a sweep's parent imports no torch
from actgrad.rundir import MADE_BY_RESOLVER, attempts_of_this_sweep, missing_dirs
from actgrad.stop import SWEEP_ID, stop_file

log = logging.getLogger(__name__)
# TensorBoard's default port; the query turns its smoothing (0.6 by default, which hides a bad start) off
BOARD_URL = "http://localhost:6006/?smoothing=0#timeseries"
# what no address or event file sets: said where the address is printed
BOARD_NOTE = 'TIME SERIES; in SCALARS and CUSTOM SCALARS set smoothing 0 and untick "Ignore outliers" yourself'


def swept_overrides() -> str:
    """A job's name: the overrides that vary across its sweep, in command-line order
    (`init=kaiming,norm=batchnorm`), without those every job shares."""
    hydra = HydraConfig.get()
    parser = OverridesParser.create()
    varying = list(hydra.sweeper.get("params") or {})  # a search (Optuna) declares what it varies
    sweep_file = Path(hydra.sweep.dir) / "multirun.yaml"  # a grid sweep's command line, saved by the sweeper
    if sweep_file.is_file():
        sweep = parser.parse_overrides(list(OmegaConf.load(sweep_file).hydra.overrides.task))
        varying += [o.get_key_element() for o in sweep if o.is_sweep_override()]
    job = {o.get_key_element(): line for o, line in
           zip(parser.parse_overrides(list(hydra.overrides.task)), hydra.overrides.task)}
    name = ",".join(job[key] for key in varying if key in job)
    return dir_name(name or hydra.job.override_dirname or "run")


def dir_name(name: str) -> str:
    """`name` made safe as one directory's name, so a run stays inside its root: an override's value
    (+tag=../../x) can hold a path separator or be `..`. Each such character becomes "_"; a name
    without any is returned as it is, so existing run dirs keep their names (a resume finds them)."""
    for separator in ("/", "\\", "\0"):
        name = name.replace(separator, "_")
    return "_" * len(name) if name in (".", "..") else name


def fresh_dir(path: str) -> str:
    """`path`, else `path-2`, `path-3`...: the first that does not exist yet, created at once
    (mkdir is atomic), so two sweeps started in the same second never share a directory."""
    for n in itertools.count(1):
        candidate = path if n == 1 else f"{path}-{n}"
        made = missing_dirs(Path(candidate))
        try:
            os.makedirs(candidate)
            MADE_BY_RESOLVER.extend(made)
            return candidate
        except FileExistsError:
            continue


def parallel_jobs(threads_per_job: int = 1, jobs_per_gpu: int = 1) -> int:
    """As many jobs as the machine holds: jobs_per_gpu on each GPU, else one per `threads_per_job` cores."""
    gpus = gpu_count()
    if gpus:
        return gpus * jobs_per_gpu
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_job))


def outcomes_of_this_sweep(sweep_dir: Path) -> list[tuple[str, dict]]:
    """(job, attempt) for every job's end that this sweep invocation recorded: one per job, even when two
    jobs share a dir (`+tag=a/b,a_b`) or another sweep writes into the same dir at the same time."""
    found = []
    for path in sorted(Path(sweep_dir).glob("**/attempts.jsonl")):
        name = str(path.parent.relative_to(sweep_dir))
        found += [(name, a) for a in attempts_of_this_sweep(path.parent) if a.get("outcome") not in (None, "started")]
    return found


OUTCOMES = ("completed", "already completed", "diverged", "failed", "interrupted", "busy")


class SweepSummary(Callback):
    """A sweep's start and end in its parent process.

    At the start it names this invocation (ACTGRAD_SWEEP, inherited by every job's process), so its
    summary counts its own jobs and its stop file is its own. Interrupted (Ctrl-C, SIGTERM): the jobs
    are asked to stop at their next step boundary, save and record `interrupted` (see actgrad.stop);
    a second Ctrl-C stops at once. At the end: each job of this invocation counted once by outcome,
    and the command that resumes the sweep. Exit status 1 if any job failed or was refused as busy,
    128 + the signal if interrupted; a diverged job is a result, not an error.
    """

    def on_multirun_start(self, config, **kwargs):
        os.environ[SWEEP_ID] = f"{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
        self.stop_file = stop_file(config.hydra.sweep.dir)
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, self.interrupt)

    def interrupt(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            self.stop_file.unlink(missing_ok=True)
            raise KeyboardInterrupt  # the second Ctrl-C: train.py says it in one line
        self.signum = signum
        self.stop_file.parent.mkdir(parents=True, exist_ok=True)
        self.stop_file.touch()
        log.warning("%s: asking every running job to stop at its next step and save (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def on_multirun_end(self, config, **kwargs):
        sweep_dir = Path(config.hydra.sweep.dir)
        self.stop_file.unlink(missing_ok=True)
        ended = outcomes_of_this_sweep(sweep_dir)
        counts = {s: sum(1 for _, a in ended if a.get("outcome") == s) for s in OUTCOMES}
        said = [f"{n} {'refused as busy' if s == 'busy' else s}" for s, n in counts.items()
                if n or s not in ("interrupted", "busy")]
        log.info("sweep %s: %s", sweep_dir, ", ".join(said))
        for name, attempt in ended:
            if attempt.get("outcome") not in ("completed", "already completed"):
                at = f" at step {attempt['steps']:,}" if isinstance(attempt.get("steps"), int) else ""
                log.info("  %s: %s%s %s", name, attempt.get("outcome"), at, attempt.get("error") or "")
        if counts["completed"] or counts["already completed"] or counts["diverged"]:
            where = shlex.quote(str(sweep_dir))
            log.info("look at it: tensorboard --logdir %s, then %s (%s); its loss table: python scripts/report.py %s",
                     where, BOARD_URL, BOARD_NOTE, where)
            write_comparison(sweep_dir)
        if counts["interrupted"] or self.signum is not None:
            log.info("resume the sweep with the same command and hydra.sweep.dir=%s", sweep_dir)
            names = [a.get("signal") for _, a in ended if a.get("signal")]
            sys.exit(128 + (self.signum or signal.Signals[names[0] if names else "SIGTERM"]))
        if counts["failed"] or counts["busy"]:
            sys.exit(1)


def write_comparison(sweep_dir: Path) -> None:
    """The sweep's comparison run (actgrad.compare), after the summary: in a process of its own, as it draws
    with torch's SummaryWriter and this parent imports no torch. Its failure is said in one line, no more."""
    done = subprocess.run([sys.executable, "-m", "actgrad.compare", str(sweep_dir)], capture_output=True, text=True)
    if done.returncode == 0:
        log.info("%s", done.stdout.strip())
    else:
        lines = (done.stderr or done.stdout).strip().splitlines()
        log.warning("no comparison run: %s", lines[-1] if lines else f"exit status {done.returncode}")


for name, resolver, cache in [("swept", swept_overrides, False), ("parallel_jobs", parallel_jobs, False),
                              ("fresh_dir", fresh_dir, True),  # cached: a sweep's jobs all see one dir
                              ("dir_name", dir_name, False)]:
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, resolver, use_cache=cache)
