"""Each stacked block against its single twin, HFTA-style: M unstacked copies with their own weights and
inputs against the stacked one (values, gradients, BatchNorm's running statistics, state dicts); whole
networks stacked by actgrad.stacking.stack; what has no stacked form says why; and sweeps of a custom
model and of the WaveNet that stack and end where their single runs end."""

import copy
import subprocess
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import ROOT, read_statuses

from actgrad import events, init
from actgrad.layers import NONLINEARITIES
from actgrad.model import MLP, FlattenConsecutive, SwapTimeAndChannels, WaveNet
from actgrad.stacking import TWINS, NoStackedForm, member_state, stack, stack_states

M, B = 3, 16
EXACT = {"rtol": 1e-6, "atol": 1e-6}  # float32
# A 3-D Linear's weight and bias gradients are sums over batch x time (64 terms of size ~1) taken in another
# order than a single run's (one bmm over members): up to 1.6e-6 apart, so within 1e-5
SUMMED = {"rtol": 1e-5, "atol": 1e-5}


def copies(block: nn.Module) -> list[nn.Module]:
    """M copies of `block`, each with weights and running statistics of its own."""
    out = []
    for m in range(M):
        torch.manual_seed(m)
        c = copy.deepcopy(block)
        with torch.no_grad():
            for name, t in c.state_dict().items():
                if t.is_floating_point():
                    t.copy_(torch.rand_like(t) + 0.5 if "var" in name else torch.randn_like(t))
        out.append(c)
    return out


def twin_of(singles: list[nn.Module]) -> nn.Module:
    stacked = TWINS[type(singles[0])](singles[0], len(singles))
    stacked.load_state_dict(stack_states([s.state_dict() for s in singles]))
    return stacked


# (id, the block, a member's input shape); built when a test runs: a layer built at import would draw random
# numbers, and the sweep's worker imports this module to build custom_mlp after seeding
BLOCKS = [
    ("linear", lambda: nn.Linear(6, 5), (B, 6)),
    ("linear, no bias", lambda: nn.Linear(6, 5, bias=False), (B, 6)),
    ("linear on 3-D", lambda: nn.Linear(6, 5), (B, 4, 6)),
    ("batchnorm", lambda: nn.BatchNorm1d(5, momentum=0.1), (B, 5)),
    ("batchnorm on 3-D", lambda: nn.BatchNorm1d(5), (B, 5, 4)),
    ("batchnorm, no affine, no running stats", lambda: nn.BatchNorm1d(5, affine=False, track_running_stats=False), (B, 5)),
    ("layernorm", lambda: nn.LayerNorm(5), (B, 5)),
    ("layernorm on 3-D, two dims", lambda: nn.LayerNorm((4, 5)), (B, 4, 5)),
    ("layernorm, no bias", lambda: nn.LayerNorm(5, bias=False), (B, 5)),
    ("rmsnorm", lambda: nn.RMSNorm(5), (B, 5)),
    ("rmsnorm on 3-D", lambda: nn.RMSNorm(5, eps=1e-5), (B, 4, 5)),
    ("flatten", nn.Flatten, (B, 4, 3)),
    ("flatten consecutive", lambda: FlattenConsecutive(2), (B, 4, 3)),
    ("flatten consecutive to one position", lambda: FlattenConsecutive(2), (B, 2, 3)),
    ("swap time and channels", SwapTimeAndChannels, (B, 4, 3)),
    ("swap time and channels, 2-D", SwapTimeAndChannels, (B, 3)),
    *((t.__name__, t, (B, 5)) for t in NONLINEARITIES if t is not nn.PReLU),
]


@pytest.mark.parametrize("make, shape", [b[1:] for b in BLOCKS], ids=[b[0] for b in BLOCKS])
def test_each_block_equals_its_single_twin(make, shape):
    block = make()
    summed = EXACT if len(shape) == 2 or not isinstance(block, nn.Linear) else SUMMED
    singles = copies(block)
    stacked = twin_of(singles)
    xs = [torch.randn(shape, generator=torch.Generator().manual_seed(10 + m), requires_grad=True) for m in range(M)]
    x = torch.stack([x.detach() for x in xs]).movedim(1, -1).requires_grad_()  # the stack's layout: batch last
    out = stacked(x).movedim(-1, 1)  # (members, batch, ...)
    grads = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    (out * grads).sum().backward()
    params = dict(stacked.named_parameters())
    for m, (single, xm) in enumerate(zip(singles, xs)):
        alone = single(xm)
        torch.testing.assert_close(out[m], alone, **EXACT)
        (alone * grads[m]).sum().backward()
        torch.testing.assert_close(x.grad.movedim(-1, 1)[m], xm.grad, **EXACT)
        for name, p in single.named_parameters():
            torch.testing.assert_close(params[name].grad[m], p.grad, **summed)
        for name, b in single.named_buffers():  # BatchNorm: each member's own running statistics
            torch.testing.assert_close(dict(stacked.named_buffers())[name][m], b, **EXACT)
    stacked.eval()  # and BatchNorm's evaluation, from each member's statistics
    for m, single in enumerate(singles):
        torch.testing.assert_close(stacked(x).movedim(-1, 1)[m], single.eval()(xs[m]), **EXACT)


