"""optimizers.py: Adamax against torch's, its skip on the device, its state, and make_optimizer."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from optimizers import OPTIMIZERS, Adamax, make_optimizer, skips_on_device

SHAPES = [(5,), (3, 7), (8, 4, 3, 3), (6, 2, 1, 1), (4, 3, 2, 2)]


def make_params(seed: int = 0, device: str = "cpu") -> list[torch.nn.Parameter]:
    """A few parameters of different shapes, the 4-d ones channels-last, as the repository's convolutions are."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = torch.randn(shape, generator=g)
        if p.dim() == 4:
            p = p.contiguous(memory_format=torch.channels_last)
        params.append(torch.nn.Parameter(p.to(device)))
    assert params[2].stride() != params[2].contiguous().stride()  # really channels-last
    return params


def gradients(step: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    grads = [torch.randn(shape, generator=g) * scale for shape in SHAPES]
    # a channels-last gradient, and a contiguous one (the last) for a channels-last parameter
    grads[2] = grads[2].contiguous(memory_format=torch.channels_last)
    return grads


def set_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone(memory_format=torch.preserve_format)


def lr_factor(step: int) -> float:
    return 1.0 / (1 + 0.3 * step) if step % 3 else 0.5 + 0.05 * step


def assert_state_close(opt, ref, params, ref_params, rtol=1e-6, atol=1e-7) -> None:
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
        for key in ("exp_avg", "exp_inf"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=rtol, atol=atol)
        assert float(opt.state[p]["step"]) == float(ref.state[q]["step"])


@pytest.mark.parametrize("found_inf", [None, 0.0])
def test_adamax_equals_torch_adamax(found_inf):
    params, ref_params = make_params(), make_params()
    opt = Adamax(params, lr=0.02, betas=(0.8, 0.99), eps=1e-6)
    if found_inf is not None:
        opt.found_inf = torch.tensor(found_inf)
    ref = torch.optim.Adamax(ref_params, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in (opt, ref)]
    start = [p.detach().clone() for p in params]
    for step in range(20):
        grads = gradients(step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        ref.step()
        for s in scheds:
            s.step()
        assert_state_close(opt, ref, params, ref_params)
    assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"] != 0.02
    assert all((p - s).abs().max() > 1e-2 for p, s in zip(params, start))  # they really moved
    assert params[2].is_contiguous(memory_format=torch.channels_last)
    assert opt.state[params[2]]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert opt.state[params[0]]["step"].dtype == torch.float32


@pytest.mark.parametrize("found_inf", [None, 0.0])
def test_weight_decay_is_decoupled(found_inf):
    lr, wd = 0.05, 0.3
    params, ref_params = make_params(), make_params()
    opt = Adamax(params, lr=lr, weight_decay=wd)
    if found_inf is not None:
        opt.found_inf = torch.tensor(found_inf)
    ref = torch.optim.Adamax(ref_params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref, lr_factor)
    for step in range(15):
        grads = gradients(step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        with torch.no_grad():
            for q in ref_params:
                q.mul_(1 - ref.param_groups[0]["lr"] * wd)
        ref.step()
        sched.step()
        ref_sched.step()
    assert_state_close(opt, ref, params, ref_params)
    # and it is not torch's coupled L2 decay
    coupled_params = make_params()
    coupled = torch.optim.Adamax(coupled_params, lr=lr, weight_decay=wd)
    coupled_sched = torch.optim.lr_scheduler.LambdaLR(coupled, lr_factor)
    for step in range(15):
        set_grads(coupled_params, gradients(step))
        coupled.step()
        coupled_sched.step()
    assert (params[1] - coupled_params[1]).abs().max() > 1e-3


def snapshot(opt, params) -> list[torch.Tensor]:
    out = []
    for p in params:
        out.append(p.detach().clone())
        state = opt.state.get(p, {})
        out += [state[k].clone() for k in ("step", "exp_avg", "exp_inf") if k in state]
    return out


def assert_bit_identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype == torch.float32 and torch.equal(x.view(torch.int32), y.view(torch.int32))


def poisoned(step: int) -> list[torch.Tensor]:
    grads = gradients(step)
    grads[0][1] = float("nan")
    grads[1][0, 2] = float("inf")
    grads[2][0, 0, 0, 0] = float("-inf")
    grads[3].fill_(float("nan"))
    return grads


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("bad", ["huge", "nonfinite"])
def test_found_inf_skips_bit_for_bit(bad, weight_decay):
    found = torch.zeros(())
    params = make_params()
    opt = Adamax(params, lr=0.01, weight_decay=weight_decay)
    opt.found_inf = found
    bad_grads = (lambda step: gradients(step, 1e30)) if bad == "huge" else poisoned

    # a first step skipped: the state is created, still all zero, and the parameters do not move
    set_grads(params, bad_grads(0))
    before = [p.detach().clone() for p in params]
    found.fill_(1)
    opt.step()
    assert_bit_identical([p.detach() for p in params], before)
    for p in params:
        assert float(opt.state[p]["step"]) == 0
        assert not opt.state[p]["exp_avg"].any() and not opt.state[p]["exp_inf"].any()

    found.fill_(0)
    for step in range(1, 4):
        set_grads(params, gradients(step))
        opt.step()
    set_grads(params, bad_grads(4))
    before = snapshot(opt, params)
    found.fill_(1)
    opt.step()
    assert_bit_identical(snapshot(opt, params), before)


def test_skipped_step_is_as_if_it_never_happened():
    found = torch.zeros(())
    params, ref_params = make_params(), make_params()
    opt = Adamax(params, lr=0.01, weight_decay=0.05)
    ref = Adamax(ref_params, lr=0.01, weight_decay=0.05)
    opt.found_inf, ref.found_inf = found, torch.zeros(())
    for step in range(8):
        if step == 3:  # only opt sees this one, skipped, with NaN and inf gradients
            set_grads(params, poisoned(step))
            found.fill_(1)
            opt.step()
            found.fill_(0)
        set_grads(params, gradients(step))
        set_grads(ref_params, gradients(step))
        opt.step()
        ref.step()
    assert_bit_identical(snapshot(opt, params), snapshot(ref, ref_params))
    assert float(opt.state[params[0]]["step"]) == 8
    assert all(torch.isfinite(p).all() for p in params)


def test_step_never_reads_a_value_on_the_host():
    """Meta tensors have no values: any .item(), bool() or float() of one raises."""
    params = [torch.nn.Parameter(torch.empty(shape, device="meta")) for shape in SHAPES]
    params[2] = torch.nn.Parameter(torch.empty(SHAPES[2], device="meta").contiguous(memory_format=torch.channels_last))
    for p in params:
        p.grad = torch.empty_like(p)
    for found_inf in (torch.zeros((), device="meta"), None):
        opt = Adamax(params, lr=0.01, weight_decay=0.1)
        opt.found_inf = found_inf
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        for _ in range(2):
            opt.step()
            sched.step()
        assert opt.state[params[0]]["step"].device.type == "meta"
        assert opt.state[params[2]]["exp_inf"].shape == SHAPES[2]


class OpCounter(TorchDispatchMode):
    """Counts the aten operators a block runs (views aside: they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in (torch.ops.aten.as_strided, torch.ops.aten.view, torch.ops.aten.detach):
            self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("found_inf", [None, 0.0])
def test_operator_count_does_not_grow_with_the_tensor_count(found_inf):
    counts = []
    for n in (4, 40):
        params = [torch.nn.Parameter(torch.randn(3, 2)) for _ in range(n)]
        opt = Adamax(params, lr=0.01, weight_decay=0.1)
        opt.found_inf = None if found_inf is None else torch.tensor(found_inf)
        for step in range(2):  # the first creates the state and the flat layout
            for p in params:
                p.grad = torch.randn_like(p)
            with OpCounter() as counter:
                opt.step()
        counts.append(counter.ops)
    assert counts[0] == counts[1]
    assert "_local_scalar_dense" not in counts[0]  # no .item(): on the CPU it would pass unnoticed
    foreach = [op for op in counts[0] if op.startswith("_foreach")]
    assert 8 <= len(foreach) <= 16 and len(counts[0]) <= 32, counts[0]


def trained_and_a_copy(steps: int) -> tuple[Adamax, list[torch.Tensor], list[torch.Tensor]]:
    """An Adamax (lr 0.01, decay 0.05, reading found_inf) after ``steps`` updates of its parameters, and a second
    set of parameters equal to them, for an optimiser loaded from its state dict."""
    params, other = make_params(), make_params(seed=5)
    opt = Adamax(params, lr=0.01, weight_decay=0.05)
    opt.found_inf = torch.zeros(())
    for step in range(steps):
        set_grads(params, gradients(step))
        opt.step()
    with torch.no_grad():
        for p, q in zip(params, other):
            q.copy_(p)
    return opt, params, other


def assert_resumes_alike(opt: Adamax, params: list[torch.Tensor], reloaded: Adamax, other: list[torch.Tensor],
                         steps: range) -> None:
    """The optimiser loaded from ``opt``'s state dict (reading found_inf too) takes the same updates, bit for bit."""
    reloaded.found_inf = torch.zeros(())
    for step in steps:
        set_grads(params, gradients(step))
        set_grads(other, gradients(step))
        opt.step()
        reloaded.step()
    assert_bit_identical(snapshot(reloaded, other), snapshot(opt, params))


def test_state_dict_round_trip():
    opt, params, other = trained_and_a_copy(5)
    saved = copy.deepcopy(opt.state_dict())
    # as a checkpoint saved and loaded on the CPU holds it
    assert set(saved["state"][0]) == {"step", "exp_avg", "exp_inf"}
    reloaded = Adamax(other, lr=0.5)
    reloaded.load_state_dict(saved)
    assert reloaded.param_groups[0]["lr"] == 0.01
    assert_resumes_alike(opt, params, reloaded, other, range(5, 10))


def test_make_optimizer_skips_on_the_cpu():
    for name, fused in (("adamax", False), ("adamax", True), ("adamw", True)):
        found = torch.zeros(())
        params = make_params()
        opt = make_optimizer(name, params, lr=0.01, betas=(0.9, 0.99), weight_decay=0.1, fused=fused, found_inf=found)
        assert opt.found_inf is found and skips_on_device(opt)
        assert opt.defaults["betas"] == (0.9, 0.99) and opt.defaults["weight_decay"] == 0.1
        set_grads(params, gradients(0))
        opt.step()
        set_grads(params, poisoned(1))
        before = [p.detach().clone() for p in params]
        found.fill_(1)
        opt.step()
        assert all(torch.equal(p, b) for p, b in zip(params, before)), name
        found.fill_(0)
        set_grads(params, gradients(2))
        opt.step()
        assert all(not torch.equal(p, b) and torch.isfinite(p).all() for p, b in zip(params, before)), name
    assert isinstance(make_optimizer("adamax", make_params(), 0.01, (0.9, 0.99), 0.0, False, found), Adamax)
    plain = make_optimizer("adamw", make_params(), 0.01, (0.9, 0.99), 0.0, False, found)
    assert type(plain) is torch.optim.AdamW and not plain.defaults["fused"]
    assert getattr(plain, "found_inf", None) is None and not skips_on_device(plain)
    assert OPTIMIZERS == ("adamw", "adamax")


def test_make_optimizer_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="adamw, adamax"):
        make_optimizer("sgd", make_params(), 0.01, (0.9, 0.99), 0.0, False, torch.zeros(()))


def test_adamax_through_the_trainer_equals_torch_adamax_and_skips_without_reading_the_device(monkeypatch):
    """--optimizer adamax in the one training loop: three updates equal those of torch.optim.Adamax driven by the
    same Trainer (its host-side skip path), and an update skipped by --skip_threshold leaves every weight as it was
    with no value read back to the host (Tensor.item and bool raise while it runs)."""
    from conftest import tiny_hps
    from trainer import Trainer, lr_factor

    h = tiny_hps(optimizer="adamax", lr=1e-3, adam_beta2=0.999, wd=0.0, grad_clip=0.0, skip_threshold=-1.0,
                 warmup_iters=2, device="cpu", compile="off")
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    ours, theirs = [Trainer(h, torch.device("cpu")) for _ in range(2)]
    theirs.model.load_state_dict(ours.model.state_dict())
    assert isinstance(ours.optimizer, Adamax) and ours.skips_on_device
    theirs.optimizer = torch.optim.Adamax(theirs.trained, lr=h.lr, betas=(0.9, 0.999), eps=1e-8)
    theirs.scheduler = torch.optim.lr_scheduler.LambdaLR(theirs.optimizer,
                                                         lambda s: lr_factor(h, s, theirs.stage_steps, h.lr))
    theirs.skips_on_device = False
    for _ in range(3):
        for trainer in (ours, theirs):
            torch.manual_seed(5)
            trainer.step(images, labels)
    for a, b in zip(ours.model.parameters(), theirs.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    before = [p.detach().clone() for p in ours.model.parameters()]
    ours.H.skip_threshold = 1e-12  # every gradient norm reaches it
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("Tensor.item in a training step"))
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("bool(Tensor) in a training step"))
    skipped, _ = ours.step(images, labels)
    monkeypatch.undo()
    assert skipped.item()
    assert all(torch.equal(a, b) for a, b in zip(before, ours.model.parameters()))


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns, to compare floats of any dtype bit for bit (-0.0 and NaN included)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_a_bucket_shares_one_step_count_and_holds_no_other_buffer():
    """The state is the two moments of each parameter and one 0-dim step count per bucket (the tensors of a group
    with one device and dtype), which every state of the bucket holds: no per-element buffer besides the moments."""
    params = make_params() + [torch.nn.Parameter(torch.randn(4, dtype=torch.float64))]
    opt = Adamax(params, lr=0.01, weight_decay=0.1)
    opt.found_inf = torch.zeros(())
    for step in range(3):
        set_grads(params, gradients(step) + [torch.randn(4, dtype=torch.float64)])
        opt.step()
    shared = opt.state[params[0]]["step"]
    assert all(opt.state[p]["step"] is shared for p in params[:-1])
    assert opt.state[params[-1]]["step"] is not shared  # float64: a bucket of its own
    assert float(shared) == float(opt.state[params[-1]]["step"]) == 3
    unique = {id(t): t for state in opt.state.values() for t in state.values()}.values()
    state_bytes = sum(t.numel() * t.element_size() for t in unique)
    assert state_bytes == 2 * sum(p.numel() * p.element_size() for p in params) + 2 * 4
    assert not [k for k, v in vars(opt).items() if torch.is_tensor(v) and k != "found_inf"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_found_inf_skips_bit_for_bit_in_any_dtype_and_keeps_negative_zeros(dtype):
    """A bucket of any floating dtype skips through its integer view (int64, int16), kept updates follow torch's
    Adamax in that dtype, and a -0.0 in a weight or a moment stays -0.0 through a skipped update (it adds -0.0,
    never +0.0, which would turn -0.0 into +0.0); b1 = 0.5 lets a moment reach -0.0 by itself."""
    lr, wd = 0.01, 0.1
    found = torch.zeros(())
    params = [torch.nn.Parameter(p.detach().to(dtype)) for p in make_params()]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Adamax(params, lr=lr, betas=(0.5, 0.9), weight_decay=wd)
    opt.found_inf = found
    ref = torch.optim.Adamax(ref_params, lr=lr, betas=(0.5, 0.9))
    for step in range(3):
        grads = [g.to(dtype) for g in gradients(step)]
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(ref_params, 1 - lr * wd)
        ref.step()
    tolerance = dict(rtol=0, atol=0.02) if dtype != torch.float64 else dict(rtol=1e-12, atol=1e-14)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p, q, **tolerance)
    with torch.no_grad():
        params[1][0, 0] = -0.0
        opt.state[params[1]]["exp_avg"][0, 1] = -0.0
    set_grads(params, [g.to(dtype) for g in poisoned(3)])
    before = snapshot(opt, params)
    found.fill_(1)
    opt.step()
    after = snapshot(opt, params)
    assert len(after) == len(before) == 4 * len(params)  # weight, step count and both moments
    assert all(x.dtype == y.dtype and torch.equal(bits(x), bits(y)) for x, y in zip(after, before))
    assert bits(params[1])[0, 0] == bits(torch.tensor(-0.0, dtype=dtype))


@pytest.mark.parametrize("found_inf", [None, 0.0])
def test_a_parameter_that_joins_late_takes_its_bucket_step_count(found_inf):
    """A parameter whose first gradient comes at step 3 starts its moments at zero then, as in torch.optim.Adamax,
    but takes its bucket's step count (torch's would start at 0): its first update is bias-corrected by
    1 / (1 - b1**4), not 1 / (1 - b1), so it is (1 - b1) / (1 - b1**4) of torch's. The other parameters, and the
    late one's moments, are torch's."""
    lr, b1, late = 0.01, 0.9, 4
    params, ref_params = make_params(), make_params()
    opt = Adamax(params, lr=lr, betas=(b1, 0.999))
    opt.found_inf = None if found_inf is None else torch.tensor(found_inf)
    ref = torch.optim.Adamax(ref_params, lr=lr, betas=(b1, 0.999))
    for step in range(5):
        for ps in (params, ref_params):
            set_grads(ps, gradients(step))
            if step < 3:
                ps[late].grad = None
        before, ref_before = params[late].detach().clone(), ref_params[late].detach().clone()
        opt.step()
        ref.step()
        if step < 3:
            assert params[late] not in opt.state and torch.equal(params[late], before)
        if step == 3:
            ratio = (params[late] - before) / (ref_params[late] - ref_before)
            torch.testing.assert_close(ratio, torch.full_like(ratio, (1 - b1) / (1 - b1**4)), rtol=1e-4, atol=0)
    assert opt.state[params[late]]["step"] is opt.state[params[0]]["step"]
    assert float(opt.state[params[late]]["step"]) == 5 and float(ref.state[ref_params[late]]["step"]) == 2
    assert_state_close(opt, ref, params[:late], ref_params[:late])
    for key in ("exp_avg", "exp_inf"):
        torch.testing.assert_close(opt.state[params[late]][key], ref.state[ref_params[late]][key])


def test_a_state_dict_with_a_step_count_per_tensor_loads():
    """A state dict whose states hold their own step counts (torch.optim.Adamax's, or this class's when it kept one
    per parameter) loads as one count per bucket, their maximum, and resumes as the optimiser it came from;
    stepping the loaded optimiser leaves the dict's counts as they were."""
    opt, params, other = trained_and_a_copy(4)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():  # as this class saved them before: a tensor of its own per state
        state["step"] = state["step"].clone()
    reloaded = Adamax(other, lr=0.5)
    reloaded.load_state_dict(saved)
    assert len({id(reloaded.state[q]["step"]) for q in other}) == 1
    assert_resumes_alike(opt, params, reloaded, other, range(4, 7))
    assert all(float(state["step"]) == 4 for state in saved["state"].values())
    # counts that differ within a bucket (a parameter that joined late) become the largest
    saved["state"][2]["step"] = torch.tensor(1.0)
    late = Adamax(make_params(), lr=0.01)
    late.load_state_dict(saved)
    assert {float(state["step"]) for state in late.state.values()} == {4.0}
    # and torch's own Adamax state dict
    theirs_params = make_params()
    theirs = torch.optim.Adamax(theirs_params, lr=0.01)
    for step in range(2):
        set_grads(theirs_params, gradients(step))
        theirs.step()
    ours = Adamax(make_params(), lr=0.01)
    ours.load_state_dict(theirs.state_dict())
    step = ours.state[ours.param_groups[0]["params"][0]]["step"]
    assert float(step) == 2 and step.dtype == torch.float32 and all(s["step"] is step for s in ours.state.values())
