"""A bad command line is refused in one line that names the override and what is accepted;
whatever Hydra accepts passes, and composes to the config it says."""

import os
import subprocess
import sys

import pytest
from hydra import compose

from actgrad import checks
from actgrad.checks import ConfigError, check_overrides

from conftest import ROOT

CONF = ROOT / "conf"
INITS = "accepted: kaiming, naive, pytorch, scaled, scaled_output, xavier"


def cli(*args, cwd=ROOT):
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def refusal(*args) -> str:
    with pytest.raises(ConfigError) as err:
        check_overrides(list(args), CONF)
    message = str(err.value)
    assert "\n" not in message
    return message


def choices(cfg) -> dict:
    return cfg.hydra.runtime.choices


@pytest.fixture
def composed(monkeypatch):
    """The configs check_overrides composes, in order (the last is the last job's, with all its overrides)."""
    configs = []

    def spy(*args, **kwargs):
        configs.append(compose(*args, **kwargs))
        return configs[-1]

    monkeypatch.setattr(checks, "compose", spy)
    return configs


@pytest.mark.parametrize(
    "args, says",
    [
        (["init=foo"], f"init=foo: unknown init; {INITS}"),
        (["init="], f"init=: needs a value; {INITS}"),
        (["optimzer.lr=0.1"], "optimzer.lr=0.1: no such setting; did you mean optimizer.lr?"),
    ],
)
def test_what_hydra_refuses_the_cli_says_in_one_line(args, says):
    proc = cli("--cfg", "job", *args)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {says}"]


@pytest.mark.parametrize(
    "args, says",
    [
        (["optimizer.lr=fast"], "optimizer.lr='fast': must be a number > 0"),
        (["seed=abc"], "seed='abc': must be a whole number from 0 to 4294967295"),
    ],
)
def test_a_value_hydra_takes_is_refused_by_the_run_in_one_line_and_writes_nothing(args, says, tmp_path):
    proc = cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [f"error: {says}"]
    assert not (tmp_path / "run").exists()


def test_a_launch_checks_nothing_before_hydra(monkeypatch):
    """The one-line messages cost a launch nothing: check_overrides runs only once Hydra has failed."""
    ran = []
    monkeypatch.setattr(checks, "check_overrides", lambda *a: ran.append(a))
    with checks.one_line_errors(["init=naive"], CONF):
        pass
    assert ran == []
    with pytest.raises(SystemExit), checks.one_line_errors(["init=foo"], CONF):
        raise SystemExit(1)  # what Hydra's main does on a composition error
    assert ran == [(["init=foo"], CONF)]


SEEDS = "must be a whole number from 0 to 4294967295"
JOBS = "must be a whole number >= 1 (jobs at once)"


