"""The latent-use diagnostic (Efficient-VDVAE's share of active latent channels): exact on a model whose groups are
known to be on or off, consistent with the ELBO's KL per group, printed and written by evaluate.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import run, tiny_hps
from data import Split
from evaluate import format_table
from models import build_model
from scoring import ACTIVE_LATENT_THRESHOLD, active_latents, channel_kl_sums, evaluate_elbo

CPU = torch.device("cpu")

# (group, channel) -> the posterior mean's bias, with prior N(0, 1) and posterior N(bias, 1): KL = bias^2 / 2 nats
# per dimension. The tiny model's groups are 1x1, 4x4, 4x4, 8x8, 8x8, of 4 channels each.
MEAN_BIASES = {(0, 0): 1.0, (0, 1): 1.0,  # 0.5 nats: active
               (1, 2): 1e-3,  # 5e-7 nats: on, but below the threshold
               (1, 3): 0.02,  # 2e-4 nats: just above it
               (3, 0): 1.0, **{(4, c): 1.0 for c in range(4)}}  # group 2: every channel's posterior is its prior


def random_split(n: int, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=gen))


def model_with_known_groups():
    """A tiny VDVAE whose every prior is N(0, 1) and whose posteriors are N(MEAN_BIASES, 1) whatever the image: the
    last conv of each block's prior and posterior nets is zeroed (its outputs are the means and log-sigmas, then the
    prior's feature for the state), then the chosen posterior means get a bias."""
    torch.manual_seed(0)
    model = build_model(tiny_hps()).eval()
    with torch.no_grad():
        for block in model.decoder.dec_blocks:
            for conv in (block.enc.c4, block.prior.c4):
                conv.weight.zero_()
                conv.bias.zero_()
        for (group, channel), bias in MEAN_BIASES.items():
            model.decoder.dec_blocks[group].enc.c4.bias[channel] = bias  # rows :zdim are the mean
    return model


def test_active_latents_of_a_model_with_known_groups():
    model = model_with_known_groups()
    assert [(b.base, b.zdim) for b in model.decoder.dec_blocks] == [(1, 4), (4, 4), (4, 4), (8, 4), (8, 4)]
    elbo = evaluate_elbo(model, random_split(10), 4, CPU, seed=1, per_channel=True)
    expected = torch.zeros(5, 4, dtype=torch.float64)
    for (group, channel), bias in MEAN_BIASES.items():
        expected[group, channel] = bias ** 2 / 2
    # (the float32 KL, 0.5 * (1 + mu^2) - 0.5, is exact to about 6e-8 nats)
    torch.testing.assert_close(torch.stack(elbo["kl_per_channel"]), expected, rtol=1e-5, atol=1e-7)
    assert all(kl.dtype == torch.float64 and kl.shape == (4,) for kl in elbo["kl_per_channel"])
    assert elbo["kl_per_channel"][2].abs().max() == 0  # the posterior is the prior exactly

    report = active_latents(model, elbo["kl_per_channel"])
    assert report == {"threshold_nats": ACTIVE_LATENT_THRESHOLD, "share": 8 / 20, "active": 8, "channels": 20,
                      "per_resolution": {"1": {"share": 2 / 4, "active": 2, "channels": 4},
                                         "4": {"share": 1 / 8, "active": 1, "channels": 8},
                                         "8": {"share": 5 / 8, "active": 5, "channels": 8}}}
    assert list(report["per_resolution"]) == ["1", "4", "8"]  # coarse to fine
    assert active_latents(model, elbo["kl_per_channel"], threshold=1e-7)["active"] == 9  # the 5e-7 channel too
    assert active_latents(model, elbo["kl_per_channel"], threshold=0.5)["active"] == 0  # strictly above

    line = [ln for ln in format_table(fake_report(report)).splitlines() if ln.strip().startswith("active latents:")]
    assert line == ["  active latents: 40.0% of 20 channels (8) above 1e-04 nats; at 1x1 50.0% (2/4), "
                    "at 4x4 12.5% (1/8), at 8x8 62.5% (5/8)"]


def fake_report(active: dict | None) -> dict:
    """The fields evaluate.py's table reads, around an ``active_latents`` entry (none: a family without groups)."""
    r = {"dataset": "digits", "split": "test", "n_images": 10, "weights": "ema", "terms": ["neg. ELBO", "recon", "KL"],
         "bpd": 1.0, "recon_bpd": 0.5, "kl_bpd": 0.5, "kl_per_resolution": {"z": 0.5}, "iw_samples": 1,
         "bpd_iw": 1.0, "nats_per_image": 44.0}
    return r if active is None else {**r, "active_latents": active}


def test_the_channels_kl_adds_up_to_the_elbos_kl_per_group():
    """Summed over a group's channels and positions, the per-channel KL is the group's KL of the ELBO (bits/dim of
    the image there), at any batch size; asking for it changes no other figure."""
    torch.manual_seed(0)
    model = build_model(tiny_hps()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # priors and posteriors that differ, as after training
        for block in model.decoder.dec_blocks:
            for conv in (block.prior.c4, block.enc.c4):
                conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=gen))
    model.train()
    split = random_split(13)
    to_bits = model.scored_dims(split.images.shape[1:]) * math.log(2.0)
    for batch in (5, 13):
        plain = evaluate_elbo(model, split, batch, CPU, seed=2)
        assert model.training  # evaluation restores the training mode
        elbo = evaluate_elbo(model, split, batch, CPU, seed=2, per_channel=True)
        assert model.training
        for kl, group_bpd, (c, h, w) in zip(elbo["kl_per_channel"], plain["kl_groups"], model.latent_shapes()):
            assert kl.shape == (c,) and (kl > 0).all()
            assert kl.sum().item() * h * w / to_bits == pytest.approx(group_bpd, rel=1e-5)
        assert elbo["loss"] == plain["loss"] and elbo["kl_groups"] == plain["kl_groups"]
        torch.testing.assert_close(elbo["per_image"], plain["per_image"])
    for block in model.decoder.dec_blocks:  # the hooks are gone
        assert not block._forward_hooks


def test_families_without_groups_have_no_channel_kl():
    model = build_model(tiny_hps(model="cvae", conv_width=8, made_hidden=32))
    assert "groups" not in model.abilities
    with pytest.raises(ValueError, match="no latent groups"):
        with channel_kl_sums(model):
            pass
    assert "active latents" not in format_table(fake_report(None))


def test_evaluate_cli_prints_and_writes_the_active_latents(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "eval.json"
    result = run("evaluate.py", "--weights", str(run_dir), "--no_classify", "--n_batch", "180", "--out", str(out),
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [ln.strip() for ln in result.stdout.splitlines() if ln.strip().startswith("active latents:")]
    assert len(lines) == 1, result.stdout
    print(lines[0])
    report = json.loads(out.read_text())["active_latents"]
    assert report["threshold_nats"] == 1e-4 and report["channels"] == 20
    assert list(report["per_resolution"]) == ["1", "4", "8"]
    assert sum(v["active"] for v in report["per_resolution"].values()) == report["active"]
    assert report["share"] == report["active"] / report["channels"]
    assert f"{report['share']:.1%} of 20 channels ({report['active']})" in lines[0]
