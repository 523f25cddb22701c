"""Which GPU a sweep's job trains on: a free one, from a pool its processes share.

Each GPU has `jobs_per_gpu` slots, one lock file each under `<sweep dir>/.gpus/`. A job (or a
stacked group trained in one process) holds a slot with flock for as long as it trains; the
kernel drops the lock when the file is closed or the process dies, killed or not, so a slot is
never left taken. (Job number mod GPU count, the old rule, put a job beside a still-running one
as soon as jobs finished out of order, while another GPU idled.)

    with take_gpu(sweep_dir, gpu_count(), jobs_per_gpu) as gpu:  # None without GPUs
        ...train on cuda:gpu...
"""

import collections
import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)
DRIVER = Path("/proc/driver/nvidia/gpus")  # a folder per GPU, where NVIDIA's driver is loaded


def gpu_count() -> int:
    """The GPUs torch can train on: what a job, or a group's worker, decides with."""
    import torch  # here: a sweep's parent process never imports torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus() -> int:
    """The NVIDIA GPUs this process may use, counted without torch: a sweep's parent sizes its pool of
    workers with it and never imports torch (~1 s). The driver's devices (/proc/driver/nvidia/gpus),
    at most as many as CUDA_VISIBLE_DEVICES names before its first hidden one (-1). Other GPUs (ROCm)
    count 0 here; the workers still train on them, and say when torch sees another count."""
    count = len(list(DRIVER.iterdir())) if DRIVER.is_dir() else 0
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is None:
        return count
    shown = 0
    for device in named.split(","):
        if not device.strip() or device.strip().startswith("-"):
            break  # CUDA ignores every device from the first invalid one on
        shown += 1
    return min(count, shown)


def pool_dir(sweep_dir) -> Path:
    """The slot locks of this machine's GPUs. One pool per host, and per SLURM job on a cluster
    (SLURM gives each job its own GPUs, all numbered from 0): jobs on other nodes that share the
    sweep dir over NFS must not wait for these GPUs."""
    scope = socket.gethostname()
    if "SLURM_JOB_ID" in os.environ:
        scope += f"-slurm{os.environ['SLURM_JOB_ID']}"
    return Path(sweep_dir) / ".gpus" / scope


def _lock(path: Path) -> int | None:
    """An open file descriptor holding `path`'s lock, or None if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        os.close(fd)
        return None


@contextlib.contextmanager
def take_gpu(sweep_dir, gpus: int, jobs_per_gpu: int = 1, poll: float = 0.5):
    """Yields the index of a GPU with a free slot, held until the block ends: the least busy
    GPU, the lowest index among equals. Waits while every slot is taken. Without GPUs
    (`gpus == 0`) yields None and writes nothing."""
    if jobs_per_gpu < 1:
        raise ValueError(f"jobs_per_gpu={jobs_per_gpu}: must be a whole number >= 1")
    if gpus == 0:
        yield None
        return
    pool = pool_dir(sweep_dir)
    pool.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        # hold every free slot while choosing, so the loads compared are the ones taken from
        free = {}
        for gpu in range(gpus):
            for slot in range(jobs_per_gpu):
                fd = _lock(pool / f"{gpu}.{slot}.lock")
                if fd is not None:
                    free[gpu, slot] = fd
        if free:
            n_free = collections.Counter(gpu for gpu, _ in free)
            chosen = max(free, key=lambda gpu_slot: n_free[gpu_slot[0]])  # first of the most free
            for gpu_slot, fd in free.items():
                if gpu_slot != chosen:
                    os.close(fd)
            try:
                yield chosen[0]
            finally:
                os.close(free[chosen])  # frees the slot (the file stays: unlinking it would race)
            return
        if not waiting:
            log.info("all %d GPU slots of %s are taken: waiting for one", gpus * jobs_per_gpu, pool)
            waiting = True
        time.sleep(poll)
