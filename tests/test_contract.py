"""The model contract (README, "Bring your own model"): any nn.Module mapping (batch, block_size) int64 indices
to (batch, vocab) logits trains through model=custom; what breaks the contract is refused in one line before
training; model=wavenet, norm=rmsnorm; run.yaml's parameter shapes.

The custom models here train with init=pytorch: the other inits find a model's layers by role, which is
another change's (init.py)."""

import importlib
import sys
import textwrap
from functools import partial

import pytest
import torch
import torch.nn as nn
import yaml

import actgrad
from actgrad import experiment
from actgrad.checkpoint import config_hash
from actgrad.checks import ConfigError
from actgrad.experiment import build, build_net, train
from actgrad.model import MLP, FlattenConsecutive, WaveNet

from conftest import TINY, make_config

# Networks no one at actgrad wrote: a module of the user's, importable as `mynets` from a folder of theirs.
MYNETS = '''
import torch.nn as nn

WIDTH = {width}


class Net(nn.Module):
    """A 2-layer ReLU MLP."""

    def __init__(self, vocab_size, block_size, width=WIDTH, n_embd=8):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, n_embd)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(block_size * n_embd, width), nn.ReLU(),
                                  nn.Linear(width, width), nn.ReLU())
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx):
        return self.head(self.body(self.emb(idx)))


class Fixed(nn.Module):
    """Asks for no sizes: names.txt's 27 symbols and 3 characters of context, written in."""

    def __init__(self, width=16):
        super().__init__()
        self.net = nn.Sequential(nn.Embedding(27, 4), nn.Flatten(), nn.Linear(12, width), nn.Tanh(), nn.Linear(width, 27))

    def forward(self, idx):
        return self.net(idx)


class Anything(Net):
    """**kwargs: takes whatever it is given."""

    def __init__(self, **kwargs):
        super().__init__(kwargs["vocab_size"], kwargs["block_size"])
        self.given = dict(kwargs)


class Normed(Net):
    """Names `norm`: gets the norm group's layer."""

    def __init__(self, vocab_size, block_size, norm=None):
        super().__init__(vocab_size, block_size)
        self.given_norm = norm


class Sequence(Net):
    """Logits for every position, GPT-style: outside the contract."""

    def forward(self, idx):
        return self.head(self.emb(idx) @ self.body[1].weight[:, :8].T)


class Wide(Net):
    """One logit too many."""

    def __init__(self, vocab_size, block_size):
        super().__init__(vocab_size + 1, block_size)
'''


@pytest.fixture
def mynets(tmp_path, monkeypatch):
    """write(width): (re)writes mynets.py in a folder on sys.path and returns the module, freshly imported."""
    folder = tmp_path / "mine"
    folder.mkdir()
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a rewrite within the same second is read again

    def write(width=16):
        (folder / "mynets.py").write_text(textwrap.dedent(MYNETS.format(width=width)))
        sys.modules.pop("mynets", None)
        importlib.invalidate_caches()
        return importlib.import_module("mynets")

    yield write
    sys.modules.pop("mynets", None)


def custom(name, *overrides):
    return make_config(*TINY, "model=custom", f"model._target_=mynets.{name}", "init=pytorch", *overrides)


# --- the constructor gets what its signature names, nothing else ------------------------------------------

def test_the_constructor_gets_the_sizes_its_signature_names_and_nothing_else(mynets):
    mine = mynets()
    net = build_net(custom("Net"), vocab_size=27, block_size=5)
    assert net.body[1].in_features == 5 * 8 and net.head.out_features == 27
    assert isinstance(build_net(custom("Fixed"), 27, 3), mine.Fixed)  # no sizes asked, none given
    assert build_net(custom("Anything"), 27, 3).given == {"vocab_size": 27, "block_size": 3}  # **kwargs: the sizes, no norm
    assert build_net(custom("Net", "+model.width=64"), 27, 3).head.in_features == 64  # its own arguments


def test_the_norm_group_goes_only_to_a_model_that_names_norm(mynets):
    mynets()
    assert build_net(custom("Normed"), 27, 3).given_norm is None  # model=custom: norm none by default
    given = build_net(custom("Normed", "norm=layernorm"), 27, 3).given_norm
    assert given.func is nn.LayerNorm
    mlp = build_net(make_config("norm=batchnorm"), 27, 3)
    assert isinstance(mlp.blocks[0].norm, nn.BatchNorm1d)


def test_model_custom_defaults_to_no_norm_and_refuses_one_given(mynets, small_names, tmp_path):
    mynets()
    assert not custom("Net").norm  # conf/model/custom.yaml: override /norm: none
    with pytest.raises(ConfigError) as err:
        train(custom("Net", "norm=batchnorm", f"data.path={small_names}"), tmp_path / "run")
    message = str(err.value)
    assert message.startswith("norm=") and "mynets.Net takes no `norm` argument" in message and "norm=none" in message
    assert "\n" not in message and not (tmp_path / "run").exists()


