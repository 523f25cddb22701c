"""The diagnostics in a project of the user's: a module file of its own in a temporary folder that
imports only lightning and actgrad.callbacks, a plain L.Trainer, a small CNN with ReLU and BatchNorm2d.
Each logged value is checked against the same training written by hand in plain torch."""

import copy
import csv
import importlib
import math
import sys

import pytest
import torch
import torch.nn.functional as F

torch.set_num_threads(1)

PROJECT = '''
"""A user's project: their own model and LightningModule."""
import contextlib

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

import actgrad.callbacks
from actgrad.callbacks.activation_grads import ActivationGrads
from actgrad.callbacks.activations import Activations
from actgrad.callbacks.initial_loss import InitialLoss
from actgrad.callbacks.param_grads import ParamGrads
from actgrad.callbacks.update_ratio import UpdateRatio


class Classifier(L.LightningModule):
    def __init__(self, blowup_at=None):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                   nn.Linear(4 * 6 * 6, 10))
        self.blowup_at = blowup_at

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        return loss * math.inf if batch_idx == self.blowup_at else loss  # non-finite gradients: a scaler skips the step

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class ManualClassifier(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()


class Float32Scaled(MixedPrecision):
    """A GradScaler scaling by 1024 as 16-bit training would, without autocast: float32 numbers on CPU."""

    def __init__(self):
        super().__init__("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=10**6))

    def autocast_context_manager(self):
        return contextlib.nullcontext()


def dataset(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 10, (n,), generator=g))


def diagnostics():
    return [InitialLoss(num_classes=10), Activations(every_n_steps=1), ActivationGrads(every_n_steps=1),
            ParamGrads(every_n_steps=1), UpdateRatio(every_n_steps=1)]


def fit(module, callbacks, logger, max_steps=3, accumulate=1, plugins=None):
    trainer = L.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, callbacks=callbacks, logger=logger,
                        plugins=plugins, accelerator="cpu", devices=1, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1, log_every_n_steps=1)
    trainer.fit(module, DataLoader(dataset(64, 0), batch_size=8), DataLoader(dataset(16, 1), batch_size=8))
    return trainer
'''.replace("import contextlib", "import contextlib\nimport math", 1)


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "myproject.py").write_text(PROJECT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("myproject", None)
    yield importlib.import_module("myproject")
    sys.modules.pop("myproject", None)


def csv_logger(path):
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(path, name="", version="")


def logged(path) -> dict:
    """{tag: {step: value}} of a CSVLogger's metrics.csv."""
    out = {}
    with open(path / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for tag, v in row.items():
                if tag != "step" and v != "":
                    out.setdefault(tag, {})[int(row["step"])] = float(v)
    return out


def by_hand(model, batches, steps, accumulate=1, skip=(), lr=0.1):
    """The same training in plain torch: per step, (loss, accumulated grads, the last micro-batch's ReLU
    output and d (its loss) / d output, the parameters before the update, after); a step in `skip` is not
    applied (a scaler skipped it)."""
    model = copy.deepcopy(model)
    seen = {}

    def keep(module, inputs, out):
        seen["out"] = out.detach().clone()
        out.register_hook(lambda g: seen.__setitem__("grad", g * accumulate))  # of the micro-batch's own loss

    model[2].register_forward_hook(keep)
    records, batches = [], iter(batches)
    for step in range(steps):
        for p in model.parameters():
            p.grad = None
        loss = 0.0
        for _ in range(accumulate):
            x, y = next(batches)
            micro = F.cross_entropy(model(x), y) / accumulate
            micro.backward()
            loss = loss + micro.detach()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        if step not in skip:
            with torch.no_grad():
                for p in model.parameters():
                    p -= lr * p.grad
        after = {n: p.detach().clone() for n, p in model.named_parameters()}
        records.append({"loss": loss, "grads": grads, "out": seen["out"], "out_grad": seen["grad"], "before": before,
                        "after": after})
    return records


def batches(project):
    return [(x, y) for x, y in torch.utils.data.DataLoader(project.dataset(64, 0), batch_size=8)]


CONV, LINEAR = "layer1.model.0.weight", "model.4.weight"  # each parameter's tag: the layer it feeds


def check_step(values, record, step):
    close = lambda a, b: a == pytest.approx(float(b), rel=1e-4, abs=1e-7)  # noqa: E731
    for tag, name in ((CONV, "0.weight"), (LINEAR, "4.weight")):
        g, w, u = record["grads"][name], record["before"][name], record["after"][name] - record["before"][name]
        assert close(values[f"param_grad/std/{tag}"][step], g.std()), (tag, step)
        assert close(values[f"update_ratio/{tag}"][step], torch.log10(u.std() / w.std())), (tag, step)
    out = record["out"]
    assert close(values["act/std/layer1"][step], out.std())
    assert close(values["act/saturation/layer1"][step], (out <= 0).float().mean())  # ReLU: flat where 0
    assert close(values["act_grad/std/layer1"][step], record["out_grad"].std())


def test_gradient_accumulation_logs_the_accumulated_gradient_and_the_last_micro_batch(project, tmp_path):
    torch.manual_seed(0)
    module = project.Classifier()
    hand = by_hand(module.model, batches(project), steps=3, accumulate=2)
    project.fit(module, project.diagnostics(), csv_logger(tmp_path / "logs"), max_steps=3, accumulate=2)
    values = logged(tmp_path / "logs")
    for step in range(3):
        check_step(values, hand[step], step)
    assert values["init/loss"] == {0: pytest.approx(float(hand[0]["loss"]), rel=1e-5)}  # the mean of its micro-batches
    assert values["init/uniform_loss"] == {0: pytest.approx(math.log(10))}
    assert all(torch.allclose(p, hand[-1]["after"][n], atol=1e-6) for n, p in module.model.named_parameters())


def test_gradients_are_logged_unscaled_and_a_step_the_scaler_skips_is_logged_as_skipped(project, tmp_path):
    torch.manual_seed(0)
    module = project.Classifier(blowup_at=2)
    hand = by_hand(module.model, batches(project), steps=4, skip={2})
    trainer = project.fit(module, project.diagnostics(), csv_logger(tmp_path / "logs"), max_steps=4,
                          plugins=[project.Float32Scaled()])
    assert trainer.precision_plugin.scaler.get_scale() == 512.0  # it scaled by 1024, and backed off once
    values = logged(tmp_path / "logs")
    assert values["grad_scaler/skipped"] == {2: 1.0}
    assert all(2 not in values[tag] for tag in (f"update_ratio/{CONV}", f"param_grad/std/{CONV}", "act/std/layer1"))
    for step in (0, 1, 3):
        check_step(values, hand[step], step)  # 1024 times the gradients if read scaled
    assert values["init/loss"][0] == pytest.approx(float(hand[0]["loss"]), rel=1e-5)


def test_manual_optimization(project, tmp_path):
    torch.manual_seed(0)
    module = project.ManualClassifier()
    hand = by_hand(module.model, batches(project), steps=3)
    project.fit(module, project.diagnostics(), csv_logger(tmp_path / "logs"))
    values = logged(tmp_path / "logs")
    for step in range(3):
        check_step(values, hand[step], step)
    assert values["init/loss"][0] == pytest.approx(float(hand[0]["loss"]), rel=1e-5)  # the loss given to manual_backward


def test_the_default_bundle_changes_nothing_and_writes_what_an_actgrad_run_does(project, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from actgrad.events import read

    def final_state(callbacks, logger):
        torch.manual_seed(0)
        module = project.Classifier()
        project.fit(module, callbacks, logger, max_steps=4, accumulate=2)
        return module.state_dict()

    plain = final_state([], False)
    watched = final_state([project.actgrad.callbacks.default(num_classes=10)],
                          TensorBoardLogger(tmp_path / "tb", name="", version=""))
    assert plain.keys() == watched.keys()
    assert all(torch.equal(plain[k], watched[k]) for k in plain)  # BatchNorm's running statistics too

    events = read(tmp_path / "tb")
    tags = events.Tags()
    assert [e.step for e in events.Scalars("act/saturation/layer1")] == [0, 3]  # step 0 and the last
    assert [e.step for e in events.Scalars(f"update_ratio/{CONV}")] == [0, 3]
    assert {"init/loss", "init/uniform_loss", "bn_calibration/mean_error/layer1",
            "bn_calibration/val_loss_running", "bn_calibration/val_loss_calibrated"} <= set(tags["scalars"])
    assert {"act/layer1", f"param_grad/{CONV}"} <= set(tags["histograms"])
    assert {"figures/act", "figures/act_grad", "figures/param_grad", "figures/update_ratio"} <= set(tags["images"])
    assert "custom_scalars__config__" in tags["tensors"]
    assert "Start here/text_summary" in tags["tensors"]
    assert (tmp_path / "tb" / "layer1").is_dir()  # the layer's own run, as in an actgrad run


def test_batchnorm_calibration_without_a_forward_says_so_and_changes_nothing(project, caplog):
    import logging
    from types import SimpleNamespace

    from actgrad.callbacks.bn_calibration import BNCalibration

    class NoForward(project.L.LightningModule):  # training_step calls self.model: no forward of its own
        def __init__(self):
            super().__init__()
            self.model = project.Classifier().model

    module = NoForward()
    state = copy.deepcopy(module.state_dict())
    trainer = SimpleNamespace(datamodule=None, loggers=[], global_step=3)
    with caplog.at_level(logging.WARNING, logger="actgrad.callbacks.bn_calibration"):
        BNCalibration().on_train_end(trainer, module)
    assert "NoForward has no forward()" in caplog.text
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in state.items())
