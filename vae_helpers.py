"""Building blocks and probability maths of the VDVAE: residual blocks, per-resolution widths,
Gaussian KL and sampling, and the discretized mixture of logistics (DMOL) likelihood.

All likelihood and KL maths runs in float32, even when the caller is under autocast.
"""
from __future__ import annotations

import contextlib

import math
from collections import defaultdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from hps import Hyperparams, parse_resolution_map

# ---------------------------------------------------------------------------------------------
# Per-resolution widths
# ---------------------------------------------------------------------------------------------


def get_width_settings(width: int, custom: str) -> dict[int, int]:
    """Width per resolution: ``width`` everywhere unless ``custom`` (e.g. ``512:32,256:64``) says otherwise."""
    mapping: dict[int, int] = defaultdict(lambda: width)
    mapping.update(parse_resolution_map(custom, int))
    return mapping


def get_bottleneck_settings(multiple: float, custom: str) -> dict[int, float]:
    """Bottleneck multiple per resolution: ``multiple`` everywhere unless ``custom`` (e.g. ``32:1.0,16:0.5``,
    Efficient-VDVAE's narrow high resolutions with wide bottlenecks) says otherwise."""
    mapping: dict[int, float] = defaultdict(lambda: multiple)
    mapping.update(parse_resolution_map(custom, float))
    return mapping


# ---------------------------------------------------------------------------------------------
# Convolutions and the residual bottleneck block
# ---------------------------------------------------------------------------------------------


def get_conv(in_dim: int, out_dim: int, kernel_size: int, zero_weights: bool = False) -> nn.Conv2d:
    """A same-padded convolution with zero bias (and optionally zero weights), as in VDVAE."""
    conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2)
    nn.init.zeros_(conv.bias)
    if zero_weights:
        nn.init.zeros_(conv.weight)
    return conv


class GeluConv(torch.autograd.Function):
    """conv2d(gelu(cat(xs))) that keeps only the inputs ``xs`` for the backward pass.

    Plain autograd would keep both gelu's input and its output (the conv's input); recomputing the cheap
    GELU in the backward pass halves what a block holds, and taking the inputs as a list lets the posterior
    network read [state, encoder activation] without storing their concatenation.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, bias: torch.Tensor, padding: int, *xs: torch.Tensor) -> torch.Tensor:
        g = F.gelu(xs[0]) if len(xs) == 1 else torch.cat([F.gelu(x) for x in xs], dim=1)
        out = F.conv2d(g, weight, bias, padding=padding)  # under autocast this runs in the autocast dtype
        ctx.save_for_backward(weight, *xs)
        ctx.padding = padding
        ctx.compute_dtype = out.dtype
        ctx.bias_dtype = bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight, *xs = ctx.saved_tensors
        dtype = ctx.compute_dtype
        g = torch.cat([F.gelu(x).to(dtype) for x in xs], dim=1)
        grad_g, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out.to(dtype), g, weight.to(dtype), [weight.shape[0]], [1, 1], [ctx.padding] * 2, [1, 1],
            False, [0, 0], 1, [any(ctx.needs_input_grad[3:]), ctx.needs_input_grad[0], ctx.needs_input_grad[1]])
        grad_xs = [None] * len(xs)
        if grad_g is not None:
            pieces = grad_g.split([x.shape[1] for x in xs], dim=1)
            grad_xs = [torch.ops.aten.gelu_backward(p.to(x.dtype), x) for p, x in zip(pieces, xs)]
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(ctx.bias_dtype) if grad_b is not None else None
        return (grad_w, grad_b, None, *grad_xs)


def without_autocast(device_type: str):
    """A region that runs in the tensors' own precision even inside an autocast region (a no-op context on devices
    without autocast, such as the meta device that measures activation memory)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def gelu_conv(conv: nn.Conv2d, xs: list[torch.Tensor], recompute_gelu: bool) -> torch.Tensor:
    """conv(gelu(cat(xs))); with ``recompute_gelu`` (while training) through the memory-saving GeluConv."""
    if recompute_gelu and torch.is_grad_enabled():
        return GeluConv.apply(conv.weight, conv.bias, conv.padding[0], *xs)
    g = F.gelu(xs[0]) if len(xs) == 1 else torch.cat([F.gelu(x) for x in xs], dim=1)
    return conv(g)