def test_model_custom_without_a_target_is_refused_in_one_line(small_names, tmp_path):
    with pytest.raises(ConfigError, match=r"^model._target_: not set; model=custom trains your own nn.Module"):
        train(make_config(*TINY, "model=custom", f"data.path={small_names}"), tmp_path / "run")


def test_a_target_that_cannot_be_imported_is_refused_in_one_line(small_names, tmp_path):
    with pytest.raises(ConfigError, match=r"^model._target_=nowhere.Net: cannot import it"):
        train(make_config(*TINY, "model=custom", "model._target_=nowhere.Net", f"data.path={small_names}"), tmp_path / "run")


# --- the output is checked before training -----------------------------------------------------------------

@pytest.mark.parametrize("name, says", [
    ("Wide", "mynets.Wide: returns logits of shape (2, 28) for a (batch, block_size) = (2, 3) input; "
             "expected (batch, vocab) = (2, 27)"),
    ("Sequence", "mynets.Sequence: returns logits for every position, (batch, block_size, vocab) = (2, 3, 27)"),
])
def test_an_output_outside_the_contract_is_refused_in_one_line_before_training(name, says, mynets, small_names, tmp_path):
    mynets()
    with pytest.raises(ConfigError) as err:
        train(custom(name, f"data.path={small_names}"), tmp_path / "run")
    assert str(err.value).startswith(f"model._target_={says}")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()


@pytest.mark.parametrize("norm", ["batchnorm", "none"])
def test_the_output_check_changes_nothing_an_mlp_run_logs(norm, small_names, monkeypatch):
    """Its probe pass changes no random stream and no BatchNorm statistic: build gives the same weights,
    buffers and random state with the check as without it."""
    cfg = make_config(*TINY, f"data.path={small_names}", f"norm={norm}")
    _, checked = build(cfg)
    rng_checked = torch.random.get_rng_state()
    monkeypatch.setattr(experiment, "check_output", lambda *args: None)
    _, unchecked = build(cfg)
    assert torch.equal(torch.random.get_rng_state(), rng_checked)
    a, b = checked.state_dict(), unchecked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if norm == "batchnorm":
        assert a["net.blocks.0.norm.num_batches_tracked"] == 0


# --- run.yaml records the shapes; a resume with other shapes is refused ------------------------------------

def test_run_yaml_records_the_shapes_outside_the_hash(small_names, tmp_path):
    cfg = make_config(*TINY, f"data.path={small_names}")
    data, module = build(cfg)
    record = experiment.run_record(cfg, data, module.net)
    assert record["config_hash"] == experiment.run_record(cfg, data)["config_hash"] == config_hash(record["run_config"])
    assert record["shapes"] == {"embedding.weight": [27, 10], "blocks.0.linear.weight": [200, 30],
                                "blocks.0.norm.weight": [200], "blocks.0.norm.bias": [200],
                                "output.weight": [27, 200], "output.bias": [27]}
    assert train(cfg, tmp_path / "run")["status"] == "completed"
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["shapes"] == record["shapes"]


def test_a_resume_with_other_shapes_is_refused_naming_the_parameter(mynets, small_names, tmp_path):
    mynets(width=16)
    run = tmp_path / "run"
    cfg = custom("Net", f"data.path={small_names}", "trainer.max_steps=20")
    assert train(cfg, run)["status"] == "completed"
    assert yaml.safe_load((run / "run.yaml").read_text())["shapes"]["body.1.weight"] == [16, 24]
    mynets(width=24)  # the user's code changed; the config did not
    with pytest.raises(ConfigError) as err:
        train(cfg, run)
    assert str(err.value) == (f"{run} (run.yaml) holds a model of other shapes (body.1.weight is (16, 24) there, "
                              "(24, 24) now: the model's code changed since); give another hydra.run.dir "
                              "(hydra.sweep.dir in a sweep)")


# --- a model of one's own trains, and loads ---------------------------------------------------------------

def test_a_custom_model_trains_and_loads(mynets, small_names, tmp_path):
    mine = mynets()
    run = tmp_path / "run"
    results = train(custom("Net", f"data.path={small_names}", "+model.width=32"), run)
    assert results["status"] == "completed" and results["steps"] == 40
    assert results["final/train_loss"] < 3.3  # below the uniform ln(27): it learnt
    loaded = actgrad.load(run, model=mine.Net)
    assert isinstance(loaded.model.net, mine.Net) and loaded.model.net.head.in_features == 32
    assert len(loaded.sample(3, seed=1)) == 3


# --- model=wavenet -----------------------------------------------------------------------------------------

