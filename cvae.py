"""Two single-latent model families on the VDVAE's pipeline: the conditional VAE and the VLAE.

``cvae`` (Sohn et al. 2015, "Learning Structured Output Representation using Deep Conditional Generative
Models", in the convolutional form most VAE codebases ship): a strided-conv encoder maps the image (and the
class) to a diagonal Gaussian posterior q(z | x, y) over ONE latent vector z of ``H.zdim`` dimensions; a
decoder maps [z, y] back to image-sized features that the project's likelihood head (vae.OutputNet: DMOL,
Bernoulli or discretized Gaussian) scores. The prior is N(0, I), so the KL is analytic.

``vlae`` (Chen et al. 2017, "Variational Lossy Autoencoder", its autoregressive-flow prior): the same encoder
and decoder, but p(z | y) is a MADE-based autoregressive flow (Germain et al. 2015) that maps z to standard
normal noise, eps_i = z_i * sigma_i(z_<i, y) + mu_i(z_<i, y). A flexible prior can match the aggregate posterior
that the N(0, I) prior of the cvae can only approximate, which is what lowers the KL term of the ELBO.

Both derive from family.Family, the contract every family meets (it also scales inputs and output levels, the
same way for every family), so every entry point treats them alike. The likelihood, KL and log-densities run in
float32 even under autocast.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from family import Family
from hps import Hyperparams
from vae import OutputNet
from vae_helpers import (draw_gaussian_diag_samples, elbo_report, gaussian_analytical_kl, gaussian_log_prob,
                         guided_gaussian, label_weights, without_autocast)

# The conv stacks stride down to (and up from) a 4x4 map: image sizes are powers of two >= 8.
BASE_RES = 4
# The flow's log-scales are soft-clamped to +-LOG_SIGMA_BOUND: sampling divides by sigma, so an unbounded
# log-scale could blow a sample up; tanh keeps the map smooth, the identity near 0 and sigma in [e^-5, e^5].
LOG_SIGMA_BOUND = 5.0


def n_stages(image_size: int) -> int:
    """Stride-2 stages between ``image_size`` and the 4x4 base map (8 -> 1, 32 -> 3, 64 -> 4)."""
    if image_size < 2 * BASE_RES or image_size & (image_size - 1):
        raise ValueError(f"the cvae/vlae conv stacks need an image size that is a power of two >= 8, "
                         f"got {image_size}")
    return int(math.log2(image_size // BASE_RES))


def label_vector(labels: torch.Tensor | None, n_classes: int) -> torch.Tensor | None:
    """The conditioning vector (B, n_classes) in float32: a one-hot of class indices (B,), or float labels (B, A)
    as given (multi-hot attributes, or weights that mix classes). None for an unconditional model."""
    if n_classes == 0:
        return None
    if labels is None:
        raise ValueError("this model is class-conditional: pass labels")
    return label_weights(labels, n_classes)


class ConvEncoder(nn.Module):
    """Image (and class) -> the diagonal Gaussian posterior q(z | x, y) over one latent vector.

    A 3x3 conv, then per stage a 4x4 stride-2 conv that doubles the channels and a 3x3 conv (no pooling: the
    network learns its own downsampling), down to a 4x4 map. The flattened map, concatenated with the class
    vector, goes through a hidden linear layer to the posterior's means and log-sigmas. Concatenating y there is
    the first layer of an MLP over [features(x), y], as in Sohn et al.'s encoder q(z | x, y).
    """

    def __init__(self, H: Hyperparams):
        super().__init__()
        width = H.conv_width
        layers: list[nn.Module] = [nn.Conv2d(H.image_channels, width, 3, padding=1), nn.GELU()]
        for _ in range(n_stages(H.image_size)):
            layers += [nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.GELU(),
                       nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU()]
            width *= 2
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(width * BASE_RES * BASE_RES + H.n_classes, width)
        self.head = nn.Linear(width, 2 * H.zdim)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior (mean, log-sigma), each (B, zdim) in float32."""
        h = self.convs(x).flatten(1)
        if y is not None:
            h = torch.cat([h, y.to(h.dtype)], dim=1)
        h = F.gelu(self.fc(h))
        # the head parameterises a distribution: fp32 even under autocast, so the KL and the draws are not rounded
        with without_autocast(h.device.type):
            mu, logsigma = self.head(h.float()).chunk(2, dim=1)
        return mu, logsigma


