"""Each diagnostic against an independent computation on the same tensors.

The expected values come from the MLP written out by hand from a snapshot of its parameters
(`manual_forward`) and from parameter snapshots taken around each optimizer step; the
diagnostics are driven through the step protocol of actgrad.module (see `run_steps`): the loop
records one Snapshot on each watched step and hands it to every watching diagnostic.
"""

import functools
import logging
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger

from actgrad import init
from actgrad.diagnostic import layout
from actgrad.snapshot import Recorder as SnapshotRecorder
from actgrad.writer import Writer
from actgrad.model import MLP
from actgrad.callbacks.activation_grads import ActivationGrads
from actgrad.callbacks.activations import Activations
from actgrad.callbacks.figures import DistributionFigures
from actgrad.callbacks.histograms import Histograms
from actgrad.callbacks.initial_loss import InitialLoss
from actgrad.callbacks.never_fired import NeverFired
from actgrad.callbacks.param_grads import ParamGrads
from actgrad.callbacks.update_ratio import UpdateRatio
from actgrad.callbacks.update_ratio_figure import UpdateRatioFigure

torch.set_num_threads(1)  # tiny models; the machine's other core may be busy
NAMES = Path(__file__).resolve().parents[2] / "shared/data/names.txt"

MODELS = [
    pytest.param(n_layers, norm, activation, id=f"{n_layers}layer-{'bn' if norm else 'nonorm'}-{activation}")
    for n_layers in (1, 5) for norm in (False, True) for activation in ("tanh", "relu")
]


# ---------------------------------------------------------------- harness


class Recorder:
    """A logger that keeps every scalar: {tag: {step: value}}."""

    def __init__(self):
        self.scalars = {}

    def log_metrics(self, metrics, step):
        for tag, value in metrics.items():
            self.scalars.setdefault(tag, {})[step] = value


def make_net(n_layers, norm, activation, seed=0, n_hidden=16, rule=init.naive):
    torch.manual_seed(seed)
    net = MLP(n_embd=4, n_hidden=n_hidden, n_layers=n_layers, activation=activation,
              norm=nn.BatchNorm1d if norm else None)
    rule(net)
    return net


def make_trainer(diagnostics, tmp_path=None, datamodule=None):
    loggers = [Recorder()]
    if tmp_path is not None:
        loggers.append(TensorBoardLogger(save_dir=str(tmp_path), name="", version=""))
    for d in diagnostics:
        d.writer = Writer(loggers)
    return SimpleNamespace(loggers=loggers, callbacks=list(diagnostics), global_step=0, datamodule=datamodule)


def run_steps(net, diagnostics, trainer, n_steps, optimizer=None, scheduler=None, batch_size=32, seed=0):
    """What LanguageModel's fast path does, step by step; returns what each step saw:
    {step: (state before, x, y, state after)}."""
    optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    seen = {}
    for step in range(n_steps):
        x = torch.randint(0, 27, (batch_size, 3), generator=g)
        y = torch.randint(0, 27, (batch_size,), generator=g)
        before = snapshot(net)
        watching = [d for d in diagnostics if d.wants(step)]
        recorder = SnapshotRecorder(net, set().union(*(d.needs for d in watching))) if watching else None
        if recorder:
            recorder.start()
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recorder:
            recorder.before_update()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if watching:
            shot = recorder.snapshot(step, loss, optimizer.param_groups[0]["lr"])
            for d in watching:
                d.observe(shot)
        seen[step] = (before, x, y, snapshot(net))
    trainer.global_step = n_steps
    return seen


def finish(diagnostics, trainer, net):
    module = SimpleNamespace(net=net)
    for d in diagnostics:
        d.teardown(trainer, module, "fit")
    for logger in trainer.loggers[1:]:
        logger.experiment.flush()


def snapshot(net):
    return {name: t.detach().clone() for name, t in net.state_dict().items()}


