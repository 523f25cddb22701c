"""actgrad.optim: flat-buffer SGD/Adam/AdamW train the makemore MLP as torch.optim's do, step for step,
keep parameters, gradients and state in their flat buffers, and checkpoint in torch's format."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F

from actgrad import optim
from actgrad.model import MLP

STEPS = 200
NORMS = {"none": None, "batchnorm": torch.nn.BatchNorm1d}
# name: (ours, torch's, options, exact): exact = bit for bit, else within float32 rounding
CASES = {
    "sgd": (optim.SGD, torch.optim.SGD, dict(lr=0.1), True),
    "sgd_momentum": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9), True),
    "sgd_weight_decay": (optim.SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=1e-2), True),
    "sgd_nesterov": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3), True),
    "sgd_dampening": (optim.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.5, dampening=0.3), True),
    "adam": (optim.Adam, torch.optim.Adam, dict(lr=1e-2), False),
    "adam_weight_decay": (optim.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=1e-2), False),
    "adamw": (optim.AdamW, torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1), False),
}
STATE_KEYS = {optim.SGD: ["momentum_buffer"], optim.Adam: ["step", "exp_avg", "exp_avg_sq"],
              optim.AdamW: ["step", "exp_avg", "exp_avg_sq"]}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A step of this model is fastest on one thread, and ~20x slower on two of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 27, (32, 3), generator=g), torch.randint(0, 27, (32,), generator=g)) for _ in range(n)]


def make_net(norm=None, seed=0):
    torch.manual_seed(seed)
    return MLP(norm=norm)


def train_ours(net, opt, data, call="update", scheduler=None, lrs=None):
    for x, y in data:
        loss = F.cross_entropy(net(x), y)
        opt.clear_grads()
        loss.backward()
        opt.update() if call == "update" else opt.step()
        if scheduler is not None:
            scheduler.step()
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])


def train_torch(net, opt, data, scheduler=None, lrs=None):
    for x, y in data:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if lrs is not None:
            lrs.append(opt.param_groups[0]["lr"])


def torch_optimizer(cls, params, options):
    return cls(params, foreach=False, **options)  # the single-tensor path, torch's default on a CPU


def assert_same(a, b, exact):
    """Same parameters and buffers (BatchNorm's running statistics too)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), f"{k} differs by {(sa[k] - sb[k]).abs().max()}"
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-6, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")


def assert_trained(net, initial):
    """The comparison means something: the weights moved."""
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), initial.parameters()))


def assert_in_flat_buffers(net, opt):
    flat_p, flat_g = opt.flat_params.untyped_storage().data_ptr(), opt.flat_grads.untyped_storage().data_ptr()
    for p in net.parameters():
        assert p.untyped_storage().data_ptr() == flat_p and p.grad.untyped_storage().data_ptr() == flat_g
    for key in STATE_KEYS[type(opt)]:
        if opt.state:
            assert len({opt.state[p][key].untyped_storage().data_ptr() for p in net.parameters()}) == 1, key


