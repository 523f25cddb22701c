"""SGD, Adam and AdamW whose parameters and gradients each live in one flat buffer.

A step of the makemore MLP is well under a millisecond on a CPU, mostly fixed per-call cost, so
the optimizer's own overhead matters: torch.optim loops over the parameters in Python, one small
op each, and wraps `step` in a profiler range and hook dispatch (what this saves:
scripts/bench_optim.py, figures in docs/performance.md). Here every
parameter's data is a view of one contiguous buffer (`flat_params`), every parameter's
`.grad` a view of another (`flat_grads`), and the optimizer state (momentum, Adam's moments)
views of more flat buffers, so a step is a handful of tensor ops on whole buffers:

    optimizer = actgrad.optim.SGD(net.parameters(), lr=0.1)
    loss = F.cross_entropy(net(x), y)
    optimizer.clear_grads()  # one zero_(): what zero_grad() does, keeping the views
    loss.backward()          # autograd adds into the existing .grad in place: into flat_grads
    optimizer.update()       # one optimizer step; `step()` is the same, through torch's wrapper

They are torch.optim.Optimizer subclasses, so Lightning, LR schedulers, `state_dict()` /
`load_state_dict()` and checkpoints work as with torch's: `state_dict()` has torch's format
(state[p] holds "momentum_buffer", or "step"/"exp_avg"/"exp_avg_sq") and loads into
torch.optim's optimizers and back. `update()` is not named `step` because torch wraps the
`step` of every Optimizer subclass with its profiler hook; `update()` therefore runs no
optimizer step hooks (register_step_pre_hook / _post_hook, global ones): call `step()` if you
register any.

Numerics: with Python-number hyperparameters the ops are those of torch.optim's single-tensor
path (foreach=False, torch's default on a CPU), in the same order, so SGD is bit for bit
torch.optim.SGD and Adam/AdamW match torch's to float32 rounding (bit for bit on the machines
we tried). lr, momentum, dampening, weight_decay, betas and eps may also be tensors
broadcastable against the flat buffers (per-run hyperparameters of runs stacked along a leading
dimension); those use the tensor forms of the same ops (see `_add`, `Adam._update`).

Caveats:
- Build the optimizer after the module is on its device and dtype (Lightning's
  configure_optimizers does): `module.to(other device or dtype)` gives the parameters new
  storage, outside the flat buffers. `update()`/`step()` then raise a one-line RuntimeError
  rather than silently train nothing. `.to()` to where the module already is keeps the views.
- A parameter whose `.grad` was set to None (zero_grad(set_to_none=True) of the module, or
  code that assigns .grad) is re-attached at the next update: its new gradient is copied into
  the flat buffer, or zeros if it got none. torch.optim skips a parameter without a gradient;
  here it is updated with a zero gradient (which still applies momentum and weight decay).
  For this model every parameter gets a gradient at every step, so the two agree.
- `zero_grad(set_to_none=...)` zeroes the flat gradient buffer whatever set_to_none says.
- The optimizer's in-place updates bump the flat buffer's autograd version counter, not each
  parameter's: stepping between a forward and its backward is not detected as torch detects it.
- Parameters become contiguous, each starting on a 64-byte boundary of the buffer.
"""

from numbers import Real

import torch
from torch import Tensor

ALIGN_BYTES = 64  # each parameter starts on a cache-line / SIMD-vector boundary of the flat buffer


def _show(value) -> str:
    """A value as it would be written in a config, on one line (a tensor's repr spans lines)."""
    if isinstance(value, Tensor):
        return f"tensor({value.tolist()})" if value.numel() <= 8 else f"tensor(shape={list(value.shape)})"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return repr(value)


def _valid(value, ok) -> bool:
    """A real number, or a floating-point tensor, for which ok(value) holds (everywhere)."""
    if isinstance(value, Tensor):
        return value.is_floating_point() and bool(ok(value).all())
    return isinstance(value, Real) and not isinstance(value, bool) and bool(ok(value))