def manual_forward(state, x, activation, eps=1e-5):
    """The MLP by hand from a state dict: [(pre-activation, output) per hidden layer], logits.
    BatchNorm in training mode: batch mean and biased variance."""
    n_layers = len([k for k in state if re.fullmatch(r"blocks\.\d+\.linear\.weight", k)])
    h = state["embedding.weight"][x].reshape(len(x), -1)
    layers = []
    for i in range(n_layers):
        pre = h @ state[f"blocks.{i}.linear.weight"].T
        if f"blocks.{i}.linear.bias" in state:
            pre = pre + state[f"blocks.{i}.linear.bias"]
        if f"blocks.{i}.norm.weight" in state:
            var = ((pre - pre.mean(0)) ** 2).mean(0)
            pre = (pre - pre.mean(0)) / torch.sqrt(var + eps) * state[f"blocks.{i}.norm.weight"] + state[f"blocks.{i}.norm.bias"]
        h = torch.tanh(pre) if activation == "tanh" else torch.where(pre > 0, pre, torch.zeros_like(pre))
        layers.append((pre, h))
    return layers, h @ state["output.weight"].T + state["output.bias"]


def weight_names(state):
    """Tag names of the weight matrices, written out independently of actgrad.diagnostic.param_name."""
    names = {"embedding.weight": "embedding.weight"}
    names |= {k: f"layer{int(k.split('.')[1]) + 1}.weight" for k in state if re.fullmatch(r"blocks\.\d+\.linear\.weight", k)}
    return names | {"output.weight": "output.weight"}


def manual_grads(state, x, y, activation):
    """Gradients of the loss w.r.t. each layer's output and each weight, by autograd on the hand-written net."""
    params = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in state.items()}
    layers, logits = manual_forward(params, x, activation)
    weights = weight_names(state)
    grads = torch.autograd.grad(F.cross_entropy(logits, y), [out for _, out in layers] + [params[k] for k in weights])
    return grads[: len(layers)], dict(zip(weights.values(), grads[len(layers):]))


def close(got, expected, abs=1e-6):
    return got == pytest.approx(float(expected), rel=1e-4, abs=abs)


# ---------------------------------------------------------------- each diagnostic


@pytest.mark.parametrize("n_layers,norm,activation", MODELS)
def test_activation_statistics(n_layers, norm, activation):
    net = make_net(n_layers, norm, activation, rule=init.naive if activation == "tanh" else init.kaiming)
    d = Activations(every_n_steps=2, means=True)
    trainer = make_trainer([d])
    seen = run_steps(net, [d], trainer, 5)
    logged = trainer.loggers[0].scalars
    assert set(logged["act/saturation/layer1"]) == {0, 2, 4}
    for step in (0, 4):
        before, x, y, _ = seen[step]
        for i, (pre, out) in enumerate(manual_forward(before, x, activation)[0], 1):
            flat = out.abs() > 0.97 if activation == "tanh" else out == 0
            one_flip = 1.5 / flat.numel()  # a value right at the threshold may round either way
            assert close(logged[f"act/mean/layer{i}"][step], out.mean())
            assert close(logged[f"act/std/layer{i}"][step], out.std())
            assert close(logged[f"act/saturation/layer{i}"][step], flat.float().mean(), abs=one_flip)
            if activation == "tanh":  # tanh units do not die: no such tag
                assert f"act/dead/layer{i}" not in logged
            else:
                assert close(logged[f"act/dead/layer{i}"][step], flat.all(0).float().mean(), abs=1.5 / flat.shape[1])
            assert close(logged[f"preact/mean/layer{i}"][step], pre.mean(), abs=1e-5)
            assert close(logged[f"preact/std/layer{i}"][step], pre.std())
    assert f"act/mean/layer{n_layers + 1}" not in logged


def test_saturation_is_not_trivial():
    """The naive tanh net of the tests above really is partly saturated, and a ReLU net partly dead."""
    logged = {}
    for activation in ("tanh", "relu"):
        net = make_net(5, False, activation, n_hidden=64)
        d = Activations(every_n_steps=1)
        trainer = make_trainer([d])
        run_steps(net, [d], trainer, 1, batch_size=8)
        logged[activation] = trainer.loggers[0].scalars
    assert 0.3 < logged["tanh"]["act/saturation/layer2"][0] < 1
    assert 0 < logged["relu"]["act/dead/layer5"][0] < 1


