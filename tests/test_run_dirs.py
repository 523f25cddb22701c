"""A run's or a sweep job's directory, named after its overrides, stays inside its root whatever the
overrides' values hold (+tag=../../x); names without such characters are the ones they always were."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from actgrad.sweep import dir_name, swept_overrides

from conftest import ROOT, TINY
from test_train import run_cli

ESCAPING = "+tag=../../../../../escaped"  # from outputs/runs/<date>/: out of outputs/ and of the working dir


@pytest.mark.parametrize("name", ["", "init=kaiming,norm=batchnorm", "optimizer.lr=0.1,seed=1,trainer.max_steps=300",
                                  "+tag=a.b,c=..x", "run"])
def test_a_name_without_separators_is_kept_as_it_is(name):
    assert dir_name(name) == name  # resume finds existing run dirs by these names


@pytest.mark.parametrize("name, safe", [("+tag=../../x", "+tag=.._.._x"), ("+tag=a\\b", "+tag=a_b"),
                                        ("+tag=a\0b", "+tag=a_b"), ("..", "__"), (".", "_"), ("/", "_")])
def test_separators_and_dot_names_are_escaped(name, safe):
    assert dir_name(name) == safe


def hydra_config(monkeypatch, *overrides):
    """The composed config with its Hydra node, set as Hydra sets it for a job (undone after the test)."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    HydraConfig.instance().set_config(cfg)
    return cfg


def test_a_run_dir_resolves_inside_outputs_runs(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = hydra_config(monkeypatch, ESCAPING, "seed=3")
    run_dir = Path(cfg.hydra.run.dir)
    assert run_dir.parent.parent == Path("outputs/runs")
    assert run_dir.name == "+tag=.._.._.._.._.._escaped,seed=3"


def test_a_sweep_jobs_name_stays_one_directory(monkeypatch, tmp_path):
    sweep = tmp_path / "sweep"
    hydra_config(monkeypatch, "+tag=../../x", "seed=1", f"hydra.sweep.dir={sweep}")
    assert swept_overrides() == "+tag=.._.._x,seed=1"  # no multirun.yaml: every override names the job
    sweep.mkdir()
    OmegaConf.save({"hydra": {"overrides": {"task": ["seed=1,2", "+tag=../../x,../y"]}}}, sweep / "multirun.yaml")
    hydra_config(monkeypatch, "seed=1", "+tag=../y", f"hydra.sweep.dir={sweep}")
    assert swept_overrides() == "seed=1,+tag=.._y"


def everything_under(root: Path) -> set[Path]:
    return {Path(dirpath) / name for dirpath, dirs, files in os.walk(root) for name in dirs + files}


def assert_only_inside(top: Path, run_dir: Path, own_files=(), own_dirs=()):
    """Everything under top is the run dir, inside it, or one of its parents (with `own_files` and `own_dirs`,
    a sweep dir's: its multirun.yaml, its comparison run): nothing stray, nothing empty."""
    for path in everything_under(top):
        own = path.name in own_files and run_dir.is_relative_to(path.parent)
        own = own or any(path.is_relative_to(run_dir.parent / d) for d in own_dirs)
        assert path.is_relative_to(run_dir) or run_dir.is_relative_to(path) or own, path


@pytest.mark.slow
def test_a_run_with_a_traversing_value_writes_inside_outputs(small_names, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(*TINY, f"data.path={small_names}", ESCAPING, cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [dated] = (work / "outputs" / "runs").iterdir()
    [run_dir] = dated.iterdir()
    assert run_dir.name.startswith("+tag=.._.._.._.._.._escaped,") and (run_dir / "status.yaml").is_file()
    assert_only_inside(work, run_dir)
    assert set(tmp_path.iterdir()) == {work, small_names}


@pytest.mark.slow
def test_a_sweep_with_a_traversing_value_writes_inside_its_dir(small_names, tmp_path):
    sweep = tmp_path / "work" / "sweep"
    proc = run_cli("-m", *TINY, f"data.path={small_names}", ESCAPING, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    [run_dir] = [p for p in sweep.iterdir() if p.is_dir() and p.name != "compare"]  # one job: named after all its overrides
    assert run_dir.name.startswith("+tag=.._.._.._.._.._escaped,") and (run_dir / "status.yaml").is_file()
    assert_only_inside(tmp_path / "work", run_dir, own_files={"multirun.yaml"}, own_dirs={"compare"})
    assert set(tmp_path.iterdir()) == {tmp_path / "work", small_names}