@pytest.mark.parametrize(
    "args, says",
    [
        (["seed=-5"], f"seed=-5: {SEEDS}"),
        (["-m", "seed=1,2", "hydra.launcher.n_jobs=0"], f"hydra.launcher.n_jobs=0: {JOBS}"),
        (["-m", "seed=1,2", "jobs_per_gpu=0"],
         "jobs_per_gpu=0: must be a whole number >= 1 (jobs sharing one GPU in a sweep)"),
    ],
)
def test_a_refused_run_or_sweep_leaves_nothing_in_the_working_dir(args, says, tmp_path):
    proc = cli(*args, cwd=tmp_path)  # into outputs/, as a user's command would
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: {says}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, says",
    [
        (["init=foo"], f"init=foo: unknown init; {INITS}"),
        (["init="], f"init=: needs a value; {INITS}"),
        (["callbacks=[default,nope]"],
         "callbacks=nope: unknown callbacks; accepted: activation_grads, activations,"),
        (["hydra/launcher=nope"],
         "hydra/launcher=nope: unknown hydra/launcher; accepted: basic, joblib, local, parallel"),
        (["-m", "init=naive,foo"], f"init=foo: unknown init; {INITS}"),
        (["-m", "init=naive,kaiming", "norm=none,nope"],
         "norm=nope: unknown norm; accepted: batchnorm, layernorm, none"),
        # Hydra itself stops with a traceback on a null group: the one way to none is the option none
        (["norm=null"],
         "norm=null: a config group takes one of its options, not null; accepted: batchnorm, layernorm, none"),
        (["optimzer.lr=0.1"], "optimzer.lr=0.1: no such setting; did you mean optimizer.lr?"),
        (["lr=0.1"], "lr=0.1: no such setting; did you mean optimizer.lr?"),
        (["trainer.max_step=10"], "trainer.max_step=10: no such setting; did you mean trainer.max_steps?"),
        (["optimizer.foo=1"], "optimizer.foo=1: no such setting; optimizer has: _target_, _partial_, lr, momentum"),
        (["foo=1"], "foo=1: no such setting; top-level keys are: data, norm, model, init, optimizer"),
        (["optimizer=adam", "optimizer.momentum=0.9"],
         "optimizer.momentum=0.9: no such setting; optimizer has: _target_"),
        (["seed=abc"], "seed='abc': expected an integer"),
        (["seed=null"], "seed=null: expected an integer"),
        (["-m", "seed=1,abc"], "seed='abc': expected an integer"),
        (["trainer.max_steps=1.5"], "trainer.max_steps=1.5: expected an integer"),
        (["optimizer.lr=fast"], "optimizer.lr='fast': expected a number"),
        (["compile=1"], "compile=1: expected true or false"),
        (["scheduler.at=0.5"], "scheduler.at=0.5: expected a list like [a,b]"),
        (["+seed=1"], "Could not append to config. An item is already at 'seed'"),
        (["~nope"], "Could not delete from config. 'nope' does not exist"),
        (["hydra.job.chdir=maybe"], "Error merging override hydra.job.chdir=maybe: Value 'maybe' is not a valid bool"),
        (["init=naive,kaiming"], "init=naive,kaiming: a sweep needs -m (--multirun); a list is written [a,b]"),
        (["a=[1,2"], "a=[1,2: cannot parse: no viable alternative at input '[1,2'"),
        (["a b=1"], "a b=1: cannot parse: unexpected ' ' at character 2"),
        (["seed"], "seed: cannot parse: missing EQUAL"),
        (["-m", "search=lr_gain", "optimzer.lr=tag(log, interval(0.01, 1.0))"],
         "optimzer.lr=tag(log, interval(0.01, 1.0)): no such setting; did you mean optimizer.lr?"),
        (["-m", "--cfg", "job", "init=naive"], "-m and --cfg: give only one of --run, --multirun, --cfg, --info"),
        # what Lightning's seed_everything takes; a launcher's job count; the run's threads
        (["seed=-5"], "seed=-5: must be a whole number from 0 to 4294967295"),
        (["seed=4294967296"], "seed=4294967296: must be a whole number from 0 to 4294967295"),
        (["-m", "seed=1,-2"], "seed=-2: must be a whole number from 0 to 4294967295"),
        (["-m", "seed=1,2", "hydra.launcher.n_jobs=0"], f"hydra.launcher.n_jobs=0: {JOBS}"),
        (["-m", "seed=1,2", "hydra.launcher.n_jobs=-1"], f"hydra.launcher.n_jobs=-1: {JOBS}"),
        (["-m", "seed=1,2", "hydra/launcher=parallel", "hydra.launcher.n_jobs=0"],
         f"hydra.launcher.n_jobs=0: {JOBS}, or -1 for one per CPU (joblib's)"),
        (["-m", "seed=1,2", "jobs_per_gpu=0"], "jobs_per_gpu=0: must be a whole number >= 1 (jobs sharing one GPU"),
        (["-m", "seed=1,2", "threads=-1"], "threads=-1: must be a whole number >= 0 (torch threads per run; 0 leaves"),
    ],
)
def test_bad_overrides_are_named_in_one_line(args, says):
    assert refusal(*args).startswith(says)


@pytest.mark.parametrize(
    "args",
    [["seed=0"], ["seed=4294967295"], ["-m", "seed=1,2", "threads=0"], ["-m", "seed=1,2", "hydra.launcher.n_jobs=1"],
     ["-m", "seed=1,2", "hydra/launcher=parallel", "hydra.launcher.n_jobs=-1"], ["-m", "seed=1,2", "jobs_per_gpu=2"]],
)
def test_counts_at_the_ends_of_their_ranges_pass(args):
    check_overrides(args, CONF)


