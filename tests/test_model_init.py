import math

import pytest
import torch
import torch.nn.functional as F

from actgrad import init
from actgrad.data import NamesData
from actgrad.model import MLP

from conftest import LN_V

NORMS = {"none": None, "batchnorm": torch.nn.BatchNorm1d, "layernorm": torch.nn.LayerNorm}


def big_mlp(**kw):
    # wide layers so that the sample std of a weight matrix is within ~1% of its true std
    return MLP(n_embd=20, n_hidden=400, n_layers=2, **kw)


@pytest.mark.parametrize("norm", NORMS)
def test_a_linear_before_a_norm_has_no_bias(norm):
    net = MLP(n_layers=3, norm=NORMS[norm])
    for layer in net.hidden_linears():
        assert (layer.bias is None) == (norm != "none")
    assert net.output.bias is not None


@pytest.mark.parametrize("activation, gain", [("tanh", 5 / 3), ("relu", math.sqrt(2)), ("sigmoid", 1.0)])
def test_kaiming_std_is_gain_over_sqrt_fan_in(activation, gain):
    torch.manual_seed(0)
    net = big_mlp(activation=activation)
    init.kaiming(net, output_scale=0.1)
    for layer in net.hidden_linears():
        assert layer.weight.std().item() == pytest.approx(gain / math.sqrt(layer.in_features), rel=0.03)
        assert torch.all(layer.bias == 0)
    assert net.output.weight.std().item() == pytest.approx(0.1 / math.sqrt(400), rel=0.03)
    assert torch.all(net.output.bias == 0)


def test_xavier_std():
    torch.manual_seed(0)
    net = big_mlp(activation="tanh")
    init.xavier(net)
    for layer in net.hidden_linears():
        expected = 5 / 3 * math.sqrt(2 / (layer.in_features + layer.out_features))
        assert layer.weight.std().item() == pytest.approx(expected, rel=0.03)


def test_naive_and_scaled_stds():
    torch.manual_seed(0)
    net = big_mlp()
    init.naive(net)
    for p in [net.embedding.weight, net.output.weight, *[l.weight for l in net.hidden_linears()]]:
        assert p.std().item() == pytest.approx(1.0, rel=0.03)
    init.scaled(net, output_weight=0.01, output_bias=0.0, hidden_weight=0.2, hidden_bias=0.01)
    assert net.output.weight.std().item() == pytest.approx(0.01, rel=0.03)
    assert torch.all(net.output.bias == 0)
    for layer in net.hidden_linears():
        assert layer.weight.std().item() == pytest.approx(0.2, rel=0.03)


def test_pytorch_rule_keeps_pytorchs_defaults():
    torch.manual_seed(0)
    net = big_mlp()
    before = [p.clone() for p in net.parameters()]
    init.pytorch(net)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def initial_loss(rule, names_path, **kw):
    torch.manual_seed(42)
    data = NamesData(path=str(names_path))
    data.prepare()
    x, y = (t.long() for t in data.splits["train"])
    net = MLP()  # the lecture's: 200 tanh units, n_embd 10, block_size 3
    getattr(init, rule)(net, **kw)
    with torch.no_grad():
        return F.cross_entropy(net(x[:20000]), y[:20000]).item()


@pytest.mark.parametrize("rule, kw", [("scaled", {}), ("kaiming", {}), ("scaled", {"hidden_weight": 1, "hidden_bias": 1})])
def test_fixed_inits_start_near_the_uniform_baseline(rule, kw, small_names):
    assert initial_loss(rule, small_names, **kw) == pytest.approx(LN_V, abs=0.1)


def test_naive_init_starts_far_above_the_baseline(names_txt):
    loss = initial_loss("naive", names_txt)
    assert loss > 5 * LN_V  # the lecture sees ~27.9 against 3.30
    assert 20 < loss < 40


