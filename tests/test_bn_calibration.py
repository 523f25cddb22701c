"""BNCalibration against the exact statistics computed by hand, on the whole split at once."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from actgrad.events import scalars
from actgrad.experiment import train
from actgrad.model import MLP
from actgrad.callbacks.bn_calibration import BNCalibration

from conftest import TINY, make_config
from test_diagnostics import Recorder

torch.set_num_threads(1)


def make_splits(n_train=1000, n_val=300):
    """Stored as the data module stores them: uint8."""
    g = torch.Generator().manual_seed(0)
    split = lambda n: (torch.randint(0, 27, (n, 3), generator=g).to(torch.uint8),
                       torch.randint(0, 27, (n,), generator=g).to(torch.uint8))
    return {"train": split(n_train), "val": split(n_val)}


def trained(net, splits, steps=20, lr=0.1):
    """`net` trained a little in train mode: its running statistics have moved, and lag behind it."""
    torch.manual_seed(0)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    x, y = splits["train"]
    for _ in range(steps):
        ix = torch.randint(0, len(x), (32,))
        loss = F.cross_entropy(net(x[ix].long()), y[ix].long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net


def trained_net(norm, splits, steps=30):
    torch.manual_seed(0)
    return trained(MLP(n_hidden=20, n_layers=2, norm=norm), splits, steps, lr=0.2)


def calibrate(net, splits, chunk=4096, step=123):
    trainer = SimpleNamespace(loggers=[Recorder()], global_step=step, datamodule=SimpleNamespace(splits=splits))
    BNCalibration(chunk).on_train_end(trainer, SimpleNamespace(net=net, device=torch.device("cpu")))
    return trainer.loggers[0].scalars


@torch.no_grad()
def exact_stats(net, x):
    """(mean, unbiased var) of each BatchNorm's input over all of x, by hand: each layer normalized
    with the exact statistics of its own input, as in the calibrated network."""
    h = net.embedding(x.long()).flatten(1)
    stats = []
    for block in net.blocks:
        pre = block.linear(h)
        mean, var = pre.mean(0), pre.var(0)
        stats.append((mean, var))
        h = block.act((pre - mean) / torch.sqrt(var + block.norm.eps) * block.norm.weight + block.norm.bias)
    return stats


@torch.no_grad()
def eval_loss(net, x, y):
    return F.cross_entropy(net.eval()(x.long()), y.long()).item()


@pytest.mark.parametrize("chunk", [4096, 256])  # one pass, and chunks that do not divide the split
def test_figures_match_the_exact_statistics(chunk):
    splits = make_splits()
    net = trained_net(nn.BatchNorm1d, splits)
    stats = exact_stats(net, splits["train"][0])
    running = [(b.norm.running_mean.clone(), b.norm.running_var.clone()) for b in net.blocks]
    calibrated = copy.deepcopy(net)
    for block, (mean, var) in zip(calibrated.blocks, stats):
        block.norm.running_mean.copy_(mean)
        block.norm.running_var.copy_(var)
    expected_running, expected_calibrated = eval_loss(copy.deepcopy(net), *splits["val"]), eval_loss(calibrated, *splits["val"])

    logged = calibrate(net, splits, chunk)

    assert set(logged) == {"bn_calibration/val_loss_running", "bn_calibration/val_loss_calibrated",
                           *(f"bn_calibration/{q}/layer{i}" for q in ("mean_error", "var_error") for i in (1, 2))}
    assert all(list(steps) == [123] for steps in logged.values())
    value = {tag: steps[123] for tag, steps in logged.items()}
    for i, ((mean, var), (running_mean, running_var)) in enumerate(zip(stats, running), 1):
        mean_error = ((running_mean - mean).abs() / torch.sqrt(var + 1e-5)).mean().item()
        var_error = ((running_var - var).abs() / (var + 1e-5)).mean().item()
        assert value[f"bn_calibration/mean_error/layer{i}"] == pytest.approx(mean_error, rel=1e-4)
        assert value[f"bn_calibration/var_error/layer{i}"] == pytest.approx(var_error, rel=1e-4)
        assert mean_error > 1e-3 and var_error > 1e-3  # the running statistics lag: there is something to measure
    assert value["bn_calibration/val_loss_running"] == pytest.approx(expected_running, rel=1e-5)
    assert value["bn_calibration/val_loss_calibrated"] == pytest.approx(expected_calibrated, rel=1e-5)
    assert abs(expected_calibrated - expected_running) > 1e-4  # calibrating changes the loss: the two are told apart


def test_model_state_is_restored_exactly():
    splits = make_splits()
    net = trained_net(nn.BatchNorm1d, splits)
    net.train()
    net.blocks[1].norm.eval()  # mixed modes too: each module gets its own back
    state = {name: t.clone() for name, t in net.state_dict().items()}
    modes = {name: m.training for name, m in net.named_modules()}

    assert calibrate(net, splits)

    assert state.keys() == net.state_dict().keys()
    for name, t in net.state_dict().items():
        assert torch.equal(t, state[name]), name  # running_mean, running_var, num_batches_tracked, parameters
    assert {name: m.training for name, m in net.named_modules()} == modes


@pytest.mark.parametrize("norm", [None, nn.LayerNorm], ids=["none", "layernorm"])
def test_without_batchnorm_nothing_is_logged(norm):
    splits = make_splits()
    net = trained_net(norm, splits)
    state = {name: t.clone() for name, t in net.state_dict().items()}
    assert calibrate(net, splits) == {}
    assert all(torch.equal(t, state[name]) for name, t in net.state_dict().items())
    assert net.training


def test_in_a_real_run_it_logs_at_the_final_step_and_leaves_the_final_model_alone(small_names, tmp_path):
    cfg = make_config(*TINY, f"data.path={small_names}", "norm=batchnorm")
    results = train(cfg, tmp_path, extra_callbacks=[BNCalibration()])
    assert results["status"] == "completed"
    logged = scalars(tmp_path)
    assert {t for t in logged if t.startswith("bn_calibration/")} == {
        "bn_calibration/mean_error/layer1", "bn_calibration/var_error/layer1",
        "bn_calibration/val_loss_running", "bn_calibration/val_loss_calibrated"}
    [(step, running)] = logged["bn_calibration/val_loss_running"]
    assert step == 40
    # the run's own final val loss, computed after the hook, is the model's with its running statistics
    assert running == pytest.approx(results["final/val_loss"], rel=1e-6)
    assert logged["bn_calibration/val_loss_calibrated"][0][1] != pytest.approx(running, rel=1e-6)
