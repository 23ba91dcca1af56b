"""The discretized mixture of logistics: a proper distribution over the pixel levels, sampled exactly."""
from __future__ import annotations

import itertools
import math

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


# ---------------------------------------------------------------------------------------------
# An independent float64 reference, written from the definition (Salimans et al. 2017, PixelCNN++) with
# openai/vdvae's parameter layout and constants, against which dmol_log_prob is checked
# ---------------------------------------------------------------------------------------------

EPS32 = 2.0 ** -24  # unit roundoff of float32, in which dmol_log_prob computes


def _log_sigmoid(t: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -t)


def _log_logistic_mass(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """log(sigmoid(hi) - sigmoid(lo)) for lo < hi, accurate in both tails: by symmetry the difference equals
    sigmoid(-lo) - sigmoid(-hi), so it is taken on the side where both terms are small."""
    flip = (lo + hi) > 0
    a, b = np.where(flip, -hi, lo), np.where(flip, -lo, hi)
    log_a, log_b = _log_sigmoid(a), _log_sigmoid(b)
    return log_b + np.log1p(-np.exp(log_a - log_b))


def reference_dmol_log_prob(params: np.ndarray, levels_k: np.ndarray, levels: int, mixtures: int,
                            _approx_width_factor: float = 1.0):
    """log p(pixel) in nats, summed over channels: (B, H, W), in float64, from the definition.

    ``params`` (B, P, H, W): M mixture logits, then for each channel its M means, M log-scales and (RGB only)
    M coefficient slots (tanh). ``levels_k`` (B, C, H, W) holds integer levels k in 0..L-1, x = 2k/(L-1) - 1;
    each level owns [x - 1/(L-1), x + 1/(L-1)], the edge levels take the tails (-inf / +inf). Log-scales are
    clamped below at -7 as in openai/vdvae. A bin whose logistic mass is at most 1e-5 is scored as
    density(x) * bin width (2/(L-1)), i.e. openai/vdvae's log_pdf_mid - log((L-1)/2) (log 127.5 at 256 levels).

    Also returns ``used_approx`` (B, C, M, H, W): where that approximation was used, and ``f32_bound`` (B, H, W):
    a bound on what float32 rounding can change the result by (the rounding of each logistic argument
    (x - mu +- 1/(L-1)) / s, which its log changes with at most slope 1, and of the difference of two sigmoids
    that a bin mass is), so that the comparison can be tight everywhere else.
    ``_approx_width_factor`` deliberately mis-scales the approximation: the test checks such a bug is caught.
    """
    p = np.asarray(params, dtype=np.float64)
    k = np.asarray(levels_k)
    b, c_count, h, w = k.shape
    m = mixtures
    per_channel = 3 if c_count == 3 else 2
    x = 2.0 * k / (levels - 1) - 1.0
    width = 2.0 / (levels - 1)
    logits = p[:, :m]
    log_weights = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    slot = lambda c, part, j: p[:, m + (c * per_channel + part) * m + j]  # noqa: E731 - 0 mean, 1 log-scale, 2 coeff
    log_components = np.zeros((b, m, h, w))
    f32_error = np.zeros((b, m, h, w))
    used_approx = np.zeros((b, c_count, m, h, w), dtype=bool)
    for j in range(m):
        for c in range(c_count):
            mu = slot(c, 0, j)
            if c == 1:  # G's mean moves with the observed R; B's with the observed R and G
                mu = mu + np.tanh(slot(0, 2, j)) * x[:, 0]
            elif c == 2:
                mu = mu + np.tanh(slot(1, 2, j)) * x[:, 0] + np.tanh(slot(2, 2, j)) * x[:, 1]
            log_s = np.maximum(slot(c, 1, j), -7.0)
            s = np.exp(log_s)
            upper, lower = (x[:, c] + width / 2 - mu) / s, (x[:, c] - width / 2 - mu) / s
            bottom, top = k[:, c] == 0, k[:, c] == levels - 1
            log_mass = _log_logistic_mass(lower, upper)
            mass = np.exp(log_mass)
            u = (x[:, c] - mu) / s
            log_density = -u - log_s - 2.0 * np.logaddexp(0.0, -u)  # logistic density of x, in x units
            approx = (mass <= 1e-5) & ~bottom & ~top
            log_bin = np.where(bottom, _log_sigmoid(upper),  # (-inf, x + 1/(L-1)]
                               np.where(top, _log_sigmoid(-lower),  # [x - 1/(L-1), +inf)
                                        np.where(approx, log_density + np.log(width * _approx_width_factor),
                                                 log_mass)))
            log_components[:, j] += log_bin
            used_approx[:, c, j] = approx
            sigmoids = np.exp(_log_sigmoid(upper)) + np.exp(_log_sigmoid(lower))
            difference = np.where(bottom | top | approx, 0.0, sigmoids / np.maximum(mass, 1e-300))
            f32_error[:, j] += 4 * EPS32 * ((np.abs(x[:, c]) + np.abs(mu) + width) / s + difference + 1.0)
    log_p = np.logaddexp.reduce(log_components + log_weights, axis=1)
    return log_p, used_approx, f32_error.max(axis=1)


def _reference_case(channels: int, levels: int, mixtures: int, seed: int):
    """Parameters and levels for 2 images of 6x8 pixels: columns 0, 1 and 2 at level 0, L-1 and L//2 in every
    channel, the rest random; rows 0-2 with log-scales in [-11, -6] (tiny, mostly clamped at -7: bins far from
    the means get a mass below 1e-5), rows 3-5 with log-scales in [-4.5, -0.5]."""
    gen = torch.Generator().manual_seed(seed)
    b, h, w = 2, 6, 8
    per_channel = 3 if channels == 3 else 2
    params = torch.randn(b, dmol_param_count(channels, mixtures), h, w, generator=gen)
    k = torch.randint(0, levels, (b, channels, h, w), generator=gen)
    k[..., 0], k[..., 1], k[..., 2] = 0, levels - 1, levels // 2
    for c in range(channels):
        log_scales = slice(mixtures + (c * per_channel + 1) * mixtures, mixtures + (c * per_channel + 2) * mixtures)
        params[:, log_scales] = torch.rand(b, mixtures, h, w, generator=gen) * 4.0 - 4.5
        params[:, log_scales, :3] = torch.rand(b, mixtures, 3, w, generator=gen) * 5.0 - 11.0
    return params, k


@pytest.mark.parametrize("channels,levels,mixtures", [(1, 256, 3), (1, 17, 4), (3, 256, 3), (3, 17, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_log_prob_matches_an_independent_float64_reference(channels, levels, mixtures, seed):
    """dmol_log_prob (float32) against the float64 reference above, pixel by pixel, at edge, middle and random
    levels, with tiny (clamped) scales that send some bins down the small-probability branch."""
    params, k = _reference_case(channels, levels, mixtures, seed)
    x = k.float() * (2.0 / (levels - 1)) - 1.0  # as VAE.preprocess makes its targets
    got = dmol_log_prob(params, x, levels, mixtures).double().numpy()
    ref, used_approx, f32_bound = reference_dmol_log_prob(params.double().numpy(), k.numpy(), levels, mixtures)
    assert got.shape == ref.shape == (2, 6, 8)
    tolerance = 1e-5 * np.abs(ref) + f32_bound
    worst = np.unravel_index(np.argmax(np.abs(got - ref) - tolerance), ref.shape)
    assert np.all(np.abs(got - ref) <= tolerance), (got[worst], ref[worst], tolerance[worst])

    # what the case covers: both edge levels, clamped log-scales, and pixels whose value the small-probability
    # approximation decides (every mixture component takes it in some channel: its constant shifts the pixel)
    assert (k == 0).any() and (k == levels - 1).any()
    per_channel = 3 if channels == 3 else 2
    log_scales = [mixtures + (c * per_channel + 1) * mixtures + j for c in range(channels) for j in range(mixtures)]
    assert (params[:, log_scales] < -7.0).any()  # clamped
    decisive = used_approx.any(axis=1).all(axis=1)  # (B, H, W)
    assert decisive.sum() >= 5, decisive.sum()
    # ... and the tolerance is tight enough to catch a factor of 2 in that constant (log(L-1) for log((L-1)/2))
    wrong, _, _ = reference_dmol_log_prob(params.double().numpy(), k.numpy(), levels, mixtures,
                                          _approx_width_factor=0.5)
    assert np.all(np.abs(got - wrong)[decisive] > tolerance[decisive])
    assert np.all(tolerance[decisive] < 0.2 * math.log(2.0))


def test_output_net_nll_is_the_per_image_sum_of_the_reference(tiny):
    """The model's reconstruction term: minus the reference log-probability summed over each image, in nats."""
    from vae import OutputNet

    params, k = _reference_case(1, 17, 3, seed=5)
    net = OutputNet(tiny())  # digits: 1 channel, 17 levels, 3 mixtures
    net.out_conv = torch.nn.Identity()  # feed the DMOL parameters straight in
    nll = net.nll(params, k.float() * (2.0 / 16) - 1.0).double().numpy()
    ref, _, f32_bound = reference_dmol_log_prob(params.double().numpy(), k.numpy(), 17, 3)
    assert nll.shape == (2,)
    np.testing.assert_allclose(nll, -ref.sum(axis=(1, 2)), rtol=1e-5, atol=f32_bound.sum())
