"""The optimisers a training stage can use: torch's AdamW (fused where the device has the kernel) and Adamax, the
optimiser Efficient-VDVAE trains with. Both can skip an update on the device (``found_inf``), so that a training step
needs no host round trip to decide whether its update is kept."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

OPTIMIZERS = ("adamw", "adamax")


def _dense_strides(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s strides when its elements fill a block of memory without gaps or overlaps (contiguous, channels-last or
    any other permutation of the dimensions), else the contiguous strides of its shape."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.shape[d] == 1:
            continue
        if t.stride(d) != expected:
            break
        expected *= t.shape[d]
    else:
        return t.stride()
    contiguous, expected = [], 1
    for size in reversed(t.shape):
        contiguous.append(expected)
        expected *= size
    return tuple(reversed(contiguous))


class _Layout:
    """Where each tensor of a bucket (one device and dtype of a parameter group) lies in one flat buffer of theirs.
    A tensor's view of the buffer has its parameter's strides, so that a multi-tensor operation mixing such views
    with parameters and moments (which share the parameters' layout) keeps its one-kernel path."""

    def __init__(self, params: list[torch.Tensor]):
        self.sizes = [p.shape for p in params]
        self.strides = [_dense_strides(p) for p in params]
        self.offsets: list[int] = []
        self.numel = 0
        for p in params:
            self.offsets.append(self.numel)
            self.numel += p.numel()
        self.device, self.dtype = params[0].device, params[0].dtype
        self._segments: torch.Tensor | None = None

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """One view of the flat buffer per tensor, shaped and strided like its parameter."""
        return [flat.as_strided(size, stride, offset)
                for size, stride, offset in zip(self.sizes, self.strides, self.offsets)]

    def segments(self) -> torch.Tensor:
        """For each element of the flat buffer, the index of its tensor (int32, built on the device once)."""
        if self._segments is None:
            self._segments = torch.cat([torch.full((size.numel(),), i, dtype=torch.int32, device=self.device)
                                        for i, size in enumerate(self.sizes)])
        return self._segments


class Adamax(torch.optim.Optimizer):
    """Adamax (Kingma & Ba 2015, sec. 7.1; the optimiser Efficient-VDVAE trains with) whose update the device can skip.

    Per parameter ``p`` with gradient ``g``: ``m = b1*m + (1-b1)*g``; ``u = max(b2*u, |g| + eps)``; ``t += 1``;
    ``p -= lr / (1 - b1**t) * m / u``: torch.optim.Adamax with ``weight_decay=0``, with its state names ("step",
    "exp_avg", "exp_inf"), each parameter with its own step count. Weight decay is decoupled as in torch.optim.AdamW:
    ``p *= 1 - lr*weight_decay`` before the update, which is how Efficient-VDVAE's JAX code decays (optax
    ``add_decayed_weights`` scaled by the learning rate); it is not torch.optim.Adamax's L2 term added to the gradient.

    ``found_inf`` (None, or a 0-dim float tensor on the parameters' device holding 0 or 1) is read by ``step`` as fused
    AdamW reads it: at 1 the parameters, both moments and the step counts stay bit-for-bit unchanged whatever the
    gradients hold (NaN and inf included). Nothing in ``step`` reads a tensor's value on the host: step counts and
    bias corrections live on the device, and each device and dtype of a parameter group is updated by a fixed number
    of multi-tensor (``torch._foreach_*``) operations, however many tensors it has. ``lr`` in a parameter group is a
    float that a scheduler may change between steps.
    """

    found_inf: torch.Tensor | None = None

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        if isinstance(lr, torch.Tensor) or not 0.0 <= lr:
            raise ValueError(f"invalid learning rate {lr!r}: a float >= 0 is expected")
        if not 0.0 <= eps:
            raise ValueError(f"invalid epsilon {eps!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas!r}: each in [0, 1) is expected")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight decay {weight_decay!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.found_inf = None
        self._layouts: dict[tuple, _Layout] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Restore a pickled optimiser (its buffer layouts are rebuilt on the next step)."""
        super().__setstate__(state)
        self._layouts = {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict``; the step counts go to their parameters' devices as float32 tensors
        (torch keeps a loaded "step" where it was saved, on the CPU for a checkpoint loaded there)."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = torch.as_tensor(state["step"], dtype=torch.float32).to(p.device)

    def _layout(self, params: list[torch.Tensor]) -> _Layout:
        key = (params[0].device, params[0].dtype, tuple((p.shape, p.stride()) for p in params))
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= 16:  # the tensors with a gradient changed often: keep the cache small
                self._layouts.clear()
            layout = self._layouts[key] = _Layout(params)
        return layout

    def _buckets(self, group: dict[str, Any]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
        """The group's parameters that have a gradient, by device and dtype, their state created where missing."""
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adamax does not support sparse gradients")
            if not p.is_floating_point():
                raise RuntimeError(f"Adamax updates real floating-point parameters, not {p.dtype}")
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif state["step"].device != p.device:  # a state assigned by hand, not through load_state_dict
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            buckets.setdefault((p.device, p.dtype), []).append(p)
        return buckets

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient, skipped on the device where ``found_inf`` is 1."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params in self._buckets(group).values():
                self._update(group, params)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor]) -> None:
        """Update one bucket: parameters of one device and dtype."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        states = [self.state[p] for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_infs = [s["exp_inf"] for s in states]
        steps = [s["step"] for s in states]
        grads = [p.grad for p in params]
        layout = self._layout(params)
        device, dtype = layout.device, layout.dtype

        if self.found_inf is None:
            if wd != 0:
                torch._foreach_mul_(params, 1 - lr * wd)
            torch._foreach_lerp_(exp_avgs, grads, 1 - b1)
            torch._foreach_mul_(exp_infs, b2)
            candidates = torch._foreach_abs(grads)
            torch._foreach_add_(candidates, eps)
            torch._foreach_maximum_(exp_infs, candidates)
            del candidates
            torch._foreach_add_(steps, 1.0)
            t = torch.stack(steps)
            keep32 = None
        else:
            found = self.found_inf.to(device)
            skip = found.ne(0)
            keep32 = found.eq(0).to(torch.float32)
            keep = keep32.to(dtype)  # 0 or 1, exact in any dtype: the only coefficient kept as a tensor
            # the gradients, or zeros where the step is skipped: 0 * nan is nan, so a product with keep would not
            # do; a masked fill of one flat copy of them does, in one kernel
            flat = torch.empty(layout.numel, dtype=dtype, device=device)
            g = layout.views(flat)
            torch._foreach_copy_(g, grads)
            flat.masked_fill_(skip, 0)
            # every change below is a product with keep (or with g, zero when skipped), added to the old value:
            # adding an exact zero leaves a tensor bit-for-bit unchanged
            if wd != 0:  # p -= lr*wd*keep*p
                torch._foreach_add_(params, torch._foreach_mul(params, keep), alpha=-lr * wd)
            # m += (1-b1)*(g - keep*m), torch's lerp formula when kept
            d = torch._foreach_mul(exp_avgs, keep)
            torch._foreach_sub_(d, g)
            torch._foreach_add_(exp_avgs, d, alpha=-(1 - b1))
            del d
            # u = max(u - (1-b2)*keep*u, |g| + eps*keep): max(u, 0) = u when skipped, as u >= 0
            torch._foreach_add_(exp_infs, torch._foreach_mul(exp_infs, keep), alpha=-(1 - b2))
            torch._foreach_abs_(g)
            torch._foreach_add_(g, keep, alpha=eps)
            torch._foreach_maximum_(exp_infs, g)
            del g, flat
            # alpha selects the Tensor overload: without it, a 0-dim tensor is read on the host as a Scalar
            torch._foreach_add_(steps, keep32, alpha=1.0)
            # a first step skipped leaves t = 0, where 1 - b1**t = 0: the step size, zeroed by keep, must stay finite
            t = torch.stack(steps).clamp_min_(1)

        # each tensor's step size -lr / (1 - b1**t) from its own step count, spread over its elements of a flat
        # buffer (one gather), so that a single multi-tensor product applies them all
        size = torch.pow(b1, t).sub_(1).reciprocal_().mul_(lr)
        if keep32 is not None:
            size.mul_(keep32)
        size = size.to(dtype).index_select(0, layout.segments())
        numerators = torch._foreach_mul(exp_avgs, layout.views(size))
        del size
        if keep32 is None:
            denominators = exp_infs
        else:  # u is 0 before the first kept step: u + 1 keeps 0/0 out of a skipped update
            denominators = torch._foreach_add(exp_infs, skip.to(dtype), alpha=1.0)
        torch._foreach_addcdiv_(params, numerators, denominators)


def make_optimizer(name: str, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float,
                   betas: tuple[float, float], weight_decay: float, fused: bool,
                   found_inf: torch.Tensor) -> torch.optim.Optimizer:
    """The optimiser ``name`` (one of OPTIMIZERS) over ``params``. "adamw": torch.optim.AdamW, fused where ``fused``
    (then it reads ``found_inf`` to skip an update on the device); "adamax": Adamax (decoupled weight decay), which
    always reads ``found_inf``. ``fused`` does not concern Adamax, whose update needs no fused kernel."""
    if name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas,
                                                             fused=fused or None)
        if fused:
            optimizer.found_inf = found_inf
        return optimizer
    if name == "adamax":
        optimizer = Adamax(params, lr=lr, betas=betas, weight_decay=weight_decay)
        optimizer.found_inf = found_inf
        return optimizer
    raise ValueError(f"unknown optimizer {name!r}: the valid ones are {', '.join(OPTIMIZERS)}")


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads its ``found_inf`` tensor itself (fused Adam or AdamW, or Adamax) and has
    one, so that a trainer skips an update by setting it, without a host branch on the skip decision."""
    reads = isinstance(optimizer, Adamax) or (isinstance(optimizer, torch.optim.Adam)
                                              and bool(optimizer.defaults.get("fused")))
    return reads and getattr(optimizer, "found_inf", None) is not None
