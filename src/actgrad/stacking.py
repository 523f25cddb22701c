"""Several networks of one shape as one module: every parameter and buffer gets a leading member
dimension, and a step of all of them is one forward and one backward (HFTA's fused layers, PyTorch's
model-ensembling pattern written out: batched matmuls instead of vmap, so BatchNorm keeps each member's
running statistics and the layer hooks see every member's tensors).

`stack(nets, block_size)` is the one place that decides: it traces the first net with torch.fx and
rebuilds its graph with each module call replaced by its stacked twin (TWINS: Embedding, Linear,
BatchNorm1d, LayerNorm, RMSNorm, the nonlinearities, Flatten, FlattenConsecutive, SwapTimeAndChannels)
and each shape op by its form for the stack's layout (SHAPE_OPS), or raises NoStackedForm saying why
not (`blocks.0.conv (Conv1d) has no stacked form`). The stack keeps the members' module paths and
parameter names, in their order, so `member_state(stacked.state_dict(), i)` is member i's own state dict.

Layout: a member's tensor (batch, d1, ..., dk) is held as (members, d1, ..., dk, batch): the member
dimension takes the batch's place and the batch goes last. A member's dim d >= 1 is the stack's dim d.
For an MLP's (batch, features) that is feature-major, (members, features, batch): each Linear is one
batched matmul W x + b, each BatchNorm one F.batch_norm over members x features channels of a
(1, channels, batch) view, with no transposed copies (5-8% faster a step than (members, batch, features)
on a CPU). The stacked net takes (members, batch, block) indices, the loop's layout, and returns logits
(members, vocab, batch), the layout F.cross_entropy takes for a (members, batch) target.

Where batching changes the arithmetic (float32, tests/test_stacked_blocks.py): a batched matmul may sum
in another order than a single one, BatchNorm reduces the batch in another order, LayerNorm's and
RMSNorm's affine are applied apart from the normalisation, the embedding's gradient is summed in the
batch's order (index_select's backward).
"""

import copy
import operator
from functools import reduce
from types import SimpleNamespace

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from actgrad.checks import first_line
from actgrad.layers import NONLINEARITIES, untouched
from actgrad.model import FlattenConsecutive, SwapTimeAndChannels


class NoStackedForm(Exception):
    """Why these networks cannot train as one stacked module, in a few words."""


# --- the layout: a member's dim d (of n) in the stack


def stack_dim(d: int, n: int, op: str) -> int:
    """The stack's dim of a member's dim d, for a member's tensor of n dims: d >= 1 stays, the batch is last."""
    if d == 0 or d == -n:
        raise NoStackedForm(f"{op}({d}) moves the batch dimension")
    return d + n if d < 0 else d


def batch_last(x):  # (members, batch, ...) -> (members, ..., batch): a view
    return x.movedim(1, -1)


def member_shape(x) -> torch.Size:
    """A member's shape of a stacked tensor: what x.shape is in its forward."""
    return torch.Size((x.shape[-1], *x.shape[1:-1]))


# --- the blocks, each the twin of one module (values and gradients tested against it)


def stacked_empty(members, t):
    return None if t is None else torch.empty(members, *t.shape, dtype=t.dtype, device=t.device)


class StackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, members: int):
        super().__init__()
        self.weight = nn.Parameter(stacked_empty(members, linear.weight))  # (members, out, in)
        self.bias = None if linear.bias is None else nn.Parameter(stacked_empty(members, linear.bias))

    def forward(self, x):  # (members, [...,] in, batch) -> (members, [...,] out, batch): W x + b
        if x.dim() == 3:  # a member's (batch, in): one batched matmul, no copy
            return self.matmul(x)
        members, n_out, n_in = self.weight.shape
        y = x.movedim(-2, 1)  # (members, in, ..., batch)
        return self.matmul(y.reshape(members, n_in, -1)).view(members, n_out, *y.shape[2:]).movedim(1, -2)

    def matmul(self, x):  # (members, in, n) -> (members, out, n)
        if self.bias is None:
            return torch.bmm(self.weight, x)
        return torch.baddbmm(self.bias.unsqueeze(2), self.weight, x)


