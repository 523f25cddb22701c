"""The two ways to extend actgrad: a diagnostic of one's own, and a plain Lightning callback."""

import os
import subprocess
import sys

import pytest
import torch
from lightning.pytorch import Callback

from actgrad.checks import ConfigError, check_config
from actgrad.experiment import train

from conftest import ROOT, TINY, make_config
from test_train import scalars

MY_DIAGNOSTIC = '''
from actgrad.diagnostic import Diagnostic


class LossTimesTwo(Diagnostic):
    needs = {"layers"}

    def compute(self, snapshot):
        return {"mine/loss_x2": snapshot.loss * 2, "mine/out": snapshot.layers["layer1"].out}
'''


def test_a_diagnostic_from_a_folder_of_ones_own_is_added_with_one_override(small_names, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "loss_x2.py").write_text(MY_DIAGNOSTIC)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *TINY, f"data.path={small_names}",
                           f"hydra.run.dir={run_dir}", "+callbacks.mine._target_=loss_x2.LossTimesTwo",
                           "+callbacks.mine.every_n_steps=10"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path / "mine")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    logged = scalars(run_dir)
    assert [s for s, _ in logged["mine/loss_x2"]] == [0, 10, 20, 30, 39]  # and the last step
    from actgrad.events import steps as logged_steps

    assert logged_steps(run_dir)[("histogram", "mine/out")] == [0, 10, 20, 30, 39]


class CountHooks(Callback):
    """A callback as the Lightning docs teach it: the step hooks with Lightning's signatures."""

    def __init__(self):
        self.seen = {"on_before_backward": [], "on_after_backward": [], "on_before_optimizer_step": []}

    def on_before_backward(self, trainer, pl_module, loss):
        self.seen["on_before_backward"].append(trainer.global_step)

    def on_after_backward(self, trainer, pl_module):
        self.seen["on_after_backward"].append(trainer.global_step)
        assert all(p.grad is not None for p in pl_module.parameters())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.seen["on_before_optimizer_step"].append(trainer.global_step)


def test_a_plain_lightning_callback_sees_every_step_and_training_is_the_same(small_names, tmp_path):
    args = [*TINY, f"data.path={small_names}", "callbacks=default", "callbacks.activations.every_n_steps=5"]
    hooks = CountHooks()
    lightning_path = train(make_config(*args), tmp_path / "lightning", extra_callbacks=[hooks])
    fast_path = train(make_config(*args), tmp_path / "fast")
    assert lightning_path["status"] == fast_path["status"] == "completed"
    assert hooks.seen == {hook: list(range(40)) for hook in hooks.seen}  # every step, global_step = steps before
    a = torch.load(tmp_path / "lightning" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "fast" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 40
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert scalars(tmp_path / "lightning")["act/saturation/layer1"] == scalars(tmp_path / "fast")["act/saturation/layer1"]


class Quiet(Callback):
    def on_train_end(self, trainer, pl_module):
        self.ended_at = trainer.global_step


def test_a_callback_without_step_hooks_keeps_the_fast_path(small_names, tmp_path):
    quiet = Quiet()
    train(make_config(*TINY, f"data.path={small_names}"), tmp_path, extra_callbacks=[quiet])
    assert quiet.ended_at == 40
    from actgrad.module import needs_lightning_path

    assert not needs_lightning_path(type("T", (), {"callbacks": [quiet], "precision": "32-true"}))
    assert needs_lightning_path(type("T", (), {"callbacks": [quiet], "precision": "bf16-mixed"}))
    assert needs_lightning_path(type("T", (), {"callbacks": [CountHooks()], "precision": "32-true"}))


def test_a_stacked_snapshot_gives_each_member_its_own_snapshot():
    """A run of M stacked members (leading dimension M on every tensor) hands member i's diagnostics
    snapshot.member(i): what a run of one would have recorded."""
    from actgrad.snapshot import Layer, Snapshot
    from actgrad.callbacks.activations import Activations

    g = torch.Generator().manual_seed(0)
    pre = torch.randn(3, 16, 8, generator=g)
    stacked = Snapshot(step=5, loss=torch.rand(3, generator=g), lr=0.1,
                       layers={"layer1": Layer(torch.nn.Tanh(), pre, pre.tanh(), torch.randn(3, 16, 8, generator=g))},
                       params={"layer1.weight": torch.randn(3, 8, 4, generator=g)},
                       grads={"layer1.weight": torch.randn(3, 8, 4, generator=g)})
    d = Activations(every_n_steps=1)
    for i in range(3):
        alone = Snapshot(step=5, loss=stacked.loss[i], lr=0.1,
                         layers={"layer1": Layer(torch.nn.Tanh(), pre[i], pre[i].tanh(), stacked.layers["layer1"].grad[i])},
                         params={"layer1.weight": stacked.params["layer1.weight"][i]},
                         grads={"layer1.weight": stacked.grads["layer1.weight"][i]})
        a, b = d.compute(stacked.member(i)), d.compute(alone)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert d.compute(stacked.member(0))["act/std/layer1"] != d.compute(stacked.member(1))["act/std/layer1"]


def test_an_exception_in_a_diagnostic_stops_the_run_with_its_traceback_and_keeps_the_checkpoint(small_names, tmp_path,
                                                                                                  caplog):
    from actgrad.diagnostic import Diagnostic

    class Buggy(Diagnostic):
        def compute(self, snapshot):
            if snapshot.step == 30:
                raise ZeroDivisionError("a bug in a diagnostic")
            return {}

    cfg = make_config(*TINY, f"data.path={small_names}", "checkpoint_every_n_steps=20")
    results = train(cfg, tmp_path, extra_callbacks=[Buggy(every_n_steps=10)])
    assert results["status"] == "failed" and "ZeroDivisionError: a bug in a diagnostic" in results["error"]
    assert any(r.exc_info and r.exc_info[0] is ZeroDivisionError for r in caplog.records)  # the traceback is logged
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20


def test_the_diagnostics_are_actgrad_callbacks_and_nothing_installs_a_top_level_callbacks(tmp_path):
    probe = ("import importlib.util, actgrad.callbacks.figures as f; "
             "print(importlib.util.find_spec('callbacks') is None, f.__name__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["True", "actgrad.callbacks.figures"], done.stderr[-2000:]


def test_a_target_under_the_old_top_level_name_is_refused_in_one_line(tmp_path):
    cfg = make_config(*TINY, "+callbacks.mine._target_=callbacks.figures.DistributionFigures")
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert str(err.value) == ("callbacks.mine._target_=callbacks.figures.DistributionFigures: the diagnostics are the "
                              "package actgrad.callbacks; use _target_=actgrad.callbacks.figures.DistributionFigures")
