"""The Efficient-VDVAE options (Hazami et al. 2022): softplus standard deviations, skips from every encoder block,
per-resolution bottlenecks, the narrow cosine schedule, KL warm-up and balancing, flips; each checked against an
independent computation, and each a field whose default leaves the model as it was."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import run, tiny_hps
from hps import hparams_from_preset, parse_layer_string, skip_slots
from trainer import Trainer, kl_balance, kl_beta, lr_factor
from vae import VAE, count_parameters
from vae_helpers import (SOFTPLUS_BETA, dmol_log_prob, draw_gaussian_diag_samples, gaussian_analytical_kl,
                         log_std_of)
from utils import UserError


def reference_log_softplus_std(x: torch.Tensor) -> torch.Tensor:
    """log(softplus(ln2 x) / ln2) in float64, written out from the definition."""
    beta = math.log(2.0)
    return torch.log(torch.log1p(torch.exp(beta * x.double())) / beta)


def test_softplus_std_value_and_gradient_equal_the_definition():
    x = torch.linspace(-30.0, 25.0, 221, requires_grad=True)
    got = log_std_of(x, "softplus")
    want = reference_log_softplus_std(x.detach())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert abs(torch.exp(log_std_of(torch.zeros(1), "softplus")).item() - 1.0) < 1e-7  # sigma 1 at 0, as exp(0)
    got.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    reference_log_softplus_std(x64).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)


def test_softplus_std_stays_finite_far_from_zero():
    """Below the range where softplus underflows, the log is linear in x (not log 0), its gradient beta."""
    x = torch.tensor([-400.0, -150.0, -21.0, 80.0], requires_grad=True)
    y = log_std_of(x, "softplus")
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert abs(y[0].item() - (-400.0 * SOFTPLUS_BETA - math.log(SOFTPLUS_BETA))) < 1e-3
    assert abs(x.grad[0].item() - SOFTPLUS_BETA) < 1e-6
    assert abs(y[3].item() - math.log(80.0)) < 1e-6  # softplus(ln2 x)/ln2 = x for large x


def test_exp_parameterisation_is_the_identity_on_log_sigma():
    x = torch.randn(50)
    assert log_std_of(x, "exp") is x


def test_kl_and_draws_with_softplus_std_are_exact():
    """The analytic KL between two softplus-parameterised Gaussians equals a Monte Carlo estimate of
    E_q[log q - log p], and draws have the softplus standard deviation."""
    torch.manual_seed(0)
    raw_q, raw_p = torch.tensor([-1.5, 0.0, 2.0]), torch.tensor([0.5, -0.7, 1.0])
    mq, mp = torch.tensor([0.3, -1.0, 0.0]), torch.tensor([0.0, 0.5, 1.0])
    lq, lp = log_std_of(raw_q, "softplus"), log_std_of(raw_p, "softplus")
    kl = gaussian_analytical_kl(mq, mp, lq, lp)
    n = 400_000
    z = draw_gaussian_diag_samples(mq.expand(n, 3), lq.expand(n, 3))
    sq = torch.nn.functional.softplus(SOFTPLUS_BETA * raw_q) / SOFTPLUS_BETA
    sp = torch.nn.functional.softplus(SOFTPLUS_BETA * raw_p) / SOFTPLUS_BETA
    log_q = torch.distributions.Normal(mq, sq).log_prob(z)
    log_p = torch.distributions.Normal(mp, sp).log_prob(z)
    mc = (log_q - log_p).double().mean(0)
    stderr = (log_q - log_p).double().std(0) / math.sqrt(n)
    assert ((mc - kl.double()).abs() < 5 * stderr + 1e-4).all(), (mc, kl)
    torch.testing.assert_close(z.std(0), sq, rtol=1e-2, atol=0)


def test_dmol_with_softplus_scales_sums_to_one_over_all_levels():
    torch.manual_seed(1)
    levels = 17
    params = torch.randn(1, 3 * 4, 1, 1)
    x = (torch.arange(levels, dtype=torch.float32) * (2.0 / (levels - 1)) - 1.0).reshape(levels, 1, 1, 1)
    probs = torch.exp(dmol_log_prob(params.expand(levels, -1, -1, -1), x, levels, 4, scale="softplus").double())
    assert abs(probs.sum().item() - 1.0) < 1e-5
    assert not torch.allclose(dmol_log_prob(params, x[:1], levels, 4, scale="softplus"),
                              dmol_log_prob(params, x[:1], levels, 4, scale="exp"))


def test_defaults_leave_the_cifar10_model_as_openai_vdvae():
    h = hparams_from_preset("cifar10")
    h.image_size, h.image_channels = 32, 3
    assert count_parameters(VAE(h)) == 39_149_540


@pytest.mark.parametrize("preset,size,groups,zdim", [
    ("cifar10_efficient", 32, 47, 32), ("cifar10_efficient_c1", 32, 47, 16),
    ("imagenet32_efficient", 32, 73, 32), ("imagenet32_efficient_c1", 32, 73, 48),
    ("imagenet64_efficient", 64, 84, 32), ("imagenet64_efficient_c1", 64, 84, 64)])
def test_efficient_presets_have_their_configs_latent_layout(preset, size, groups, zdim):
    """Latent groups: their config's bottom-up blocks plus its down_n_blocks_per_res extras (33 + 14, 48 + 25,
    53 + 31); one decoder skip per encoder block at every resolution."""
    h = hparams_from_preset(preset)
    assert len(parse_layer_string(h.dec_blocks)) == groups and h.zdim == zdim
    assert len(parse_layer_string(h.enc_blocks)) == {32: 33 if "cifar" in preset else 48, 64: 53}[size]
    with torch.device("meta"):
        h.image_size, h.image_channels = size, 3
        model = VAE(h)
    assert model.decoder.n_groups == groups


def test_c1_widths_and_bottlenecks_follow_their_config():
    """egs/cifar10_C1.cfg: widths 48, 96, 192, 384 from 32x32 down, bottlenecks 48, 48, 48, 96, 96."""
    h = hparams_from_preset("cifar10_efficient_c1")
    h.image_size, h.image_channels = 32, 3
    with torch.device("meta"):
        model = VAE(h)
    widths, middles = {}, {}
    for block, (res, _) in zip(model.encoder.enc_blocks, parse_layer_string(h.enc_blocks)):
        widths[res], middles[res] = block.c1.in_channels, block.c1.out_channels
    assert widths == {32: 48, 16: 96, 8: 192, 4: 384, 1: 384}
    assert middles == {32: 48, 16: 48, 8: 48, 4: 96, 1: 96}


def test_skip_slots_read_the_encoder_in_reverse_and_rsn_repeats_the_block_before():
    assert skip_slots("1x2,4m1,4,4s2,4x1") == [0, 1, 0, 1, 1, 1, 2]
    with pytest.raises(ValueError, match="none"):
        skip_slots("1x1,4s2")


def test_every_skip_hands_each_decoder_block_its_encoder_blocks_output(monkeypatch):
    """Decoder block j at resolution R reads the output of the encoder block skip_slots(j) from the last at R
    (before it pools), checked by identity of the tensors handed over."""
    h = tiny_hps(enc_skips="every", enc_blocks="8x2,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4,8m4,8s1,8x2")
    model = VAE(h).eval()
    encoder_outputs: list[torch.Tensor] = []
    for block in model.encoder.enc_blocks:
        block.register_forward_hook(lambda mod, args, out: encoder_outputs.append(out))
    received: list[int] = []
    original = type(model.decoder.dec_blocks[0]).forward

    def spy(self, x, acts, *args, **kwargs):
        received.append(next(i for i, t in enumerate(encoder_outputs) if t is acts))
        return original(self, x, acts, *args, **kwargs)

    monkeypatch.setattr(type(model.decoder.dec_blocks[0]), "forward", spy)
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    model(images, torch.tensor([1, 2]))
    # encoder blocks: 0, 1, 2 (pools) at 8x8; 3, 4 (pools) at 4x4; 5 at 1x1
    assert received == [5, 4, 3, 2, 2, 1, 0]
    assert encoder_outputs[2].shape[-1] == 8  # the pooling block's skip is its output before it pools


def test_every_skip_layout_must_match_the_encoder():
    with pytest.raises(UserError, match="8x8: 2 decoder skips, 3 encoder blocks"):
        tiny_hps(enc_skips="every", enc_blocks="8x2,8d2,4x1,4d4,1x1", dec_blocks="1x1,4m1,4,8m4,8x1")


def test_vdvae_only_fields_are_refused_for_other_families():
    with pytest.raises(UserError, match="--latent_std"):
        hparams_from_preset("digits", {"model": "cvae", "latent_std": "softplus"})


def test_narrow_cosine_schedule_equals_their_formula():
    """egs/cifar10_baseline.cfg's NarrowCosineDecay as their JAX code computes it."""
    h = hparams_from_preset("cifar10_efficient")
    for step in [0, 1, 50, 100, 101, 30_000, 50_000, 50_001, 200_000, 425_000, 799_999, 800_000, 900_000]:
        if step <= 50_000:
            want = 1e-3 * min(1.0, step / 100)
        else:
            t = min(step - 50_000, 750_000)
            a = 2e-4 / 1e-3
            want = 1e-3 * ((1 - a) * 0.5 * (1 + math.cos(math.pi * t / 750_000)) + a)
        assert abs(lr_factor(h, step, h.max_steps, h.lr) * h.lr - want) < 1e-12, step