def test_the_embedding_equals_its_single_twin():
    """The stack's input, (members, batch, block) indices, through one table of M x vocab rows."""
    singles = copies(nn.Embedding(7, 4))
    stacked = twin_of(singles)
    idx = torch.randint(0, 7, (M, B, 3))
    out = stacked(idx).movedim(-1, 1)  # (members, batch, block, n_embd)
    grads = torch.randn(out.shape)
    (out * grads).sum().backward()
    for m, single in enumerate(singles):
        alone = single(idx[m])
        assert torch.equal(out[m], alone)
        (alone * grads[m]).sum().backward()
        # summed in the batch's order (index_select's backward), a repeated index's rows in another order
        torch.testing.assert_close(stacked.weight.grad[m], single.weight.grad, **EXACT)


def conv_net(vocab_size, block_size):
    """A user's network with a block that has no stacked twin."""
    return nn.Sequential(nn.Embedding(vocab_size, 4), nn.Conv1d(block_size, block_size, 1), nn.Flatten(),
                         nn.Linear(4 * block_size, vocab_size))


def custom_mlp(vocab_size, block_size, n_embd=10, n_hidden=64):
    """A user's network of torch.nn blocks only: what `model=custom model._target_=...` builds."""
    return nn.Sequential(nn.Embedding(vocab_size, n_embd), nn.Flatten(), nn.Linear(block_size * n_embd, n_hidden, bias=False),
                         nn.BatchNorm1d(n_hidden), nn.Tanh(), nn.Linear(n_hidden, vocab_size))


class ShapeOps(nn.Module):
    """Shape ops a forward may use, each rewritten for the stack's layout."""

    def __init__(self, vocab_size=27, block_size=4):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, 6)
        self.norm = nn.LayerNorm(block_size)
        self.hidden = nn.Linear(6 * block_size, 12)
        self.head = nn.Linear(12, vocab_size)

    def forward(self, idx):
        x = self.norm(self.embed(idx).transpose(1, 2))  # (B, 6, T): normalised over time
        x = x.permute(0, 2, 1).reshape(x.shape[0], -1)  # (B, T * 6)
        h = torch.relu(self.hidden(x.view(x.size(0), -1).unsqueeze(1).squeeze(1)))
        return self.head(h + 0.5 * F.gelu(h))


class Flattened(nn.Module):
    """An embedding flattened at once, written three ways (the stack makes it flat in one view), and looked
    up twice (the stack takes the general path)."""

    def __init__(self, how):
        super().__init__()
        self.how, self.embed, self.head = how, nn.Embedding(27, 4), nn.Linear(12, 27)

    def forward(self, idx):
        if self.how == "torch.flatten":
            return self.head(torch.flatten(self.embed(idx), 1))
        if self.how == "keywords":
            return self.head(self.embed(idx).flatten(start_dim=1, end_dim=-1))
        return self.head(self.embed(idx).flatten(1) - 0.5 * self.embed(idx).flatten(1))


NETS = [
    ("mlp", lambda: MLP(27, 3, 10, 40, 2), 3),
    ("mlp, batchnorm", lambda: MLP(27, 3, 10, 40, 2, norm=partial(nn.BatchNorm1d, momentum=0.1)), 3),
    ("mlp, layernorm", lambda: MLP(27, 3, 10, 40, 2, norm=nn.LayerNorm), 3),
    ("mlp, rmsnorm", lambda: MLP(27, 3, 10, 40, 2, norm=nn.RMSNorm), 3),
    ("wavenet, batchnorm", lambda: WaveNet(27, 8, 12, 32, norm=partial(nn.BatchNorm1d, momentum=0.1)), 8),
    ("wavenet, layernorm", lambda: WaveNet(27, 8, 12, 32, norm=nn.LayerNorm), 8),
    ("custom nn.Sequential", lambda: custom_mlp(27, 3), 3),
    ("shape ops", lambda: ShapeOps(), 4),
    *((f"embedding flattened, {how}", partial(Flattened, how), 3) for how in ("torch.flatten", "keywords", "looked up twice")),
]


