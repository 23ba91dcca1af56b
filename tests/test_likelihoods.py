"""The Bernoulli and discretized Gaussian likelihoods: proper distributions over the pixel levels, exact
samplers, accurate tails; MNIST's padding left out of the likelihood; binarization."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from conftest import tiny_hps
from data import binarize
from vae import VAE
from vae_helpers import (_log_normal_mass, bernoulli_log_prob, discretized_gaussian_log_prob,
                         discretized_gaussian_sample)


def level_grid(levels: int, channels: int = 1) -> torch.Tensor:
    """Every pixel level as a (levels, channels, 1, 1) batch of x values in [-1, 1]."""
    x = torch.arange(levels, dtype=torch.float32) * (2.0 / (levels - 1)) - 1.0
    return x.view(-1, 1, 1, 1).expand(-1, channels, 1, 1)


@pytest.mark.parametrize("levels", [2, 17, 32, 256])
@pytest.mark.parametrize("mean,log_std", [(0.0, 0.0), (0.3, -3.0), (-0.99, -6.5), (2.5, -1.0), (0.1, 2.0)])
def test_discretized_gaussian_sums_to_one_over_the_levels(levels, mean, log_std):
    x = level_grid(levels)
    params = torch.tensor([mean, log_std]).view(1, 2, 1, 1).expand(levels, -1, -1, -1)
    total = torch.exp(discretized_gaussian_log_prob(params, x, levels).double()).sum()
    assert abs(total.item() - 1.0) < 1e-4


def test_fixed_std_gaussian_uses_the_given_std_and_sums_to_one():
    x = level_grid(17)
    params = torch.full((17, 1, 1, 1), 0.2)  # only the mean: the std is fixed
    logp = discretized_gaussian_log_prob(params, x, 17, fixed_std=0.1)
    assert abs(torch.exp(logp.double()).sum().item() - 1.0) < 1e-5
    learned = discretized_gaussian_log_prob(torch.cat([params, torch.full_like(params, math.log(0.1))], 1), x, 17)
    torch.testing.assert_close(logp, learned)


def test_normal_bin_mass_is_accurate_in_both_tails():
    a = torch.tensor([-0.1, 3.0, 8.0, -9.0, 25.0, -30.0])
    b = a + torch.tensor([0.2, 0.01, 0.05, 0.1, 0.001, 0.5])
    # reference in float64 with erfc on the side where it does not cancel
    ad, bd = a.double(), b.double()
    upper = 0.5 * (torch.special.erfc(ad / math.sqrt(2)) - torch.special.erfc(bd / math.sqrt(2)))
    lower = 0.5 * (torch.special.erfc(-bd / math.sqrt(2)) - torch.special.erfc(-ad / math.sqrt(2)))
    ref = torch.log(torch.where(ad + bd > 0, upper, lower))
    finite = torch.isfinite(ref)
    got = _log_normal_mass(a, b).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("levels", [5, 32])
def test_discretized_gaussian_sampling_matches_its_probabilities(levels):
    params = torch.tensor([0.15, math.log(0.4)]).view(1, 2, 1, 1)
    n = 100_000
    samples = discretized_gaussian_sample(params.expand(1, -1, n, 1), 1, levels,
                                          generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(samples.flatten(), minlength=levels).double().numpy()
    probs = torch.exp(discretized_gaussian_log_prob(params.expand(levels, -1, -1, -1), level_grid(levels), levels))
    expected = probs.double().flatten().numpy() * n
    keep = expected > 5
    obs = np.append(observed[keep], observed[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    assert chisquare(obs, exp * obs.sum() / exp.sum()).pvalue > 1e-3


def test_bernoulli_probabilities_of_both_values_sum_to_one():
    logits = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * 3
    ones, zeros = torch.ones(1, 3, 4, 4), -torch.ones(1, 3, 4, 4)
    per_channel = [torch.exp(bernoulli_log_prob(logits[:, c:c + 1], v[:, c:c + 1])) for c in range(3) for v in
                   (ones, zeros)]
    sums = torch.stack(per_channel).view(3, 2, 1, 4, 4).sum(dim=1)
    torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("overrides", [dict(likelihood="bernoulli", pixel_levels=2),
                                       dict(likelihood="gaussian", gaussian_std=0.0),
                                       dict(likelihood="gaussian", gaussian_std=0.05)])
def test_each_likelihood_trains_and_samples(overrides):
    torch.manual_seed(0)
    model = VAE(tiny_hps(**overrides))
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    if overrides["likelihood"] == "bernoulli":
        images = binarize(images, torch.Generator().manual_seed(0))
    out = model(images, torch.arange(6))
    assert torch.isfinite(out["loss"]) and out["loss"] > 0
    out["loss_nats"].backward()
    assert all(p.grad is not None for p in model.decoder.out_net.parameters())
    samples = model.sample(4, torch.arange(4))
    allowed = torch.round(torch.arange(model.H.pixel_levels) * (255.0 / (model.H.pixel_levels - 1)))
    assert torch.isin(samples.float(), allowed).all()


def test_padding_is_left_out_of_the_likelihood_and_of_the_dimension_count():
    torch.manual_seed(0)
    model = VAE(tiny_hps(pad=2))
    px_z = torch.randn(2, model.H.width, 8, 8)
    target = torch.rand(2, 1, 8, 8) * 2 - 1
    changed = target.clone()
    changed[..., :2, :] = -1.0  # only the border
    changed[..., :, -2:] = 1.0
    out_net = model.decoder.out_net
    torch.testing.assert_close(out_net.nll(px_z, changed), out_net.nll(px_z, target))
    assert out_net.scored_dims((1, 8, 8)) == 16.0


def test_binarization_keeps_the_intensity_as_probability_and_shards_like_one_draw():
    images = torch.full((4000, 1, 2, 2), 64, dtype=torch.uint8)
    images[:, :, 0, 0] = 255
    images[:, :, 1, 1] = 0
    b = binarize(images, torch.Generator().manual_seed(0))
    assert set(b.unique().tolist()) <= {0, 255}
    assert (b[:, :, 0, 0] == 255).all() and (b[:, :, 1, 1] == 0).all()
    assert abs((b[:, :, 0, 1] == 255).float().mean().item() - 64 / 255) < 0.02
    whole = binarize(images[:8], torch.Generator().manual_seed(1))
    halves = [binarize(images[:4], torch.Generator().manual_seed(1), shard=(i, 2)) for i in range(2)]
    assert torch.equal(torch.cat(halves), whole)