@pytest.mark.parametrize("n_layers,norm,activation", MODELS)
def test_activation_gradients(n_layers, norm, activation):
    net = make_net(n_layers, norm, activation, rule=init.kaiming)
    d = ActivationGrads(every_n_steps=3, means=True)
    trainer = make_trainer([d])
    seen = run_steps(net, [d], trainer, 4)
    logged = trainer.loggers[0].scalars
    for step in (0, 3):
        before, x, y, _ = seen[step]
        act_grads, _ = manual_grads(before, x, y, activation)
        for i, g in enumerate(act_grads, 1):
            assert close(logged[f"act_grad/mean/layer{i}"][step], g.mean(), abs=1e-9)
            assert close(logged[f"act_grad/std/layer{i}"][step], g.std(), abs=1e-9)
    assert set(logged["act_grad/std/layer1"]) == {0, 3}


@pytest.mark.parametrize("n_layers,norm,activation", MODELS)
def test_parameter_gradients(n_layers, norm, activation):
    net = make_net(n_layers, norm, activation, rule=init.kaiming)
    d = ParamGrads(every_n_steps=2, means=True)
    trainer = make_trainer([d])
    seen = run_steps(net, [d], trainer, 3)
    logged = trainer.loggers[0].scalars
    before, x, y, _ = seen[2]
    _, weight_grads = manual_grads(before, x, y, activation)
    weights = {name: before[key] for key, name in weight_names(before).items()}
    assert {t.split("/")[-1] for t in logged} == set(weights)  # weights only: no biases, no norm parameters
    for name, g in weight_grads.items():
        assert close(logged[f"param_grad/mean/{name}"][2], g.mean(), abs=1e-9)
        assert close(logged[f"param_grad/std/{name}"][2], g.std(), abs=1e-9)
        assert close(logged[f"param_grad/data_ratio/{name}"][2], g.std() / weights[name].std(), abs=1e-9)


def test_means_are_opt_in():
    """Means of tanh outputs and of gradients are noise around 0: only with means=True (values: the tests above)."""
    logged = {}
    for means in (False, True):
        net = make_net(2, False, "tanh", rule=init.kaiming)
        diagnostics = [Activations(every_n_steps=1, means=means), ActivationGrads(every_n_steps=1, means=means),
                       ParamGrads(every_n_steps=1, means=means)]
        trainer = make_trainer(diagnostics)
        run_steps(net, diagnostics, trainer, 1)
        logged[means] = set(trainer.loggers[0].scalars)
    means = {f"{q}/mean/layer{i}" for q in ("act", "preact", "act_grad") for i in (1, 2)}
    means |= {f"param_grad/mean/{w}" for w in ("embedding.weight", "layer1.weight", "layer2.weight", "output.weight")}
    assert logged[True] - logged[False] == means
    assert "act/std/layer2" in logged[False] and "param_grad/data_ratio/output.weight" in logged[False]


def test_parameter_gradients_of_every_parameter():
    net = make_net(2, True, "tanh", rule=init.kaiming)
    d = ParamGrads(every_n_steps=1, weights_only=False)
    trainer = make_trainer([d])
    run_steps(net, [d], trainer, 1)
    names = {t.split("/")[-1] for t in trainer.loggers[0].scalars}
    assert names == {"embedding.weight", "layer1.weight", "layer1.norm.weight", "layer1.norm.bias", "layer2.weight",
                     "layer2.norm.weight", "layer2.norm.bias", "output.weight", "output.bias"}


@pytest.mark.parametrize("n_layers,norm,activation", MODELS)
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_ratio_is_the_real_update(n_layers, norm, activation, optimizer):
    net = make_net(n_layers, norm, activation, rule=init.kaiming)
    if optimizer == "adam":  # the update is not lr * grad: only a before/after snapshot gets it right
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    d = UpdateRatio(every_n_steps=2)
    d.last_step = 4  # what the loop sets when fit starts: max_steps - 1
    trainer = make_trainer([d])
    seen = run_steps(net, [d], trainer, 5, optimizer=opt, scheduler=scheduler)
    logged = trainer.loggers[0].scalars
    for step in (0, 2, 4):
        before, _, _, after = seen[step]
        for key, name in weight_names(before).items():
            expected = torch.log10((after[key] - before[key]).std() / before[key].std())
            assert close(logged[f"update_ratio/{name}"][step], expected, abs=1e-5)
    assert logged["update_ratio/guide"] == {0: -3, 4: -3}  # the first and the last step: one line, not a point per step
    if optimizer == "adam":  # and that differs from the lecture's SGD shortcut lr * grad
        before, x, y, _ = seen[0]
        _, grads = manual_grads(before, x, y, activation)
        shortcut = torch.log10((0.01 * grads["layer1.weight"]).std() / before["blocks.0.linear.weight"].std())
        assert abs(logged["update_ratio/layer1.weight"][0] - float(shortcut)) > 0.1