@pytest.mark.parametrize("make, block_size", [n[1:] for n in NETS], ids=[n[0] for n in NETS])
def test_a_stacked_network_equals_its_members(make, block_size):
    members = []
    for seed in range(M):
        torch.manual_seed(seed)
        net = make()
        init.kaiming(net, block_size=block_size)
        members.append(net)
    stacked = stack(members, block_size)
    assert [n for n, _ in stacked.named_parameters()] == [n for n, _ in members[0].named_parameters()]
    idx = torch.randint(0, 27, (M, B, block_size))
    y = torch.randint(0, 27, (M, B))
    logits = stacked(idx)  # (members, vocab, batch)
    F.cross_entropy(logits, y, reduction="none").mean(1).sum().backward()
    params, state = dict(stacked.named_parameters()), stacked.state_dict()
    for m, net in enumerate(members):
        alone = net(idx[m])
        torch.testing.assert_close(logits[m].T, alone, **EXACT)
        F.cross_entropy(alone, y[m]).backward()
        for name, p in net.named_parameters():  # sums of a batch's terms in another order: 1e-5 relative
            torch.testing.assert_close(params[name].grad[m], p.grad, rtol=1e-5, atol=1e-6)
        mine = member_state(state, m)  # its checkpoint's weights load as a single run's (strict)
        torch.testing.assert_close(mine, net.state_dict(), **EXACT)  # running statistics included
        fresh = make()
        fresh.load_state_dict(mine)


def test_the_stacks_own_order_of_modules_is_the_members(tmp_path):
    """fx records modules in call order; the stack keeps the member's (its optimizer's flat buffers and a
    member's checkpoint follow the parameters' order)."""

    class Backwards(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 27)
            self.embed = nn.Embedding(27, 4)

        def forward(self, idx):
            return self.head(self.embed(idx).flatten(1))

    stacked = stack([Backwards(), Backwards()], 2)
    assert list(stacked.state_dict()) == ["head.weight", "head.bias", "embed.weight"]