class StackedEmbedding(nn.Module):
    def __init__(self, embedding: nn.Embedding, members: int):
        super().__init__()
        e = embedding
        if e.padding_idx is not None or e.max_norm is not None or e.scale_grad_by_freq or e.sparse:
            raise NoStackedForm("padding_idx, max_norm, scale_grad_by_freq or sparse")
        self.weight = nn.Parameter(stacked_empty(members, e.weight))  # (members, vocab, n_embd)
        vocab = e.num_embeddings  # member m's rows of one table start at m * vocab:
        self.register_buffer("offsets", torch.arange(members, device=e.weight.device).view(-1, 1) * vocab,
                             persistent=False)
        self.flat = False  # set by `stack` when the member flattens this output at once (see flattens_at_once)

    def forward(self, idx):  # the net's input (members, batch, ...) -> (members, ..., n_embd, batch)
        members, vocab, n_embd = self.weight.shape
        # index_select, not F.embedding: its backward (an index_add) is the faster one for a stack
        rows = self.weight.view(members * vocab, n_embd).index_select(0, (idx.reshape(members, -1) + self.offsets).view(-1))
        if self.flat:  # the member's flatten(1) of it, in one view: (members, ... x n_embd, batch)
            return rows.view(members, idx.shape[1], -1).transpose(1, 2)
        return rows.view(*idx.shape, n_embd).movedim(1, -1)


class StackedBatchNorm(nn.Module):
    """BatchNorm1d of every member as one F.batch_norm over members x channels: each keeps its own statistics.
    A member's (batch, channels[, time]) is (members, channels[, time], batch): one (1, members x channels, ...) view."""

    def __init__(self, norm: nn.BatchNorm1d, members: int):
        super().__init__()
        if norm.momentum is None:
            raise NoStackedForm("momentum=None (a cumulative average)")
        self.eps, self.momentum, self.track = norm.eps, norm.momentum, norm.track_running_stats
        self.weight = nn.Parameter(stacked_empty(members, norm.weight)) if norm.affine else None
        self.bias = nn.Parameter(stacked_empty(members, norm.bias)) if norm.affine else None
        if self.track:
            self.register_buffer("running_mean", stacked_empty(members, norm.running_mean))
            self.register_buffer("running_var", stacked_empty(members, norm.running_var))
            self.register_buffer("num_batches_tracked", stacked_empty(members, norm.num_batches_tracked))

    def forward(self, x):
        if self.training and self.track:
            self.num_batches_tracked.add_(1)
        mean, var = (self.running_mean.view(-1), self.running_var.view(-1)) if self.track else (None, None)
        weight, bias = (self.weight.view(-1), self.bias.view(-1)) if self.weight is not None else (None, None)
        y = F.batch_norm(x.reshape(1, x.shape[0] * x.shape[1], -1), mean, var, weight, bias,
                         self.training or not self.track, self.momentum, self.eps)
        return y.view(x.shape)


class StackedLastDimsNorm(nn.Module):
    """LayerNorm or RMSNorm over a member's last dims: normalised batch-major, the members' own scale and
    shift applied after (a copy each way)."""

    def __init__(self, norm, members: int):
        super().__init__()
        self.shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight = None if norm.weight is None else nn.Parameter(stacked_empty(members, norm.weight))
        self.bias = None if getattr(norm, "bias", None) is None else nn.Parameter(stacked_empty(members, norm.bias))

    def forward(self, x):
        y = self.normalise(x.movedim(-1, 1))  # (members, batch, ..., *shape)
        lead = (y.shape[0],) + (1,) * (y.ndim - 1 - len(self.shape))
        if self.weight is not None:
            y = y * self.weight.view(*lead, *self.shape)
        if self.bias is not None:
            y = y + self.bias.view(*lead, *self.shape)
        return y.movedim(1, -1)


class StackedLayerNorm(StackedLastDimsNorm):
    def normalise(self, y):
        return F.layer_norm(y, self.shape, eps=self.eps)


class StackedRMSNorm(StackedLastDimsNorm):
    def normalise(self, y):
        return F.rms_norm(y, self.shape, eps=self.eps)


def elementwise(module: nn.Module, members: int) -> nn.Module:
    """A nonlinearity without parameters works on any layout: itself."""
    if any(True for _ in module.parameters()):
        raise NoStackedForm("a parameter per channel")
    return copy.deepcopy(module)


class StackedFlatten(nn.Module):
    def __init__(self, flatten: nn.Flatten, members: int):
        super().__init__()
        self.start_dim, self.end_dim = flatten.start_dim, flatten.end_dim

    def forward(self, x):
        return flatten(x, self.start_dim, self.end_dim)