class Block(nn.Module):
    """Bottleneck block: GELU then conv, four times (1x1, 3x3, 3x3, 1x1), optional residual and pooling.

    The 3x3 convs become 1x1 at resolutions <= 2, where a 3x3 kernel would mostly see padding. The input
    may be a list of tensors, read as their concatenation along channels.
    """

    def __init__(self, in_width: int, middle_width: int, out_width: int, down_rate: int | None = None,
                 residual: bool = False, use_3x3: bool = True, zero_last: bool = False):
        super().__init__()
        self.down_rate = down_rate
        self.residual = residual
        self.recompute_gelu = False  # set by the model for --grad_checkpoint gelu
        self.fp32_last = False  # set by the model for heads whose outputs parameterise distributions
        k = 3 if use_3x3 else 1
        self.c1 = get_conv(in_width, middle_width, 1)
        self.c2 = get_conv(middle_width, middle_width, k)
        self.c3 = get_conv(middle_width, middle_width, k)
        self.c4 = get_conv(middle_width, out_width, 1, zero_weights=zero_last)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        xs = x if isinstance(x, (list, tuple)) else [x]
        h = xs
        for conv in (self.c1, self.c2, self.c3):
            h = [gelu_conv(conv, h, self.recompute_gelu)]
        if self.fp32_last:  # a cheap 1x1 conv whose outputs are means and log-scales: fp32 even under autocast
            with without_autocast(h[0].device.type):
                h = [gelu_conv(self.c4, [h[0].float()], self.recompute_gelu)]
        else:
            h = [gelu_conv(self.c4, h, self.recompute_gelu)]
        out = xs[0] + h[0] if self.residual else h[0]
        if self.down_rate is not None:
            out = F.avg_pool2d(out, kernel_size=self.down_rate, stride=self.down_rate)
        return out


# ---------------------------------------------------------------------------------------------
# Data scaling, shared by every model family so that all of them see the same inputs and score the same levels
# ---------------------------------------------------------------------------------------------


def preprocess_images(H: "Hyperparams", images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B, C, H, W) in 0..255 -> (encoder input, likelihood target in [-1, 1]).

    The encoder input is ``(x + data_shift) * data_scale``; the target is x rounded to the grid of
    ``H.pixel_levels`` levels and mapped to [-1, 1] (the level grid every likelihood scores).
    """
    x = images.float()
    enc_in = (x + H.data_shift) * H.data_scale
    if H.vdvae_5bit:  # openai/vdvae's FFHQ-256: 8 * floor(x / 8), scaled as 8-bit data (top level 0.945)
        return enc_in, torch.floor(x / 8.0) * (8.0 / 127.5) - 1.0
    levels = H.pixel_levels - 1
    target = torch.round(x * (levels / 255.0)) * (2.0 / levels) - 1.0
    return enc_in, target


def levels_to_uint8(H: "Hyperparams", levels: torch.Tensor) -> torch.Tensor:
    """Integer pixel levels 0..L-1 -> uint8 0..255 for display and saving."""
    return torch.round(levels.float() * (255.0 / (H.pixel_levels - 1))).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Diagonal Gaussians, parameterised by mean and log standard deviation
# ---------------------------------------------------------------------------------------------


# Efficient-VDVAE's softplus standard deviations: sigma = softplus(beta x) / beta with beta = ln 2, so that sigma is 1
# at x = 0 (as exp(x) is) while growing linearly, not exponentially, in large x: their "gradient smoothing"
SOFTPLUS_BETA = math.log(2.0)
_SOFTPLUS_LINEAR_BELOW = -20.0  # log(softplus(y)) = y + log(1 - e^y/2 + ...) equals y to float precision below this


def log_std_of(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """The log standard deviation (or log scale) a network output ``raw`` stands for under ``kind``: exp (the output
    is the log itself, openai/vdvae) or softplus (log(softplus(ln2 raw) / ln2), Efficient-VDVAE). Every density,
    draw and KL then reads the log, so both parameterisations share one exact maths. The softplus branch is
    computed stably: far below zero, where softplus underflows, its log is linear."""
    if kind == "exp":
        return raw
    y = raw.float() * SOFTPLUS_BETA
    # the clamp keeps the unused branch finite, so that torch.where's gradient is not 0 * inf there
    log_softplus = torch.log(F.softplus(y.clamp(min=_SOFTPLUS_LINEAR_BELOW)))
    return (torch.where(y < _SOFTPLUS_LINEAR_BELOW, y, log_softplus) - math.log(SOFTPLUS_BETA)).to(raw.dtype)


def gaussian_analytical_kl(mu1: torch.Tensor, mu2: torch.Tensor, logsigma1: torch.Tensor,
                           logsigma2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL( N(mu1, sigma1^2) || N(mu2, sigma2^2) ) in nats, computed in float32.

    KL = log(s2/s1) + (s1^2 + (mu1-mu2)^2) / (2 s2^2) - 1/2  (the closed form used by the ELBO, eq. 2-3
    of Child 2020, with q the posterior and p the prior of each latent group).
    """
    mu1, mu2, logsigma1, logsigma2 = (t.float() for t in (mu1, mu2, logsigma1, logsigma2))
    return (-0.5 + logsigma2 - logsigma1
            + 0.5 * (torch.exp(2 * logsigma1) + (mu1 - mu2) ** 2) * torch.exp(-2 * logsigma2))


def gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logsigma: torch.Tensor) -> torch.Tensor:
    """Elementwise log N(z; mu, sigma^2) in nats, computed in float32."""
    z, mu, logsigma = z.float(), mu.float(), logsigma.float()
    return -0.5 * math.log(2 * math.pi) - logsigma - 0.5 * ((z - mu) * torch.exp(-logsigma)) ** 2


def label_weights(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Class labels as class weights (B, n_classes) in float32: a one-hot of class indices (B,), float labels as
    given (multi-hot attributes, weights that mix classes, or all zeros: the null label of --label_dropout)."""
    if labels.is_floating_point():
        if labels.dim() != 2 or labels.shape[1] != n_classes:
            raise ValueError(f"float labels must have shape (B, {n_classes}), got {tuple(labels.shape)}")
        return labels.float()
    # a comparison rather than F.one_hot: it also runs on the meta device (activation-memory measurement)
    return (labels.reshape(-1, 1) == torch.arange(n_classes, device=labels.device)).float()


def guides(w: float | torch.Tensor) -> bool:
    """Whether guidance scale ``w`` guides: a number when it is > 0; a 0-dim tensor always. The compiled sampler
    (sampling.py) hands its scale as a tensor, only when it guides, so that torch.compile reads its value as data
    and one graph serves every scale (a float is a constant to the graph: each new value would recompile)."""
    return isinstance(w, torch.Tensor) or w > 0


# Where the guided target's precision falls below this share of the conditional's, the dimension falls back to
# guiding the mean only. At 1 the guided prior is never wider than the conditional (a wider one draws latents neither
# prior gives, which the decoder was never trained on: NaN samples of the Fashion-MNIST model at w = 1, where the
# exact product's precision was 0.53 of the conditional's), and the two rules agree where they meet (equal
# precisions give the same mean and sigma), so the guided prior is continuous in the priors' parameters.
GUIDANCE_PRECISION_FLOOR = 1.0


def guided_gaussian(mu_c: torch.Tensor, logsigma_c: torch.Tensor, mu_u: torch.Tensor, logsigma_u: torch.Tensor,
                    w: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Classifier-free guidance of a diagonal Gaussian prior, per dimension, in float32: the target
    p(z|y)^(1+w) / p(z)^w for the conditional N(mu_c, s_c^2) and the unconditional N(mu_u, s_u^2).

    It is Gaussian with precision l = (1+w)/s_c^2 - w/s_u^2 and mean ((1+w) mu_c/s_c^2 - w mu_u/s_u^2) / l where l
    is positive. Where l < GUIDANCE_PRECISION_FLOOR / s_c^2, that is where the conditional is wider than the
    unconditional (s_c > s_u, for any w > 0), the product is wider than the conditional (and no distribution at all
    when l <= 0), so the dimension guides the mean only: (1+w) mu_c - w mu_u with the conditional's s_c, bounded
    for any w. Returns (mean, log sigma, fell_back), the last a bool map of the dimensions that used the fallback."""
    mu_c, logsigma_c, mu_u, logsigma_u = (t.float() for t in (mu_c, logsigma_c, mu_u, logsigma_u))
    precision_c, precision_u = torch.exp(-2 * logsigma_c), torch.exp(-2 * logsigma_u)
    precision = (1 + w) * precision_c - w * precision_u
    fell_back = precision < GUIDANCE_PRECISION_FLOOR * precision_c
    safe = torch.where(fell_back, precision_c, precision)  # no division by a precision near zero, even unused
    mean = torch.where(fell_back, (1 + w) * mu_c - w * mu_u,
                       ((1 + w) * mu_c * precision_c - w * mu_u * precision_u) / safe)
    logsigma = torch.where(fell_back, logsigma_c, -0.5 * torch.log(safe))
    return mean, logsigma, fell_back


def draw_gaussian_diag_samples(mu: torch.Tensor, logsigma: torch.Tensor, noise: torch.Tensor | None = None,
                               shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Reparameterised sample mu + sigma * eps; ``noise`` supplies eps when the caller fixes it.

    With ``shard = (index, count)`` the batch is one slice of a global batch of ``count`` such slices (one per
    rank and accumulation pass): eps is drawn for the whole global batch (same RNG state on every rank and pass)
    and sliced, so the ranks and passes together draw what one process with the global batch would. ``index`` may
    be a 0-dim integer tensor (the trainer's, updated in place), so torch.compile need not specialise on it."""
    if noise is None:
        index, count = shard
        # randn in the logical (contiguous) layout: the same seed gives the same draws in any memory format
        if count == 1:
            eps = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype)
        else:  # rows index*b .. (index+1)*b of the global draw; a tensor index keeps one compiled graph for all
            eps = torch.randn((count, *mu.shape), device=mu.device, dtype=mu.dtype)
            # index_select with a device tensor: plain indexing would read the index back to the host every pass
            eps = eps[index] if isinstance(index, int) else eps.index_select(0, index.reshape(1))[0]
    else:
        eps = noise.to(mu.dtype)
    return torch.exp(logsigma) * eps + mu


# ---------------------------------------------------------------------------------------------
# Discretized mixture of logistics (Salimans et al. 2017, PixelCNN++), over L pixel levels
# ---------------------------------------------------------------------------------------------
#
# Pixel values are levels k = 0..L-1 mapped to x = 2k/(L-1) - 1 in [-1, 1]; each level owns the bin
# [x - 1/(L-1), x + 1/(L-1)], and the two edge bins extend to -inf and +inf so the L probabilities sum to 1.
# For three channels the means of G and B depend linearly on the (observed) values of the channels before
# them, with coefficients through tanh. The parameter layout matches openai/vdvae for 3 channels: the
# mixture logits, then for each channel in turn its means, log-scales and one coefficient slot.

LOG_SCALE_MIN = -7.0


def dmol_param_count(channels: int, num_mixtures: int) -> int:
    """Channels the output conv must produce: logits plus means and log-scales (and coefficients for RGB)."""
    _check_channels(channels)
    return num_mixtures * (10 if channels == 3 else 3)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"DMOL supports 1 or 3 image channels, got {channels}")


def _split_dmol_params(params: torch.Tensor, channels: int, num_mixtures: int, scale: str = "exp"):
    """Split (B, P, H, W) output-conv activations into logits (B,M,H,W) and per-channel (B,C,M,H,W) parts; the
    log-scales through ``scale`` (log_std_of), floored at LOG_SCALE_MIN."""
    _check_channels(channels)
    b, _, h, w = params.shape
    m = num_mixtures
    logits = params[:, :m]
    per_channel = 3 if channels == 3 else 2
    rest = params[:, m:].reshape(b, channels, per_channel, m, h, w)
    means = rest[:, :, 0]
    log_scales = log_std_of(rest[:, :, 1], scale).clamp(min=LOG_SCALE_MIN)
    coeffs = torch.tanh(rest[:, :, 2]) if channels == 3 else None
    return logits, means, log_scales, coeffs


def _channel_means(means: torch.Tensor, coeffs: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """Means of each channel given the observed values x (B,C,H,W) of the channels before it."""
    if coeffs is None:
        return means
    x = x.unsqueeze(2)  # (B, C, 1, H, W) broadcast over mixtures
    m_r = means[:, 0]
    m_g = means[:, 1] + coeffs[:, 0] * x[:, 0]
    m_b = means[:, 2] + coeffs[:, 1] * x[:, 0] + coeffs[:, 2] * x[:, 1]
    return torch.stack([m_r, m_g, m_b], dim=1)


def dmol_log_prob(params: torch.Tensor, x: torch.Tensor, levels: int, num_mixtures: int,
                  scale: str = "exp") -> torch.Tensor:
    """Log-probability in nats of each pixel (summed over channels): shape (B, H, W).

    ``x`` holds values in [-1, 1] on the grid of ``levels`` levels, shape (B, C, H, W); ``scale``: how the
    log-scales come from their parameters (log_std_of).
    """
    params, x = params.float(), x.float()
    channels = x.shape[1]
    logits, means, log_scales, coeffs = _split_dmol_params(params, channels, num_mixtures, scale)
    means = _channel_means(means, coeffs, x)
    half_bin = 1.0 / (levels - 1)
    centered = x.unsqueeze(2) - means
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (centered + half_bin)
    min_in = inv_s * (centered - half_bin)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log sigmoid(plus_in): mass of the lowest (open) bin
    log_one_minus_cdf_min = -F.softplus(min_in)  # log (1 - sigmoid(min_in)): mass of the highest bin
    mid_in = inv_s * centered
    # When the bin mass underflows, approximate it by density * bin width (width 2/(L-1) in x-space).
    log_pdf_mid = mid_in - log_scales - 2.0 * F.softplus(mid_in)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                          log_pdf_mid - math.log((levels - 1) / 2.0))
    xe = x.unsqueeze(2)
    log_bin = torch.where(xe < -1.0 + half_bin, log_cdf_plus,
                          torch.where(xe > 1.0 - half_bin, log_one_minus_cdf_min, log_mid))
    log_joint = log_bin.sum(dim=1) + torch.log_softmax(logits, dim=1)  # (B, M, H, W)
    return torch.logsumexp(log_joint, dim=1)


def dmol_sample(params: torch.Tensor, channels: int, levels: int, num_mixtures: int,
                generator: torch.Generator | None = None, shared_noise: bool = False,
                scale: str = "exp") -> torch.Tensor:
    """Exact sample from the DMOL: integer levels 0..L-1 of shape (B, C, H, W).

    A mixture component is drawn per pixel, then each channel is drawn from its logistic and rounded to the
    nearest level (edge bins absorb the tails), conditioning later channels on the rounded values, which is
    exactly the distribution ``dmol_log_prob`` scores. ``shared_noise`` uses the same uniform draws for every
    image of the batch (each still an exact sample), so that images differ only where their parameters do:
    interpolations and latent explorations then change smoothly. ``scale``: as for dmol_log_prob.
    """
    params = params.float()
    logits, means, log_scales, coeffs = _split_dmol_params(params, channels, num_mixtures, scale)
    b, m, h, w = logits.shape
    probs = torch.softmax(logits, dim=1)
    if shared_noise:  # inverse-CDF choice of the component from one uniform per pixel, shared by the batch
        u_k = torch.rand((1, 1, h, w), generator=generator, device=probs.device)
        k = (probs.cumsum(dim=1) < u_k).sum(dim=1).clamp(max=m - 1).reshape(b, 1, 1, h, w)
    else:
        probs = probs.permute(0, 2, 3, 1).reshape(-1, m)
        k = torch.multinomial(probs, 1, generator=generator).reshape(b, 1, 1, h, w)
    pick = lambda t: t.gather(2, k.expand(b, t.shape[1], 1, h, w)).squeeze(2)  # noqa: E731
    mu, log_s = pick(means), pick(log_scales)
    co = pick(coeffs) if coeffs is not None else None
    u_shape = (1, *mu.shape[1:]) if shared_noise else mu.shape
    u = torch.rand(u_shape, generator=generator, device=mu.device).clamp(1e-5, 1.0 - 1e-5)
    noise = torch.log(u) - torch.log1p(-u)  # standard logistic
    out = torch.empty_like(mu)
    for c in range(channels):
        mean_c = mu[:, c]
        if c >= 1:
            mean_c = mean_c + co[:, 0 if c == 1 else 1] * out[:, 0]
        if c == 2:
            mean_c = mean_c + co[:, 2] * out[:, 1]
        x_c = mean_c + torch.exp(log_s[:, c]) * noise[:, c]
        level = torch.round((x_c + 1.0) * (levels - 1) / 2.0).clamp(0, levels - 1)
        out[:, c] = level * (2.0 / (levels - 1)) - 1.0
    return torch.round((out + 1.0) * (levels - 1) / 2.0).long()


# ---------------------------------------------------------------------------------------------
# Other output likelihoods over the same pixel levels: Bernoulli (binarized data) and a discretized Gaussian
# ---------------------------------------------------------------------------------------------
#
# Both score the level grid of the DMOL above (x = 2k/(L-1) - 1), so every likelihood gives a proper
# distribution over the L levels and bits/dim figures compare across them (hps.LIKELIHOODS names them).


def likelihood_param_count(kind: str, channels: int, num_mixtures: int, learned_std: bool = True) -> int:
    """Channels the output conv produces for ``kind``."""
    if kind == "dmol":
        return dmol_param_count(channels, num_mixtures)
    if kind == "bernoulli":
        return channels  # one logit per channel
    return channels * (2 if learned_std else 1)  # mean (and log-std) per channel


def bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log-probability in nats of binary pixels ``x`` in {-1, 1} (summed over channels): shape (B, H, W)."""
    bits = (x.float() > 0).float()
    return -F.binary_cross_entropy_with_logits(logits.float(), bits, reduction="none").sum(dim=1)


def bernoulli_sample(logits: torch.Tensor, generator: torch.Generator | None = None,
                     shared_noise: bool = False) -> torch.Tensor:
    """Levels 0/1 of shape (B, C, H, W); ``shared_noise``: the same uniforms for every image (see dmol_sample)."""
    logits = logits.float()
    shape = (1, *logits.shape[1:]) if shared_noise else logits.shape
    u = torch.rand(shape, generator=generator, device=logits.device)
    return (u < torch.sigmoid(logits)).long()


def _gaussian_params(params: torch.Tensor, channels: int, fixed_std: float) -> tuple[torch.Tensor, torch.Tensor]:
    params = params.float()
    mean = params[:, :channels]
    if fixed_std > 0:
        return mean, torch.full_like(mean, math.log(fixed_std))
    return mean, params[:, channels:2 * channels].clamp(min=LOG_SCALE_MIN)


def _log_normal_mass(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails: by symmetry Phi(b) - Phi(a) = Phi(-a) - Phi(-b),
    so it is computed on the side where both CDF values are small and their difference keeps its digits."""
    flip = (a + b) > 0
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1((log_lo - log_hi).clamp(max=-1e-12)))


