"""What a lightning-hydra-template user expects: logger, debug, experiment and trainer groups; one name per
knob (a Trainer setting actgrad decides is refused, any other is Lightning's); the end of a run says where
it wrote; every run records what produced it."""

import csv
import os
import subprocess
import sys

import pytest
import yaml
from lightning.pytorch import Callback

from actgrad.checks import ConfigError, check_overrides, plugin_hint
from actgrad.experiment import end_line, format_value, train

from conftest import ROOT, TINY, make_config
from test_train import run_cli, scalars


@pytest.mark.parametrize(
    "override, says",
    [
        ("trainer.log_every_n_steps=10", "trainer.log_every_n_steps=10: actgrad sets it; use log_every_n_steps=10"),
        ("+trainer.log_every_n_steps=10", "trainer.log_every_n_steps=10: actgrad sets it; use log_every_n_steps=10"),
        ("+trainer.val_check_interval=500", "actgrad sets it; use val_every_n_steps=500"),
        ("trainer.check_val_every_n_epoch=2", "actgrad sets it; use val_every_n_steps=<steps>"),
        ("+trainer.logger=false", "trainer.logger=false: actgrad sets it; use logger=<tensorboard, csv"),
        ("+trainer.callbacks=[]", "actgrad sets it; use callbacks=<option>"),
        ("+trainer.enable_checkpointing=false", "use checkpoint_every_n_steps=<steps>"),
        ("+trainer.fast_dev_run=true", "trainer.fast_dev_run=true: actgrad sets it; use debug=fdr"),
        ("+trainer.default_root_dir=x", "use hydra.run.dir=<dir>"),
        ("+trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val=1.0: not supported; actgrad steps the optimizer"),
        ("+trainer.accumulate_grad_batches=4", "trainer.accumulate_grad_batches=4: not supported"),
        ("+trainer.overfit_batches=1", "trainer.overfit_batches=1: actgrad sets it; use debug=overfit"),
    ],
)
def test_a_trainer_setting_actgrad_decides_is_refused_naming_the_key_to_use(override, says, tmp_path):
    with pytest.raises(ConfigError) as err:
        check_overrides([override], ROOT / "conf")
    assert says in str(err.value) and "\n" not in str(err.value)
    # the same refusal where no command line was checked: a sweep's job, or train(cfg) called directly
    in_default = override.startswith(("+", "trainer.check_val_every_n_epoch"))
    with pytest.raises(ConfigError) as err:
        train(make_config(*TINY, override if in_default else f"+{override}"), tmp_path / "run")
    assert says in str(err.value)
    assert not (tmp_path / "run").exists()


def test_a_swept_trainer_setting_is_refused_too():
    with pytest.raises(ConfigError, match="trainer.accumulate_grad_batches=4: not supported"):
        check_overrides(["-m", "+trainer.accumulate_grad_batches=1,4"], ROOT / "conf")


@pytest.mark.parametrize("override", ["+trainer.precision=64-true", "+trainer.profiler=simple",
                                      "+trainer.limit_val_batches=0", "+trainer.accumulate_grad_batches=1"])
def test_any_other_trainer_setting_is_lightnings(override, small_names, tmp_path):
    check_overrides([override], ROOT / "conf")  # passes
    seen = {}

    class Look(Callback):
        def on_train_start(self, trainer, module):
            seen.update(precision=trainer.precision, profiler=type(trainer.profiler).__name__,
                        limit_val_batches=trainer.limit_val_batches)

    results = train(make_config(*TINY, f"data.path={small_names}", override), tmp_path / "run", extra_callbacks=[Look()])
    assert results["status"] == "completed"
    key, value = override.removeprefix("+trainer.").split("=")
    if key == "precision":
        assert seen["precision"] == "64-true"
    elif key == "profiler":
        assert seen["profiler"] == "SimpleProfiler"
    elif key == "limit_val_batches":
        assert seen["limit_val_batches"] == 0


def test_logger_csv_gets_every_scalar_and_no_event_files(small_names, tmp_path):
    results = train(make_config(*TINY, f"data.path={small_names}", "logger=csv"), tmp_path / "run")
    assert results["status"] == "completed"
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = sorted({int(r["step"]) for r in rows if r["train/loss"]})
    assert steps == [10, 20, 30, 40]  # log_every_n_steps=10, max_steps=40
    final = [r for r in rows if r["final/val_loss"]]
    assert len(final) == 1 and float(final[0]["final/val_loss"]) == pytest.approx(results["final/val_loss"])


def test_several_loggers_at_once_get_the_same_scalars(small_names, tmp_path):
    results = train(make_config(*TINY, f"data.path={small_names}", "logger=[tensorboard,csv]"), tmp_path / "run")
    logged = scalars(tmp_path / "run")  # TensorBoard's reader
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["train/loss"]]
    assert [(int(r["step"]), pytest.approx(float(r["train/loss"]))) for r in rows] == \
        [(step, value) for step, value in logged["train/loss"]]
    assert results["status"] == "completed"