def test_groups(composed):
    check_overrides(["callbacks=[default,never_fired]"], CONF)
    assert {"activations", "never_fired"} <= set(composed[-1].callbacks)
    check_overrides(["callbacks=[default, never_fired]"], CONF)
    assert {"activations", "never_fired"} <= set(composed[-1].callbacks)
    check_overrides(["callbacks=none"], CONF)
    assert not composed[-1].callbacks
    check_overrides(["callbacks=[]"], CONF)
    assert "callbacks" not in composed[-1]  # no option, so no node at all
    check_overrides(["norm=none"], CONF)
    assert not composed[-1].norm  # experiment.train builds no norm layer
    check_overrides(["search=lr_gain"], CONF)
    assert set(composed[-1].hydra.sweeper.params) == {"optimizer.lr", "init.gain"}
    check_overrides(["hydra/launcher=local"], CONF)
    assert composed[-1].hydra.launcher._target_.endswith("BasicLauncher")


def test_settings_hydra_settings_and_additions(composed):
    check_overrides(["data.path=/some/file", "trainer.max_steps=10", "hydra.run.dir=/tmp/x", "optimizer.lr=1",
                     "+callbacks.mine._target_=actgrad.callbacks.never_fired.NeverFired", "~compile", "trainer.devices=auto"],
                    CONF)
    cfg = composed[-1]
    assert cfg.data.path == "/some/file" and cfg.trainer.max_steps == 10 and cfg.hydra.run.dir == "/tmp/x"
    assert cfg.optimizer.lr == 1 and cfg.trainer.devices == "auto" and "compile" not in cfg
    assert cfg.callbacks.mine._target_ == "actgrad.callbacks.never_fired.NeverFired"


def test_a_sweep_composes_every_value(composed):
    check_overrides(["-m", "init=naive,scaled,kaiming", "norm=none,batchnorm", "trainer.max_steps=40"], CONF)
    assert {choices(c)["init"] for c in composed} == {"naive", "scaled", "kaiming"}
    assert {choices(c)["norm"] for c in composed} == {"none", "batchnorm"}
    assert {c.norm.get("_target_") for c in composed} == {None, "torch.nn.BatchNorm1d"}
    assert len(composed) < 2 * 3 * 2  # not the whole grid, twice over


def test_range_and_glob_sweeps_compose_every_value(composed):
    check_overrides(["-m", "optimizer.lr=range(0.01,0.1,0.03)"], CONF)
    assert sorted(round(c.optimizer.lr, 6) for c in composed[1:]) == [0.01, 0.04, 0.07, 0.1]
    composed.clear()
    check_overrides(["-m", "init=glob(*)"], CONF)
    assert {choices(c)["init"] for c in composed} == set(INITS.split(": ")[1].split(", "))


def test_an_optuna_search_interval_is_left_to_the_sweeper():
    check_overrides(["-m", "search=lr_gain", "optimizer.lr=tag(log, interval(0.01, 1.0))", "init=naive,kaiming"], CONF)


def test_flags_are_not_overrides_and_unusual_ones_leave_it_to_hydra(composed):
    check_overrides(["--cfg", "job", "--resolve", "--package", "optimizer"], CONF)
    check_overrides(["--info", "defaults"], CONF)
    assert composed == []  # no overrides: nothing to check
    check_overrides(["--config-name", "other", "init=foo"], CONF)  # another config: Hydra's to say
    check_overrides(["--experimental-rerun", "x.pickle"], CONF)
    assert refusal("--cfg=job", "init=foo").startswith("init=foo: unknown init")
    assert refusal("-i", "init=foo").startswith("init=foo: unknown init")  # not a topic of --info


def test_checking_creates_no_directory(tmp_path, monkeypatch):
    import actgrad.sweep  # noqa: F401  registers fresh_dir, which creates the directory it resolves to

    monkeypatch.chdir(tmp_path)
    check_overrides(["-m", "init=naive,kaiming", "trainer.max_steps=10"], CONF)
    check_overrides(["trainer.max_steps=10"], CONF)
    assert list(tmp_path.iterdir()) == []


def test_the_check_imports_neither_torch_nor_lightning():
    code = "import sys, actgrad.checks; sys.exit(sorted({'torch', 'lightning'} & set(sys.modules)) or None)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
