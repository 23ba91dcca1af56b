"""The optimisers a training stage can use: torch's AdamW (fused where the device has the kernel) and Adamax, the
optimiser Efficient-VDVAE trains with. Both can skip an update on the device (``found_inf``), so that a training step
needs no host round trip to decide whether its update is kept."""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch

OPTIMIZERS = ("adamw", "adamax")


_Bucket = tuple[torch.device, torch.dtype]  # the parameters of a group that one multi-tensor operation can update


def _bits_type(dtype: torch.dtype) -> torch.dtype:
    """The integer type of ``dtype``'s size: a view of a float tensor as it reads the floats' bit patterns."""
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


class _Skip(NamedTuple):
    """``found_inf`` read on the device for one bucket, also as integers of its dtype's size, which select floats by
    their bit patterns: an integer product with ``keep`` (1, or 0 where skipped) makes any float +0.0, NaN and inf
    included, where a float product would not (NaN * 0 is NaN), and adding ``sign`` (0, or the sign bit where
    skipped) makes that +0.0 a -0.0, the one float whose addition leaves every float (-0.0 too) as it is."""

    skipped: torch.Tensor  # bool
    keep: torch.Tensor
    sign: torch.Tensor

    @staticmethod
    def read(found_inf: torch.Tensor, like: torch.Tensor) -> _Skip:
        """The decision for the bucket of ``like`` (its device and dtype)."""
        skipped = found_inf.to(like.device).ne(0)
        bits = skipped.to(_bits_type(like.dtype))
        return _Skip(skipped, 1 - bits, bits * torch.iinfo(bits.dtype).min)

    def terms(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of ``tensors``, -0.0 everywhere where skipped."""
        bits = torch._foreach_mul([t.view(self.keep.dtype) for t in tensors], self.keep)
        # alpha selects the Tensor overload: without it, a 0-dim tensor is read on the host as a Scalar
        torch._foreach_add_(bits, self.sign, alpha=1)
        return [b.view(t.dtype) for b, t in zip(bits, tensors)]

    def zero_(self, tensors: list[torch.Tensor]) -> None:
        """Set ``tensors`` to +0.0 where skipped, in place."""
        torch._foreach_mul_([t.view(self.keep.dtype) for t in tensors], self.keep)


def _scalar(value: float, like: torch.Tensor, skip: _Skip | None, neutral: float) -> torch.Tensor:
    """``value`` as a 0-dim tensor of ``like``'s device and dtype, or ``neutral`` where the update is skipped.
    A CUDA multi-tensor kernel keeps its one-kernel path only with a scalar tensor of its tensors' dtype, so the
    value is rounded to that dtype (exactly as a Python scalar is for float32 and float64 tensors)."""
    scalar = torch.full((), value, dtype=like.dtype, device=like.device)
    return scalar if skip is None else scalar.masked_fill_(skip.skipped, neutral)


class Adamax(torch.optim.Optimizer):
    """Adamax (Kingma & Ba 2015, sec. 7.1; the optimiser Efficient-VDVAE trains with) whose update the device can skip.

    Per parameter ``p`` with gradient ``g``: ``m = b1*m + (1-b1)*g``; ``u = max(b2*u, |g| + eps)``; ``t += 1``;
    ``p -= lr / (1 - b1**t) * m / u``: torch.optim.Adamax with ``weight_decay=0``, with its state names ("step",
    "exp_avg", "exp_inf"). Weight decay is decoupled as in torch.optim.AdamW: ``p *= 1 - lr*weight_decay`` before the
    update, which is how Efficient-VDVAE's JAX code decays (optax ``add_decayed_weights`` scaled by the learning rate);
    it is not torch.optim.Adamax's L2 term added to the gradient.

    The step count ``t`` is one per bucket (the parameters of a group on one device with one dtype): a 0-dim float32
    tensor on that device, which every parameter state of the bucket holds as its "step", counting the updates in
    which any of them had a gradient. A parameter without a gradient is left alone, as torch.optim.Adamax leaves it,
    but its count moves on with its bucket's: where torch's would count the parameter's own updates, a parameter whose
    first gradient comes after other parameters' (or that misses some steps) is bias-corrected with the bucket's
    larger count, so that its first update is about ``1 - b1`` times as large as torch's (its moment is not yet
    corrected for its zero start), growing to torch's as its moment fills. A loaded state dict whose counts differ
    within a bucket (torch.optim.Adamax's, or this class's when it counted per parameter) gets their maximum.

    ``found_inf`` (None, or a 0-dim float tensor on the parameters' device holding 0 or 1) is read by ``step`` as fused
    AdamW reads it: at 1 the parameters, both moments and the step counts stay bit-for-bit unchanged whatever the
    gradients hold (NaN and inf included). Nothing in ``step`` reads a tensor's value on the host: step counts and
    bias corrections live on the device, and each bucket is updated by a fixed number of multi-tensor
    (``torch._foreach_*``) operations, however many tensors it has. The state is the two moments and a 0-dim step
    count per bucket; an update allocates one temporary tensor per parameter at a time. ``lr`` in a parameter group is
    a float that a scheduler may change between steps.
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

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by ``state_dict`` (or by torch.optim.Adamax, or by this class when it kept a step count
        per parameter): each bucket's step counts become one new float32 tensor on its device, their maximum (all are
        equal but for parameters that joined late), so that stepping never changes the loaded dict."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._steps(group, fresh=True)

    def _steps(self, group: dict[str, Any], fresh: bool = False) -> dict[_Bucket, torch.Tensor]:
        """The step count of each bucket of ``group`` that has a state, the one tensor all its states hold (joined
        here where they hold several: a state dict loaded, or a state set by hand; always where ``fresh``)."""
        buckets: dict[_Bucket, list[dict[str, Any]]] = {}
        for p in group["params"]:
            state = self.state.get(p)
            if state and "step" in state:
                buckets.setdefault((p.device, p.dtype), []).append(state)
        steps = {}
        for (device, dtype), states in buckets.items():
            step = states[0]["step"]
            shared = (isinstance(step, torch.Tensor) and step.device == device and step.dtype == torch.float32
                      and step.dim() == 0 and all(s["step"] is step for s in states))
            if fresh or not shared:
                step = torch.stack([torch.as_tensor(s["step"], dtype=torch.float32).to(device).reshape(())
                                    for s in states]).amax()
                for s in states:
                    s["step"] = step
            steps[(device, dtype)] = step
        return steps

    def _buckets(self, group: dict[str, Any]) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """The group's parameters that have a gradient, by device and dtype, each bucket with its step count; a
        parameter's state is created at its first gradient, with its bucket's count."""
        steps = self._steps(group)
        buckets: dict[_Bucket, list[torch.Tensor]] = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Adamax does not support sparse gradients")
            if not p.is_floating_point():
                raise RuntimeError(f"Adamax updates real floating-point parameters, not {p.dtype}")
            key = (p.device, p.dtype)
            state = self.state[p]
            if not state:
                if key not in steps:
                    steps[key] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["step"] = steps[key]
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buckets.setdefault(key, []).append(p)
        return [(params, steps[key]) for key, params in buckets.items()]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient, skipped on the device where ``found_inf`` is 1."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for params, step in self._buckets(group):
                self._update(group, params, step)
        return loss

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], step: torch.Tensor) -> None:
        """Update one bucket: parameters of one device and dtype, whose step count is ``step``.

        Where the update is skipped, every change is made an exact no-op without reading the decision: the gradients
        become -0.0 (see _Skip) and every factor 1 and every other term -0.0 or 0, so that each moment, parameter and
        count is multiplied by 1, added -0.0 or 0, or kept by a maximum; the one term that cannot be so, ``m / u``
        (0/0 on a state never updated), is zeroed itself."""
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_infs = [self.state[p]["exp_inf"] for p in params]
        grads = [p.grad for p in params]
        like = params[0]
        skip = None if self.found_inf is None else _Skip.read(self.found_inf, like)
        if skip is not None:
            grads = skip.terms(grads)
        step.add_(1 if skip is None else skip.keep)  # one count for the bucket: one small kernel
        if wd != 0:
            torch._foreach_mul_(params, _scalar(1 - lr * wd, like, skip, 1.0))
        torch._foreach_mul_(exp_avgs, _scalar(b1, like, skip, 1.0))
        torch._foreach_add_(exp_avgs, grads, alpha=1 - b1)
        torch._foreach_mul_(exp_infs, _scalar(b2, like, skip, 1.0))
        if skip is None:
            candidates = torch._foreach_abs(grads)
        else:  # the copies of the gradients are ours to change
            torch._foreach_abs_(grads)
            candidates = grads
        torch._foreach_add_(candidates, _scalar(eps, like, skip, 0.0), alpha=1)  # alpha: see _Skip.terms
        torch._foreach_maximum_(exp_infs, candidates)  # max(u, 0) = u where skipped: u >= 0
        del candidates, grads
        # the bias correction 1 / (1 - b1**t) from the count on the device; where a first update is skipped, t = 0
        # makes it inf, and the update NaN, zeroed below. Computed in float32, or float64 for float64 parameters.
        t = step.to(torch.promote_types(like.dtype, torch.float32))
        correction = (1 - torch.pow(b1, t)).reciprocal_().to(like.dtype)
        updates = torch._foreach_div(exp_avgs, exp_infs)
        torch._foreach_mul_(updates, correction)
        if skip is not None:
            skip.zero_(updates)
        torch._foreach_add_(params, updates, alpha=-lr)  # -lr * +0.0 = -0.0 where skipped


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
