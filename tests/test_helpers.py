"""The Gaussian maths of the latent groups."""
from __future__ import annotations

import math

import pytest
import torch

from vae_helpers import draw_gaussian_diag_samples, gaussian_analytical_kl


def test_kl_matches_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    ls1, ls2 = 0.5 * torch.randn(6, generator=gen), 0.5 * torch.randn(6, generator=gen)
    analytic = gaussian_analytical_kl(mu1, mu2, ls1, ls2)
    n = 400_000
    torch.manual_seed(1)
    z = draw_gaussian_diag_samples(mu1.expand(n, 6), ls1.expand(n, 6))

    def log_normal(z, mu, logsigma):
        return -0.5 * math.log(2 * math.pi) - logsigma - 0.5 * ((z - mu) / torch.exp(logsigma)) ** 2

    log_ratio = (log_normal(z, mu1, ls1) - log_normal(z, mu2, ls2)).double()
    estimate, stderr = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(n)
    assert torch.all((estimate - analytic.double()).abs() < 5 * stderr + 1e-6)


def test_kl_is_zero_for_equal_and_positive_otherwise():
    mu, ls = torch.randn(100), torch.randn(100)
    assert torch.allclose(gaussian_analytical_kl(mu, mu, ls, ls), torch.zeros(100), atol=1e-6)
    assert torch.all(gaussian_analytical_kl(mu, mu + 0.1, ls, ls) > 0)


def test_samples_have_the_asked_moments():
    torch.manual_seed(0)
    z = draw_gaussian_diag_samples(torch.full((200_000,), 1.5), torch.full((200_000,), math.log(0.5)))
    assert z.mean().item() == pytest.approx(1.5, abs=0.01)
    assert z.std().item() == pytest.approx(0.5, abs=0.01)


def test_seeded_restores_the_mps_generator_too(monkeypatch):
    """On a Mac, torch.manual_seed reseeds the MPS generator as well: seeded must put its state back, or the
    training stream would restart from the same state after every evaluation. A fake MPS generator stands in."""
    import torch

    from utils import seeded

    mps = {"state": torch.tensor([7], dtype=torch.uint8)}
    real_seed = torch.manual_seed

    def manual_seed(seed):
        mps["state"] = torch.tensor([seed % 256], dtype=torch.uint8)
        return real_seed(seed)
    monkeypatch.setattr(torch, "manual_seed", manual_seed)
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda device="mps": mps["state"].clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", lambda state, device="mps": mps.update(state=state.clone()))
    cpu_before = torch.get_rng_state()
    with seeded(torch.device("mps"), 5):
        assert mps["state"].item() == 5
    assert mps["state"].item() == 7 and torch.equal(torch.get_rng_state(), cpu_before)