@pytest.mark.parametrize(
    "kw, complaint",
    [({"n_hidden": 0}, "model.n_hidden=0"), ({"n_layers": -1}, "model.n_layers=-1"),
     ({"activation": "swish"}, "accepted values are tanh"), ({"n_embd": 2.5}, "model.n_embd=2.5")],
)
def test_bad_model_settings_name_the_value(kw, complaint):
    with pytest.raises(ValueError, match=complaint.replace(".", r"\.")):
        MLP(**kw)


# ---------------------------------------------------------------- the MLP's weights as before inits went by role


class Before:
    """The rules as they were written for the MLP alone (its embedding, hidden_linears(), output and
    activation attributes): inits by role must give it the same weights, bit for bit."""

    @staticmethod
    @torch.no_grad()
    def naive(model):
        torch.nn.init.normal_(model.embedding.weight)
        for layer in model.hidden_linears() + [model.output]:
            torch.nn.init.normal_(layer.weight)
            if layer.bias is not None:
                torch.nn.init.normal_(layer.bias)

    @staticmethod
    @torch.no_grad()
    def scaled(model, output_weight=0.01, output_bias=0.0, hidden_weight=0.2, hidden_bias=0.01):
        Before.naive(model)
        model.output.weight.mul_(output_weight)
        model.output.bias.mul_(output_bias)
        for layer in model.hidden_linears():
            layer.weight.mul_(hidden_weight)
            if layer.bias is not None:
                layer.bias.mul_(hidden_bias)

    @staticmethod
    @torch.no_grad()
    def kaiming(model, gain=None, output_scale=0.1):
        gain = init.gain_for(model.activation) if gain is None else gain
        torch.nn.init.normal_(model.embedding.weight)
        for layer in model.hidden_linears():
            torch.nn.init.normal_(layer.weight, std=gain / math.sqrt(layer.in_features))
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)
        torch.nn.init.normal_(model.output.weight, std=output_scale / math.sqrt(model.output.in_features))
        torch.nn.init.zeros_(model.output.bias)

    @staticmethod
    @torch.no_grad()
    def xavier(model, gain=None):
        gain = init.gain_for(model.activation) if gain is None else gain
        torch.nn.init.normal_(model.embedding.weight)
        for layer in model.hidden_linears():
            torch.nn.init.xavier_normal_(layer.weight, gain=gain)
            if layer.bias is not None:
                torch.nn.init.zeros_(layer.bias)
        torch.nn.init.xavier_normal_(model.output.weight)
        torch.nn.init.zeros_(model.output.bias)

    @staticmethod
    def pytorch(model):
        pass


RULES = {"naive": ("naive", {}), "scaled": ("scaled", {}),  # conf/init/*.yaml's settings
         "scaled_output": ("scaled", {"hidden_weight": 1.0, "hidden_bias": 1.0}),
         "kaiming": ("kaiming", {"gain": None, "output_scale": 0.1}), "xavier": ("xavier", {"gain": None}),
         "pytorch": ("pytorch", {})}


def built(rule, kw, n_layers, activation, norm, **where):
    torch.manual_seed(1234)
    net = MLP(n_hidden=100 if n_layers == 5 else 200, n_layers=n_layers, activation=activation, norm=NORMS[norm])
    rule(net, **kw, **where)
    return net.state_dict(), torch.rand(4)  # and the random stream after it: what is drawn next must not move


@pytest.mark.parametrize("name", RULES)
@pytest.mark.parametrize("where", [{}, {"block_size": 3}], ids=["registered-order", "probed"])
def test_the_mlp_gets_the_weights_it_always_had(name, where):
    rule, kw = RULES[name]
    for n_layers in (1, 5):
        for activation in ("tanh", "relu", "gelu", "leaky_relu"):
            for norm in NORMS:
                before, next_before = built(getattr(Before, rule), kw, n_layers, activation, norm)
                now, next_now = built(getattr(init, rule), kw, n_layers, activation, norm, **where)
                assert before.keys() == now.keys()
                assert all(torch.equal(before[k], now[k]) for k in before), (n_layers, activation, norm)
                assert torch.equal(next_before, next_now)