def test_initial_loss(caplog):
    x = torch.randint(0, 27, (500, 3), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 27, (500,), generator=torch.Generator().manual_seed(2))
    datamodule = SimpleNamespace(splits={"train": (x, y)})
    for rule, warned in ((init.naive, True), (init.kaiming, False)):
        net = make_net(2, True, "tanh", n_hidden=32, rule=rule)
        state = snapshot(net)
        d = InitialLoss(num_examples=1000)  # more than the split: all of it, in some order
        trainer = make_trainer([d], datamodule=datamodule)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="actgrad.callbacks.initial_loss"):
            d.on_train_start(trainer, SimpleNamespace(net=net, device=torch.device("cpu")))
        logged = trainer.loggers[0].scalars
        expected = F.cross_entropy(manual_forward(state, x, "tanh")[1], y)
        assert close(logged["init/loss"][0], expected, abs=1e-4)
        assert close(logged["init/uniform_loss"][0], math.log(27))
        assert any(r.levelno == logging.WARNING for r in caplog.records) == warned
        assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # BatchNorm's running stats untouched


def test_initial_loss_skips_resumed_runs():
    d = InitialLoss()
    trainer = make_trainer([d])
    trainer.global_step = 100
    d.on_train_start(trainer, None)
    assert trainer.loggers[0].scalars == {}


from actgrad.events import read as read_events  # noqa: E402


@pytest.mark.parametrize("n_layers,norm,activation", MODELS)
def test_histograms(tmp_path, n_layers, norm, activation):
    net = make_net(n_layers, norm, activation, rule=init.kaiming)
    d = Histograms(every_n_steps=2)
    trainer = make_trainer([d], tmp_path)
    seen = run_steps(net, [d], trainer, 3)
    finish([d], trainer, net)
    events = read_events(tmp_path)
    before, x, y, _ = seen[2]
    layers, _ = manual_forward(before, x, activation)
    act_grads, weight_grads = manual_grads(before, x, y, activation)
    expected = {}
    for i, ((pre, out), g) in enumerate(zip(layers, act_grads), 1):
        expected |= {f"act/layer{i}": out, f"preact/layer{i}": pre, f"act_grad/layer{i}": g}
    expected |= {f"param_grad/{name}": g for name, g in weight_grads.items()}
    assert set(events.Tags()["histograms"]) == set(expected)
    for tag, values in expected.items():
        steps = {e.step: e.histogram_value for e in events.Histograms(tag)}
        assert set(steps) == {0, 2}
        h = steps[2]
        assert h.num == values.numel()
        assert h.min == pytest.approx(float(values.min()), rel=1e-4, abs=1e-9)
        assert h.max == pytest.approx(float(values.max()), rel=1e-4, abs=1e-9)
        assert h.sum_squares == pytest.approx(float((values.double() ** 2).sum()), rel=1e-3, abs=1e-12)


