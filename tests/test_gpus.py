"""The GPU pool: jobs in separate processes, on a faked number of GPUs, never share a slot,
and a GPU freed by a job that ended early is the next job's. Overlaps are computed from the
times each job recorded, not from the pool's lock files."""

import contextlib
import multiprocessing
import threading
import time

import pytest

from actgrad.gpus import take_gpu

POLL = 0.02  # seconds between a waiting job's tries: short, for the test


def run_jobs(sweep_dir, gpus, jobs_per_gpu, start, results, jobs):
    """A launcher's worker process: its jobs [(job, seconds)] one after another, each on a slot
    from the pool. Records (job, gpu, began, ended) while it holds the slot."""
    start.wait()  # every worker begins at once
    for job, seconds in jobs:
        with take_gpu(sweep_dir, gpus, jobs_per_gpu, poll=POLL) as gpu:
            began = time.monotonic()  # one clock for all processes on Linux
            time.sleep(seconds)
            results.put((job, gpu, began, time.monotonic()))


def sweep(tmp_path, gpus, jobs_per_gpu, workers) -> dict[int, tuple]:
    """{job: (gpu, began, ended)} of jobs run by one process per worker (a list of jobs each)."""
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Barrier(len(workers)), ctx.Queue()
    procs = [ctx.Process(target=run_jobs, args=(str(tmp_path), gpus, jobs_per_gpu, start, results, jobs))
             for jobs in workers]
    for p in procs:
        p.start()
    records = [results.get(timeout=60) for _ in range(sum(map(len, workers)))]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    return {job: (gpu, began, ended) for job, gpu, began, ended in records}


def most_at_once(intervals) -> int:
    """The largest number of (began, ended) intervals open at one moment."""
    edges = sorted([(b, 1) for b, e in intervals] + [(e, -1) for b, e in intervals])  # an end before a start at a tie
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    return most


def gpu_loads(ran: dict) -> dict[int, int]:
    """The most jobs any GPU ever carried at once."""
    return {gpu: most_at_once([(b, e) for g, b, e in ran.values() if g == gpu]) for gpu, _, _ in ran.values()}


def overlap(a, b) -> bool:
    return a[1] < b[2] and b[1] < a[2]


def test_a_gpu_freed_early_is_taken_while_the_long_job_runs_on_the_other(tmp_path):
    # joblib on 2 GPUs: one worker runs long job 0 while the other runs jobs 1, 2, 3. Round-robin
    # (job mod 2) put job 2 on GPU 0 beside job 0 while GPU 1 idled.
    ran = sweep(tmp_path, gpus=2, jobs_per_gpu=1, workers=[[(0, 1.0)], [(1, 0.15), (2, 0.15), (3, 0.15)]])
    assert sorted(ran) == [0, 1, 2, 3]
    assert gpu_loads(ran) == {0: 1, 1: 1}  # both GPUs used, never two jobs on one
    assert all(overlap(ran[0], ran[j]) for j in (1, 2, 3))  # no short job waited for the long one


def test_more_jobs_than_slots_wait_for_one_and_never_crowd_a_gpu(tmp_path):
    lengths = [0.8, 0.2, 0.2, 0.5, 0.3, 0.2, 0.1]  # 7 processes after 4 slots (2 GPUs x 2)
    ran = sweep(tmp_path, gpus=2, jobs_per_gpu=2, workers=[[(j, s)] for j, s in enumerate(lengths)])
    assert sorted(ran) == list(range(len(lengths)))
    assert gpu_loads(ran) == {0: 2, 1: 2}
    assert most_at_once([(b, e) for _, b, e in ran.values()]) == 4  # every slot was in use at once


def test_a_job_goes_to_the_least_busy_gpu(tmp_path):
    with contextlib.ExitStack() as first_two, contextlib.ExitStack() as third:
        assert first_two.enter_context(take_gpu(tmp_path, 2, 2)) == 0
        assert first_two.enter_context(take_gpu(tmp_path, 2, 2)) == 1
        assert third.enter_context(take_gpu(tmp_path, 2, 2)) == 0  # one job on each: the lowest index
        first_two.close()  # GPU 0 keeps the third job, GPU 1 idles: GPU 1, not GPU 0's free slot
        with take_gpu(tmp_path, 2, 2) as gpu:
            assert gpu == 1


def waiting_job(*args) -> tuple[threading.Thread, list]:
    """A thread taking a slot with take_gpu(*args), and [when it got one] once it has."""
    got = []

    def take():
        with take_gpu(*args, poll=POLL):
            got.append(time.monotonic())

    thread = threading.Thread(target=take, daemon=True)  # daemon: a wait that never ends must not hang pytest
    thread.start()
    return thread, got


def hold_forever(sweep_dir, held):
    with take_gpu(sweep_dir, 1, 1):
        held.set()
        time.sleep(600)


def test_a_killed_job_frees_its_gpu(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=hold_forever, args=(str(tmp_path), held))
    holder.start()
    assert held.wait(timeout=30)
    waiter, got = waiting_job(tmp_path, 1, 1)
    waiter.join(0.3)
    assert not got  # the only slot is taken: the job waits
    holder.kill()  # SIGKILL: no finally, no cleanup; the kernel drops the lock
    holder.join()
    waiter.join(5)
    assert got


def test_pools_are_per_slurm_job(tmp_path, monkeypatch):
    # SLURM numbers each job's own GPUs from 0: two jobs sharing the sweep dir must not wait for each other
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    with take_gpu(tmp_path, 1, 1) as gpu:
        assert gpu == 0
        same_job, got_same = waiting_job(tmp_path, 1, 1)
        same_job.join(0.3)
        assert not got_same
        monkeypatch.setenv("SLURM_JOB_ID", "102")
        other_job, got_other = waiting_job(tmp_path, 1, 1)
        other_job.join(5)
        assert got_other and not got_same
    same_job.join(5)
    assert got_same


def test_no_gpus_no_pool(tmp_path):
    with take_gpu(tmp_path, 0, 1) as gpu:
        assert gpu is None
    assert list(tmp_path.iterdir()) == []  # nothing in the sweep dir
    with pytest.raises(ValueError, match="jobs_per_gpu=0"), take_gpu(tmp_path, 2, 0):
        pass
