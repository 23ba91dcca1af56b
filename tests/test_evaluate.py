"""Held-out evaluation: the ELBO, the importance-weighted bound, generative classification, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_cli_args, tiny_hps
from data import Split
from evaluate import class_conditional_bpd, evaluate_elbo, importance_weighted_bpd
from vae import VAE


def model_with_informative_posterior(seed: int = 0) -> VAE:
    """A fresh tiny model whose priors and posteriors differ (as after training), so the bounds differ."""
    torch.manual_seed(seed)
    model = VAE(tiny_hps()).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.decoder.dec_blocks:
            for conv in (block.prior.c4, block.enc.c4):
                conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=gen))
    return model


def random_split(n: int, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=gen))


def test_single_draw_importance_weight_is_an_unbiased_elbo():
    """E_q[log p(x,z) - log q(z|x)] (Monte Carlo KL) equals the ELBO with the analytic KL."""
    model = model_with_informative_posterior()
    images, labels = random_split(1).images.expand(4000, -1, -1, -1), torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    log_w = model.log_importance_weights(images, labels).double()
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(images, labels)
    ndims = 64 * math.log(2.0)
    elbo_bpd = out["loss_per_image"].double()
    iw1_bpd = -log_w / ndims
    stderr = math.sqrt(iw1_bpd.var() / len(iw1_bpd) + elbo_bpd.var() / len(elbo_bpd))
    assert abs(iw1_bpd.mean() - elbo_bpd.mean()) < 4 * stderr


def test_iw_bound_with_k1_is_the_elbo_estimate_and_more_draws_are_never_worse():
    model = model_with_informative_posterior()
    split = random_split(24)
    k1 = importance_weighted_bpd(model, split, 1, 64, torch.device("cpu"), seed=0)
    k1_again = importance_weighted_bpd(model, split, 1, 64, torch.device("cpu"), seed=0)
    k20 = importance_weighted_bpd(model, split, 20, 64, torch.device("cpu"), seed=0)
    assert torch.equal(k1, k1_again)  # a fixed seed makes the bound repeatable
    assert k20.mean() < k1.mean()  # the bound tightens (bits/dim fall) with K
    assert (k20 <= k1 + 0.05).float().mean() > 0.9  # and is rarely worse per image, up to noise


def test_generative_classification_on_a_known_toy_case():
    """Class 0 is always black, class 1 always white: after brief training the ELBO tells them apart."""
    torch.manual_seed(0)
    model = VAE(tiny_hps(n_classes=2))
    images = torch.cat([torch.zeros(16, 1, 8, 8), torch.full((16, 1, 8, 8), 255.0)]).to(torch.uint8)
    labels = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(images, labels)["loss_nats"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = class_conditional_bpd(model, Split(images, labels), 64, torch.device("cpu"))
    assert scores.shape == (32, 2)
    assert torch.equal(scores.argmin(dim=1), labels)


def test_evaluate_elbo_leaves_the_callers_rng_alone():
    model = model_with_informative_posterior()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = evaluate_elbo(model, random_split(8), 4, torch.device("cpu"), seed=1)
    assert torch.equal(torch.rand(3), expected)
    second = evaluate_elbo(model, random_split(8), 4, torch.device("cpu"), seed=1)
    assert first["loss"] == second["loss"]
    assert first["loss"] == pytest.approx(first["recon"] + first["kl"], abs=1e-5)


def test_evaluate_cli_writes_every_field(tmp_path):
    run_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_cli_args(run_dir)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", str(run_dir),
                             "--iw_samples", "3", "--n_batch", "120"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generative classification accuracy" in result.stdout
    report = json.loads((run_dir / "eval_test.json").read_text())
    for key in ["bpd", "recon_bpd", "kl_bpd", "kl_per_resolution", "bpd_iw", "iw_samples", "per_class_bpd",
                "gen_class_acc", "confusion", "n_images", "class_names", "checkpoint"]:
        assert key in report, key
    assert report["n_images"] == 360 and sum(map(sum, report["confusion"])) == 360
    assert set(report["kl_per_resolution"]) == {"1", "4", "8"}
    assert report["bpd"] == pytest.approx(report["recon_bpd"] + report["kl_bpd"], abs=1e-4)
    assert len(report["per_class_bpd"]) == 10

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "latest.pt").read_bytes()[:1000])
    for weights, message in [(truncated, "cannot read checkpoint"), (tmp_path / "missing.pt", "does not exist")]:
        bad = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", str(weights)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_figures_do_not_depend_on_the_batch_size_or_the_order_of_batches():
    """Each image's posterior noise comes from (seed, its index): the same --seed gives the same ELBO, IW bound and
    class scores at any --n_batch (the README figure came from one batch of 360, the default batch is 64)."""
    model = model_with_informative_posterior()
    split = random_split(37)
    whole = evaluate_elbo(model, split, 37, torch.device("cpu"), seed=3)
    for batch in (1, 5, 16):
        part = evaluate_elbo(model, split, batch, torch.device("cpu"), seed=3)
        torch.testing.assert_close(part["per_image"], whole["per_image"], rtol=1e-5, atol=1e-5)
        assert abs(part["loss"] - whole["loss"]) < 1e-5
    other_seed = evaluate_elbo(model, split, 37, torch.device("cpu"), seed=4)
    assert not torch.allclose(other_seed["per_image"], whole["per_image"])  # the noise does matter
    iw = [importance_weighted_bpd(model, split, 4, b, torch.device("cpu"), seed=3) for b in (8, 64)]
    torch.testing.assert_close(iw[0], iw[1], rtol=1e-5, atol=1e-5)
    scores = [class_conditional_bpd(model, split, b, torch.device("cpu"), seed=3) for b in (5, 37)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)
