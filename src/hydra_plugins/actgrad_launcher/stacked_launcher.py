"""`hydra/launcher=stacked`: a sweep's runs of one shape trained together as one stacked model.

A Hydra Launcher plugin like Hydra's own (in the `hydra_plugins` namespace; its config is
conf/hydra/launcher/stacked.yaml), so any sweeper (the grid, Optuna) hands it its batches of jobs. It groups
the jobs that can share one computation (actgrad.group.group_key), at most `stack_size` a group,
and runs the groups in parallel processes (joblib), `n_jobs` at a time. A group of one runs
exactly as under Hydra's own launchers, through the task function.
"""

import contextlib
import logging
import os
from pathlib import Path
from typing import Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from joblib import Parallel, delayed
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


def plan_groups(keys: list, stack_size: int, workers: int = 1) -> list[list[int]]:
    """Job indices grouped by key (None: alone), in order of first appearance, at most stack_size each;
    the largest groups halved while there are fewer groups than workers, so none stays idle."""
    groups, open_groups = [], {}
    for i, key in enumerate(keys):
        if key is None:
            groups.append([i])
            continue
        group = open_groups.get(key)
        if group is None or len(group) == stack_size:
            group = open_groups[key] = []
            groups.append(group)
        group.append(i)
    while len(groups) < workers and max(map(len, groups), default=0) > 1:
        largest = max(groups, key=len)
        at = groups.index(largest)
        groups[at : at + 1] = [largest[: (len(largest) + 1) // 2], largest[(len(largest) + 1) // 2 :]]
    return groups


class StackedLauncher(Launcher):
    def __init__(self, stack_size: int = 64, n_jobs: int = 1, submitit=None) -> None:
        if not isinstance(stack_size, int) or isinstance(stack_size, bool) or stack_size < 1:
            raise ValueError(f"hydra.launcher.stack_size={stack_size!r}: must be a whole number >= 1")
        self.stack_size, self.n_jobs = stack_size, n_jobs
        self.submitit = dict(submitit) if submitit else None  # each group one submitit job (stacked_slurm.yaml)
        self.config = self.task_function = self.hydra_context = None

    def setup(self, *, hydra_context, task_function, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from actgrad.grouping import group_key  # from the configs alone: this process imports no torch

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = []
        for idx, overrides in enumerate(job_overrides):
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = f"{cfg.hydra.job.name}_{initial_job_idx + idx}"
                cfg.hydra.job.num = initial_job_idx + idx
            configs.append(cfg)
        groups = plan_groups([group_key(cfg) for cfg in configs], self.stack_size, self.n_jobs)
        n_jobs = min(self.n_jobs, len(groups))
        log.info("Launching %d jobs as %d groups (stacked, at most %d a group), %d at a time", len(configs),
                 len(groups), self.stack_size, n_jobs)
        for group in groups:
            log.info("\t%s", " | ".join(" ".join(filter_overrides(job_overrides[i])) for i in group))
        state = Singleton.get_state()
        tasks = [(self.hydra_context, self.task_function, [configs[i] for i in group], state) for group in groups]
        if self.submitit:
            done = self.submit(tasks)
        else:
            done = Parallel(n_jobs=n_jobs, backend="loky")(delayed(run_group)(*task) for task in tasks)
        returns = [None] * len(configs)
        for group, rets in zip(groups, done):
            for i, ret in zip(group, rets):
                returns[i] = ret
        return returns


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


def job_dir(cfg: DictConfig) -> Path:
    return Path(str(OmegaConf.select(cfg, "hydra.sweep.dir"))) / str(OmegaConf.select(cfg, "hydra.sweep.subdir"))


def run_group(hydra_context, task_function, configs: list[DictConfig], singleton_state) -> list[JobReturn]:
    """In a worker process: one job as Hydra runs it, or a group stacked (actgrad.group.train_group)."""
    setup_globals()
    Singleton.set_state(singleton_state)
    if len(configs) == 1:
        HydraConfig.instance().set_config(configs[0])
        return [run_job(hydra_context=hydra_context, task_function=task_function, config=configs[0],
                        job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")]
    configure_log(configs[0].hydra.hydra_logging, configs[0].hydra.verbose)  # a worker starts bare: lines to the terminal
    with free_gpu(configs):
        return train_stacked(hydra_context, task_function, configs)


@contextlib.contextmanager
def free_gpu(configs: list[DictConfig]):
    """The whole group on one free GPU of the sweep's pool, held while it trains; None without GPUs."""
    from actgrad.gpus import gpu_count, take_gpu

    first = configs[0]
    if first.trainer.accelerator not in ("auto", "gpu", "cuda"):  # not with trainer=cpu or mps
        yield None
        return
    with take_gpu(first.hydra.sweep.dir, gpu_count(), first.jobs_per_gpu) as gpu:
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
            HydraConfig.instance().set_config(cfg)
            returns.append(run_job(hydra_context=hydra_context, task_function=task_function, config=cfg,
                                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir"))
            continue
        ret = JobReturn()
        ret.cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        ret.hydra_cfg = OmegaConf.create({"hydra": cfg.hydra})
        ret.overrides = list(cfg.hydra.overrides.task)
        ret.working_dir, ret.task_name = os.getcwd(), cfg.hydra.job.name
        ret.status = JobStatus.COMPLETED
        ret.return_value = result.get(cfg.objective, float("inf")) if cfg.get("objective") else result
        returns.append(ret)
    return returns