@pytest.mark.parametrize("call", ["update", "step"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("case", CASES)
def test_trains_as_torch_optim(case, norm, call):
    ours_cls, torch_cls, options, exact = CASES[case]
    initial = make_net(NORMS[norm])
    ours, ref = copy.deepcopy(initial), copy.deepcopy(initial)
    opt = ours_cls(ours.parameters(), **options)
    data = batches(STEPS)
    train_ours(ours, opt, data, call)
    train_torch(ref, torch_optimizer(torch_cls, ref.parameters(), options), data)
    assert_trained(ref, initial)
    assert_same(ours, ref, exact)
    assert_in_flat_buffers(ours, opt)


@pytest.mark.parametrize("norm", [None, torch.nn.BatchNorm1d, torch.nn.LayerNorm])
def test_backward_fills_the_flat_gradient_buffer(norm):
    net, ref = make_net(norm), make_net(norm)
    opt = optim.SGD(net.parameters(), lr=0.1)
    grads = [p.grad for p in net.parameters()]
    (x, y), (x2, y2) = batches(2)
    for _ in range(2):  # the second time over gradients left by the first: clear_grads zeroes them
        opt.flat_grads.fill_(7.0)
        opt.clear_grads()
        F.cross_entropy(net(x), y).backward()
    F.cross_entropy(ref(x), y).backward()
    assert [p.grad for p in net.parameters()] == grads  # the same tensors: views of the buffer
    assert_in_flat_buffers(net, opt)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)  # the embedding's dense gradient and the norm's affine ones too
    F.cross_entropy(net(x2), y2).backward()  # without clearing: autograd accumulates, in place
    F.cross_entropy(ref(x2), y2).backward()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert_in_flat_buffers(net, opt)
    assert opt.flat_grads.count_nonzero() == sum(p.grad.count_nonzero() for p in net.parameters())  # padding: 0


def test_moving_the_module_keeps_or_refuses():
    net = make_net(torch.nn.BatchNorm1d)
    opt = optim.SGD(net.parameters(), lr=0.1)
    net.to("cpu").cpu().float()  # where it already is: the views stay
    assert_in_flat_buffers(net, opt)
    (x, y), = batches(1)
    opt.clear_grads()
    F.cross_entropy(net(x), y).backward()
    opt.update()
    net.double()  # new storage, outside the buffers: training would silently stop
    with pytest.raises(RuntimeError, match="build the optimizer after moving the module") as error:
        opt.update()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["sgd_nesterov", "adamw"])
def test_grads_set_to_none_are_reattached(case):
    """zero_grad(set_to_none=True) of the module (or today's lean_calls) leaves the buffer: training stays right."""
    ours_cls, torch_cls, options, exact = CASES[case]
    initial = make_net(torch.nn.BatchNorm1d)
    ours, ref = copy.deepcopy(initial), copy.deepcopy(initial)
    opt = ours_cls(ours.parameters(), **options)
    for i, (x, y) in enumerate(batches(50)):
        loss = F.cross_entropy(ours(x), y)
        if i % 2:
            ours.zero_grad(set_to_none=True)
        else:
            opt.zero_grad(set_to_none=True)  # ours keeps the views whatever set_to_none says
            assert all(p.grad is not None for p in ours.parameters())
        loss.backward()
        opt.update()
        assert_in_flat_buffers(ours, opt)
    train_torch(ref, torch_optimizer(torch_cls, ref.parameters(), options), batches(50))
    assert_same(ours, ref, exact)


@pytest.mark.parametrize("call", ["update", "step"])
@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_lr_scheduler_drives_our_lr(case, call):
    ours_cls, torch_cls, options, exact = CASES[case]
    initial = make_net(torch.nn.BatchNorm1d)
    ours, ref = copy.deepcopy(initial), copy.deepcopy(initial)
    opt, ref_opt = ours_cls(ours.parameters(), **options), torch_optimizer(torch_cls, ref.parameters(), options)
    milestones = dict(milestones=[50, 120], gamma=0.1)
    ours_lrs, ref_lrs, data = [], [], batches(STEPS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_ours(ours, opt, data, call, torch.optim.lr_scheduler.MultiStepLR(opt, **milestones), ours_lrs)
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]  # update() counts as an optimizer step
    train_torch(ref, ref_opt, data, torch.optim.lr_scheduler.MultiStepLR(ref_opt, **milestones), ref_lrs)
    assert ours_lrs == ref_lrs and ref_lrs[0] != ref_lrs[-1]
    assert_same(ours, ref, exact)