@pytest.mark.parametrize("n_layers,norm,activation", [MODELS[0], MODELS[-1]])
def test_distribution_figures(tmp_path, monkeypatch, n_layers, norm, activation):
    import actgrad.callbacks.figures as figures

    drawn = []
    overlay = figures.overlay
    monkeypatch.setattr(figures, "overlay", lambda title, xlabel, curves, start=None, kept=None:
                        drawn.append((title, curves)) or overlay(title, xlabel, curves, start, kept))
    net = make_net(n_layers, norm, activation)
    d = DistributionFigures(every_n_steps=5)
    trainer = make_trainer([d], tmp_path)
    seen = run_steps(net, [d], trainer, 7)
    assert drawn == []  # nothing is drawn while training
    d.on_train_end(trainer, None)
    finish([d], trainer, net)
    assert [title for title, _ in drawn] == [f"{kind} distribution, step {step}" for step in (0, 5)
                                             for kind in ("activation", "gradient", "weight gradient")]
    act, act_grad, param_grad = (curves for _, curves in drawn[3:])  # step 5's three figures
    before, x, y, _ = seen[5]
    layers, _ = manual_forward(before, x, activation)
    grads, weight_grads = manual_grads(before, x, y, activation)
    for (label, values), (_, out), g in zip(act.items(), layers, grads):
        flat = out.abs() > 0.97 if activation == "tanh" else out == 0
        assert torch.allclose(values, out, atol=1e-6)
        assert f"std {out.std():.2f}" in label and f"saturated {100 * flat.float().mean():.1f}%" in label
    assert len(act) == len(act_grad) == n_layers
    for (label, values), g in zip(act_grad.items(), grads):
        assert torch.allclose(values, g, rtol=1e-4, atol=1e-7) and f"std {g.std():.2e}" in label
    assert [label.split(" ")[0] for label in param_grad] == list(weight_grads)
    for (label, values), (name, g) in zip(param_grad.items(), weight_grads.items()):
        ratio = g.std() / before[next(k for k, v in weight_names(before).items() if v == name)].std()
        assert torch.allclose(values, g, rtol=1e-4, atol=1e-7) and f"grad:data {ratio:.2e}" in label
    events = read_events(tmp_path)
    assert sorted(events.Tags()["images"]) == ["figures/act", "figures/act_grad", "figures/param_grad"]
    images = events.Images("figures/act")
    assert [i.step for i in images] == [0, 5]
    assert images[1].encoded_image_string[:4] == b"\x89PNG"
    assert [i.width >= 1000 for i in images] == [True, True]  # the start alone, then start and step 5 side by side


def test_figures_are_drawn_when_a_run_fails(tmp_path):
    net = make_net(1, False, "tanh")
    diagnostics = [DistributionFigures(every_n_steps=2), UpdateRatioFigure(every_n_steps=1)]
    trainer = make_trainer(diagnostics, tmp_path)
    run_steps(net, diagnostics, trainer, 3)
    for d in diagnostics:
        d.on_exception(trainer, None, RuntimeError("diverged"))
    trainer.loggers[1].experiment.flush()
    images = read_events(tmp_path).Tags()["images"]
    assert sorted(images) == ["figures/act", "figures/act_grad", "figures/param_grad", "figures/update_ratio"]


def test_update_ratio_figure(tmp_path):
    net = make_net(5, True, "relu", rule=init.kaiming)
    d = UpdateRatioFigure(every_n_steps=2)
    trainer = make_trainer([d], tmp_path)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    seen = run_steps(net, [d], trainer, 9, optimizer=opt)
    d.on_train_end(trainer, None)
    finish([d], trainer, net)
    assert d.steps == [0, 2, 4, 6, 8]
    assert d.names == list(weight_names(seen[0][0]).values())
    for step, ratios in zip(d.steps, d.history):
        before, _, _, after = seen[step]
        expected = [torch.log10((after[k] - before[k]).std() / before[k].std()) for k in weight_names(before)]
        assert torch.allclose(ratios, torch.stack(expected), atol=1e-5)
    images = read_events(tmp_path).Images("figures/update_ratio")
    assert [i.step for i in images] == [9]  # drawn once, at the end


@pytest.mark.parametrize("n_layers,norm", [(1, False), (5, True)])
def test_never_fired_example(n_layers, norm):
    """The README's worked example, against a running OR of (output > 0) over the watched steps."""
    net = make_net(n_layers, norm, "relu", n_hidden=32, rule=init.kaiming)
    d = NeverFired(every_n_steps=2)
    trainer = make_trainer([d])
    seen = run_steps(net, [d], trainer, 7, batch_size=2)
    logged = trainer.loggers[0].scalars
    fired = [torch.zeros(32, dtype=torch.bool)] * n_layers
    for step in (0, 2, 4, 6):
        before, x, _, _ = seen[step]
        outs = [out for _, out in manual_forward(before, x, "relu")[0]]
        fired = [f | (out > 0).any(0) for f, out in zip(fired, outs)]
        for i, f in enumerate(fired, 1):
            assert close(logged[f"act/never_fired/layer{i}"][step], 1 - f.float().mean())
    shares = [logged[f"act/never_fired/layer{n_layers}"][step] for step in (0, 2, 4, 6)]
    assert shares == sorted(shares, reverse=True)  # only goes down
    assert norm or shares[0] > shares[-1]  # and does (batch-normed units always fire for one of two examples)