class Indexing(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(27, 4), nn.Linear(4, 27)

    def forward(self, idx):
        return self.head(self.embed(idx)[:, -1])


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(27, 4), nn.Linear(12, 27)
        self.scale = nn.Parameter(torch.ones(12))

    def forward(self, idx):
        return self.head(self.embed(idx).flatten(1) * self.scale)


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(27, 4), nn.Linear(12, 27)

    def forward(self, idx):
        x = self.embed(idx).flatten(1)
        return self.head(x if x.sum() > 0 else -x)


class Cumulative(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(27, 4), nn.Linear(12, 27)

    def forward(self, idx):
        return self.head(torch.cumsum(self.embed(idx), 1).flatten(1))


def sequential(*middle, n_in=12):
    return nn.Sequential(nn.Embedding(27, 4), *middle, nn.Flatten(), nn.Linear(n_in, 27))


@pytest.mark.parametrize("make, reason", [
    (lambda: sequential(nn.Conv1d(3, 3, 1)), "1 (Conv1d) has no stacked form"),
    (lambda: sequential(nn.PReLU(4)), "1 (PReLU) has no stacked form: a parameter per channel"),
    (lambda: nn.Sequential(nn.Embedding(27, 4, padding_idx=0), nn.Flatten(), nn.Linear(12, 27)),
     "0 (Embedding) has no stacked form: padding_idx, max_norm, scale_grad_by_freq or sparse"),
    (lambda: sequential(nn.Flatten(), nn.BatchNorm1d(12, momentum=None)),
     "2 (BatchNorm1d) has no stacked form: momentum=None (a cumulative average)"),
    (Indexing, "Indexing.forward has no stacked form: indexing a tensor"),
    (Scaled, "Scaled.scale is used outside a module call: it has no stacked form"),
    (Branching, "Branching.forward cannot be traced by torch.fx (TraceError: symbolically traced variables cannot "
                "be used as inputs to control flow)"),
    (Cumulative, "cumsum in Cumulative.forward has no stacked form"),
    (lambda: nn.Sequential(nn.Embedding(27, 4), nn.Flatten(0), nn.Linear(12, 27)),
     "Sequential.forward has no stacked form: flatten(0) moves the batch dimension"),
], ids=["conv", "prelu", "padding_idx", "cumulative batchnorm", "indexing", "parameter", "branching", "cumsum",
        "flatten(0)"])
def test_what_has_no_stacked_form_says_why(make, reason):
    net = make()
    with pytest.raises(NoStackedForm) as e:
        stack([net, copy.deepcopy(net)], 3)
    assert str(e.value) == reason


# --- sweeps: a custom model given on the command line, and model=wavenet, stack and end as their single runs

SWEEP = ["trainer.max_steps=300", "steps_per_batch=50", "log_every_n_steps=50", "val_every_n_steps=150",
         "checkpoint_every_n_steps=300", "trainer.enable_progress_bar=false", "callbacks=default"]
CUSTOM = ["model=custom", "model._target_=test_stacked_blocks.custom_mlp"]


def test_a_custom_model_sweep_stacks_and_each_member_ends_as_its_single_run(small_names, tmp_path):
    from actgrad.experiment import train

    from conftest import make_config

    env = {"PYTHONPATH": str(ROOT / "tests")}
    proc = subprocess.run([sys.executable, "train.py", "-m", "hydra/launcher=stacked", "hydra.launcher.n_jobs=1",
                           *SWEEP, *CUSTOM, f"data.path={small_names}", "seed=1,2", f"hydra.sweep.dir={tmp_path / 's'}"],
                          cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, **env})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "training 2 runs stacked" in out and "trains alone" not in out, out[-3000:]
    statuses = read_statuses(tmp_path / "s")
    for seed in (1, 2):
        single = train(make_config(*SWEEP, *CUSTOM, f"data.path={small_names}", f"seed={seed}"), tmp_path / f"single{seed}")
        assert statuses[f"seed={seed}"]["final/val_loss"] == pytest.approx(single["final/val_loss"], rel=1e-5, abs=1e-5)
        # its diagnostics name its layers and parameters as its single run does (the watched layers of its own net)
        mine, theirs = events.scalars(tmp_path / "s" / f"seed={seed}"), events.scalars(tmp_path / f"single{seed}")
        assert mine.keys() == theirs.keys() and "act/saturation/layer1" in mine
    board = events.accumulate(tmp_path / "s" / "seed=1")
    card = board.Tensors("Start here/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**Layers watched** (each call of a nonlinearity module): layer1 `4` (Tanh)" in card


def test_a_wavenet_group_stacks_and_each_member_ends_as_its_single_run(composer, small_names, tmp_path):
    from actgrad.experiment import train
    from actgrad.group import ALONE, train_group

    cfgs = [composer(*SWEEP, "model=wavenet", "model.n_embd=8", "model.n_hidden=32", f"data.path={small_names}",
                     f"seed={seed}") for seed in (1, 2)]
    stacked = train_group(cfgs, [tmp_path / f"stacked{i}" for i in range(2)])
    assert ALONE not in stacked and [r["status"] for r in stacked] == ["completed"] * 2
    for i, cfg in enumerate(cfgs):
        single = train(cfg, tmp_path / f"single{i}")
        assert stacked[i]["final/val_loss"] == pytest.approx(single["final/val_loss"], rel=1e-5, abs=1e-5)
        # its diagnostics saw its own 3-D activations and parameters, under a single run's tags
        mine, theirs = events.scalars(tmp_path / f"stacked{i}"), events.scalars(tmp_path / f"single{i}")
        assert mine.keys() == theirs.keys() and "act/saturation/layer3" in mine
        for tag in ("act/saturation/layer1", "update_ratio/layer2.weight"):
            assert [v for _, v in mine[tag]] == pytest.approx([v for _, v in theirs[tag]], rel=1e-4, abs=1e-6), tag


def test_a_group_that_cannot_stack_says_why_once_and_each_member_records_it(composer, small_names, tmp_path, caplog):
    import json

    from actgrad.group import ALONE, train_group

    cfgs = [composer(*SWEEP, "model=custom", "model._target_=test_stacked_blocks.conv_net", f"data.path={small_names}",
                     f"seed={seed}") for seed in (1, 2)]
    with caplog.at_level("WARNING", logger="actgrad.group"):
        assert train_group(cfgs, [tmp_path / "seed=1", tmp_path / "seed=2"]) == [ALONE, ALONE]
    lines = [r.getMessage() for r in caplog.records if "trains alone" in r.getMessage()]
    assert lines == ["seed=1 | seed=2: trains alone: 1 (Conv1d) has no stacked form"]
    for seed in (1, 2):
        attempts = [json.loads(line) for line in (tmp_path / f"seed={seed}" / "attempts.jsonl").read_text().splitlines()]
        assert attempts[-1]["note"] == "trains alone: 1 (Conv1d) has no stacked form"