def resume(ours_cls, options, net, state_dict, how):
    """A new module and optimizer from saved states, as a checkpoint resume builds them."""
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save({"net": net.state_dict(), "optimizer": state_dict}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
    else:
        saved = {"net": copy.deepcopy(net.state_dict()), "optimizer": state_dict}
    resumed = make_net(torch.nn.BatchNorm1d, seed=99)
    resumed.load_state_dict(saved["net"])
    opt = ours_cls(resumed.parameters(), **options)
    opt.load_state_dict(saved["optimizer"])
    return resumed, opt


@pytest.mark.parametrize("how", ["state_dict", "torch.save"])
@pytest.mark.parametrize("case", ["sgd_momentum", "sgd_nesterov", "adam_weight_decay", "adamw"])
def test_resume_from_state_dict_is_uninterrupted_training(case, how):
    ours_cls, _, options, exact = CASES[case]
    net = make_net(torch.nn.BatchNorm1d)
    opt = ours_cls(net.parameters(), **options)
    first, rest = batches(STEPS // 2, seed=1), batches(STEPS // 2, seed=2)
    train_ours(net, opt, first)
    resumed, resumed_opt = resume(ours_cls, options, net, opt.state_dict(), how)
    assert_in_flat_buffers(resumed, resumed_opt)  # the loaded state lives in flat buffers again
    train_ours(net, opt, rest)
    train_ours(resumed, resumed_opt, rest)
    assert_same(resumed, net, exact=exact or case.startswith("adam"))  # from the same state, the same ops
    assert_in_flat_buffers(resumed, resumed_opt)


def test_resume_before_the_first_step():
    """An empty state (no step yet) loads as empty; the first step then starts the momentum as torch does."""
    net = make_net(torch.nn.BatchNorm1d)
    opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    assert opt.state_dict()["state"] == {}
    resumed, resumed_opt = resume(optim.SGD, dict(lr=0.1, momentum=0.9), net, opt.state_dict(), "torch.save")
    ref = copy.deepcopy(resumed)
    train_ours(resumed, resumed_opt, batches(20))
    train_torch(ref, torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, foreach=False), batches(20))
    assert_same(resumed, ref, exact=True)


@pytest.mark.parametrize("case", ["sgd_momentum", "adamw"])
def test_state_dict_has_torchs_format(case):
    """Our state loads into torch.optim's optimizer and torch's into ours; either way training goes on the same."""
    ours_cls, torch_cls, options, exact = CASES[case]
    net = make_net(torch.nn.BatchNorm1d)
    opt = ours_cls(net.parameters(), **options)
    first, rest = batches(60, seed=1), batches(60, seed=2)
    train_ours(net, opt, first)
    state = opt.state_dict()
    assert list(state["state"]) == list(range(len(list(net.parameters()))))
    fresh = copy.deepcopy(net)
    fresh_opt = torch_optimizer(torch_cls, fresh.parameters(), options)
    train_torch(fresh, fresh_opt, first[:1])
    torch_state = fresh_opt.state_dict()
    assert set(state["param_groups"][0]) <= set(torch_state["param_groups"][0])
    for i, s in state["state"].items():  # same keys, dtypes, shapes and devices as torch's own
        assert list(s) == STATE_KEYS[ours_cls] == list(torch_state["state"][i])
        assert [(v.dtype, v.shape, v.device) for v in s.values()] == [
            (v.dtype, v.shape, v.device) for v in torch_state["state"][i].values()]

    into_torch = copy.deepcopy(net)
    torch_opt = torch_optimizer(torch_cls, into_torch.parameters(), options)
    torch_opt.load_state_dict(copy.deepcopy(state))
    train_torch(into_torch, torch_opt, rest)
    train_ours(net, opt, rest)
    assert_same(into_torch, net, exact)

    back = copy.deepcopy(into_torch)
    back_opt = ours_cls(back.parameters(), **options)
    back_opt.load_state_dict(torch_opt.state_dict())  # torch's state (and its extra group keys) into ours
    assert_in_flat_buffers(back, back_opt)
    train_ours(back, back_opt, batches(30, seed=3))
    train_torch(into_torch, torch_opt, batches(30, seed=3))
    assert_same(into_torch, back, exact)


@pytest.mark.parametrize("case", ["sgd_momentum", "adam"])
def test_tensor_hyperparameters(case):
    """lr, momentum, betas... as tensors (per-run values of stacked runs, later): the same training, to rounding."""
    ours_cls, _, options, _ = CASES[case]
    as_tensors = {k: (tuple(torch.tensor(b) for b in v) if k == "betas" else torch.tensor(float(v)))
                  for k, v in {**options, **({"betas": (0.9, 0.999)} if ours_cls is optim.Adam else {})}.items()}
    initial = make_net(torch.nn.BatchNorm1d)
    a, b = copy.deepcopy(initial), copy.deepcopy(initial)
    opt_a, opt_b = ours_cls(a.parameters(), **options), ours_cls(b.parameters(), **as_tensors)
    data = batches(50)
    train_ours(a, opt_a, data)
    train_ours(b, opt_b, data)
    assert_trained(a, initial)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_update_skips_step_hooks_step_runs_them():
    net = make_net()
    opt = optim.SGD(net.parameters(), lr=0.1)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append("hook"))
    (x, y), = batches(1)
    F.cross_entropy(net(x), y).backward()
    opt.update()
    assert calls == []
    opt.step()
    assert calls == ["hook"]