def test_the_readme_example_is_short_and_the_same_as_its_file():
    source = (Path(__file__).resolve().parents[1] / "callbacks/grad_norm.py").read_text()
    assert len(source.splitlines()) <= 30
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert source.strip() in readme, "README's worked example differs from callbacks/grad_norm.py"


def test_grad_norm_example():
    from actgrad.callbacks.grad_norm import GradNorm

    net = make_net(3, True, "tanh", rule=init.kaiming)
    d = GradNorm(every_n_steps=2)
    trainer = make_trainer([d])
    seen = run_steps(net, [d], trainer, 3)
    logged = trainer.loggers[0].scalars
    before, x, y, _ = seen[2]
    _, weight_grads = manual_grads(before, x, y, "tanh")
    assert {t.split("/")[-1] for t in logged} == set(weight_grads)
    for name, g in weight_grads.items():
        assert close(logged[f"grad_norm/{name}"][2], g.norm(), abs=1e-7)


# ---------------------------------------------------------------- the base


class Meddler(Activations):
    """A diagnostic that runs the nonlinearity itself and scribbles on a copy: it must not disturb others."""

    def compute(self, snapshot):
        for layer in snapshot.layers.values():
            layer.act(layer.pre * 3)  # would re-fire a capture hook, if one were still attached
        return super().compute(snapshot)


def test_diagnostics_see_the_same_snapshot_in_any_order():
    logged = []
    for order in (0, 1):
        net = make_net(3, True, "relu", rule=init.kaiming)
        diagnostics = [Meddler(every_n_steps=2), ActivationGrads(every_n_steps=2), Histograms(every_n_steps=4),
                       ParamGrads(every_n_steps=1), UpdateRatio(every_n_steps=2)]
        if order:
            diagnostics.reverse()
        trainer = make_trainer(diagnostics)
        run_steps(net, diagnostics, trainer, 5)
        logged.append({tag: {s: v for s, v in points.items() if not tag.startswith("act/")}
                       for tag, points in trainer.loggers[0].scalars.items()})
    assert logged[0] == logged[1] and logged[0]


def test_a_recorder_leaves_no_hook_behind():
    net = make_net(2, False, "tanh")
    recorder = SnapshotRecorder(net, {"layers"})
    recorder.start()
    net(torch.zeros(4, 3, dtype=torch.long)).sum().backward()
    recorder.before_update()
    first = recorder.snapshot(0, torch.tensor(0.0), 0.1)
    net(torch.ones(8, 3, dtype=torch.long)).sum().backward()  # a forward nobody watches
    assert first.layers["layer1"].out.shape[0] == 4 and recorder.seen["layer1"]["out"].shape[0] == 4
    with pytest.raises(ValueError, match="needs=\\['weights'\\]"):
        SnapshotRecorder(net, {"weights"})


def test_every_n_steps_is_checked():
    with pytest.raises(ValueError, match="every_n_steps"):
        Activations(every_n_steps=0)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_layout_puts_every_layer_in_one_chart(tmp_path, activation):
    net = make_net(3, False, activation)
    diagnostics = [Activations(every_n_steps=1), ActivationGrads(every_n_steps=1), ParamGrads(every_n_steps=1),
                   UpdateRatio(every_n_steps=1)]
    trainer = make_trainer(diagnostics, tmp_path)
    for d in diagnostics:  # what Lightning calls before the module's on_fit_start
        d.setup(trainer, SimpleNamespace(net=net), "fit")
    Writer(trainer.loggers).charts(layout(diagnostics))  # what the loop does when fit starts
    run_steps(net, diagnostics, trainer, 1)
    Writer(trainer.loggers).scalars({"train/loss": 3.0, "val/loss": 3.1, "final/val_loss": 3.1, "test/loss": 3.2}, 1)
    finish(diagnostics, trainer, net)
    events = read_events(tmp_path)
    from tensorboard.plugins.custom_scalar import layout_pb2

    (config,) = events.Tensors("custom_scalars__config__")
    written = layout_pb2.Layout.FromString(config.tensor_proto.string_val[0])
    assert written.category[0].title == "Loss"  # shown first
    charts = {chart.title: chart.multiline.tag for category in written.category for chart in category.chart}
    from actgrad.events import accumulate, subruns

    runs = {"": events.main} | {sub.name: accumulate(sub) for sub in subruns(tmp_path)}  # each layer a TensorBoard run
    tags = [(run, tag) for run, e in runs.items() for tag in e.Tags()["scalars"]]

    def members(title_start):  # as TensorBoard's custom-scalars plugin matches a chart's regexes: re.match, run by run
        (regexes,) = [r for t, r in charts.items() if t.startswith(title_start)]
        return sorted(f"{run}:{t}" for run, t in tags if any(re.match(r, t) for r in regexes))

    assert members("loss") == [":train/loss", ":val/loss"]
    assert members("act/saturation") == ["layer1:act/saturation", "layer2:act/saturation", "layer3:act/saturation"]
    assert members("update_ratio") == [":update_ratio/guide", "embedding:update_ratio/weight", "layer1:update_ratio/weight",
                                       "layer2:update_ratio/weight", "layer3:update_ratio/weight", "output:update_ratio/weight"]
    assert members("act/std") == ["layer1:act/std", "layer2:act/std", "layer3:act/std"]  # not preact/std
    assert all(members(title) for title in charts)  # no empty chart: a tanh net gets no act/dead chart
    assert any(t.startswith("act/dead") for t in charts) == (activation != "tanh")
    unseen = [(run, t) for run, t in tags if not any(re.match(r, t) for rs in charts.values() for r in rs)]
    assert sorted(unseen) == [("", "final/val_loss"), ("", "test/loss")]  # every diagnostic's tag is in a chart


