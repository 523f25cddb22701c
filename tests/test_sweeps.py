import math
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from actgrad import sweep
from actgrad.sweep import fresh_dir, parallel_jobs

from conftest import ROOT, TINY, read_statuses
from test_train import run_cli, scalars


def test_parallel_jobs_fills_the_cores_or_the_gpus(monkeypatch):
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(sweep, "gpu_count", lambda: 0)
    assert parallel_jobs(1, 1) == 8 and parallel_jobs(2, 1) == 4 and parallel_jobs(16, 1) == 1
    monkeypatch.setattr(sweep, "gpu_count", lambda: 4)
    assert parallel_jobs(1, 1) == 4 and parallel_jobs(1, 3) == 12


def test_fresh_dir_never_hands_out_a_directory_twice(tmp_path):
    dirs = [fresh_dir(str(tmp_path / "2026-11-23_12-00-00")) for _ in range(3)]
    assert len(set(dirs)) == 3 and all((tmp_path / d).is_dir() for d in dirs)


def compose_with_hydra(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


def test_default_launcher_stacks_jobs_and_runs_groups_in_parallel():
    cfg = compose_with_hydra()
    assert cfg.hydra.launcher._target_.endswith("StackedLauncher") and cfg.hydra.launcher.n_jobs >= 1
    assert compose_with_hydra("hydra/launcher=parallel").hydra.launcher._target_.endswith("JoblibLauncher")


def test_slurm_launcher_config_composes():
    cfg = compose_with_hydra("hydra/launcher=slurm", "hydra.launcher.partition=gpu")
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    assert cfg.hydra.launcher.partition == "gpu" and cfg.hydra.launcher.gpus_per_node == 1


def test_optuna_search_config_composes():
    cfg = compose_with_hydra("search=lr_gain")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert set(cfg.hydra.sweeper.params) == {"optimizer.lr", "init.gain"}
    assert cfg.objective == "final/val_loss" and cfg.hydra.sweeper.direction == "minimize"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "parallel", "stacked"])
def test_real_multirun_with_each_launcher(launcher, small_names, tmp_path):
    proc = run_cli("-m", "init=naive,scaled,kaiming", "norm=none,batchnorm", *TINY, f"data.path={small_names}",
                   f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    statuses = read_statuses(tmp_path)
    assert sorted(statuses) == sorted(f"init={i},norm={n}" for i in ("naive", "scaled", "kaiming")
                                      for n in ("none", "batchnorm"))
    assert all(s["status"] == "completed" for s in statuses.values())
    assert "6 completed, 0 already completed, 0 diverged, 0 failed" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_a_diverging_job_does_not_take_the_sweep_down(small_names, tmp_path):
    with_diagnostics = [o for o in TINY if not o.startswith("callbacks=")]
    proc = run_cli("-m", "optimizer.lr=0.1,1e30", *with_diagnostics, f"data.path={small_names}",
                   f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]  # divergence is a result, not a failure
    statuses = read_statuses(tmp_path)
    assert statuses["optimizer.lr=0.1"]["status"] == "completed"
    assert statuses["optimizer.lr=1e+30"]["status"] == "diverged"
    assert statuses["optimizer.lr=1e+30"]["steps"] <= 20  # stopped within a log interval or two
    assert "1 completed, 0 already completed, 1 diverged, 0 failed" in proc.stderr + proc.stdout
    logged = scalars(tmp_path / "optimizer.lr=1e+30")
    assert "final/steps" in logged

    sys.path.insert(0, str(ROOT / "scripts"))
    from report import report

    rows = {row["run"]: row for row in report(tmp_path)}
    assert rows["optimizer.lr=1e+30"]["status"] == "diverged"
    good = rows["optimizer.lr=0.1"]
    assert good["status"] == "completed"
    assert good["val loss"] == pytest.approx(statuses["optimizer.lr=0.1"]["final/val_loss"], rel=1e-6)
    assert good["ln(V)"] == pytest.approx(math.log(27), rel=1e-6)
    assert 0 <= good["peak saturation"] <= 1
    assert "layer1.weight:" in good["final update ratio (log10, weights)"]
    for name in ("report.md", "report.csv", "loss_curves.png", "saturation.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| optimizer.lr=1e+30 | diverged |" in (tmp_path / "report.md").read_text()


@pytest.mark.slow
def test_a_failing_job_is_recorded_and_fails_the_sweep_at_the_end(small_names, tmp_path):
    proc = run_cli("-m", "model.n_hidden=0,20", *TINY, f"data.path={small_names}", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode != 0
    statuses = read_statuses(tmp_path)
    assert statuses["model.n_hidden=20"]["status"] == "completed"  # the other job still ran
    failed = statuses["model.n_hidden=0"]
    assert failed["status"] == "failed" and "model.n_hidden=0" in failed["error"]
    # what it leaves: why it failed, for the summary and the report; no event files, no checkpoints
    assert sorted(p.name for p in (tmp_path / "model.n_hidden=0").iterdir()) == ["attempts.jsonl", "status.yaml",
                                                                                 "train.log"]
    assert "1 completed, 0 already completed, 0 diverged, 1 failed" in proc.stderr + proc.stdout


@pytest.mark.slow
def test_two_sweeps_started_together_write_to_distinct_directories(small_names, tmp_path):
    args = [sys.executable, str(ROOT / "train.py"), "-m", "init=naive,kaiming", *TINY, "hydra/launcher=local",
            f"data.path={small_names}", f"hydra.sweep.dir=${{fresh_dir:{tmp_path}/sweep}}"]
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    sweeps = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("sweep"))
    assert sweeps == ["sweep", "sweep-2"]
    for name in sweeps:
        assert len(read_statuses(tmp_path / name)) == 2


def test_the_report_prints_a_diverged_loss_short():
    sys.path.insert(0, str(ROOT / "scripts"))
    from report import fmt

    assert [fmt(v) for v in (3.8e31, 2.07123, float("nan"), -3.5, 1e-5)] == ["3.8e+31", "2.0712", "-", "-3.5000", "1e-05"]
