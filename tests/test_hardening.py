"""Whatever happens to one run, the rest is there in the morning and a rerun picks up."""

import signal
import subprocess
import sys

import pytest
import torch
import yaml

from actgrad.checkpoint import AtomicCheckpointIO
from actgrad.checks import ConfigError
from actgrad.experiment import train

from conftest import TINY, make_config
from test_fast_path import StopAt
from test_train import run_cli, scalars

LONG = ["trainer.max_steps=30000", "steps_per_batch=100", "log_every_n_steps=100", "val_every_n_steps=1000",
        "trainer.enable_progress_bar=false", "callbacks=none", "model.n_hidden=50"]


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "w": torch.ones(3)}, path)
    # a child process that dies (SIGKILL) in the middle of writing the next checkpoint
    child = f"""
import os, signal, torch
from actgrad.checkpoint import AtomicCheckpointIO
def dying_save(obj, f):
    f.write(b"half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({{"global_step": 2}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["w"], torch.ones(3))


def test_divergence_stops_the_run_with_a_clear_status_and_histograms_survive(small_names, tmp_path):
    cfg = make_config(*[o for o in TINY if not o.startswith("callbacks=")], "callbacks=full", "trainer.max_steps=200",
                      "optimizer.lr=1e30", f"data.path={small_names}")
    results = train(cfg, tmp_path)
    assert results["status"] == "diverged" and results["steps"] <= 20
    assert "diverged" in results["error"] and "nan" in results["error"].lower()
    assert yaml.safe_load((tmp_path / "status.yaml").read_text())["status"] == "diverged"


def bad_input(tmp_path, *overrides):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train(make_config(*TINY, *overrides), run_dir)
    message = str(err.value)
    assert "\n" not in message and not run_dir.exists()
    return message


@pytest.mark.parametrize(
    "override, says",
    [
        ("optimizer.lr=0", "optimizer.lr=0: must be a number > 0"),
        ("optimizer.lr=-1", "optimizer.lr=-1: must be a number > 0"),
        ("optimizer.lr=fast", "optimizer.lr='fast': must be a number > 0"),
        ("model.n_hidden=abc", "model.n_hidden='abc': must be a positive whole number"),
        ("model.n_hidden=0", "model.n_hidden=0: must be a positive whole number"),
        ("model.n_layers=-2", "model.n_layers=-2: must be a positive whole number"),
        ("data.batch_size=0", "data.batch_size=0: must be a positive whole number"),
        ("data.block_size=-1", "data.block_size=-1: must be a positive whole number"),
        ("trainer.max_steps=0", "trainer.max_steps=0: must be a number > 0"),
        ("model.activation=swish", "model.activation='swish': accepted values are tanh"),
        ("seed=-5", "seed=-5: must be a whole number from 0 to 4294967295"),
        ("threads=-1", "threads=-1: must be a whole number >= 0"),
        ("jobs_per_gpu=0", "jobs_per_gpu=0: must be a whole number >= 1"),
        # the optimizer is built before anything is written, not first inside fit
        ("optimizer.momentum=-0.5", "optimizer.momentum=-0.5: invalid momentum, must be a number >= 0"),
        ("+optimizer.nesterov=true", "optimizer.nesterov=True: Nesterov momentum requires a momentum > 0"),
        ("+optimizer.foo=1", "optimizer: SGD.__init__() got an unexpected keyword argument 'foo'"),
    ],
)
def test_bad_settings_are_one_line_and_leave_nothing(override, says, small_names, tmp_path):
    assert says in bad_input(tmp_path, override, f"data.path={small_names}")


def test_a_resume_says_nothing_of_tensorboards_purge(small_names, tmp_path, caplog):
    cfg = make_config(*TINY, f"data.path={small_names}", "checkpoint_every_n_steps=10")
    assert train(cfg, tmp_path, extra_callbacks=[StopAt(20)])["status"] == "interrupted"
    assert train(cfg, tmp_path)["status"] == "completed"  # its end reads the events back, purged from step 20
    assert "Detected out of order event.step" not in caplog.text


# Lightning's note on resuming a loader it cannot save (a stacked group's), word for word, and TensorBoard's
# reader's on a purge. pytest sets its own warning filters for each test: the import's are seen in a process.
QUIET = """
import logging, warnings
from lightning.fabric.utilities.warnings import PossibleUserWarning
import actgrad.experiment
warnings.warn("You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not "
              "resumable. This can cause unreliable results if further training is done. Consider using an "
              "end-of-epoch checkpoint or make your dataloader resumable by implementing the `state_dict` / "
              "`load_state_dict` interface.", PossibleUserWarning)