class StackedFlattenConsecutive(nn.Module):
    def __init__(self, module: FlattenConsecutive, members: int):
        super().__init__()
        self.n = module.n

    def forward(self, x):  # (members, T, C, batch) -> (members, T // n, C * n, batch), a single position squeezed
        members, T, C, B = x.shape
        x = x.reshape(members, T // self.n, C * self.n, B)
        return x.squeeze(1) if x.shape[1] == 1 else x


class StackedSwapTimeAndChannels(nn.Module):
    def __init__(self, module: SwapTimeAndChannels, members: int):
        super().__init__()

    def forward(self, x):  # a member's (batch, time, channels) <-> (batch, channels, time); 2-D as it is
        return x.transpose(1, 2) if x.dim() == 4 else x


TWINS = {nn.Linear: StackedLinear, nn.Embedding: StackedEmbedding, nn.BatchNorm1d: StackedBatchNorm,
         nn.LayerNorm: StackedLayerNorm, nn.RMSNorm: StackedRMSNorm, nn.Flatten: StackedFlatten,
         FlattenConsecutive: StackedFlattenConsecutive, SwapTimeAndChannels: StackedSwapTimeAndChannels,
         nn.Identity: elementwise, **dict.fromkeys(NONLINEARITIES, elementwise)}


# --- shape ops in a forward, in the stack's layout (a member's dim d >= 1 is the stack's d, its batch last)


def flatten(x, start_dim=0, end_dim=-1):
    n = x.dim() - 1
    return x.flatten(stack_dim(start_dim, n, "flatten"), stack_dim(end_dim, n, "flatten"))


def reshape(x, *shape):
    """A reshape that keeps the batch first, (batch, ...) -> (batch, ...): the stack keeps it last. Always
    reshape, never view: the stack's tensor may be laid out otherwise than the member's."""
    shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
    batch = x.shape[-1]
    if not shape or shape[0] not in (batch, -1) or (shape[0] == -1 and -1 in shape[1:]):
        raise NoStackedForm(f"reshape{tuple(shape)} does not keep the batch first")
    return x.reshape(x.shape[0], *shape[1:], batch)


def transpose(x, dim0, dim1):
    n = x.dim() - 1
    return x.transpose(stack_dim(dim0, n, "transpose"), stack_dim(dim1, n, "transpose"))


def permute(x, *dims):
    dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
    n = x.dim() - 1
    if dims[0] % n != 0:
        raise NoStackedForm(f"permute{dims} moves the batch dimension")
    return x.permute(0, *(stack_dim(d, n, "permute") for d in dims[1:]), n)


def squeeze(x, dim=None):
    n = x.dim() - 1
    if dim is None:  # every size-1 dim of a member but its batch
        return x.squeeze(tuple(d for d in range(1, n) if x.shape[d] == 1))
    return x.squeeze(stack_dim(dim, n, "squeeze"))


def unsqueeze(x, dim):
    return x.unsqueeze(stack_dim(dim, x.dim(), "unsqueeze"))  # a member's result has n + 1 dims


def size(x, dim=None):
    return member_shape(x) if dim is None else member_shape(x)[dim]


def dim(x):
    return x.dim() - 1


def attribute(x, name):  # x.shape, x.ndim, x.device, x.dtype in a forward (fx records getattr)
    if name == "shape":
        return member_shape(x)
    if name == "ndim":
        return x.dim() - 1
    if name in ("device", "dtype"):
        return getattr(x, name)
    raise NoStackedForm(f"x.{name}")


def item(x, i):  # [] on a shape; a tensor indexed has no stacked form (its batch dim is elsewhere)
    if isinstance(x, torch.Tensor):
        raise NoStackedForm("indexing a tensor")
    return x[i]


def contiguous(x):
    return x


SHAPE_OPS = {"flatten": flatten, "reshape": reshape, "view": reshape, "transpose": transpose, "swapaxes": transpose,
             "permute": permute, "squeeze": squeeze, "unsqueeze": unsqueeze, "size": size, "dim": dim,
             "contiguous": contiguous, getattr: attribute, operator.getitem: item,
             torch.flatten: flatten, torch.reshape: reshape, torch.transpose: transpose, torch.permute: permute,
             torch.squeeze: squeeze, torch.unsqueeze: unsqueeze}
# the same on every element, whatever the layout (tensors of one member shape, or numbers)
ELEMENTWISE = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.neg,
               torch.add, torch.sub, torch.mul, torch.tanh, torch.sigmoid, torch.relu, F.relu, F.gelu, F.silu,
               F.tanh, F.sigmoid, F.leaky_relu, F.elu, F.softplus, F.mish}
