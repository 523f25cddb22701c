"""Networks actgrad was not written for: layers found by type, inits by role, BatchNorm wherever it sits.

Each network is small and driven without a training loop: one Recorder step by hand (what
actgrad.module's fast path does), the expected values written out from the network's own modules.
"""

import logging
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from actgrad import init
from actgrad.layers import watched
from actgrad.model import MLP
from actgrad.snapshot import Recorder
from actgrad.writer import subrun
from actgrad.callbacks.activations import Activations
from actgrad.callbacks.update_ratio import UpdateRatio

from test_bn_calibration import calibrate, make_splits, trained

torch.set_num_threads(1)
VOCAB, BLOCK = 27, 3
ALL = {"layers", "params", "grads", "updates"}


class Residual(nn.Module):
    """One nn.ReLU module called in two places: two layers."""

    def __init__(self, n_embd=8, width=32):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, n_embd)
        self.inp = nn.Linear(BLOCK * n_embd, width)
        self.mid = nn.Linear(width, width)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, VOCAB)

    def forward(self, idx):
        h = self.relu(self.inp(self.embedding(idx).flatten(1)))
        h = h + self.relu(self.mid(h))
        return self.head(h)


class Nested(nn.Module):
    """GELU after LayerNorm, inside a ModuleList of nested Sequentials."""

    def __init__(self, n_embd=8, width=32, depth=2):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, n_embd)
        sizes = [BLOCK * n_embd] + [width] * depth
        self.body = nn.ModuleList(nn.Sequential(nn.Linear(a, b), nn.Sequential(nn.LayerNorm(b), nn.GELU()))
                                  for a, b in zip(sizes, sizes[1:]))
        self.head = nn.Sequential(nn.Linear(width, VOCAB))

    def forward(self, idx):
        x = self.embedding(idx).flatten(1)
        for block in self.body:
            x = block(x)
        return self.head(x)


class Functional(nn.Module):
    """Its nonlinearity is torch.tanh in forward, and it has no nn.Embedding (one-hot rows instead)."""

    def __init__(self, width=32):
        super().__init__()
        self.hidden = nn.Linear(BLOCK * VOCAB, width)
        self.out = nn.Linear(width, VOCAB)

    def forward(self, idx):
        return self.out(torch.tanh(self.hidden(F.one_hot(idx, VOCAB).float().flatten(1))))


class Wrapped(nn.Module):
    """A BatchNorm inside a module of its own (its input (N, C, L): over batch and time), and one after the
    last nonlinearity: named by the layer it feeds, and by its path."""

    def __init__(self, n_embd=8, width=16):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, n_embd)
        self.conv = nn.Sequential(nn.Linear(n_embd, width, bias=False), Time(nn.BatchNorm1d(width, momentum=0.5)))
        self.act = nn.Tanh()
        self.last_norm = nn.BatchNorm1d(BLOCK * width, momentum=0.5)
        self.head = nn.Linear(BLOCK * width, VOCAB)

    def forward(self, idx):
        h = self.act(self.conv(self.embedding(idx)))  # (N, L, C)
        return self.head(self.last_norm(h.flatten(1)))


class Time(nn.Module):
    """(N, L, C) -> its module on (N, C, L) -> (N, L, C): BatchNorm1d over batch and time, as makemore part 5 fixes it."""

    def __init__(self, module):
        super().__init__()
        self.inner = module

    def forward(self, x):
        return self.inner(x.transpose(1, 2)).transpose(1, 2)


def batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, BLOCK), generator=g), torch.randint(0, VOCAB, (n,), generator=g)


def one_step(net, layers=None, lr=0.1):
    """One step as actgrad.module's fast path takes it, recording everything: the Snapshot."""
    x, y = batch()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    recorder = Recorder(net, ALL, layers)
    recorder.start()
    loss = F.cross_entropy(net(x), y)
    optimizer.zero_grad()
    loss.backward()
    recorder.before_update()
    optimizer.step()
    return recorder.snapshot(0, loss, lr)