def discretized_gaussian_log_prob(params: torch.Tensor, x: torch.Tensor, levels: int,
                                  fixed_std: float = 0.0) -> torch.Tensor:
    """Discretized Gaussian log-probability in nats (summed over channels): shape (B, H, W).

    Each level owns the bin [x - 1/(L-1), x + 1/(L-1)] and the edge bins extend to -inf and +inf, as for the
    DMOL. ``fixed_std`` > 0 fixes the standard deviation (in the [-1, 1] scale); 0 means it is learned."""
    x = x.float()
    mean, log_std = _gaussian_params(params, x.shape[1], fixed_std)
    half_bin = 1.0 / (levels - 1)
    inv_std = torch.exp(-log_std)
    upper, lower = (x - mean + half_bin) * inv_std, (x - mean - half_bin) * inv_std
    log_bin = torch.where(x < -1.0 + half_bin, torch.special.log_ndtr(upper),
                          torch.where(x > 1.0 - half_bin, torch.special.log_ndtr(-lower),
                                      _log_normal_mass(lower, upper)))
    return log_bin.sum(dim=1)


def discretized_gaussian_sample(params: torch.Tensor, channels: int, levels: int, fixed_std: float = 0.0,
                                 generator: torch.Generator | None = None,
                                 shared_noise: bool = False) -> torch.Tensor:
    """Exact sample of the discretized Gaussian: integer levels 0..L-1 of shape (B, C, H, W)."""
    mean, log_std = _gaussian_params(params, channels, fixed_std)
    shape = (1, *mean.shape[1:]) if shared_noise else mean.shape
    value = mean + torch.exp(log_std) * torch.randn(shape, generator=generator, device=mean.device)
    return torch.round((value + 1.0) * (levels - 1) / 2.0).clamp(0, levels - 1).long()


def elbo_report(recon_nats: torch.Tensor, kl_groups_nats: torch.Tensor, ndims: float) -> dict[str, torch.Tensor]:
    """The loss dict every model family returns, from per-image reconstruction nats (B,) and per-group KL nats
    (B, G) over ``ndims`` scored dimensions: batch means of the negative ELBO (``loss_nats`` for the optimiser,
    ``loss``, ``recon`` and ``kl`` in bits/dim), the per-image ``loss_per_image`` and the per-group ``kl_groups``
    (bits/dim)."""
    kl_nats = kl_groups_nats.sum(dim=1)
    loss_nats = (recon_nats + kl_nats) / ndims
    to_bits = 1.0 / (ndims * math.log(2.0))
    return {
        "loss_nats": loss_nats.mean(),
        "loss": loss_nats.mean() / math.log(2.0),
        "recon": (recon_nats * to_bits).mean(),
        "kl": (kl_nats * to_bits).mean(),
        "loss_per_image": loss_nats / math.log(2.0),
        "kl_groups": (kl_groups_nats * to_bits).mean(dim=0),
    }