ELEMENTWISE_METHODS = {"add", "sub", "mul", "tanh", "sigmoid", "relu"}


# --- the one function


class StackedNet(nn.Module):
    """The member's module tree with each module it calls replaced by its twin, in the member's order (so its
    parameters, the flat optimizer's buffers and a member's checkpoint are in the member's order), run by
    the forward torch.fx wrote for the stack (`print(net.code)`), as a plain function of this module."""

    def __init__(self, net: nn.Module, twins: dict, graph: fx.Graph):
        super().__init__()
        written = fx.GraphModule(twins, graph)  # not kept: its call wrapper costs ~9 us a forward
        self.run, self.code = type(written).forward, written.code
        self.calls = SimpleNamespace()  # what `run` looks up: the twins, by their paths
        for path, _ in net.named_modules():
            if path and (path in twins or any(p.startswith(path + ".") for p in twins)):
                parent, _, name = path.rpartition(".")
                self.get_submodule(parent).add_module(name, twins.get(path, nn.Module()))
                setattr(reduce(getattr, parent.split(".") if parent else [], self.calls), name,
                        twins.get(path, SimpleNamespace()))

    def forward(self, idx):
        # the twins looked up in a plain namespace: nn.Module's attribute lookup costs ~1 us, nine a block
        return self.run(self.calls, idx)


class Tracer(fx.Tracer):
    """torch.fx's tracer, with every module that has a twin (actgrad's too) kept as one call."""

    def is_leaf_module(self, m, qualname):
        return type(m) in TWINS or super().is_leaf_module(m, qualname)


def stack(nets: list[nn.Module], block_size: int) -> StackedNet:
    """The stacked form of `nets` (one shape; each one member), their weights and buffers copied in; or
    NoStackedForm saying why there is none. Checked on one probe batch against the members (nothing
    of theirs changes), so what stacks computes what its members compute."""
    first = nets[0]
    try:
        graph = Tracer().trace(first)
    except Exception as e:  # noqa: BLE001  (any error of tracing user code is the reason)
        raise NoStackedForm(f"{type(first).__name__}.forward cannot be traced by torch.fx "
                            f"({type(e).__name__}: {first_line(e)})") from None
    twins = {}
    stacked = StackedNet(first, twins, stacked_graph(graph, first, twins, len(nets)))
    check_state(stacked, nets)
    stacked.load_state_dict(stack_states([net.state_dict() for net in nets]))
    stacked.train(first.training)
    check_values(stacked, nets, block_size)
    return stacked


def stacked_graph(graph: fx.Graph, net: nn.Module, twins: dict, members: int) -> fx.Graph:
    """`graph` (net's forward) for the stack: module calls to twins (added to `twins` by path), shape ops
    to their forms for the stack's layout, the input laid out batch last for all but Embeddings."""
    modules, out, env, flat = dict(net.named_modules()), fx.Graph(), {}, set()
    for node in graph.nodes:
        if node.op == "placeholder":
            if env:
                raise NoStackedForm(f"{type(net).__name__}.forward takes more than the indices")
            given = out.node_copy(node)  # (members, batch, block): what an Embedding takes
            env[node] = out.call_function(batch_last, (given,))  # what anything else takes
        elif node in flat:  # an Embedding's output flattened at once: the Embedding's twin gave it flat
            env[node] = env[node.args[0]]
        elif node.op == "call_module":
            module = modules[node.target]
            twins.setdefault(node.target, twin(module, node.target, members))
            if isinstance(module, nn.Embedding):
                if node.args[0].op != "placeholder":
                    raise NoStackedForm(f"{node.target} (Embedding) has no stacked form: it looks up other than "
                                        "the forward's input")
                user = flattens_at_once(node, graph, modules)
                if user is not None:
                    twins[node.target].flat = True
                    flat.add(user)
            env[node] = out.node_copy(node, lambda n: given if isinstance(module, nn.Embedding) else env[n])
        elif node.op == "get_attr":
            raise NoStackedForm(f"{type(net).__name__}.{node.target} is used outside a module call: it has no "
                                "stacked form")
        elif node.target in SHAPE_OPS:
            env[node] = out.call_function(SHAPE_OPS[node.target], *fx.map_arg((node.args, node.kwargs), env.get))
        elif node.op == "output" or node.target in (ELEMENTWISE_METHODS if node.op == "call_method" else ELEMENTWISE):
            env[node] = out.node_copy(node, env.get)
        else:
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            raise NoStackedForm(f"{name} in {type(net).__name__}.forward has no stacked form")
    for node in list(out.nodes):
        if node.target is batch_last and not node.users:  # only Embeddings read the input
            out.erase_node(node)
    return out