def gelu_slope(x):
    """d gelu / dx = Phi(x) + x phi(x), written out."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-x**2 / 2) / math.sqrt(2 * math.pi)


# ---------------------------------------------------------------- layers found by type


def test_residual_relu_one_module_called_twice_is_two_layers(caplog):
    torch.manual_seed(0)
    net = Residual()
    with caplog.at_level(logging.INFO, logger="actgrad.layers"):
        layers = watched(net, BLOCK)
    assert "watching 2 layers: layer1 relu (ReLU), layer2 relu (ReLU)" in caplog.text
    assert layers.paths == {"layer1": "relu", "layer2": "relu"}
    with torch.no_grad():  # the weights before the step, as the forward pass saw them
        x, _ = batch()
        pre1 = net.inp(net.embedding(x).flatten(1))
        pre2 = net.mid(pre1.relu())

    snap = one_step(net, layers)

    assert list(snap.layers) == ["layer1", "layer2"]
    for name, pre in (("layer1", pre1), ("layer2", pre2)):
        layer = snap.layers[name]
        assert layer.act is net.relu and layer.pre.shape == layer.out.shape == layer.grad.shape == (64, 32)
        assert torch.allclose(layer.pre, pre) and torch.equal(layer.out, pre.relu())
    stats = Activations().compute(snap)
    for name, pre in (("layer1", pre1), ("layer2", pre2)):
        assert stats[f"act/saturation/{name}"].item() == pytest.approx((pre <= 0).float().mean().item())
        assert stats[f"act/dead/{name}"].item() == pytest.approx((pre <= 0).all(0).float().mean().item())


def test_residual_relu_parameters_group_by_the_layer_they_feed():
    net = Residual()
    layers = watched(net, BLOCK, quiet=True)
    assert layers.tags == {"embedding.weight": "embedding.weight", "inp.weight": "layer1.inp.weight",
                           "inp.bias": "layer1.inp.bias", "mid.weight": "layer2.mid.weight",
                           "mid.bias": "layer2.mid.bias", "head.weight": "head.weight", "head.bias": "head.bias"}
    snap = one_step(net, layers)
    assert set(snap.params) == set(snap.grads) == set(snap.updates) == set(layers.tags.values())
    ratios = UpdateRatio().compute(snap)
    names = set(snap.layers) | {"embedding", "head"}
    # each weight matrix in TensorBoard: layer1's and layer2's in subruns of their own
    assert {tag: subrun(tag, names) for tag in ratios if tag != "update_ratio/guide"} == {
        "update_ratio/embedding.weight": ("embedding", "update_ratio/weight"),
        "update_ratio/layer1.inp.weight": ("layer1", "update_ratio/inp.weight"),
        "update_ratio/layer2.mid.weight": ("layer2", "update_ratio/mid.weight"),
        "update_ratio/head.weight": ("head", "update_ratio/weight")}


def test_gelu_with_layernorm_in_nested_containers():
    torch.manual_seed(0)
    net = Nested()
    layers = watched(net, BLOCK, quiet=True)
    assert layers.paths == {"layer1": "body.0.1.1", "layer2": "body.1.1.1"}
    assert layers.tags == {"embedding.weight": "embedding.weight",
                           **{f"body.{i}.{p}": f"layer{i + 1}.body.{i}.{p}" for i in (0, 1)
                              for p in ("0.weight", "0.bias", "1.0.weight", "1.0.bias")},
                           "head.0.weight": "head.0.weight", "head.0.bias": "head.0.bias"}
    with torch.no_grad():
        x, _ = batch()
        pre1 = net.body[0][1][0](net.body[0][0](net.embedding(x).flatten(1)))
        pre2 = net.body[1][1][0](net.body[1][0](F.gelu(pre1)))

    snap = one_step(net, layers)

    assert list(snap.layers) == ["layer1", "layer2"]
    stats = Activations().compute(snap)
    for name, pre in (("layer1", pre1), ("layer2", pre2)):
        layer = snap.layers[name]
        assert isinstance(layer.act, nn.GELU) and layer.pre.shape == layer.out.shape == layer.grad.shape == (64, 32)
        assert torch.allclose(layer.pre, pre, atol=1e-6)
        flat = gelu_slope(pre).abs() < 1 - 0.97**2
        assert stats[f"act/saturation/{name}"].item() == pytest.approx(flat.float().mean().item())
        assert stats[f"act/dead/{name}"].item() == pytest.approx(flat.all(0).float().mean().item())


def test_functional_activations_leave_the_layers_empty_and_the_parameters_watched(caplog):
    torch.manual_seed(0)
    net = Functional()
    with caplog.at_level(logging.INFO, logger="actgrad.layers"):
        layers = watched(net, BLOCK)
    assert layers.paths == {}
    assert "no nonlinearity module is called" in caplog.text and "will log nothing" in caplog.text
    assert "use modules" in caplog.text
    assert layers.tags == {n: n for n, _ in net.named_parameters()}

    snap = one_step(net, layers)

    assert snap.layers == {} and Activations().compute(snap) == {}
    ratios = UpdateRatio().compute(snap)
    for name in ("hidden.weight", "out.weight"):
        expected = (snap.updates[name].std() / snap.params[name].std()).log10()
        assert ratios[f"update_ratio/{name}"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_recorder_without_a_probe_finds_the_same_layers():
    """Before training starts (or a caller that never probes): hooks by type, names by call order."""
    torch.manual_seed(0)
    net = Residual()
    by_type = one_step(net)
    assert list(by_type.layers) == ["layer1", "layer2"]
    assert set(by_type.params) == {n for n, _ in net.named_parameters()}  # not grouped: the MLP's names only


def test_an_inplace_relu_keeps_its_input():
    net = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Flatten(), nn.Linear(BLOCK * 4, 16), nn.ReLU(inplace=True),
                        nn.Linear(16, VOCAB))
    x, _ = batch()
    with torch.no_grad():
        pre = net[2](net[1](net[0](x)))
    snap = one_step(net)
    assert torch.allclose(snap.layers["layer1"].pre, pre) and (snap.layers["layer1"].pre < 0).any()


@pytest.mark.parametrize("n_layers, norm", [(1, None), (3, nn.BatchNorm1d), (2, nn.LayerNorm)])
def test_the_mlp_keeps_its_tags(n_layers, norm):
    net = MLP(n_hidden=8, n_layers=n_layers, norm=norm)
    layers = watched(net, BLOCK, quiet=True)
    assert layers.paths == {f"layer{i + 1}": f"blocks.{i}.act" for i in range(n_layers)}
    expected = {"embedding.weight": "embedding.weight", "output.weight": "output.weight", "output.bias": "output.bias"}
    for i in range(n_layers):
        expected[f"blocks.{i}.linear.weight"] = f"layer{i + 1}.weight"
        if norm is None:
            expected[f"blocks.{i}.linear.bias"] = f"layer{i + 1}.bias"
        else:
            expected |= {f"blocks.{i}.norm.{p}": f"layer{i + 1}.norm.{p}" for p in ("weight", "bias")}
    assert layers.tags == expected
    assert set(one_step(net, layers).params) == set(one_step(net).params) == set(expected.values())


# ---------------------------------------------------------------- inits by role


def wide(model, **kw):
    """Wide layers: the sample std of a weight matrix is within ~2% of its true std."""
    torch.manual_seed(0)
    return model(**kw)


@pytest.mark.parametrize("rule", ["naive", "scaled", "kaiming", "xavier"])
def test_inits_by_role_on_a_residual_relu_net(rule):
    net = wide(Residual, n_embd=20, width=400)
    getattr(init, rule)(net, block_size=BLOCK)
    relu, out = math.sqrt(2), 400
    expected = {  # rule: (embedding, inp, mid, head) weight std
        "naive": (1, 1, 1, 1), "scaled": (1, 0.2, 0.2, 0.01),
        "kaiming": (1, relu / math.sqrt(60), relu / math.sqrt(400), 0.1 / math.sqrt(400)),
        "xavier": (1, relu * math.sqrt(2 / (60 + out)), relu * math.sqrt(2 / (400 + out)), math.sqrt(2 / (400 + VOCAB)))}[rule]
    for module, std in zip((net.embedding, net.inp, net.mid, net.head), expected):
        assert module.weight.std().item() == pytest.approx(std, rel=0.03), module
    if rule in ("kaiming", "xavier"):
        assert all(torch.all(m.bias == 0) for m in (net.inp, net.mid, net.head))


def test_kaiming_on_nested_gelu_keeps_layernorm_and_uses_relus_gain():
    net = wide(Nested, n_embd=20, width=400)
    init.kaiming(net, block_size=BLOCK)
    assert net.body[0][0].weight.std().item() == pytest.approx(math.sqrt(2) / math.sqrt(60), rel=0.03)
    assert net.body[1][0].weight.std().item() == pytest.approx(math.sqrt(2) / math.sqrt(400), rel=0.03)
    assert net.head[0].weight.std().item() == pytest.approx(0.1 / math.sqrt(400), rel=0.03)
    for block in net.body:
        assert torch.all(block[1][0].weight == 1) and torch.all(block[1][0].bias == 0)


def test_a_role_the_model_lacks_is_skipped_in_one_line(caplog):
    """Functional: no nn.Embedding; its tanh is no module, so its hidden Linear feeds no nonlinearity (gain 1)."""
    net = wide(Functional, width=400)
    with caplog.at_level(logging.INFO, logger="actgrad.init"):
        init.kaiming(net, block_size=BLOCK)
    [line] = [r.getMessage() for r in caplog.records]
    assert line == "init=kaiming: the model has no nn.Embedding: skipped"
    assert net.hidden.weight.std().item() == pytest.approx(1 / math.sqrt(BLOCK * VOCAB), rel=0.03)
    assert net.out.weight.std().item() == pytest.approx(0.1 / math.sqrt(400), rel=0.03)


# ---------------------------------------------------------------- BatchNorm calibration


def test_bn_calibration_finds_a_wrapped_batchnorm_over_batch_and_time():
    splits = make_splits()
    torch.manual_seed(0)
    net = trained(Wrapped(), splits)
    inner = net.conv[1].inner
    with torch.no_grad():  # the exact statistics of its input, by hand: per channel over batch and time
        h = net.conv[0](net.embedding(splits["train"][0].long())).transpose(1, 2)  # (N, C, L)
        mean, var = h.mean((0, 2)), h.var((0, 2))
    running_mean, running_var = inner.running_mean.clone(), inner.running_var.clone()

    logged = calibrate(net, splits)

    assert {tag.rpartition("/")[2] for tag in logged if "_error" in tag} == {"layer1", "last_norm"}
    value = {tag: steps[123] for tag, steps in logged.items()}
    mean_error = ((running_mean - mean).abs() / torch.sqrt(var + inner.eps)).mean().item()
    var_error = ((running_var - var).abs() / (var + inner.eps)).mean().item()
    assert value["bn_calibration/mean_error/layer1"] == pytest.approx(mean_error, rel=1e-4)
    assert value["bn_calibration/var_error/layer1"] == pytest.approx(var_error, rel=1e-4)
    assert mean_error > 1e-3 and var_error > 1e-3  # the running statistics lag: there is something to measure
    assert torch.equal(inner.running_mean, running_mean)  # the model is left as it was


def test_bn_calibration_without_batchnorm_logs_nothing():
    splits = make_splits()
    for net in (Residual(), Nested(), Functional()):
        assert calibrate(net, splits) == {}


def test_the_hparams_saturation_columns_are_the_watched_layers():
    from omegaconf import OmegaConf

    from actgrad import hparams

    cfg = OmegaConf.create({"data": {"block_size": BLOCK}, "model": {"n_layers": 5}})  # n_layers is not read
    saturation = lambda net: [m for m in hparams.metrics(cfg, net) if m.startswith("final/saturation/")]  # noqa: E731
    assert saturation(Residual()) == ["final/saturation/layer1", "final/saturation/layer2"]
    assert saturation(Functional()) == []
    assert saturation(MLP(n_layers=3, n_hidden=8)) == [f"final/saturation/layer{i}" for i in (1, 2, 3)]