def test_step_with_a_closure_returns_its_loss():
    net, ref = make_net(), make_net()
    opt, ref_opt = optim.SGD(net.parameters(), lr=0.1), torch.optim.SGD(ref.parameters(), lr=0.1, foreach=False)
    (x, y), = batches(1)

    def closure(model, optimizer):
        def run():
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return run

    with torch.no_grad():  # the closure's backward needs grad mode: step() turns it on, as torch's does
        assert torch.equal(opt.step(closure(net, opt)), ref_opt.step(closure(ref, ref_opt)))
    assert_same(net, ref, exact=True)


def two_groups():
    net = make_net()
    return [{"params": net.embedding.parameters()}, {"params": net.output.parameters(), "lr": 0.01}]


@pytest.mark.parametrize("make, message", [
    (lambda ps: optim.SGD(ps, lr=-1), "optimizer.lr=-1: invalid learning rate"),
    (lambda ps: optim.SGD(ps, lr="fast"), "optimizer.lr='fast': invalid learning rate"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=-0.5), "optimizer.momentum=-0.5: invalid momentum"),
    (lambda ps: optim.SGD(ps, lr=0.1, weight_decay=-1e-3), "optimizer.weight_decay=-0.001: invalid weight_decay"),
    (lambda ps: optim.SGD(ps, lr=0.1, nesterov=True), "optimizer.nesterov=True: Nesterov momentum requires"),
    (lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "optimizer.nesterov=True:"),
    (lambda ps: optim.SGD(ps, lr=torch.tensor([0.1, -0.1])), "optimizer.lr=tensor([0.1"),
    (lambda ps: optim.SGD(ps, lr=-torch.ones(100, 1)), "optimizer.lr=tensor(shape=[100, 1]): invalid learning rate"),
    (lambda ps: optim.Adam(ps, lr=-1e-3), "optimizer.lr=-0.001: invalid learning rate"),
    (lambda ps: optim.Adam(ps, betas=(0.9, 1.0)), "optimizer.betas=[0.9, 1.0]: invalid beta parameter at index 1"),
    (lambda ps: optim.Adam(ps, betas=(-0.1, 0.9)), "optimizer.betas=[-0.1, 0.9]: invalid beta parameter at index 0"),
    (lambda ps: optim.Adam(ps, betas=(0.9,)), "optimizer.betas=[0.9]: must be two numbers"),
    (lambda ps: optim.Adam(ps, eps=-1e-8), "optimizer.eps=-1e-08: invalid epsilon"),
    (lambda ps: optim.AdamW(ps, weight_decay=-0.1), "optimizer.weight_decay=-0.1: invalid weight_decay"),
    (lambda ps: optim.SGD(two_groups(), lr=0.1), "optimizer.params: one parameter group only"),
    (lambda ps: optim.Adam([torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2, dtype=torch.float64))]),
     "optimizer.params: parameter 1 is torch.float64 on cpu"),
])
def test_bad_options_are_one_line_errors(make, message):
    with pytest.raises(ValueError) as error:
        make(make_net().parameters())
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)


def test_add_param_group_refused_and_hydra_configs_point_here(composer):
    opt = optim.SGD(make_net().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="^optimizer.params: one parameter group only"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))]})
    from hydra.utils import instantiate

    for name, cls in {"sgd": optim.SGD, "adam": optim.Adam, "adamw": optim.AdamW}.items():
        made = instantiate(composer(f"optimizer={name}").optimizer)(make_net().parameters())
        assert type(made) is cls
        assert all(not isinstance(v, (list, dict)) or k == "params" for k, v in made.param_groups[0].items())
