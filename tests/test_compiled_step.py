"""The compiled training step on the CPU (inductor's C++ back end): it traces without graph breaks, it does nothing
that waits for the host, and its loss, gradients and updated weights equal the eager step's, for every family and
across gradient-accumulation passes. CUDA graphs (reduce-overhead) are the GPU check's to measure."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from conftest import tiny_hps
from hps import hparams_from_preset
from models import build_model
from trainer import Trainer, ema_update

FAMILY_SETTINGS = {"conv_width": 8, "made_hidden": 32, "prior_channels": 8, "prior_layers": 2}
FAMILIES = ("vdvae", "cvae", "vlae", "vqvae")


def family_hps(model: str, **overrides):
    return tiny_hps(model=model, **FAMILY_SETTINGS, **overrides)


def batch(h, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, h.image_channels, h.image_size, h.image_size), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def narrowed_cifar10():
    """The cifar10 preset's full depth (43 encoder and 66 decoder blocks, every resolution) at width 16."""
    h = hparams_from_preset("cifar10", {"width": 16, "zdim": 4, "n_batch": 2})
    h.image_size, h.image_channels, h.n_classes = 32, 3, 10
    return h


def trace_whole_or_regions(model: torch.nn.Module):
    """The model traced the way the Trainer compiles it, with fullgraph=True so that any graph break raises, and
    the eager back end (tracing is what is tested; no kernels are generated)."""
    options = dict(backend="eager", fullgraph=True, dynamic=False)
    return model if model.compile_regions(**options) else torch.compile(model, **options)


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["digits", "narrowed_cifar10", *[f"family_{f}" for f in FAMILIES[1:]],
                                  "vqvae_prior"])
def test_compiled_forward_and_backward_have_no_graph_break(name, fresh_dynamo):
    if name == "digits":
        h = hparams_from_preset("digits")
        h.image_size, h.image_channels = 8, 1
    elif name == "narrowed_cifar10":
        h = narrowed_cifar10()
    else:
        h = family_hps(name.split("_")[1] if name.startswith("family") else "vqvae")
    torch.manual_seed(0)
    model = build_model(h)
    if name == "vqvae_prior":
        model.stage = "prior"
    forward = trace_whole_or_regions(model)
    images, labels = batch(h, 2)
    out = forward(images, labels)
    out["loss_nats"].backward()
    assert torch.isfinite(out["loss"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_update_traces_without_graph_break(fresh_dynamo):
    """The gradient norm, clipping, skip decision (fixed and auto) and EMA: one graph each."""
    for threshold in (400.0, "auto"):
        trainer = Trainer(tiny_hps(skip_threshold=threshold), torch.device("cpu"))
        images, labels = batch(trainer.H, trainer.H.n_batch)
        trainer.model(images, labels)["loss_nats"].backward()
        decide = torch.compile(trainer.clip_and_decide, backend="eager", fullgraph=True)
        skip, grad_norm = decide(torch.tensor(False))
        assert not skip and torch.isfinite(grad_norm) and grad_norm > 0
        torch.compile(ema_update, backend="eager", fullgraph=True)(*trainer.ema_pairs, 0.9)


class NoHostSync(TorchDispatchMode):
    """Raises on any operator that makes the host wait for the device's result."""

    SYNCING = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.equal.default, torch.ops.aten.is_nonzero.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCING:
            raise AssertionError(f"{func} waits for the device")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", FAMILIES)
@pytest.mark.parametrize("threshold", [400.0, "auto"])
def test_forward_backward_and_skip_decision_never_wait_for_the_host(model, threshold):
    """What the compiled step runs (augmentation, forward, backward, clipping and the skip decision, over two
    accumulation passes) calls no operator that reads a device value back; the optimizer step is left out (the
    CPU's own fused AdamW reads its step count itself, the CUDA kernel does not)."""
    trainer = Trainer(family_hps(model, grad_accum=2, augment_shift=1, skip_threshold=threshold),
                      torch.device("cpu"))
    calls = []

    def update_outside_the_check(skip):
        calls.append(skip)
        with _disable_current_modes():
            Trainer._update(trainer, skip)
    trainer._update = update_outside_the_check
    images, labels = batch(trainer.H, 2 * trainer.H.n_batch)
    for _ in range(2):
        with NoHostSync():
            skip, stats = trainer.step(images, labels)
    assert len(calls) == 2 and not skip and torch.isfinite(stats).all()


@pytest.mark.parametrize("model", FAMILIES)
@torch._inductor.config.patch(fallback_random=True)
def test_compiled_step_equals_the_eager_step(model, fresh_dynamo):
    """Two updates of --grad_accum 2: the compiled step's figures, gradients and weights equal eager's to float
    tolerance (inductor's fallback_random: both draw the same posterior noise)."""
    results = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        trainer = Trainer(family_hps(model, grad_accum=2, compile=mode), torch.device("cpu"))
        assert trainer.compiled == (mode == "on")
        images, labels = batch(trainer.H, 2 * trainer.H.n_batch)
        torch.manual_seed(1)
        figures = [trainer.step(images, labels)[1] for _ in range(2)]
        results[mode] = (figures, [p.grad.clone() for p in trainer.trained],
                         [p.detach().clone() for p in trainer.model.parameters()],
                         [p.detach().clone() for p in trainer.ema.parameters()])
    (eager_figures, eager_grads, eager_weights, eager_ema), (figures, grads, weights, ema) = results["off"], results["on"]
    for a, b in zip(eager_figures, figures):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for group_a, group_b in ((eager_grads, grads), (eager_weights, weights), (eager_ema, ema)):
        assert len(group_a) == len(group_b) > 0
        for a, b in zip(group_a, group_b):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_under_cuda_graphs_accumulation_adds_into_gradient_buffers_of_its_own(fresh_dynamo, monkeypatch):
    """With reduce-overhead (CUDA graphs) a pass's gradients are graph outputs that the next pass's replay
    overwrites: the Trainer keeps every gradient in a buffer of its own, allocated once and zeroed in place, and
    --grad_accum 4 still equals eager. Here dynamo traces with its eager backend (the CPU has no CUDA graphs, and
    inductor's compile is tested above); the GPU check (cuda_paths) compares the real thing with eager on a card."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model=None, **options: real_compile(
        model, **{k: v for k, v in options.items() if k not in ("mode", "backend")}, backend="eager"))
    results = {}
    for mode in ("off", "reduce-overhead"):
        torch.manual_seed(0)
        trainer = Trainer(family_hps("vdvae", grad_accum=4, compile="off" if mode == "off" else "on"),
                          torch.device("cpu"), compile_mode=mode)
        buffers = [p.grad for p in trainer.trained]
        images, labels = batch(trainer.H, 4 * trainer.H.n_batch)
        torch.manual_seed(1)
        figures = [trainer.step(images, labels)[1] for _ in range(2)]
        if mode == "reduce-overhead":
            assert trainer.persistent_grads and all(b is not None for b in buffers)
            assert all(p.grad is b for p, b in zip(trainer.trained, buffers))  # the same tensors, added into
        results[mode] = (figures, [p.detach().clone() for p in trainer.model.parameters()])
    for a, b in zip(*(results[m][0] for m in results)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    for a, b in zip(*(results[m][1] for m in results)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
