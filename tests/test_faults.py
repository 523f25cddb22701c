"""Fault injection: a stacked sweep's worker killed (SIGKILL, as the OOM killer does) at each phase of
its members' end of run, then the same command again, must leave what an uninterrupted sweep leaves:
every logged scalar and every status.yaml equal. (ACTGRAD_FAULT names the phase: actgrad.rundir.fault.)"""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from actgrad import events

from conftest import ROOT

JOBS = ("init=scaled", "init=kaiming")
SWEEP = ["-m", "init=scaled,kaiming", "trainer.max_steps=300", "steps_per_batch=10", "log_every_n_steps=10",
         "val_every_n_steps=100", "checkpoint_every_n_steps=100", "trainer.enable_progress_bar=false",
         "hydra.launcher.n_jobs=1", "callbacks.figures.every_n_steps=150"]


def sweep(sweep_dir, data, fault=None):
    env = {k: v for k, v in os.environ.items() if k not in ("ACTGRAD_FAULT", "ACTGRAD_SWEEP")}
    if fault:
        env["ACTGRAD_FAULT"] = fault
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *SWEEP, f"data.path={data}",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, env=env,
                          capture_output=True, text=True, timeout=180)


def logged(run_dir):
    """Every scalar the run logged, as {tag: [(step, value)]}, and its status."""
    return events.scalars(run_dir), yaml.safe_load((run_dir / "status.yaml").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    data = folder / "names.txt"
    from conftest import census_sample

    census_sample(data)
    done = sweep(folder / "reference", data)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, data, {job: logged(folder / "reference" / job) for job in JOBS}


@pytest.mark.parametrize("phase", ["after_training", "callbacks_end", "run_end"])
def test_a_worker_killed_at_its_end_then_rerun_leaves_what_an_uninterrupted_sweep_leaves(phase, uninterrupted):
    folder, data, reference = uninterrupted
    sweep_dir = folder / phase
    killed = sweep(sweep_dir, data, fault=phase)
    assert killed.returncode == 1, killed.stderr[-3000:]  # its jobs failed: the sweep says so
    out = killed.stdout + killed.stderr
    assert "2 failed" in out and "worker process died (killed by SIGKILL)" in out and "Traceback" not in out
    for job in JOBS:
        status = yaml.safe_load((sweep_dir / job / "status.yaml").read_text())
        assert status["status"] == "failed" and "SIGKILL" in status["error"], status  # never left `training`
    again = sweep(sweep_dir, data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 completed" in again.stdout + again.stderr
    for job in JOBS:
        scalars, status = logged(sweep_dir / job)
        want_scalars, want_status = reference[job]
        assert status == want_status
        assert scalars.keys() == want_scalars.keys()
        for tag, points in want_scalars.items():
            assert scalars[tag] == points, tag  # every step once, the same values


# --- a worker, a member, the parent, a second sweep -------------------------------------------------------

LONG_SWEEP = ["-m", "init=scaled,kaiming", "norm=none,batchnorm", "trainer.max_steps=200000", "callbacks=none",
              "trainer.enable_progress_bar=false", "hydra.launcher.n_jobs=2"]


def start_sweep(sweep_dir, data, *extra):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *LONG_SWEEP, *extra, f"data.path={data}",
                             f"hydra.sweep.dir={sweep_dir}"], cwd=sweep_dir.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_until_training(sweep_dir, jobs: int, timeout: float = 120) -> dict:
    """{job: its worker's pid} once `jobs` jobs are training."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        statuses = {p.parent.name: yaml.safe_load(p.read_text()) or {} for p in sweep_dir.glob("*/status.yaml")}
        training = {job: s["pid"] for job, s in statuses.items() if s.get("status") == "training"}
        if len(training) >= jobs and all(any((sweep_dir / j).glob("events.out.tfevents.*")) for j in training):
            time.sleep(1)  # past the first steps
            return training
        time.sleep(0.2)
    raise AssertionError("the sweep did not start training in time")


def statuses(sweep_dir) -> dict:
    return {p.parent.name: yaml.safe_load(p.read_text()) for p in sorted(sweep_dir.glob("*/status.yaml"))}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def data(tmp_path):
    from conftest import census_sample

    return census_sample(tmp_path / "names.txt")


def test_a_worker_killed_takes_only_its_own_group(data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(sweep_dir, data, "trainer.max_steps=30000")
    pids = wait_until_training(sweep_dir, jobs=4)
    os.kill(pids["init=scaled,norm=batchnorm"], signal.SIGKILL)  # as the OOM killer would
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    found = statuses(sweep_dir)
    assert [found[j]["status"] for j in ("init=scaled,norm=none", "init=kaiming,norm=none")] == ["completed"] * 2
    for job in ("init=scaled,norm=batchnorm", "init=kaiming,norm=batchnorm"):
        assert found[job]["status"] == "failed" and "killed by SIGKILL" in found[job]["error"]
    assert "2 completed, 0 already completed, 0 diverged, 2 failed" in out + err and "Traceback" not in out + err


def test_a_members_unwritable_checkpoints_fail_it_alone(data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "init=kaiming").mkdir(parents=True)
    (sweep_dir / "init=kaiming" / "checkpoints").write_text("a file where its folder would go\n")
    done = sweep(sweep_dir, data)
    assert done.returncode == 1, done.stderr[-3000:]
    found = statuses(sweep_dir)
    assert found["init=scaled"]["status"] == "completed"
    assert found["init=kaiming"]["status"] == "failed" and "could not save" in found["init=kaiming"]["error"]
    said = done.stdout + done.stderr
    assert "1 completed, 0 already completed, 0 diverged, 1 failed" in said and "Traceback" not in said


def test_the_parents_death_stops_its_workers_which_save_and_exit(data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(sweep_dir, data)
    pids = wait_until_training(sweep_dir, jobs=4)
    proc.kill()
    proc.communicate()
    deadline = time.time() + 60
    while any(alive(pid) for pid in pids.values()) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in pids.values())  # no orphan trains on
    for job, status in statuses(sweep_dir).items():
        assert status["status"] == "interrupted" and 0 < status["steps"] < 200000, (job, status)


def test_a_second_sweep_into_a_busy_dir_says_so_and_a_second_ctrl_c_stops_at_once(data, tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = start_sweep(sweep_dir, data)
    wait_until_training(sweep_dir, jobs=4)
    busy = subprocess.run([sys.executable, str(ROOT / "train.py"), *LONG_SWEEP, f"data.path={data}",
                           f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    said = busy.stdout + busy.stderr
    assert busy.returncode == 1 and "4 refused as busy" in said and "Traceback" not in said, said[-3000:]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    time.sleep(0.1)  # the second before the jobs end of themselves: they stop, save and exit within half a second
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in out + err and err.strip().splitlines()[-1].startswith("stopped at once by a second Ctrl-C")
    assert all(s["status"] == "interrupted" for s in statuses(sweep_dir).values()), statuses(sweep_dir)
    assert not list(sweep_dir.glob(".stop*"))  # nothing left to stop the next sweep


def test_a_single_run_killed_at_its_end_then_rerun_leaves_what_an_uninterrupted_run_leaves(uninterrupted):
    folder, data, _ = uninterrupted
    single = [a for a in SWEEP if a not in ("-m", "hydra.launcher.n_jobs=1")]
    single = ["init=kaiming" if a == "init=scaled,kaiming" else a for a in single]

    def run(run_dir, fault=None):
        env = {k: v for k, v in os.environ.items() if k not in ("ACTGRAD_FAULT", "ACTGRAD_SWEEP")}
        env.update({"ACTGRAD_FAULT": fault} if fault else {})
        return subprocess.run([sys.executable, str(ROOT / "train.py"), *single, f"data.path={data}",
                               f"hydra.run.dir={run_dir}"], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=120)

    assert run(folder / "single").returncode == 0
    assert run(folder / "killed", fault="after_training").returncode == -signal.SIGKILL
    again = run(folder / "killed")
    assert again.returncode == 0, again.stderr[-3000:]
    (scalars, status), (want_scalars, want_status) = logged(folder / "killed"), logged(folder / "single")
    assert status == want_status and scalars == want_scalars
