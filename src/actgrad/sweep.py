"""What a sweep needs beyond one run: readable job names, how many jobs fit, which GPU a job
gets, and a summary when it ends.

`${swept:}` and `${parallel_jobs:}` are resolvers used in conf/config.yaml; importing this
module registers them (actgrad.experiment imports it, so every launcher's worker has them).
"""

import itertools
import logging
import os
import sys
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

log = logging.getLogger(__name__)


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
    name = ",".join(job[key] for key in varying if key in job).replace("/", "_")
    return name or hydra.job.override_dirname or "run"


def fresh_dir(path: str) -> str:
    """`path`, else `path-2`, `path-3`...: the first that does not exist yet, created at once
    (mkdir is atomic), so two sweeps started in the same second never share a directory."""
    for n in itertools.count(1):
        candidate = path if n == 1 else f"{path}-{n}"
        try:
            os.makedirs(candidate)
            return candidate
        except FileExistsError:
            continue


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parallel_jobs(threads_per_job: int = 1, jobs_per_gpu: int = 1) -> int:
    """As many jobs as the machine holds: jobs_per_gpu on each GPU, else one per `threads_per_job` cores."""
    gpus = gpu_count()
    if gpus:
        return gpus * jobs_per_gpu
    return max(1, (os.cpu_count() or 1) // max(1, threads_per_job))


def assign_gpu(job_num: int, gpus: int, jobs_per_gpu: int = 1) -> int | None:
    """The GPU of job `job_num`, or None on a machine without one.

    Jobs go round-robin: the n_jobs = gpus * jobs_per_gpu jobs running at one time are
    consecutive job numbers, so each GPU carries jobs_per_gpu of them.
    """
    if jobs_per_gpu < 1:
        raise ValueError(f"jobs_per_gpu={jobs_per_gpu}: must be a whole number >= 1")
    return None if gpus == 0 else job_num % gpus


def read_statuses(sweep_dir: Path) -> dict[str, dict]:
    return {str(p.parent.relative_to(sweep_dir)): yaml.safe_load(p.read_text()) or {}
            for p in sorted(Path(sweep_dir).glob("**/status.yaml"))}


class SweepSummary(Callback):
    """At the end of a sweep: how many jobs completed, diverged and failed; exit status 1 if any failed."""

    def on_multirun_end(self, config, **kwargs):
        statuses = read_statuses(Path(config.hydra.sweep.dir))
        counts = {s: sum(1 for r in statuses.values() if r.get("status") == s) for s in ("completed", "diverged", "failed")}
        log.info("sweep %s: %s", config.hydra.sweep.dir, ", ".join(f"{n} {s}" for s, n in counts.items()))
        for name, result in statuses.items():
            if result.get("status") != "completed":
                log.info("  %s: %s %s", name, result.get("status"), result.get("error", ""))
        if counts["failed"]:
            sys.exit(1)


for name, resolver, cache in [("swept", swept_overrides, False), ("parallel_jobs", parallel_jobs, False),
                              ("fresh_dir", fresh_dir, True)]:  # cached: a sweep's jobs all see one dir
    if not OmegaConf.has_resolver(name):
        OmegaConf.register_new_resolver(name, resolver, use_cache=cache)