def test_a_logger_whose_package_is_missing_is_one_line_with_the_install_command(small_names, tmp_path):
    pytest.importorskip("lightning.pytorch.loggers.wandb")
    try:
        import wandb  # noqa: F401
        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(ConfigError) as err:
        train(make_config(*TINY, f"data.path={small_names}", "logger=wandb"), tmp_path / "run")
    assert str(err.value).startswith("logger=wandb: ") and "pip install" in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


def test_a_logger_choice_is_not_part_of_the_run(small_names, tmp_path):
    """The same run under another logger is the same run (its config hash): it is not refused."""
    train(make_config(*TINY, f"data.path={small_names}"), tmp_path / "run")
    again = train(make_config(*TINY, f"data.path={small_names}", "logger=csv"), tmp_path / "run")
    assert again.get("skipped") and again["status"] == "completed"


def test_debug_fdr_runs_every_code_path_and_leaves_nothing(small_names, tmp_path):
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir(), scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=fdr", f"data.path={small_names}"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "run completed at step 4; removed what it wrote" in proc.stdout + proc.stderr
    assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []


def test_debug_fdr_writes_checkpoints_and_every_diagnostic_before_removing(small_names, tmp_path):
    cfg = make_config("debug=fdr", f"data.path={small_names}", "trainer.enable_progress_bar=false", "keep_run=true")
    results = train(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["steps"] == 4
    assert {p.name for p in (tmp_path / "run" / "checkpoints").iterdir()} == {"best.ckpt", "last.ckpt"}
    logged = scalars(tmp_path / "run")
    assert [s for s, _ in logged["act/saturation/layer1"]] == [0, 1, 2, 3] and "val/loss" in logged


@pytest.mark.parametrize("choice, key, value", [
    ("experiment=deep", "model.n_layers", 5), ("experiment=deep", "model.n_hidden", 100),
    ("experiment=lecture", "trainer.max_steps", 200000), ("debug=limit", "trainer.max_steps", 2000),
    ("debug=profiler", "trainer.profiler", "simple"), ("trainer=cpu", "trainer.accelerator", "cpu"),
    ("trainer=gpu", "trainer.accelerator", "gpu"), ("trainer=mps", "trainer.accelerator", "mps"),
    ("trainer=cpu", "trainer.max_steps", 200000),  # inherits the default
])
def test_presets_set_what_they_say(composer, choice, key, value):
    cfg = composer(choice)
    node = cfg
    for part in key.split("."):
        node = node[part]
    assert node == value


def test_experiment_lecture_sweeps_the_lectures_eight_runs(composer):
    from hydra import compose

    cfg = compose(config_name="config", overrides=["experiment=lecture"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == {"init": "naive,scaled_output,scaled,kaiming", "norm": "none,batchnorm"}


@pytest.mark.parametrize("group", ["logger", "debug", "experiment", "trainer"])
def test_an_unknown_option_lists_the_accepted_ones(group):
    with pytest.raises(ConfigError) as err:
        check_overrides([f"{group}=nope"], ROOT / "conf")
    assert f"{group}=nope: unknown {group}; accepted: " in str(err.value)


def test_a_missing_hydra_plugin_says_how_to_install_it():
    assert plugin_hint("In 'search/lr_gain': Could not find 'hydra/sweeper/optuna'") == \
        '; a Hydra plugin that is not installed: pip install -e ".[optuna]"'
    assert plugin_hint("Could not find 'hydra/launcher/submitit_slurm'").endswith('pip install -e ".[slurm]"')
    assert plugin_hint("Could not find 'init/foo'") == ""


def test_numbers_print_with_sensible_precision():
    assert [format_value(v) for v in (2.07123456, 3.8e31, float("nan"), 1.5e-5, 40)] == \
        ["2.0712", "3.8e+31", "nan", "1.5e-05", "40"]


def test_the_end_of_a_run_says_where_it_wrote_its_status_and_how_to_look(small_names, tmp_path, caplog):
    caplog.set_level("INFO", logger="actgrad.experiment")
    train(make_config(*TINY, f"data.path={small_names}"), tmp_path / "run")
    last = caplog.records[-1].getMessage().splitlines()
    assert last[0].startswith(f"run {tmp_path / 'run'}: completed at step 40; loss train ")
    assert last[1] == (f"look at it: tensorboard --logdir {tmp_path / 'run'}, then http://localhost:6006/?smoothing=0#timeseries "
                       '(TIME SERIES; in SCALARS and CUSTOM SCALARS set smoothing 0 and untick "Ignore outliers" yourself)')
    assert end_line(tmp_path / "x", {"status": "diverged", "steps": 1200, "final/train_loss": 3.8e31}, []) == \
        f"run {tmp_path / 'x'}: diverged at step 1,200; loss train 3.8e+31"


def test_every_run_records_what_produced_it(small_names, tmp_path):
    train(make_config(*TINY, f"data.path={small_names}"), tmp_path / "run")
    record = yaml.safe_load((tmp_path / "run" / "provenance.yaml").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert record["git"]["commit"] == (head or None) and isinstance(record["git"]["dirty"], (bool, type(None)))
    import hydra
    import lightning
    import torch

    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["lightning"] == lightning.__version__
    assert record["versions"]["hydra-core"] == hydra.__version__ and record["device"]["type"] == "cpu"
    from actgrad import events

    card = events.read(tmp_path / "run").Tensors("provenance/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"| git.commit | {head or None} |" in card and f"| versions.torch | {torch.__version__} |" in card


def test_wandb_gets_scalars_histograms_figures_and_the_status(small_names, tmp_path, monkeypatch):
    """Offline: wandb writes its run into <run dir>/wandb; `wandb sync` would upload it."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = train(make_config(*TINY, f"data.path={small_names}", "logger=wandb", "callbacks=default"),
                    tmp_path / "run")
    assert results["status"] == "completed"
    (folder,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    record = next(folder.glob("run-*.wandb")).read_bytes()
    for expected in (b"train/loss", b"final/val_loss", b"act/saturation/layer1", b'"histogram"', b'"completed"'):
        assert expected in record
    figures = {p.name.rsplit("_", 2)[0] for p in (folder / "files" / "media" / "images" / "figures").glob("*.png")}
    assert figures == {"act", "act_grad", "param_grad", "update_ratio"}
    # the next run of the same process (a sweep's worker) is a wandb run of its own, in its own dir
    train(make_config(*TINY, f"data.path={small_names}", "logger=wandb", "seed=1"), tmp_path / "next")
    assert len(list((tmp_path / "next" / "wandb").glob("offline-run-*"))) == 1


def test_mlflow_gets_scalars_figures_and_the_status(small_names, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = train(make_config(*TINY, f"data.path={small_names}", "logger=mlflow", "callbacks=default",
                                f"logger.mlflow.tracking_uri={uri}",
                                f"logger.mlflow.artifact_location={tmp_path / 'artifacts'}"), tmp_path / "run")
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("actgrad").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["status"] == "completed"
    assert [(m.step, pytest.approx(m.value)) for m in client.get_metric_history(run.info.run_id, "final/val_loss")] == \
        [(40, results["final/val_loss"])]
    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures/act")]
    assert figures == ["figures/act/step_00000000.png", "figures/act/step_00000039.png"]
    assert (tmp_path / "artifacts").is_dir()  # not ./mlruns wherever the tests run


@pytest.mark.parametrize("launcher", ["local", "parallel"])
def test_a_sweeps_end_names_tensorboard_and_the_report(launcher, small_names, tmp_path):
    """A single-process sweep and a process per job (the stacked one: tests/test_compare.py) end alike."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", f"hydra/launcher={launcher}", "init=naive,kaiming", *TINY, f"data.path={small_names}",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert f"sweep {sweep}: 2 completed, 0 already completed, 0 diverged, 0 failed" in said
    assert (f"look at it: tensorboard --logdir {sweep}, then http://localhost:6006/?smoothing=0#timeseries (TIME SERIES; "
            'in SCALARS and CUSTOM SCALARS set smoothing 0 and untick "Ignore outliers" yourself); '
            f"its loss table: python scripts/report.py {sweep}") in said
    assert f"comparison: {sweep / 'compare'}" in said  # the sweep's comparison run, after its summary
    from actgrad import events

    table = events.accumulate(sweep / "compare").Tensors("Sweep loss table/text_summary")[0].tensor_proto.string_val[0]
    assert "| init=naive | 1 |" in table.decode() and "| init=kaiming | 1 |" in table.decode()


def test_a_device_this_machine_lacks_is_one_line_and_leaves_nothing(small_names, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as err:
        train(make_config(*TINY, f"data.path={small_names}", "trainer=gpu"), tmp_path / "run")
    assert str(err.value) == "trainer (accelerator=gpu, devices=1): No supported gpu backend found!"
    assert not (tmp_path / "run").exists()


def test_debug_overfit_drives_the_train_loss_far_below_the_val_loss(small_names, tmp_path):
    """96 examples seen over and over: a model that can learn memorises them (independent check: the
    logged train/loss against the val loss of examples it never saw, and the loss of those 96)."""
    from actgrad import events

    cfg = make_config("debug=overfit", f"data.path={small_names}", "trainer.max_steps=1500", "callbacks=none",
                      "trainer.enable_progress_bar=false", "scheduler=constant")
    results = train(cfg, tmp_path / "run")
    train_loss = events.scalars(tmp_path / "run")["train/loss"][-1][1]
    assert train_loss < 0.5 * results["final/val_loss"], (train_loss, results)
    first = make_config(f"data.path={small_names}", "callbacks=none", "trainer.max_steps=1500", "scheduler=constant",
                        "trainer.enable_progress_bar=false")
    assert events.scalars(tmp_path / "run")["train/loss"][-1][1] < train(first, tmp_path / "all")["final/train_loss"]