def flattens_at_once(node: fx.Node, graph: fx.Graph, modules: dict) -> fx.Node | None:
    """The one flatten of a member's dims from 1 on (nn.Flatten(), .flatten(1), torch.flatten(x, 1)) that is
    all a once-called Embedding's output goes to, or None. The stack then makes that flat output in one view:
    the (members, ..., n_embd, batch) detour and its flatten cost the lecture's BatchNorm MLP about 34 us a
    stacked step of 2 members (bench_sweep.bare_steps: 474 against 440 us)."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == node.target]
    if len(calls) != 1 or len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if user.op == "call_module":
        m = modules[user.target]
        return user if type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 else None
    if user.target in ("flatten", torch.flatten) and user.args[0] is node:
        start = user.args[1] if len(user.args) > 1 else user.kwargs.get("start_dim", 0)
        end = user.args[2] if len(user.args) > 2 else user.kwargs.get("end_dim", -1)
        return user if (start, end) == (1, -1) else None
    return None


def twin(module: nn.Module, path: str, members: int) -> nn.Module:
    make = TWINS.get(type(module))
    what = f"{path} ({type(module).__name__})"
    if make is None:
        raise NoStackedForm(f"{what} has no stacked form")
    try:
        return make(module, members)
    except NoStackedForm as e:
        raise NoStackedForm(f"{what} has no stacked form: {e}") from None


def check_state(stacked: nn.Module, nets: list[nn.Module]) -> None:
    """The stack holds what each member holds, by the same names, in the same order, of one shape."""
    mine = [(n, tuple(t.shape[1:])) for n, t in stacked.state_dict().items()]
    for net in nets:
        theirs = [(n, tuple(t.shape)) for n, t in net.state_dict().items()]
        if mine != theirs:
            unused = sorted({n for n, _ in theirs} - {n for n, _ in mine})
            raise NoStackedForm(f"{', '.join(unused)} not used by {type(net).__name__}.forward" if unused
                                else "its members differ in shape")


def check_values(stacked: nn.Module, nets: list[nn.Module], block_size: int, batch: int = 4) -> None:
    """The stack's output on a probe batch is each member's own (within float32's batching differences)."""
    vocab = min((m.num_embeddings for m in nets[0].modules() if isinstance(m, nn.Embedding)), default=1)
    device = next(stacked.parameters()).device
    x = torch.randint(0, vocab, (len(nets), batch, block_size), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with untouched(stacked):
            got = stacked(x)
        for i, net in enumerate(nets):
            with untouched(net):
                want = net(x[i])
            if not torch.allclose(got[i].movedim(-1, 0), want, rtol=1e-3, atol=1e-4):
                raise ValueError(f"member {i}'s values differ by up to {(got[i].movedim(-1, 0) - want).abs().max():.3g}")
    except NoStackedForm as e:
        raise NoStackedForm(f"{type(nets[0]).__name__}.forward has no stacked form: {e}") from None
    except Exception as e:  # noqa: BLE001  (a shape op of the user's forward the stack's layout cannot follow)
        raise NoStackedForm(f"{type(nets[0]).__name__}.forward has no stacked form: on a probe batch its stack "
                            f"raised {type(e).__name__}: {first_line(e)}") from None


def member_state(state: dict, i: int) -> dict:
    """Member i's part of a stacked state dict: what its own network's state_dict() would be."""
    return {k: v[i].clone() for k, v in state.items()}


def stack_states(states: list[dict]) -> dict:
    """The stacked state dict of members' state dicts (the inverse of member_state)."""
    return {k: torch.stack([s[k] for s in states]) for k in states[0]}