def _check(name: str, value, what: str, ok) -> None:
    """A one-line ValueError naming optimizer.<name>=<value> unless _valid(value, ok)."""
    if not _valid(value, ok):
        raise ValueError(f"optimizer.{name}={_show(value)}: {what}")


def _is_zero(value) -> bool:
    """A Python number 0: the op it scales is skipped, as torch does. A tensor always takes part."""
    return not isinstance(value, Tensor) and value == 0


def _add(a: Tensor, b: Tensor, alpha) -> Tensor:
    """a + alpha * b, out of place; alpha a number (torch's `add(alpha=)`) or a broadcastable tensor."""
    return a.add(b, alpha=alpha) if not isinstance(alpha, Tensor) else torch.addcmul(a, b, alpha)


def _add_(a: Tensor, b: Tensor, alpha) -> Tensor:
    """a += alpha * b, in place; alpha a number or a broadcastable tensor."""
    return a.add_(b, alpha=alpha) if not isinstance(alpha, Tensor) else a.addcmul_(b, alpha)


class _FlatOptimizer(torch.optim.Optimizer):
    """The flat parameter and gradient buffers, one parameter group, clear_grads/update/step."""

    def __init__(self, params, defaults):
        super().__init__(params, defaults)  # calls add_param_group, which refuses a second group
        params = self.param_groups[0]["params"]
        self._flat_check_params(params)
        dtype, device = params[0].dtype, params[0].device
        align = max(1, ALIGN_BYTES // params[0].element_size())
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // align) * align
        self.flat_params = torch.zeros(total, dtype=dtype, device=device)
        self.flat_grads = torch.zeros(total, dtype=dtype, device=device)
        self._flat_offsets = offsets
        self._flat_views = []  # (parameter, its .grad view, the address of its data)
        with torch.no_grad():
            for p, offset in zip(params, offsets):
                data = self.flat_params[offset : offset + p.numel()].view(p.shape)
                data.copy_(p)
                # `p.data = view` (a public setter) keeps the Parameter object, which the module, the
                # param group, hooks and diagnostics hold by identity, and re-points its storage into
                # the flat buffer. Its usual hazard, changing data under a recorded graph unseen by
                # autograd, does not arise: the values are the same and no graph is being built.
                p.data = data
                grad = self.flat_grads[offset : offset + p.numel()].view(p.shape)
                if p.grad is not None:
                    grad.copy_(p.grad)
                # autograd adds into an existing .grad in place (when not create_graph), so backward
                # writes into flat_grads
                p.grad = grad
                self._flat_views.append((p, grad, p.data_ptr()))
        self._flat_step_wrapper = None  # the last `step` seen in this instance's __dict__ (an LR scheduler's)

    @staticmethod
    def _flat_check_params(params) -> None:
        first = params[0]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("optimizer.params: a parameter appears twice")
        for i, p in enumerate(params):
            if not p.is_floating_point():
                raise ValueError(f"optimizer.params: parameter {i} is {p.dtype}; only real floating-point parameters")
            if not p.requires_grad:
                raise ValueError(f"optimizer.params: parameter {i} does not require grad; pass trainable parameters only")
            if p.dtype != first.dtype or p.device != first.device:
                raise ValueError(f"optimizer.params: parameter {i} is {p.dtype} on {p.device}, parameter 0 "
                                 f"{first.dtype} on {first.device}; one flat buffer needs one dtype and device")

    def add_param_group(self, param_group):
        if self.param_groups:
            raise ValueError(f"optimizer.params: one parameter group only; actgrad.optim.{type(self).__name__} "
                             "keeps every parameter in one flat buffer")
        super().add_param_group(param_group)

    def member_index(self, members: int) -> Tensor:
        """For parameters stacked along a leading member dimension (actgrad.stack): the member of each
        element of the flat buffers (padding: 0), to spread per-member hyperparameters over them:
        `group["lr"] = lrs[optimizer.member_index(len(lrs))]`."""
        index = torch.zeros(self.flat_params.numel(), dtype=torch.long, device=self.flat_params.device)
        for p, offset in zip(self.param_groups[0]["params"], self._flat_offsets):
            if p.shape[0] != members:
                raise ValueError(f"member_index: a parameter of shape {tuple(p.shape)} is not stacked {members} times")
            index[offset : offset + p.numel()] = torch.arange(members, device=index.device).repeat_interleave(
                p.numel() // members)
        return index

    def clear_grads(self) -> None:
        """Zero every gradient: one zero_() of the flat gradient buffer. The .grad views stay."""
        self.flat_grads.zero_()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """clear_grads(), whatever set_to_none says: gradients set to None would leave the flat buffer."""
        self.flat_grads.zero_()

    def update(self) -> None:
        """One optimizer step from the current gradients: step() without torch's wrapper and hooks.

        An LR scheduler replaces this instance's `step` with a wrapper that records the call (it
        warns if its first step() comes before any optimizer step). The first update() after
        such a wrapper appears goes through it, once; later ones do not.
        """
        wrapper = self.__dict__.get("step")
        if wrapper is not self._flat_step_wrapper:
            self._flat_step_wrapper = wrapper
            if wrapper is not None:
                wrapper()
                return
        self._flat_sync_grads()
        self._update(self.param_groups[0])

    def step(self, closure=None):
        """torch's Optimizer.step: the same step as update(), after `closure()` if given (returns its loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._flat_sync_grads()
        self._update(self.param_groups[0])
        return loss

    def _flat_sync_grads(self) -> None:
        """Re-attach a .grad that is no longer its view (set to None, replaced); refuse a moved parameter."""
        for p, grad, address in self._flat_views:
            if p.grad is not grad:
                with torch.no_grad():
                    if p.grad is None:
                        grad.zero_()
                    elif p.grad.is_sparse:
                        grad.zero_().add_(p.grad)
                    else:
                        grad.copy_(p.grad)
                p.grad = grad
            if p.data_ptr() != address:
                raise RuntimeError(f"actgrad.optim.{type(self).__name__}: a parameter no longer lives in the "
                                   "optimizer's flat buffer (module moved with .to()/.double() after the optimizer "
                                   "was built?); build the optimizer after moving the module")

    def _flat_state_view(self, flat: Tensor, i: int) -> Tensor:
        p = self.param_groups[0]["params"][i]
        return flat[self._flat_offsets[i] : self._flat_offsets[i] + p.numel()].view(p.shape)

    def _flat_loaded(self, key: str, required: bool = True) -> Tensor | None:
        """A flat buffer holding state[p][key] of every parameter (after load_state_dict), or None if none has it."""
        params = self.param_groups[0]["params"]
        values = [self.state[p].get(key) if p in self.state else None for p in params]
        if all(v is None for v in values):
            return None
        if any(v is None for v in values):
            raise ValueError(f"optimizer state: {key} is missing for some parameters; "
                             f"actgrad.optim.{type(self).__name__} updates all parameters together")
        flat = torch.zeros_like(self.flat_params)
        with torch.no_grad():
            for i, value in enumerate(values):
                self._flat_state_view(flat, i).copy_(value)
        return flat

    def _flat_check_group(self) -> None:
        """Options of torch.optim's group that these optimizers do not have, if a loaded state turns one on."""
        group = self.param_groups[0]
        for key in ("maximize", "amsgrad", "capturable", "differentiable", "fused"):
            if group.get(key):
                raise ValueError(f"optimizer.{key}={group[key]!r}: not supported by actgrad.optim.{type(self).__name__}")

    def _update(self, group) -> None:
        raise NotImplementedError


class SGD(_FlatOptimizer):
    """torch.optim.SGD (momentum, dampening, weight decay, Nesterov) on flat buffers; see the module docstring.

    Same ops in the same order as torch.optim.SGD's single-tensor path: bit for bit equal with
    number hyperparameters. state[p]["momentum_buffer"] exists from the first step with momentum != 0.
    """

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False):
        _check("lr", lr, "invalid learning rate, must be a number >= 0", lambda v: v >= 0)
        _check("momentum", momentum, "invalid momentum, must be a number >= 0", lambda v: v >= 0)
        _check("dampening", dampening, "invalid dampening, must be a finite number", lambda v: abs(v) < float("inf"))
        _check("weight_decay", weight_decay, "invalid weight_decay, must be a number >= 0", lambda v: v >= 0)
        if not isinstance(nesterov, bool):
            raise ValueError(f"optimizer.nesterov={_show(nesterov)}: must be true or false")
        if nesterov and (_is_zero(momentum) or not _is_zero(dampening)):
            raise ValueError(f"optimizer.nesterov=True: Nesterov momentum requires a momentum > 0 and zero dampening "
                             f"(momentum={_show(momentum)}, dampening={_show(dampening)})")
        self._flat_momentum = None  # the flat momentum buffer, from the first step with momentum
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _update(self, group) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        param, grad = self.flat_params, self.flat_grads
        if not _is_zero(weight_decay):
            grad = _add(grad, param, weight_decay)
        if not _is_zero(momentum):
            buf = self._flat_momentum
            if buf is None:
                buf = self._flat_momentum = grad.detach().clone()  # torch: the first step's buffer is the gradient
                for i, p in enumerate(group["params"]):
                    self.state[p]["momentum_buffer"] = self._flat_state_view(buf, i)
            else:
                _add_(buf.mul_(momentum), grad, 1 - group["dampening"])
            grad = _add(grad, buf, momentum) if group["nesterov"] else buf
        if isinstance(lr, Tensor):
            param.addcmul_(grad, lr, value=-1)  # torch's form for a tensor lr
        else:
            param.add_(grad, alpha=-lr)

    def load_state_dict(self, state_dict) -> None:
        """torch's load_state_dict, then the loaded momentum buffers copied into one flat buffer, state[p] its views."""
        super().load_state_dict(state_dict)
        self._flat_check_group()
        self._flat_momentum = self._flat_loaded("momentum_buffer")
        if self._flat_momentum is not None:
            for i, p in enumerate(self.param_groups[0]["params"]):
                self.state[p]["momentum_buffer"] = self._flat_state_view(self._flat_momentum, i)


class Adam(_FlatOptimizer):
    """torch.optim.Adam (no amsgrad) on flat buffers; see the module docstring.

    With number hyperparameters, the ops and their order are those of torch's single-tensor,
    non-capturable path; the bias corrections are Python floats computed from a Python step
    count kept beside the step tensors (torch reads its step tensor with .item() instead).
    With a tensor lr, betas or eps the same formulas run as tensor ops, with two differences in
    op order: the second moment is `exp_avg_sq.lerp_(grad**2, 1 - beta2)` (torch's form for a
    tensor beta2) and the step size multiplies exp_avg before addcdiv_ (addcdiv_'s `value` must
    be a number).

    state[p] holds "step" (a float32 0-d tensor: views of one flat buffer with an entry per
    parameter), "exp_avg" and "exp_avg_sq", created at the first step.
    """

    decoupled_weight_decay = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0):
        _check("lr", lr, "invalid learning rate, must be a number >= 0", lambda v: v >= 0)
        _check("eps", eps, "invalid epsilon value, must be a number >= 0", lambda v: v >= 0)
        _check("weight_decay", weight_decay, "invalid weight_decay, must be a number >= 0", lambda v: v >= 0)
        if isinstance(betas, (Tensor, str)) or len(betas) != 2:
            raise ValueError(f"optimizer.betas={_show(betas)}: must be two numbers in [0, 1)")
        betas = tuple(betas)  # a tuple of numbers (or tensors), not Hydra's ListConfig: state_dict loads with weights_only
        for i, beta in enumerate(betas):
            if not _valid(beta, lambda v: (v >= 0) & (v < 1)):
                raise ValueError(f"optimizer.betas={_show(betas)}: invalid beta parameter at index {i}, "
                                 "must be a number in [0, 1)")
        self._flat_exp_avg = self._flat_exp_avg_sq = self._flat_steps = None  # from the first step
        self._flat_t = 0  # the step count, as a Python int (all parameters step together)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _flat_start(self, exp_avg, exp_avg_sq, steps) -> None:
        self._flat_exp_avg, self._flat_exp_avg_sq, self._flat_steps = exp_avg, exp_avg_sq, steps
        for i, p in enumerate(self.param_groups[0]["params"]):
            self.state[p].update(step=steps[i], exp_avg=self._flat_state_view(exp_avg, i),
                                 exp_avg_sq=self._flat_state_view(exp_avg_sq, i))

    def _update(self, group) -> None:
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        param, grad = self.flat_params, self.flat_grads
        if self._flat_exp_avg is None:
            # torch's step tensors: float32 (float64 if that is the default dtype), on the CPU
            step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            self._flat_start(torch.zeros_like(param), torch.zeros_like(param),
                             torch.zeros(len(group["params"]), dtype=step_dtype))
        exp_avg, exp_avg_sq = self._flat_exp_avg, self._flat_exp_avg_sq
        self._flat_steps.add_(1)
        self._flat_t += 1
        t = float(self._flat_t)
        if not _is_zero(weight_decay):
            if self.decoupled_weight_decay:
                param.mul_(1 - lr * weight_decay)
            else:
                grad = _add(grad, param, weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        if isinstance(beta2, Tensor):
            exp_avg_sq.lerp_(torch.square(grad), 1 - beta2)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**t
        bias_correction2 = 1 - beta2**t
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if isinstance(step_size, Tensor):
            param.addcdiv_(exp_avg * step_size, denom, value=-1)
        else:
            param.addcdiv_(exp_avg, denom, value=-step_size)

    def load_state_dict(self, state_dict) -> None:
        """torch's load_state_dict, then the loaded moments copied into flat buffers, state[p] their views."""
        super().load_state_dict(state_dict)
        self._flat_check_group()
        params = self.param_groups[0]["params"]
        if any(p in self.state and self.state[p].get("max_exp_avg_sq") is not None for p in params):
            raise ValueError(f"optimizer state: has max_exp_avg_sq (amsgrad), not supported by "
                             f"actgrad.optim.{type(self).__name__}")
        exp_avg, exp_avg_sq = self._flat_loaded("exp_avg"), self._flat_loaded("exp_avg_sq")
        if exp_avg is None and exp_avg_sq is None and not any(p in self.state and "step" in self.state[p] for p in params):
            self._flat_exp_avg = self._flat_exp_avg_sq = self._flat_steps = None
            self._flat_t = 0
            return
        if exp_avg is None or exp_avg_sq is None or any(p not in self.state or "step" not in self.state[p] for p in params):
            raise ValueError("optimizer state: needs step, exp_avg and exp_avg_sq for every parameter")
        steps = [float(self.state[p]["step"]) for p in params]
        if len(set(steps)) != 1 or not steps[0].is_integer():
            raise ValueError(f"optimizer state: step counts {sorted(set(steps))[:4]} differ between parameters; "
                             f"actgrad.optim.{type(self).__name__} steps all parameters together")
        first = self.state[params[0]]["step"]
        step_dtype = first.dtype if isinstance(first, Tensor) else torch.float32
        self._flat_start(exp_avg, exp_avg_sq, torch.full((len(params),), steps[0], dtype=step_dtype))
        self._flat_t = int(steps[0])


class AdamW(Adam):
    """torch.optim.AdamW on flat buffers: Adam with decoupled weight decay (param *= 1 - lr * weight_decay)."""

    decoupled_weight_decay = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