# ---------------------------------------------------------------- lecture facts on names.txt


needs_names = pytest.mark.skipif(not NAMES.is_file(), reason=f"{NAMES} is absent (the lecture's names.txt)")


@functools.cache
def names_examples(n=None):
    from actgrad.data import build_examples, read_words, split_words

    x, y = (t.long() for t in build_examples(split_words(read_words(NAMES), 42)["train"], block_size=3))
    if n is None:
        return x, y
    ix = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    return x[ix], y[ix]


@needs_names
def test_lecture_saturation_at_init():
    """200 tanh units, no norm, step 0 on 4096 training examples: the naive init saturates most of
    the hidden layer. Kaiming (gain 5/3 on N(0, 1) embeddings: preact std ~1.67) still leaves about a
    fifth beyond |t| > 0.97, as the lecture's first tanh layer (20%); the lecture's hand fix
    (hidden weights x0.2: preact std ~1.1) leaves a few percent."""
    x, y = names_examples(4096)
    saturation = {}
    for name, rule in (("naive", init.naive), ("kaiming", init.kaiming), ("scaled", init.scaled)):
        torch.manual_seed(1337)
        net = MLP(n_embd=10, n_hidden=200, n_layers=1, activation="tanh")
        rule(net)
        d = Activations(every_n_steps=1)
        trainer = make_trainer([d])
        run_one_step(d, trainer, net, x, y)
        saturation[name] = trainer.loggers[0].scalars["act/saturation/layer1"][0]
    assert saturation["naive"] > 0.5, saturation  # 0.73
    assert 0.1 < saturation["kaiming"] < 0.35, saturation  # 0.26
    assert saturation["scaled"] < 0.1, saturation  # 0.08


def run_one_step(d, trainer, net, x, y):
    recorder = SnapshotRecorder(net, d.needs)
    recorder.start()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    recorder.before_update()
    d.observe(recorder.snapshot(0, loss, 0.1))


@needs_names
def test_lecture_initial_loss():
    x, y = names_examples()  # the whole training split
    losses = {}
    for name, rule in (("naive", init.naive), ("kaiming", init.kaiming)):
        torch.manual_seed(1337)
        net = MLP(n_embd=10, n_hidden=200, n_layers=1, activation="tanh")
        rule(net)
        d = InitialLoss(num_examples=4096)
        trainer = make_trainer([d], datamodule=SimpleNamespace(splits={"train": (x, y)}))
        d.on_train_start(trainer, SimpleNamespace(net=net, device=torch.device("cpu")))
        losses[name] = trainer.loggers[0].scalars["init/loss"][0]
        assert trainer.loggers[0].scalars["init/uniform_loss"][0] == pytest.approx(3.2958, abs=1e-4)
    assert 22 < losses["naive"] < 34, losses  # 25.8 here; the lecture's first batch of 32: 27.9
    assert 3.2 < losses["kaiming"] < 3.4, losses