class ConvDecoder(nn.Module):
    """[z, y] -> image-sized features (B, H.width, S, S) for the likelihood head ``out_net``.

    A two-layer MLP to a 4x4 map with the encoder's last channel count, then per stage a 4x4 stride-2 transposed
    conv that halves the channels and a 3x3 conv, mirroring the encoder, and a 3x3 conv to ``H.width`` channels.
    """

    def __init__(self, H: Hyperparams):
        super().__init__()
        stages = n_stages(H.image_size)
        width = H.conv_width * 2 ** stages
        self.base_width = width
        self.fc = nn.Sequential(nn.Linear(H.zdim + H.n_classes, width), nn.GELU(),
                                nn.Linear(width, width * BASE_RES * BASE_RES))
        layers: list[nn.Module] = []
        for _ in range(stages):
            layers += [nn.GELU(), nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.GELU(),
                       nn.Conv2d(width // 2, width // 2, 3, padding=1)]
            width //= 2
        # a nonlinearity before the head's 1x1 conv, so the last two layers are not one linear map
        layers += [nn.GELU(), nn.Conv2d(width, H.width, 3, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.out_net = OutputNet(H)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        h = z if y is None else torch.cat([z, y.to(z.dtype)], dim=1)
        h = self.fc(h).reshape(len(z), self.base_width, BASE_RES, BASE_RES)
        return self.convs(h)


class CVAE(Family):
    """The conditional VAE: one Gaussian latent vector, conv encoder and decoder, prior N(0, I).

    Losses are in bits per dimension exactly as vae.VAE's: nats per image divided by the scored dimensions and
    ln 2. The posterior's noise and the prior's noise ``eps`` are (B, zdim) standard normals; subclasses change
    the prior by overriding ``prior_log_prob``, ``noise_of_latent``, ``latent_of_noise`` and ``kl_nats``.
    """

    family = "cvae"
    # prior noise: interpolation and class swaps act on eps; no latent groups, no per-group temperature
    abilities = frozenset({"prior_noise"})

    def __init__(self, H: Hyperparams):
        super().__init__(H)
        self.zdim = H.zdim
        self.n_classes = H.n_classes
        self.encoder = ConvEncoder(H)
        self.decoder = ConvDecoder(H)
        if H.zdim == 2:  # a 2-D latent can be shown as a manifold of decoded images, and its posterior means plotted
            self.abilities = type(self).abilities | {"manifold"}

    # ---- the latent layout: one group, the vector z -------------------------------------------
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """The one latent group: the vector z of ``zdim`` dimensions."""
        return [(self.zdim,)]

    # ---- the prior: N(0, I) here; the VLAE overrides these four -------------------------------
    def prior_log_prob(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """log p(z | y) in nats, (B,), float32."""
        zero = torch.zeros_like(z, dtype=torch.float32)
        return gaussian_log_prob(z, zero, zero).sum(dim=1)

    def noise_of_latent(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The prior's forward map z -> eps (standard normal under the prior); the identity for N(0, I)."""
        return z

    def latent_of_noise(self, eps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The prior's inverse map eps -> z; the identity for N(0, I)."""
        return eps

    def kl_nats(self, mu: torch.Tensor, logsigma: torch.Tensor, z: torch.Tensor,
                y: torch.Tensor | None) -> torch.Tensor:
        """KL(q(z|x,y) || p(z|y)) per image in nats (B,), float32: in closed form against N(0, I), which has no
        sampling variance (``z`` is unused here)."""
        zero = torch.zeros_like(mu)
        return gaussian_analytical_kl(mu, zero, logsigma, zero).sum(dim=1)

    # ---- shared pieces -------------------------------------------------------------------------
    def _y(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        y = label_vector(labels, self.n_classes)
        return None if y is None else y.to(self.decoder.fc[0].weight.device)

    def _posterior(self, images: torch.Tensor, labels: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(posterior mean, posterior log-sigma, class vector, likelihood target) of uint8 ``images``."""
        enc_in, target = self.preprocess(images)
        y = self._y(labels)
        mu, logsigma = self.encoder(enc_in, y)
        return mu, logsigma, y, target

    def _posterior_draw(self, mu: torch.Tensor, logsigma: torch.Tensor,
                        noises: Sequence[torch.Tensor | None] | None) -> torch.Tensor:
        noise = noises[0] if noises is not None else None
        return draw_gaussian_diag_samples(mu, logsigma, noise, self.noise_shard)

    def _prior_latent(self, n: int, y: torch.Tensor | None, temperature: float | Sequence[float],
                      noises: Sequence[torch.Tensor | None] | None, guidance: float = 0.0) -> torch.Tensor:
        """z for ``n`` images from the prior: eps (given or drawn), scaled by the temperature, pushed through the
        prior's inverse map (guided when ``guidance`` > 0). A temperature t draws eps from N(0, t^2 I), as VAE's
        prior groups do."""
        t = self._group_temperatures(temperature)[0]
        ref = self.decoder.fc[0].weight  # the parameters' device and dtype (float32 unless the model was cast)
        noise = noises[0] if noises is not None else None
        if noise is None:
            eps = torch.randn((n, self.zdim), device=ref.device, dtype=ref.dtype)
        else:
            eps = noise.to(device=ref.device, dtype=ref.dtype)
        if guidance > 0:
            return self.guided_latent_of_noise(eps * t, y, guidance)
        return self.latent_of_noise(eps * t, y)

    def guided_latent_of_noise(self, eps: torch.Tensor, y: torch.Tensor, guidance: float) -> torch.Tensor:
        """The cvae's prior N(0, I) ignores the class: there is nothing to guide."""
        raise ValueError("the cvae's prior ignores the class: guidance has nothing to act on")

    # ---- the ELBO ------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                noises: Sequence[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """Negative ELBO of uint8 ``images``: per-image bits/dim split into reconstruction and KL.

        Returns batch means (``loss``, ``recon``, ``kl`` in bits/dim, ``loss_nats`` for the optimiser), the
        per-image ``loss_per_image`` and ``kl_groups`` (shape (1,): one group). ``noises``, a list of one (B, zdim)
        tensor, fixes the standard-normal noise of the posterior draw.
        """
        mu, logsigma, y, target = self._posterior(images, labels)
        z = self._posterior_draw(mu, logsigma, noises)
        px_z = self.decoder(z, y)
        ndims = self.scored_dims(images.shape[1:])
        recon_nats = self.decoder.out_net.nll(px_z, target)  # (B,), fp32
        kl_nats = self.kl_nats(mu, logsigma, z, y)  # (B,), fp32
        return elbo_report(recon_nats, kl_nats[:, None], ndims)  # one latent group

    @torch.no_grad()
    def log_importance_weights(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                               noises: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One posterior draw per image: log p(x|z,y) + log p(z|y) - log q(z|x,y) in nats, shape (B,).

        Its expectation is the ELBO; log-mean-exp over K draws is the importance-weighted bound (Burda et al.
        2016). The log-densities are evaluated at the drawn z (no closed form here, so the estimate is unbiased for
        every prior, the flow's included)."""
        mu, logsigma, y, target = self._posterior(images, labels)
        z = self._posterior_draw(mu, logsigma, noises)
        log_px_z = -self.decoder.out_net.nll(self.decoder(z, y), target)
        log_qz = gaussian_log_prob(z, mu, logsigma).sum(dim=1)
        return log_px_z + self.prior_log_prob(z, y) - log_qz

    # ---- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, temperature: float | Sequence[float] = 1.0,
               noises: Sequence[torch.Tensor | None] | None = None, shared_pixel_noise: bool = False,
               guidance: float = 0.0) -> torch.Tensor:
        """``n`` images from the prior (for ``labels`` when conditional), as uint8 (n, C, H, W). ``noises``, a list
        of one (n, zdim) tensor of standard-normal eps (or None), fixes the latent: it is scaled by the temperature
        and decoded deterministically through the prior's inverse map; ``shared_pixel_noise`` draws the pixels of
        every image with the same uniforms (see dmol_sample). ``guidance`` w > 0 (the vlae, whose prior depends on
        the class) draws z from p(z|y)^(1+w) / p(z|null)^w, dimension by dimension (see guided_latent_of_noise)."""
        y = self._y(labels)
        z = self._prior_latent(n, y, temperature, noises, guidance)
        px_z = self.decoder(z, y)
        return self.levels_to_uint8(self.decoder.out_net.sample(px_z, shared_noise=shared_pixel_noise))

    @torch.no_grad()
    def prior_noise_of(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                       n_posterior: int | None = None) -> list[torch.Tensor]:
        """The latent code of ``images`` as the prior's standard-normal noise: the posterior mean pushed through the
        prior's forward map, so that ``sample(n, labels, noises=prior_noise_of(images, labels))`` decodes the
        posterior mean exactly. ``n_posterior`` 0 gives fresh prior noise instead (no group from the posterior)."""
        if n_posterior == 0:
            return [torch.randn((len(images), self.zdim), device=self.decoder.fc[0].weight.device)]
        mu, _, y, _ = self._posterior(images, labels)
        return [self.noise_of_latent(mu, y)]

    @torch.no_grad()
    def posterior_mean(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The mean of q(z | x, y) for uint8 ``images``, (B, zdim) float32: where the encoder places each image in
        the latent space (train.py --track_latents draws these for a 2-D latent)."""
        return self._posterior(images, labels)[0]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor | None = None, n_posterior: int | None = None,
                    temperature: float | Sequence[float] = 1.0) -> torch.Tensor:
        """Decode a posterior draw of z (``n_posterior`` None or >= 1: the one group), or with ``n_posterior`` 0 a
        prior draw at ``temperature`` (which, as in VAE, only applies to groups drawn from the prior)."""
        if n_posterior == 0:
            return self.sample(len(images), labels, temperature)
        mu, logsigma, y, _ = self._posterior(images, labels)
        z = draw_gaussian_diag_samples(mu, logsigma)
        return self.levels_to_uint8(self.decoder.out_net.sample(self.decoder(z, y)))


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (out_features, in_features)."""

    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        # derived from the sizes alone, so it is rebuilt rather than stored in checkpoints
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015) with a context input.

    Maps z (B, D) and a context c (B, C) to (mu, log_sigma), each (B, D), where output i depends only on
    z_<i (and c). Autoregressive masks come from degrees: input j has degree j + 1; hidden units cycle through
    degrees 0..D-1 and see the units below of degree <= theirs; output i sees hidden units of degree <= i. So
    a chain from z_j to output i needs j + 1 <= m <= i: only j < i. Degree-0 hidden units see no input, only
    the context, and they carry y to output 0 (whose mu_0 and sigma_0 would otherwise be constants). The context
    enters every hidden layer through an unmasked linear map (it is not autoregressive, so it may go anywhere).

    The output layer starts at zero: mu = 0 and log_sigma = 0, so the flow starts as the identity and the VLAE
    starts as the cvae.
    """

    def __init__(self, dim: int, hidden: int, context: int = 0):
        super().__init__()
        self.dim = dim
        in_degree = torch.arange(1, dim + 1)
        hidden_degree = torch.arange(hidden) % dim
        out_degree = torch.arange(dim)
        self.layer1 = MaskedLinear(dim, hidden, hidden_degree[:, None] >= in_degree[None, :])
        self.layer2 = MaskedLinear(hidden, hidden, hidden_degree[:, None] >= hidden_degree[None, :])
        out_mask = out_degree[:, None] >= hidden_degree[None, :]
        self.layer3 = MaskedLinear(hidden, 2 * dim, torch.cat([out_mask, out_mask], dim=0))  # [mu; log_sigma]
        nn.init.zeros_(self.layer3.weight)
        nn.init.zeros_(self.layer3.bias)
        self.context1 = nn.Linear(context, hidden) if context > 0 else None
        self.context2 = nn.Linear(context, hidden) if context > 0 else None

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layer1(z)
        if self.context1 is not None:
            h = h + self.context1(context.to(h.dtype))
        h = self.layer2(F.gelu(h))
        if self.context2 is not None:
            h = h + self.context2(context.to(h.dtype))
        mu, s = self.layer3(F.gelu(h)).chunk(2, dim=1)
        return mu, LOG_SIGMA_BOUND * torch.tanh(s / LOG_SIGMA_BOUND)


class AutoregressiveFlow(nn.Module):
    """The invertible map eps = z * sigma(z_<i, y) + mu(z_<i, y) of a MADE (an IAF-style affine flow).

    Its Jacobian d eps / d z is lower triangular (eps_i depends on z_<=i) with diagonal sigma_i, so
    log |det J| = sum_i log sigma_i, and by the change of variables
    log p(z | y) = log N(eps; 0, I) + sum_i log sigma_i. The forward (density) direction is one MADE pass; the
    inverse (sampling) direction z_i = (eps_i - mu_i) / sigma_i needs z_<i first: D passes, one dimension each.
    """

    def __init__(self, dim: int, hidden: int, context: int = 0):
        super().__init__()
        self.made = MADE(dim, hidden, context)

    def forward(self, z: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, log |det d eps / d z|) for z (B, D); in z's precision (fp32 even under autocast)."""
        with without_autocast(z.device.type):
            mu, log_sigma = self.made(z, context)
            return z * torch.exp(log_sigma) + mu, log_sigma.sum(dim=1)

    def inverse(self, eps: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """z with forward(z) = eps. Starting anywhere, pass k makes dimensions 0..k exact (mu_k and sigma_k read
        only the dimensions < k, exact since pass k - 1), so D passes invert the flow exactly."""
        with without_autocast(eps.device.type):
            z = torch.zeros_like(eps)
            for _ in range(self.made.dim):
                mu, log_sigma = self.made(z, context)
                z = (eps - mu) * torch.exp(-log_sigma)
            return z

    def log_prob(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """log p(z | context) in nats (B,) under the flow with a standard-normal base."""
        eps, log_det = self.forward(z, context)
        zero = torch.zeros_like(eps)
        return gaussian_log_prob(eps, zero, zero).sum(dim=1) + log_det


class VLAE(CVAE):
    """The cvae with an autoregressive-flow prior p(z | y) (Chen et al. 2017): a MADE with two hidden layers of
    ``H.made_hidden`` units and the class as context (AutoregressiveFlow).

    The KL has no closed form against a flow, so training uses the single-sample Monte Carlo estimate
    log q(z|x,y) - log p(z|y) at the posterior draw z (unbiased; its gradient reaches the prior through
    log p and the encoder through the reparameterised z). Sampling scales eps ~ N(0, I) by the temperature and
    inverts the flow, zdim sequential MADE passes.
    """

    family = "vlae"
    abilities = CVAE.abilities | {"guidance"}  # its prior depends on the class: it can be guided

    def __init__(self, H: Hyperparams):
        super().__init__(H)
        self.prior = AutoregressiveFlow(H.zdim, H.made_hidden, H.n_classes)

    def prior_log_prob(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.prior.log_prob(z, y)

    def noise_of_latent(self, z: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.prior(z, y)[0]

    def latent_of_noise(self, eps: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return self.prior.inverse(eps, y)

    def guided_latent_of_noise(self, eps: torch.Tensor, y: torch.Tensor, guidance: float) -> torch.Tensor:
        """The flow's inverse under guidance. Given z_<i, the flow makes z_i Gaussian, N(-mu_i/sigma_i, 1/sigma_i^2)
        (eps_i = z_i sigma_i + mu_i), under the class y and under the null label: each dimension draws from their
        guided combination (vae_helpers.guided_gaussian) with its eps_i, which carries the temperature. As in the
        plain inverse, pass k makes dimensions 0..k exact: D passes of the MADE, twice each."""
        null = torch.zeros_like(y)
        with without_autocast(eps.device.type):
            z = torch.zeros_like(eps)
            for _ in range(self.zdim):
                (mu_c, log_sigma_c), (mu_u, log_sigma_u) = self.prior.made(z, y), self.prior.made(z, null)
                mean, logsigma, _ = guided_gaussian(-mu_c * torch.exp(-log_sigma_c), -log_sigma_c,
                                                    -mu_u * torch.exp(-log_sigma_u), -log_sigma_u, guidance)
                z = mean + torch.exp(logsigma) * eps
            return z

    def kl_nats(self, mu: torch.Tensor, logsigma: torch.Tensor, z: torch.Tensor,
                y: torch.Tensor | None) -> torch.Tensor:
        """Monte Carlo KL per image in nats (B,): log q(z|x,y) - log p(z|y) at the drawn z (may be negative for one
        draw; its expectation is the KL)."""
        return gaussian_log_prob(z, mu, logsigma).sum(dim=1) - self.prior_log_prob(z, y)
