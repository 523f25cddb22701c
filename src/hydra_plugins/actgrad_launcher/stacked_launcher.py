"""`hydra/launcher=stacked`: a sweep's runs of one shape trained together as one stacked model.

A Hydra Launcher plugin like Hydra's own (in the `hydra_plugins` namespace; its config is
conf/hydra/launcher/stacked.yaml), so any sweeper (the grid, Optuna) hands it its batches of jobs. It groups
the jobs that can share one computation (actgrad.group.group_key), at most `stack_size` a group,
and runs each group in a worker process of its own (worker.py), `n_jobs` at a time: a worker that
dies takes only its own group's members, recorded `failed` with the reason, and the others go on.
A group of one runs exactly as under Hydra's own launchers, through the task function.
"""

import contextlib
import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import cloudpickle

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from actgrad.stop import stop_file

log = logging.getLogger(__name__)


def plan_groups(keys: list, stack_size: int, workers: int = 1) -> list[list[int]]:
    """Job indices grouped by key (None: alone), in order of first appearance: a key's jobs cut into as
    few groups as `stack_size` allows, of balanced sizes (80 jobs at 64: 40 + 40); then the largest groups
    halved while there are fewer groups than workers, so none stays idle."""
    by_key = {}
    for i, key in enumerate(keys):
        by_key.setdefault(i if key is None else ("key", key), []).append(i)
    groups = []
    for jobs in by_key.values():
        parts = -(-len(jobs) // stack_size)
        cuts = [-(-p * len(jobs) // parts) for p in range(parts + 1)]  # rounded up: larger groups first
        groups += [jobs[a:b] for a, b in zip(cuts, cuts[1:])]
    groups.sort(key=lambda g: g[0])
    while len(groups) < workers and max(map(len, groups), default=0) > 1:
        largest = max(groups, key=len)
        at = groups.index(largest)
        groups[at : at + 1] = [largest[: (len(largest) + 1) // 2], largest[(len(largest) + 1) // 2 :]]
    return groups


def group_lines(job_overrides: list, groups: list[list[int]], shown: int = 4) -> list[str]:
    """One line a group: how many runs, and the overrides that vary across the sweep (those every job shares
    are left out) of its first few runs and its last."""
    from actgrad.grouping import few

    jobs = [filter_overrides(o) for o in job_overrides]
    shared = set.intersection(*(set(j) for j in jobs)) if len(jobs) > 1 else set()
    names = [" ".join(o for o in j if o not in shared) or "(the defaults)" for j in jobs]
    lines = []
    for number, group in enumerate(groups, 1):
        mine = few([names[i] for i in group], shown)
        lines.append(f"group {number}, {len(group)} run{'s' if len(group) > 1 else ''}: " + " | ".join(mine))
    return lines


class StackedLauncher(Launcher):
    def __init__(self, stack_size: int = 64, n_jobs: int = 1, submitit=None) -> None:
        for key, value in (("stack_size", stack_size), ("n_jobs", n_jobs)):  # Hydra stops; train.py says it in one line
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"hydra.launcher.{key}={value!r}: must be a whole number >= 1")
        self.stack_size, self.n_jobs = stack_size, n_jobs
        self.submitit = dict(submitit) if submitit else None  # each group one submitit job (stacked_slurm.yaml)
        self.config = self.task_function = self.hydra_context = None
        self.folder, self.ready = None, []  # task and result files; workers started, waiting for a group

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        if not self.submitit:  # started now: they import torch and Lightning while the sweeper composes every job
            self.folder = tempfile.TemporaryDirectory(prefix="actgrad-groups-")
            jobs = jobs_in(config, hydra_context.config_loader) or self.n_jobs
            self.ready = [Worker(Path(self.folder.name)) for _ in range(min(self.n_jobs, jobs))]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from actgrad.checks import check_counts, release_errors
        from actgrad.grouping import group_key, why_alone  # from the configs alone: this process imports no torch

        ready, self.ready = self.ready, []
        try:
            check_counts(self.config)  # the sweep's own settings (jobs_per_gpu): one line, before any job starts
            release_errors()  # Hydra composed every job: its errors would have stopped the sweep by now

            setup_globals()
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
            if not self.submitit:  # a later batch (a search's): its workers start before its jobs are composed
                more = min(self.n_jobs, len(job_overrides)) - len(ready)
                ready += [Worker(Path(self.folder.name)) for _ in range(more)]
            configs = [self.job_config(overrides, initial_job_idx + idx) for idx, overrides in enumerate(job_overrides)]
            groups = plan_groups([group_key(cfg) for cfg in configs], self.stack_size, self.n_jobs)
            n_jobs = min(self.n_jobs, len(groups))
            log.info("Launching %d jobs as %d groups (stacked, at most %d a group), %d at a time", len(configs),
                     len(groups), self.stack_size, n_jobs)
            for line in group_lines(job_overrides, groups):
                log.info("\t%s", line)
            for i, cfg in enumerate(configs):  # said at the start; its worker records it in the job's attempts
                reason = why_alone(cfg)
                if reason:
                    log.warning("%s: trains alone: %s", " ".join(filter_overrides(job_overrides[i])), reason)
            state = Singleton.get_state()
            tasks = [(self.hydra_context, self.task_function, [configs[i] for i in group], state) for group in groups]
            done = self.submit(tasks) if self.submitit else run_workers(tasks, n_jobs, ready, Path(self.folder.name))
        finally:
            for worker in ready:
                worker.dismiss()  # those left without a group exit
        returns = [None] * len(configs)
        for group, rets in zip(groups, done):
            group_configs = [configs[i] for i in group]
            if not isinstance(rets, list):  # its worker died, or never started: rets says why
                rets = [unfinished_return(cfg, rets) for cfg in group_configs]
            for i, ret in zip(group, rets):
                returns[i] = ret
        return returns

    def job_config(self, overrides: Sequence[str], num: int) -> DictConfig:
        """A job's whole config, as Hydra's own launchers compose it."""
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id, cfg.hydra.job.num = f"{cfg.hydra.job.name}_{num}", num
        return cfg

    def submit(self, tasks: list) -> list:
        """Each group as one job of a submitit executor (SLURM, or `local` for a try), all as one array."""
        import submitit

        params = dict(self.submitit)
        executor = submitit.AutoExecutor(folder=params.pop("folder"), cluster=params.pop("cluster", None))
        executor.update_parameters(**params)
        jobs = executor.map_array(GroupTask(), *zip(*tasks))
        log.info("submitted %d groups as %s jobs %s", len(jobs), executor.cluster, ", ".join(j.job_id for j in jobs))
        return [job.results()[0] for job in jobs]


class GroupTask:
    """run_group for submitit: on preemption it is requeued with the same group, which resumes
    every member from its last checkpoint (submitit's Checkpointable protocol)."""

    def __call__(self, *args):
        return run_group(*args)

    def checkpoint(self, *args):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args)


class Worker:
    """A worker process (worker.py), started before its group is known: it imports what training needs,
    then waits for the end of its input. `give` writes its task first; `dismiss` leaves it none, and it exits."""

    def __init__(self, folder: Path):
        self.prefix = folder / f"worker{next(WORKERS)}"
        command = [sys.executable, "-m", "hydra_plugins.actgrad_launcher.worker", str(self.prefix), str(os.getpid())]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE)

    def give(self, task) -> None:
        with open(f"{self.prefix}.task", "wb") as f:
            cloudpickle.dump(task, f)
        self.dismiss()

    def dismiss(self) -> None:
        self.proc.stdin.close()

    def result(self):
        """The JobReturns it wrote, or why it wrote none."""
        result = Path(f"{self.prefix}.result")
        if result.is_file():
            with open(result, "rb") as f:
                return cloudpickle.load(f)
        code = self.proc.returncode
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return {"status": "failed", "error": f"its group's worker process died ({how})"}


def jobs_in(config: DictConfig, loader) -> int | None:
    """How many jobs the command line's sweep (and the sweeper's params) make, or None when a sweeper
    chooses them (an interval: Optuna)."""
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    lines = [f"{key}={value}" for key, value in params.items()] + list(config.hydra.overrides.task)
    count = 1
    for override in OverridesParser.create(config_loader=loader).parse_overrides(lines):
        if override.is_sweep_override():
            if not override.is_discrete_sweep():
                return None
            count *= len(list(override.sweep_string_iterator()))
    return count


WORKERS = itertools.count()  # worker numbers: the names of their task and result files


def run_workers(tasks: list, n_jobs: int, ready: list[Worker], folder: Path) -> list:
    """Each group in a process of its own, `n_jobs` at a time, the first ones given to the `ready` workers;
    each group's JobReturns, or for a group whose worker died or that never started (the sweep was stopping)
    a dict saying so. A second Ctrl-C stops every worker at once (each records its members `interrupted`)
    and is raised again here."""
    ready = list(ready)
    pending, running, done = list(range(len(tasks))), {}, [None] * len(tasks)
    stop = stop_file(OmegaConf.select(tasks[0][2][0], "hydra.sweep.dir")) if tasks else None
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                i = pending.pop(0)
                if stop is not None and stop.exists():
                    done[i] = {"status": "interrupted", "signal": "SIGTERM", "error": "not started: the sweep is stopping"}
                    continue
                running[i] = ready.pop(0) if ready else Worker(folder)
                running[i].give((run_group, tasks[i]))
            time.sleep(0.05)
            for i, worker in list(running.items()):
                if worker.proc.poll() is not None:
                    done[i] = worker.result()
                    del running[i]
    except KeyboardInterrupt:
        for worker in running.values():  # a second Ctrl-C: each worker stops at once, saving its members' status
            with contextlib.suppress(ProcessLookupError):
                worker.proc.send_signal(signal.SIGINT)
                time.sleep(0.1)  # two signals sent together may arrive as one
                worker.proc.send_signal(signal.SIGINT)
        for worker in running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                worker.proc.wait(timeout=30)
        raise
    return done


def unfinished_return(cfg: DictConfig, outcome: dict) -> JobReturn:
    """The JobReturn of a job whose worker died or never started; its run dir records why, unless its
    attempt already ended (a member that finished before another one's end killed the worker)."""
    from actgrad.rundir import RunDir, attempts_of_this_sweep

    HydraConfig.instance().set_config(cfg)  # its dir's name reads the job's own overrides
    run_dir = job_dir(cfg).absolute()
    ended = [a for a in attempts_of_this_sweep(run_dir) if a.get("outcome") not in (None, "started")]
    result = dict(ended[-1]) if ended else dict(outcome)
    if not ended:
        run = RunDir(run_dir)
        status = run.status()
        if status is None or status.get("status") == "training":
            run.write_status({k: v for k, v in result.items() if k in ("status", "steps", "signal", "error")})
        run.log_attempt({"outcome": outcome["status"], **{k: v for k, v in result.items() if k != "status"}})
        log.error("%s: %s", run_dir, outcome["error"])
    result["status"] = result.pop("outcome", result.get("status"))
    return job_return(cfg, result)


def job_return(cfg: DictConfig, result: dict) -> JobReturn:
    """What Hydra's sweepers read of a job that train.py did not run: its config and its results."""
    ret = JobReturn()
    ret.cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    ret.hydra_cfg = OmegaConf.create({"hydra": cfg.hydra})
    ret.overrides = list(cfg.hydra.overrides.task)
    ret.working_dir, ret.task_name = os.getcwd(), cfg.hydra.job.name
    ret.status = JobStatus.COMPLETED
    ret.return_value = result.get(cfg.objective, float("inf")) if cfg.get("objective") else result
    return ret


def run_alone(hydra_context, task_function, cfg: DictConfig) -> JobReturn:
    """One job as Hydra runs it, through the task function. A job that raised (a programming error) has
    its traceback logged here and is recorded `failed`: the sweep's other jobs and its summary go on."""
    HydraConfig.instance().set_config(cfg)
    ret = run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    try:
        ret.return_value  # noqa: B018  (raises what the job raised)
    except Exception as e:
        log.error("%s: failed", job_dir(cfg), exc_info=e)
        return unfinished_return(cfg, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
    return ret


def job_dir(cfg: DictConfig) -> Path:
    return Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


def run_group(hydra_context, task_function, configs: list[DictConfig], singleton_state) -> list[JobReturn]:
    """In a worker process: one job as Hydra runs it, or a group stacked (actgrad.group.train_group)."""
    setup_globals()
    Singleton.set_state(singleton_state)
    if len(configs) == 1:
        returned = run_alone(hydra_context, task_function, configs[0])
        note_alone(configs[0])
        return [returned]
    configure_log(configs[0].hydra.hydra_logging, configs[0].hydra.verbose)  # a worker starts bare: lines to the terminal
    with free_gpu(configs):
        return train_stacked(hydra_context, task_function, configs)


def note_alone(cfg: DictConfig) -> None:
    """Record in a lone job's attempts why its config kept it out of a stack (the parent said it at the start)."""
    from actgrad.grouping import why_alone
    from actgrad.rundir import RunDir

    reason = why_alone(cfg)
    if reason and (job_dir(cfg) / "attempts.jsonl").exists():
        RunDir(job_dir(cfg)).log_attempt({"note": f"trains alone: {reason}"})


@contextlib.contextmanager
def free_gpu(configs: list[DictConfig]):
    """The whole group on one free GPU of the sweep's pool, held while it trains; None without GPUs."""
    from actgrad.gpus import gpu_count, take_gpu, visible_gpus

    first = configs[0]
    if first.trainer.accelerator not in ("auto", "gpu", "cuda"):  # not with trainer=cpu or mps
        yield None
        return
    gpus = gpu_count()
    if gpus != visible_gpus():  # the parent counted without torch (a ROCm GPU, a CPU-only torch)
        log.warning("torch sees %d GPUs, the sweep's parent counted %d and ran groups at once for that; "
                    "hydra.launcher.n_jobs=<groups at once> sets it", gpus, visible_gpus())
    with take_gpu(first.hydra.sweep.dir, gpus, first.jobs_per_gpu) as gpu:
        if gpu is not None:
            for cfg in configs:
                with open_dict(cfg):
                    cfg.trainer.accelerator, cfg.trainer.devices = "gpu", [gpu]
        yield gpu


def train_stacked(hydra_context, task_function, configs: list[DictConfig]) -> list[JobReturn]:
    from actgrad.group import ALONE, train_group

    dirs = []
    for cfg in configs:
        HydraConfig.instance().set_config(cfg)
        out = job_dir(cfg).absolute()
        with read_write(cfg.hydra.runtime):
            cfg.hydra.runtime.output_dir = str(out)
        dirs.append(out)
    results = train_group(configs, dirs)
    returns = []
    for cfg, out, result in zip(configs, dirs, results):
        if result is ALONE:  # its callbacks or model cannot be stacked: as Hydra runs any job
            returns.append(run_alone(hydra_context, task_function, cfg))
            continue
        returns.append(job_return(cfg, result))
    return returns