def test_the_update_ratio_history_goes_into_checkpoints_as_one_tensor():
    """A checkpoint pays torch.save's cost per tensor: the whole history is one, and loads back equal."""
    d = UpdateRatioFigure(every_n_steps=1)
    d.names, d.steps, d.history = ["a", "b"], [0, 1, 2], [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]),
                                                           torch.tensor([5.0, 6.0])]
    state = d.state_dict()
    assert isinstance(state["history"], torch.Tensor) and state["history"].shape == (3, 2)
    again = UpdateRatioFigure(every_n_steps=1)
    again.load_state_dict(state)
    assert again.steps == [0, 1, 2] and [h.tolist() for h in again.history] == [[1, 2], [3, 4], [5, 6]]
    old = UpdateRatioFigure(every_n_steps=1)
    old.load_state_dict({"names": ["a"], "steps": [0], "history": [torch.tensor([1.0])]})  # an older checkpoint's list
    assert [h.tolist() for h in old.history] == [[1.0]]
    empty = UpdateRatioFigure(every_n_steps=1)
    empty.load_state_dict(UpdateRatioFigure(every_n_steps=1).state_dict())
    assert empty.history == []


def fresh_overlay(title, xlabel, curves, start):
    """What figures.overlay drew before it kept its Figures: a new Figure, lines plotted, then legends."""
    from matplotlib.figure import Figure

    from actgrad.callbacks.figures import with_margins

    figure = Figure(figsize=(14, 4.5), dpi=80)
    axes = figure.subplots(1, 2, sharex=True, sharey=True)
    for ax, (panel_title, panel) in zip(axes, [start, (title, curves)]):
        for label, values in panel.items():
            density, edges = torch.histogram(values, bins=50, density=True)
            ax.plot(((edges[:-1] + edges[1:]) / 2).numpy(), density.numpy(), label=label)
        ax.set_title(panel_title, fontsize=12)
        ax.set_xlabel(xlabel, fontsize=11)
        ax.legend(fontsize=10, loc="upper right")
    axes[0].set_ylabel("density", fontsize=11)
    return with_margins(figure)


def test_a_kept_figure_draws_each_figure_as_a_new_one(tmp_path):
    """Two figures in a row of the same shape, the second on other scales: each image is, pixel for
    pixel, that of a new Figure of its own data (limits, legends, titles), 1,120 x 360."""
    import io

    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    from actgrad.callbacks.figures import overlay

    g = torch.Generator().manual_seed(0)
    start = ("activation distribution, step 0", {"layer1: std 1.00": torch.randn(500, generator=g),
                                                 "layer2: std 0.10": 0.1 * torch.randn(500, generator=g)})
    steps = {5: {"layer1: std 3.00": 3 * torch.randn(500, generator=g), "layer2: std 0.50": 0.5 * torch.randn(500, generator=g)},
             9: {"layer1: std 0.01": 0.01 * torch.randn(500, generator=g), "layer2: std 0.02": 0.02 * torch.randn(500, generator=g) + 5}}
    writer = Writer([TensorBoardLogger(save_dir=str(tmp_path), name="", version="")])
    limits, kept = [], {}
    for step, curves in steps.items():
        figure = overlay(f"activation distribution, step {step}", "layer output", curves, start=start, kept=kept)
        writer.figure("figures/act", figure, step)
        limits.append([(ax.get_xlim(), ax.get_ylim()) for ax in figure.axes])
        assert [[t.get_text() for t in ax.get_legend().get_texts()] for ax in figure.axes] == [list(start[1]), list(curves)]
    writer.loggers[0].experiment.flush()
    images = read_events(tmp_path).Images("figures/act")
    assert [i.step for i in images] == [5, 9]
    assert limits[0] != limits[1]  # the second figure's limits are its own
    for image, (step, curves), kept_limits in zip(images, steps.items(), limits):
        expected = fresh_overlay(f"activation distribution, step {step}", "layer output", curves, start)
        canvas = FigureCanvasAgg(expected)
        canvas.draw()
        assert kept_limits == [(ax.get_xlim(), ax.get_ylim()) for ax in expected.axes]
        pixels = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
        assert (image.width, image.height) == (1120, 360) and pixels.shape == (360, 1120, 3)
        assert np.array_equal(pixels, np.asarray(canvas.buffer_rgba())[..., :3])