def test_default_cosine_decays_from_warm_up_to_zero():
    h = hparams_from_preset("digits")  # warm-up 100, cosine to 0 at max_steps 2,500
    for step in [0, 50, 100, 1300, 2500]:
        want = min(1.0, step / 100) if step <= 100 else 0.5 * (1 + math.cos(math.pi * (step - 100) / 2400))
        assert abs(lr_factor(h, step, 2500, h.lr) - want) < 1e-15


def test_kl_warm_up_and_balance_equal_their_formulas():
    h = hparams_from_preset("cifar10_efficient")
    for step in [0, 21, 22, 100, 2521, 5042, 6000]:
        assert kl_beta(h, step) == min(1.0, max(1e-4, (step - 21) / 5021))
    assert kl_beta(hparams_from_preset("cifar10"), 0) == 1.0
    kl = torch.tensor([1.0, 3.0, 0.0])
    sizes = torch.tensor([2.0, 2.0, 4.0])
    alpha = kl_balance(kl, sizes)  # per dimension 0.5, 1.5, 0: shares 1/4, 3/4, 0 of their sum
    torch.testing.assert_close(alpha, torch.tensor([0.75, 2.25, 0.0]))


def test_training_loss_weights_the_kl_while_warming_up_and_is_the_elbo_after():
    h = tiny_hps(kl_warmup_start=2, kl_warmup_steps=4, kl_balance_steps=3, device="cpu")
    trainer = Trainer(h, torch.device("cpu"))
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8) % 10
    out = trainer.model(images, labels)
    sizes = torch.tensor([math.prod(s) for s in trainer.model.latent_shapes()], dtype=torch.float32)
    for step in range(8):
        trainer.scheduler.last_epoch = step
        beta = min(1.0, max(1e-4, (step - 2) / 6))
        alpha = kl_balance(out["kl_groups"], sizes) if step < 3 else torch.ones_like(out["kl_groups"])
        want = math.log(2.0) * (out["recon"] + beta * (alpha * out["kl_groups"]).sum())
        got = trainer.training_loss(out)
        torch.testing.assert_close(got, want)
    trainer.scheduler.last_epoch = 8  # beta reaches 1 at step 2 start + steps
    assert trainer.training_loss(out) is out["loss_nats"]  # after both: the ELBO itself