logging.basicConfig(format="%(message)s")
logging.getLogger("tensorboard").warning("Detected out of order event.step likely caused by a TensorFlow restart. "
                                         "Purging expired events from Tensorboard display between the previous "
                                         "step: -1 (timestamp: -1) and current step: 20 (timestamp: 1.0).")
logging.getLogger("tensorboard").warning("any other warning of TensorBoard's")
"""


def test_lightnings_loader_note_and_tensorboards_purge_note_are_filtered_and_nothing_else():
    proc = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr.splitlines() == ["any other warning of TensorBoard's"], proc.stderr


@pytest.mark.parametrize(
    "content, says",
    [(b"", "has 0 names"), (b"\x00\x01binary\x00", "binary"), (b"anna\n", "has 1 names")],
)
def test_bad_data_files_are_one_line_and_leave_nothing(content, says, tmp_path):
    path = tmp_path / "names.txt"
    path.write_bytes(content)
    message = bad_input(tmp_path, f"data.path={path}")
    assert says in message and str(path) in message


def test_missing_or_unreadable_data_path(tmp_path, monkeypatch):
    assert "no such file" in bad_input(tmp_path, f"data.path={tmp_path / 'nope.txt'}")
    unreadable = tmp_path / "secret.txt"
    unreadable.write_text("anna\n" * 20)
    real_read_bytes = type(unreadable).read_bytes

    def denied(self):  # root reads any file, so deny it the way the OS would for another user
        if self == unreadable:
            raise PermissionError(13, "Permission denied")
        return real_read_bytes(self)

    monkeypatch.setattr(type(unreadable), "read_bytes", denied)
    assert "cannot read" in bad_input(tmp_path, f"data.path={unreadable}")


def test_a_checkpoint_of_another_model_shape_is_refused(small_names, tmp_path):
    train(make_config(*TINY, f"data.path={small_names}", "model.n_hidden=20"), tmp_path / "small")
    ckpt = tmp_path / "small" / "checkpoints" / "last.ckpt"
    message = bad_input(tmp_path, f"data.path={small_names}", "model.n_hidden=30", f"ckpt_path={ckpt}")
    assert f"ckpt_path={ckpt} was made with another config (model.n_hidden 20 -> 30)" in message
    assert f"init_from={ckpt}" in message
    assert "ckpt_path=" in bad_input(tmp_path, f"data.path={small_names}", f"ckpt_path={tmp_path}/x.ckpt")


@pytest.mark.slow
def test_unknown_group_and_unwritable_output_fail_in_one_line(tmp_path):
    for args, says in [(["init=foo"], "init=foo: unknown init; accepted: kaiming, naive"),
                       (["hydra.run.dir=/proc/actgrad/run"], "hydra.run.dir=/proc/actgrad/run: cannot write there")]:
        proc = run_cli(*args)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines() == [f"error: {proc.stderr.strip()[7:]}"] and says in proc.stderr


@pytest.mark.slow
def test_same_seed_same_curve_across_processes_other_seed_differs(small_names, tmp_path):
    curves = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        assert run_cli(*TINY, f"seed={seed}", f"data.path={small_names}", f"hydra.run.dir={tmp_path / name}").returncode == 0
        curves[name] = scalars(tmp_path / name)["train/loss"]
    assert curves["a"] == curves["b"]  # bit-identical floats
    assert curves["a"] != curves["c"]


def test_event_files_grow_linearly_with_logged_points(small_names, tmp_path):
    def size(steps):
        run_dir = tmp_path / str(steps)
        cfg = make_config(*[o for o in TINY if not o.startswith("callbacks=")], f"trainer.max_steps={steps}",
                          f"data.path={small_names}", "callbacks=full")
        train(cfg, run_dir)
        return sum(p.stat().st_size for p in run_dir.rglob("events.out.tfevents.*"))  # the run and its layers' subruns

    s100, s200, s400 = size(100), size(200), size(400)
    growth = (s400 - s200) / (s200 - s100)  # twice the steps logged, twice the bytes
    assert 1.6 < growth < 2.4, (s100, s200, s400)
