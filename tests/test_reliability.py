"""Never lose a user's files or a run's progress: refusals, resumes, signals, locks, full disks.

Every test that refuses something lists and hashes the files before and after.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from actgrad.checks import ConfigError
from actgrad.events import steps as logged_steps
from actgrad.experiment import train

from conftest import ROOT, TINY, make_config
from test_train import scalars

LOGS = {"train.log", "attempts.jsonl"}  # logs may gain lines; everything else stays byte for byte
LONG = ["trainer.max_steps=20000", "steps_per_batch=100", "log_every_n_steps=100", "val_every_n_steps=1000",
        "checkpoint_every_n_steps=2000", "trainer.enable_progress_bar=false", "callbacks=none", "model.n_hidden=50"]


def tree(folder: Path) -> dict:
    """{relative path: sha256} of every file under folder."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_kept(before: dict, after: dict, folder: Path, logs=LOGS):
    """Every file that was there is still there, byte for byte (a log may only gain lines)."""
    for name, digest in before.items():
        assert name in after, f"{name} was removed"
        if Path(name).name not in logs:
            assert after[name] == digest, f"{name} was changed"


def cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, HYDRA_FULL_ERROR="0", **(env or {})))


def start(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return errors[0]


def wait_for_training(run_dir: Path, proc, past_step: int = 0, timeout: float = 120):
    """Until the run has logged train/loss past `past_step` (read from its event files)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if any(run_dir.glob("events.out.tfevents.*")):
            if past_step == 0 or max((s for s, _ in scalars(run_dir).get("train/loss", [])), default=0) > past_step:
                return
        time.sleep(0.1)
    raise AssertionError("the run did not start training in time")


# --- 1. nothing a user owns is deleted or overwritten ---------------------------------------------

def test_a_refused_run_in_a_users_folder_leaves_it_as_it_was(tmp_path):
    folder = tmp_path / "scratch" / "d"
    folder.mkdir(parents=True)
    (folder / "keep").write_text("mine")
    (folder / "notes.md").write_text("# my notes\n")
    before = tree(tmp_path)
    proc = cli(*TINY, "optimizer.lr=-1", f"hydra.run.dir={folder}")
    assert proc.returncode == 1 and "optimizer.lr=-1" in one_error_line(proc)
    assert tree(tmp_path) == before  # nothing removed, nothing added


def test_run_dir_dot_in_a_scratch_folder_is_never_removed(tmp_path):
    scratch = tmp_path / "anything"
    scratch.mkdir()
    (scratch / "data.csv").write_text("a,b\n1,2\n")
    before = tree(tmp_path)
    proc = cli(*TINY, "optimizer.lr=-1", "hydra.run.dir=.", cwd=scratch)
    assert proc.returncode == 1 and "optimizer.lr=-1" in one_error_line(proc)
    assert tree(tmp_path) == before and scratch.is_dir()


def test_a_refused_run_into_a_new_dir_leaves_no_dir(tmp_path):
    run_dir = tmp_path / "new" / "deeper" / "run"
    proc = cli(*TINY, "model.n_hidden=0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1 and "model.n_hidden=0" in one_error_line(proc)
    assert list(tmp_path.iterdir()) == []  # the dirs this attempt made are gone, and only those


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory):
    """A completed tiny run made through the command line, once for this module (a copy per test)."""
    from conftest import census_sample

    folder = tmp_path_factory.mktemp("trained")
    names = census_sample(folder / "names.txt")
    proc = cli(*TINY, f"data.path={names}", f"hydra.run.dir={folder / 'run'}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return folder / "run", names


@pytest.fixture
def finished_run(trained_once, tmp_path):
    """A copy of the completed tiny run, its own to change, and the arguments that made it."""
    original, names = trained_once
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir, symlinks=True)
    return run_dir, [*TINY, f"data.path={names}", f"hydra.run.dir={run_dir}"]


@pytest.mark.parametrize("change, says", [
    ("model.n_hidden=100", "model.n_hidden 200 -> 100"),
    ("optimizer.lr=0.01", "optimizer.lr 0.1 -> 0.01"),
    ("optimizer=adam", "optimizer._target_"),
])
def test_a_refused_resume_into_a_finished_run_keeps_every_file(finished_run, change, says):
    run_dir, args = finished_run
    before = tree(run_dir)
    line = one_error_line(proc := cli(*args, change))
    assert proc.returncode == 1 and says in line and "another hydra.run.dir" in line and "init_from=" in line
    assert_kept(before, tree(run_dir), run_dir)
    assert set(tree(run_dir)) == set(before)


def test_a_truncated_checkpoint_is_refused_and_kept(finished_run):
    run_dir, args = finished_run
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    (run_dir / "status.yaml").write_text("status: interrupted\nsteps: 20\n")  # as if stopped, so it resumes
    before = tree(run_dir)
    proc = cli(*args)
    assert proc.returncode == 1 and "not a readable checkpoint" in one_error_line(proc)
    assert_kept(before, tree(run_dir), run_dir)


# --- 2. resume only what is the same run -----------------------------------------------------------

def test_a_completed_run_rerun_logs_nothing_new(finished_run):
    run_dir, args = finished_run
    before = tree(run_dir)
    proc = cli(*args)
    assert proc.returncode == 0 and "already completed" in proc.stdout + proc.stderr
    assert_kept(before, tree(run_dir), run_dir)
    assert sorted(tree(run_dir)) == sorted(before)


def test_init_from_starts_a_new_run_from_the_weights(finished_run, small_names, tmp_path):
    run_dir, _ = finished_run
    source = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    new_dir = tmp_path / "fine-tune"
    cfg = make_config(*TINY, f"data.path={small_names}", "optimizer.lr=0.01",
                      f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}", "trainer.max_steps=10")
    first = {}
    from lightning.pytorch import Callback

    class FirstWeights(Callback):
        def on_train_start(self, trainer, pl_module):
            first.update({k: v.clone() for k, v in pl_module.state_dict().items()})
            first["step"] = trainer.global_step

    results = train(cfg, new_dir, extra_callbacks=[FirstWeights()])
    assert results["status"] == "completed" and results["steps"] == 10 and first["step"] == 0
    assert all(torch.equal(first[k], v) for k, v in source["state_dict"].items())
    with pytest.raises(ConfigError, match="is of another model"):
        train(make_config(*TINY, f"data.path={small_names}", "model.n_hidden=30",
                          f"init_from={run_dir / 'checkpoints' / 'last.ckpt'}"), tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_a_checkpoint_without_a_config_record_is_refused(finished_run, small_names, tmp_path):
    run_dir, _ = finished_run
    old = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    del old["actgrad"]  # as written before checkpoints carried the config hash
    legacy = tmp_path / "legacy.ckpt"
    torch.save(old, legacy)
    with pytest.raises(ConfigError, match="no record of the config") as err:
        train(make_config(*TINY, f"data.path={small_names}", f"ckpt_path={legacy}"), tmp_path / "resumed")
    assert "init_from=" in str(err.value) and "\n" not in str(err.value)


def test_a_planted_pickle_is_refused_without_running(finished_run, small_names, tmp_path):
    run_dir, _ = finished_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "payload-ran"
    checkpoint["payload"] = Payload(str(marker))
    planted = tmp_path / "planted.ckpt"
    torch.save(checkpoint, planted)
    with pytest.raises(ConfigError, match="other than tensors"):
        train(make_config(*TINY, f"data.path={small_names}", f"ckpt_path={planted}"), tmp_path / "resumed")
    assert not marker.exists()


class Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # what a malicious checkpoint would do when unpickled


# --- 3. checkpoints that match the work -----------------------------------------------------------

def test_last_checkpoint_holds_the_final_weights_and_best_exists_when_validated(small_names, tmp_path):
    cfg = make_config(*TINY, f"data.path={small_names}", "trainer.max_steps=70", "val_every_n_steps=1000",
                      "checkpoint_every_n_steps=20")
    assert train(cfg, tmp_path)["status"] == "completed"
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 70  # not 60, the last multiple of the cadence
    assert not (tmp_path / "checkpoints" / "best.ckpt").exists()  # never validated (every 1,000 steps)
    assert not list(tmp_path.rglob("*.partial"))


# --- 4. signals ---------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum, rc", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_at_a_step_saves_and_resumes_to_the_same_result(signum, rc, small_names, tmp_path):
    args = [*LONG, f"data.path={small_names}"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    assert cli(*args, f"hydra.run.dir={full}").returncode == 0

    proc = start(*args, f"hydra.run.dir={stopped}")
    wait_for_training(stopped, proc, past_step=2500)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == rc, err[-2000:]
    status = yaml.safe_load((stopped / "status.yaml").read_text())
    assert status["status"] == "interrupted" and status["signal"] == signal.Signals(signum).name
    step = torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert step == status["steps"] and 2500 < step < 20000 and step % 100 == 0  # at a step boundary
    resume_line = [line for line in err.splitlines() if "Resume with:" in line]
    assert len(resume_line) == 1 and f"hydra.run.dir={stopped}" in resume_line[0]

    assert cli(*args, f"hydra.run.dir={stopped}").returncode == 0  # the same command resumes
    assert_same_run(full, stopped)


def assert_same_run(full: Path, resumed: Path):
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_logged, resumed_logged = scalars(full), scalars(resumed)
    assert set(full_logged) == set(resumed_logged)
    for tag, points in full_logged.items():
        steps = [s for s, _ in resumed_logged[tag]]
        assert len(steps) == len(set(steps)), f"{tag} has a step twice"
        assert resumed_logged[tag] == points, tag  # every step once, the same values
    assert logged_steps(resumed) == logged_steps(full)  # histograms and figures too, each step once


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(small_names, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(*LONG, "trainer.max_steps=2000000", f"data.path={small_names}", f"hydra.run.dir={run_dir}")
    # in the loop, where the run's own handler is: a Ctrl-C pair before it (the event file is written at fit
    # start) hung the run twice in full CI runs; that start-up window is noted as open in the closing note
    wait_for_training(run_dir, proc, past_step=100)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert yaml.safe_load((run_dir / "status.yaml").read_text())["status"] == "interrupted"


# --- 5. logs and weights that match a restart -------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [300, 4500])  # before the first checkpoint (2,000), and after two
def test_a_killed_run_resumes_with_every_step_logged_once(kill_after, small_names, tmp_path):
    args = [*LONG, "trainer.max_steps=8000", "callbacks=default", "callbacks.activations.every_n_steps=500",
            "callbacks.histograms.every_n_steps=2000", "callbacks.figures.every_n_steps=2000", f"data.path={small_names}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli(*args, f"hydra.run.dir={full}").returncode == 0
    proc = start(*args, f"hydra.run.dir={killed}")
    wait_for_training(killed, proc, past_step=kill_after)
    proc.kill()
    proc.wait()
    assert yaml.safe_load((killed / "status.yaml").read_text())["status"] == "training"
    resumed = cli(*args, f"hydra.run.dir={killed}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(full, killed)


# --- 6. one run per directory at a time ------------------------------------------------------------

@pytest.mark.slow
def test_a_second_run_into_a_busy_dir_stops_naming_the_first(small_names, tmp_path):
    run_dir = tmp_path / "run"
    args = [*LONG, "trainer.max_steps=2000000", f"data.path={small_names}", f"hydra.run.dir={run_dir}"]
    first = start(*args)
    wait_for_training(run_dir, first)
    for other in ([], ["seed=2"]):  # the same run, and another
        second = cli(*args, *other)
        assert second.returncode == 1 and f"pid {first.pid}" in one_error_line(second)
    assert first.poll() is None  # still training, undisturbed
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=60)
    assert first.returncode == 143
    steps = [s for s, _ in scalars(run_dir)["train/loss"]]
    assert steps == list(range(100, steps[-1] + 1, 100))  # one run's points, each once
    assert not (run_dir / ".lock").exists()


def test_a_lock_left_by_a_dead_process_does_not_block(small_names, tmp_path):
    (tmp_path / ".lock").write_text("pid 999999 on elsewhere, since yesterday\n")
    assert train(make_config(*TINY, f"data.path={small_names}"), tmp_path)["status"] == "completed"


# --- 7. failures say what happened ---------------------------------------------------------------

@pytest.mark.slow
def test_a_full_disk_ends_in_a_failed_status_and_one_line(small_names, tmp_path):
    run_dir = tmp_path / "run"
    limit = "import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); " \
            "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000)); sys.argv = sys.argv[1:]; " \
            "runpy.run_path(sys.argv[0], run_name='__main__')"
    args = [*TINY, "trainer.max_steps=3000", "callbacks=full", f"data.path={small_names}", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run([sys.executable, "-c", limit, str(ROOT / "train.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    status = yaml.safe_load((run_dir / "status.yaml").read_text())
    assert status["status"] == "failed" and "File too large" in status["error"] and "\n" not in status["error"]
    assert "not currently supported" not in proc.stdout + proc.stderr  # no second, misleading error
    assert not list(run_dir.rglob("*.partial"))


def test_a_finite_but_exploding_loss_counts_as_diverged(small_names, tmp_path):
    cfg = make_config(*TINY, "trainer.max_steps=200", "optimizer.lr=1e9", f"data.path={small_names}")
    results = train(cfg, tmp_path)
    assert results["status"] == "diverged" and "above" in results["error"]


# --- the sweep ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_interrupted_sweep_stops_its_jobs_and_one_command_resumes_it(small_names, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "init=scaled,kaiming", *LONG, "trainer.max_steps=40000", f"data.path={small_names}",
            f"hydra.sweep.dir={sweep}"]
    proc = start(*args)
    deadline = time.time() + 120
    while len(list(sweep.glob("*/events.out.tfevents.*"))) < 2 and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)  # the parent only, as a scheduler would
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    for job in ("init=scaled", "init=kaiming"):
        status = yaml.safe_load((sweep / job / "status.yaml").read_text())
        assert status["status"] == "interrupted", status
    assert "resume the sweep" in out + err
    again = cli(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(yaml.safe_load((sweep / j / "status.yaml").read_text())["status"] == "completed"
               for j in ("init=scaled", "init=kaiming"))
    attempts = [json.loads(l) for l in (sweep / "init=scaled" / "attempts.jsonl").read_text().splitlines()]
    assert attempts[-2]["from_step"] > 0  # it resumed, it did not start over
    # the comparison run of the resumed sweep: each configuration's line is its run's, every step once
    from actgrad import compare, events

    runs = {sweep / j: compare.RunEvents(sweep / j) for j in ("init=scaled", "init=kaiming")}
    for job, run in runs.items():
        steps, means, _, n = compare.series_line([job], runs, "val/loss")
        logged = events.scalars(job)["val/loss"]
        assert n == 1 and steps == [s for s, _ in logged] and len(set(steps)) == len(steps)
        assert means == pytest.approx([v for _, v in logged])
    board = events.accumulate(sweep / "compare")
    table = board.Tensors("Sweep loss table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| init=scaled | 1 |" in table and "| init=kaiming | 1 |" in table and "Not drawn" not in table


@pytest.mark.slow
def test_slurm_preemption_saves_into_the_run_dir_then_submitit_requeues(small_names, tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "requeued"
    args = [*LONG, "trainer.max_steps=200000", f"data.path={small_names}", f"hydra.run.dir={run_dir}"]
    # a stand-in for submitit: its handler of the preemption signal is installed before the run starts,
    # requeues (here: writes a marker) and exits, as submitit's checkpoint_and_try_requeue does
    child = f"""
import runpy, signal, sys
def requeue(signum, frame):
    open({str(marker)!r}, "w").write(str(signum))
    sys.exit(255)
signal.signal(signal.SIGUSR2, requeue)
sys.argv = [{str(ROOT / 'train.py')!r}, *{args!r}]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
    proc = subprocess.Popen([sys.executable, "-c", child], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, SUBMITIT_PREEMPT_SIGNAL="USR2"))
    wait_for_training(run_dir, proc, past_step=2500)
    proc.send_signal(signal.SIGUSR2)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 255 and marker.read_text() == str(int(signal.SIGUSR2)), err[-2000:]
    status = yaml.safe_load((run_dir / "status.yaml").read_text())
    assert status["status"] == "interrupted" and status["signal"] == "SIGUSR2"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == status["steps"]
    assert not list(tmp_path.glob("*.ckpt")) and not (tmp_path / "hpc_ckpt_1.ckpt").exists()  # nothing in the cwd
