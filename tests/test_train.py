import itertools
import os
import subprocess
import sys

import pytest
import torch
import yaml

from actgrad.experiment import build, train

from conftest import ROOT, TINY, make_config

GROUPS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
          for group in ("init", "norm", "optimizer", "scheduler", "model", "data", "trainer", "callbacks")}


from actgrad.events import scalars  # noqa: E402  (the tests' reader is the project's)


CHOICES = ("init", "norm", "optimizer", "scheduler")


@pytest.mark.parametrize("choice", itertools.product(*[GROUPS[g] for g in CHOICES]), ids="-".join)
def test_every_combination_of_groups_composes_and_trains(choice, small_names, tmp_path):
    overrides = [f"{g}={c}" for g, c in zip(CHOICES, choice)]
    cfg = make_config(*TINY, "trainer.max_steps=20", f"data.path={small_names}", *overrides)
    results = train(cfg, tmp_path)
    assert results["status"] == "completed" and results["steps"] == 20
    assert results["final/train_loss"] < 4.0 or "init=naive" in overrides


def test_step_decay_follows_the_lecture(small_names, tmp_path):
    cfg = make_config(*TINY, "trainer.max_steps=100", f"data.path={small_names}")
    train(cfg, tmp_path)
    lr = dict(scalars(tmp_path)["lr"])
    assert lr[40] == pytest.approx(0.1) and lr[50] == pytest.approx(0.01) and lr[100] == pytest.approx(0.01)


def test_run_leaves_losses_hparams_and_checkpoints(small_names, tmp_path):
    cfg = make_config(*TINY, f"data.path={small_names}")
    results = train(cfg, tmp_path)
    logged = scalars(tmp_path)
    assert [s for s, _ in logged["train/loss"]] == [10, 20, 30, 40]
    assert [s for s, _ in logged["val/loss"]][-1] == 40
    assert logged["final/val_loss"][0][1] == pytest.approx(results["final/val_loss"], rel=1e-6)
    assert {"last.ckpt", "best.ckpt"} <= {p.name for p in (tmp_path / "checkpoints").iterdir()}
    status = yaml.safe_load((tmp_path / "status.yaml").read_text())
    assert status["status"] == "completed"
    run = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert run["run_config"]["init._target_"] == "actgrad.init.kaiming"

    # the logged train loss is the mean of the losses of the steps it covers: recompute them
    data, module = build(cfg)
    xs, ys = zip(*[(x, y) for x, y in data.train_dataloader().__class__(
        *data.splits["train"], 32, 1, 10, cfg.seed)])
    optimizer = module.make_optimizer(module.net.parameters())
    losses = []
    for x, y in zip(xs, ys):
        loss = torch.nn.functional.cross_entropy(module.net(x[0]), y[0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert logged["train/loss"][0][1] == pytest.approx(sum(losses) / 10, rel=1e-5)


def test_best_checkpoint_is_the_lowest_val_loss(small_names, tmp_path):
    cfg = make_config(*TINY, "trainer.max_steps=60", "val_every_n_steps=10", f"data.path={small_names}")
    train(cfg, tmp_path)
    val = scalars(tmp_path)["val/loss"]
    best = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    best_step = min(val, key=lambda sv: sv[1])[0]
    assert best["global_step"] == best_step


def run_cli(*args, cwd=ROOT, timeout=300):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_lecture_multirun_leaves_six_named_runs(small_names, tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "init=naive,scaled,kaiming", "norm=none,batchnorm", *TINY, f"data.path={small_names}",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != "compare")  # and the sweep's comparison run
    assert len(runs) == 6 and (sweep / "compare").is_dir()
    for init, norm in itertools.product(["naive", "scaled", "kaiming"], ["none", "batchnorm"]):
        [run] = [r for r in runs if r.name.startswith(f"init={init},norm={norm}")]
        assert len(list(run.glob("events.out.tfevents.*"))) >= 1
        logged = scalars(run)
        assert {"train/loss", "val/loss", "test/loss", "final/val_loss"} <= set(logged)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, complaint",
    [("init=foo", "init"), ("optimizer.lr=-1", "optimizer.lr=-1"), ("model.n_hidden=0", "model.n_hidden=0"),
     ("data.path=/nope", "data.path=/nope")],
)
def test_bad_overrides_fail_in_one_line_and_leave_nothing(override, complaint, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, override, f"hydra.run.dir={run_dir}")
    assert proc.returncode != 0
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if complaint in l]
    assert lines, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not run_dir.exists()


def test_sample_script_rebuilds_the_run_and_samples_names(small_names, tmp_path):
    cfg = make_config(*TINY, f"data.path={small_names}")
    train(cfg, tmp_path / "run")
    small_names.rename(tmp_path / "moved.txt")  # the checkpoint is all it needs

    def sample(path, seed):
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sample.py"), str(path), "--n", "10",
                               "--seed", str(seed)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    names = sample(tmp_path / "run", seed=1)  # a run dir: its checkpoints/last.ckpt
    assert len(names) == 10 and all(names)
    assert names == sample(tmp_path / "run" / "checkpoints" / "last.ckpt", seed=1) != sample(tmp_path / "run", seed=2)
    assert all(set(name) <= set("abcdefghijklmnopqrstuvwxyz") for name in names)