def test_flatten_consecutive_fuses_neighbours_and_squeezes_a_single_position():
    x = torch.arange(2 * 8 * 3.0).view(2, 8, 3)
    y = FlattenConsecutive(2)(x)
    assert y.shape == (2, 4, 6) and torch.equal(y[0, 1], torch.cat([x[0, 2], x[0, 3]]))
    assert FlattenConsecutive(2)(torch.zeros(5, 2, 3)).shape == (5, 6)
    assert FlattenConsecutive(4)(torch.zeros(5, 8, 3)).shape == (5, 2, 12)


def test_wavenet_has_the_lectures_shapes_and_76579_parameters():
    net = WaveNet(norm=partial(nn.BatchNorm1d, momentum=0.1, eps=1e-5))
    assert sum(p.numel() for p in net.parameters()) == 76579  # makemore part 5
    shapes = []
    for block in net.blocks:
        block.register_forward_hook(lambda module, inputs, output: shapes.append(tuple(output.shape)))
    assert net(torch.randint(0, 27, (32, 8))).shape == (32, 27)
    assert shapes == [(32, 4, 128), (32, 2, 128), (32, 128)]
    for block in net.blocks:
        assert block.linear.bias is None and type(block.norm) is nn.BatchNorm1d and block.norm.momentum == 0.1
        assert isinstance(block.act, nn.Tanh)


def test_wavenets_batchnorm_normalises_over_batch_and_time():
    """A plain nn.BatchNorm1d, given (batch, channels, time) as PyTorch reads it: each channel's statistics
    are over batch and time, as the lecture's fix computes them."""
    net = WaveNet(n_embd=3, n_hidden=4, norm=partial(nn.BatchNorm1d, momentum=0.1))
    block, seen = net.blocks[0], {}
    assert type(block.norm) is nn.BatchNorm1d
    block.norm.register_forward_hook(lambda module, inputs, output: seen.update(input=inputs[0]))
    h = block.linear(block.flatten(net.embedding(torch.randint(0, 27, (16, 8)))))  # (batch, time, channels)
    y = block.from_channels(block.norm(block.to_channels(h)))
    assert seen["input"].shape == (16, 4, 4) and torch.equal(seen["input"], h.transpose(1, 2))
    assert torch.allclose(y.mean((0, 1)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.var((0, 1), unbiased=False), torch.ones(4), atol=1e-3)
    assert torch.allclose(block.norm.running_mean, 0.1 * h.mean((0, 1)), atol=1e-5)


def test_wavenet_with_another_block_size_is_refused_in_one_line(small_names, tmp_path):
    cfg = make_config(*TINY, "model=wavenet", "data.block_size=3", "init=pytorch", f"data.path={small_names}")
    with pytest.raises(ConfigError, match=r"^data.block_size=3: model=wavenet fuses 2 positions 3 times, so it needs "
                                          r"block_size 8 \(group \*\* n_layers\)$"):
        train(cfg, tmp_path / "run")


def test_model_wavenet_trains(small_names, tmp_path):
    cfg = make_config(*TINY, "model=wavenet", "init=pytorch", f"data.path={small_names}")
    assert cfg.data.block_size == 8
    results = train(cfg, tmp_path / "run")
    assert results["status"] == "completed" and results["final/train_loss"] < 3.3


def test_experiment_wavenet_has_the_lectures_settings():
    cfg = make_config("experiment=wavenet")
    assert cfg.model._target_ == "actgrad.model.WaveNet" and cfg.data.block_size == 8 and cfg.data.batch_size == 32
    assert (cfg.model.n_embd, cfg.model.n_hidden) == (24, 128)
    assert (cfg.init._target_, cfg.init.gain, cfg.init.output_scale) == ("actgrad.init.kaiming", 1.0, 0.1)
    assert (cfg.norm.momentum, cfg.norm.eps) == (0.1, 1e-5)
    assert (cfg.optimizer.lr, cfg.trainer.max_steps, cfg.scheduler.at[0] * cfg.trainer.max_steps) == (0.1, 200000, 150000)


# --- norm=rmsnorm ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm, keeps_bias", [(nn.BatchNorm1d, False), (nn.LayerNorm, False), (nn.RMSNorm, True),
                                              (partial(nn.LayerNorm, bias=False), True), (None, True)])
def test_a_linear_drops_its_bias_only_before_a_norm_with_a_shift(norm, keeps_bias):
    for net in (MLP(n_layers=2, norm=norm), WaveNet(norm=norm)):
        assert all((layer.bias is not None) == keeps_bias for layer in net.hidden_linears())


def test_norm_rmsnorm_builds_and_trains(small_names, tmp_path):
    cfg = make_config(*TINY, "norm=rmsnorm", f"data.path={small_names}", "init=pytorch")
    data, module = build(cfg)
    assert isinstance(module.net.blocks[0].norm, nn.RMSNorm) and module.net.blocks[0].linear.bias is not None
    assert train(cfg, tmp_path / "run")["status"] == "completed"
