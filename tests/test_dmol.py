"""The discretized mixture of logistics: a proper distribution over the pixel levels, sampled exactly."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from vae_helpers import dmol_log_prob, dmol_param_count, dmol_sample


def random_params(channels: int, mixtures: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(1, dmol_param_count(channels, mixtures), 1, 1, generator=gen) * scale
    return p


def all_values(channels: int, levels: int) -> torch.Tensor:
    """Every joint pixel value, as (levels**channels, C, 1, 1) in [-1, 1]."""
    grid = torch.tensor(list(itertools.product(range(levels), repeat=channels)), dtype=torch.float32)
    return (grid * 2.0 / (levels - 1) - 1.0)[:, :, None, None]


@pytest.mark.parametrize("levels", [2, 17, 256])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grey_probabilities_sum_to_one(levels, seed):
    params = random_params(1, 5, seed, scale=2.0)
    x = all_values(1, levels)
    logp = dmol_log_prob(params.expand(len(x), -1, -1, -1), x, levels, 5)
    assert torch.exp(logp.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_rgb_probabilities_sum_to_one_17_levels(seed):
    params = random_params(3, 4, seed, scale=1.5)
    x = all_values(3, 17)  # 4,913 joint values
    logp = dmol_log_prob(params.expand(len(x), -1, -1, -1), x, 17, 4)
    assert torch.exp(logp.double()).sum().item() == pytest.approx(1.0, abs=1e-4)


def test_rgb_probabilities_sum_to_one_256_levels():
    """All 16.7M RGB values at 8 bits, in chunks of 16 red levels."""
    params = random_params(3, 2, seed=3, scale=1.0)
    gb = torch.tensor(list(itertools.product(range(256), repeat=2)), dtype=torch.float32)
    total = 0.0
    for r0 in range(0, 256, 16):
        r = torch.arange(r0, r0 + 16, dtype=torch.float32).repeat_interleave(len(gb))
        grid = torch.cat([r[:, None], gb.repeat(16, 1)], dim=1)
        x = (grid * 2.0 / 255.0 - 1.0)[:, :, None, None]
        total += torch.exp(dmol_log_prob(params.expand(len(x), -1, -1, -1), x, 256, 2).double()).sum().item()
    assert total == pytest.approx(1.0, abs=1e-3)


def test_edge_bins_take_the_tails():
    """A component far below the range puts (almost) all mass on level 0; far above, on the top level."""
    m = 1
    for mean, expected_level in [(-5.0, 0), (5.0, 16)]:
        params = torch.zeros(1, dmol_param_count(1, m), 1, 1)
        params[0, 1] = mean  # the mean slot of the single component
        params[0, 2] = -2.0  # log-scale
        x = all_values(1, 17)
        probs = torch.exp(dmol_log_prob(params.expand(len(x), -1, -1, -1), x, 17, m))
        assert probs[expected_level].item() > 0.999


@pytest.mark.parametrize("shared_noise", [False, True])
@pytest.mark.parametrize("channels,levels,mixtures", [(1, 17, 5), (3, 5, 3)])
def test_sampling_matches_probabilities(channels, levels, mixtures, shared_noise):
    """Chi-square goodness of fit of 200,000 samples against the probabilities dmol_log_prob assigns (with
    shared noise the samples are 200,000 pixels of one image: the noise is shared across images only)."""
    params = random_params(channels, mixtures, seed=7, scale=1.0)
    n = 200_000
    gen = torch.Generator().manual_seed(11)
    if shared_noise:
        samples = dmol_sample(params.expand(1, -1, n, 1), channels, levels, mixtures, gen, shared_noise=True)
        flat = samples[0, :, :, 0].T
    else:
        samples = dmol_sample(params.expand(n, -1, -1, -1), channels, levels, mixtures, generator=gen)
        flat = samples[:, :, 0, 0]
    codes = torch.zeros(n, dtype=torch.long)
    for c in range(channels):
        codes = codes * levels + flat[:, c]
    observed = torch.bincount(codes, minlength=levels ** channels).double().numpy()
    x = all_values(channels, levels)
    probs = torch.exp(dmol_log_prob(params.expand(len(x), -1, -1, -1), x, levels, mixtures).double())
    expected = probs.flatten().numpy() * n
    keep = expected > 5  # chi-square needs enough expected counts per cell; pool the rest
    obs, exp = observed[keep], expected[keep]
    if (~keep).any():
        obs, exp = np.append(obs, observed[~keep].sum()), np.append(exp, expected[~keep].sum())
    exp *= obs.sum() / exp.sum()
    assert chisquare(obs, exp).pvalue > 1e-3


def test_log_prob_is_float32_under_bf16_inputs():
    params = random_params(3, 2, seed=0).bfloat16()
    x = all_values(3, 4)[:5].bfloat16()
    logp = dmol_log_prob(params.expand(5, -1, -1, -1), x, 4, 2)
    assert logp.dtype == torch.float32


def test_shared_noise_gives_equal_images_equal_samples():
    params = random_params(3, 4, seed=1, scale=1.0).expand(1, -1, 6, 6)
    other = random_params(3, 4, seed=2, scale=1.0).expand(1, -1, 6, 6)
    batch = torch.cat([params, other, params])
    gen = torch.Generator().manual_seed(0)
    shared = dmol_sample(batch, 3, 256, 4, gen, shared_noise=True)
    assert torch.equal(shared[0], shared[2]) and not torch.equal(shared[0], shared[1])
    independent = dmol_sample(batch, 3, 256, 4, gen)
    assert not torch.equal(independent[0], independent[2])