def test_flips_mirror_about_half_and_shards_take_their_slice():
    from data import random_flip

    images = torch.arange(4 * 3, dtype=torch.uint8).reshape(4, 1, 1, 3).repeat(50, 1, 1, 1)
    g = torch.Generator().manual_seed(0)
    out = random_flip(images, generator=g)
    flipped = (out != images).any(dim=(1, 2, 3))
    assert 0.35 < flipped.float().mean().item() < 0.65
    assert torch.equal(out[flipped], images[flipped].flip(-1))
    whole = random_flip(images, generator=torch.Generator().manual_seed(3))
    halves = [random_flip(images[i * 100:(i + 1) * 100], generator=torch.Generator().manual_seed(3), shard=(i, 2))
              for i in range(2)]
    assert torch.equal(torch.cat(halves), whole)


def test_summary_prints_the_activation_memory_per_image():
    result = run("train.py", "--hps", "cifar10_efficient_c1", "--summary")
    assert result.returncode == 0, result.stderr[-2000:]
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("activation memory per image:"))
    mb = float(line.split(":")[1].split("MB")[0])
    assert mb > 0


def test_the_cosine_spans_the_stage_that_num_epochs_ends_first(tmp_path):
    """--num_epochs 1 ends the stage long before --max_steps: the cosine reaches --lr_min at that real end (it
    spanned max_steps, and so barely decayed)."""
    import json

    import train
    from conftest import tiny_cli_args

    run_dir = tmp_path / "run"
    train.main(tiny_cli_args(run_dir, max_steps=100_000, num_epochs=1, lr_decay="cosine", lr=1e-3, lr_min=1e-5,
                             warmup_iters=0, log_every=40, eval_every=0, save_every=1000))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["kind"] == "train"}
    last = max(lrs)  # one epoch of 16-image batches
    assert last == 80 and lrs[last] == pytest.approx(1e-5)
    assert lrs[40] == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-6)  # half-way down the half cosine


def test_compile_cache_calls_are_skipped_on_a_torch_without_them(tmp_path, monkeypatch):
    """torch.compiler's cache artifacts arrived in torch 2.7; requirements.txt admits 2.4, so their absence costs a
    log line and a cold compile, never an AttributeError."""
    from trainer import COMPILE_CACHE, load_compile_cache, save_compile_cache

    (tmp_path / COMPILE_CACHE).write_bytes(b"artifacts of another process")
    monkeypatch.delattr(torch.compiler, "load_cache_artifacts")
    monkeypatch.delattr(torch.compiler, "save_cache_artifacts")
    lines: list[str] = []
    assert load_compile_cache(tmp_path, lines.append) is False
    assert len(lines) == 1 and "cannot load one; compiling afresh" in lines[0]
    save_compile_cache(tmp_path)
    assert (tmp_path / COMPILE_CACHE).read_bytes() == b"artifacts of another process"
