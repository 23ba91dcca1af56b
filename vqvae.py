"""The discrete-latent family: a VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning")
with a class-conditional gated PixelCNN prior over its codes (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders").

Stage 1, the autoencoder: a strided-conv encoder maps the image (centred and scaled to [-1, 1]) to a grid of
D-dimensional vectors z_e; each is replaced by its nearest entry of a codebook of K vectors (VectorQuantizer), and
a decoder that mirrors the encoder maps the quantised grid z_q to image-sized features scored by the project's
likelihood head (vae.OutputNet: DMOL, Bernoulli or discretized Gaussian), so the model has a real bits/dim. The
encoder learns through the straight-through estimator z_e + sg[z_q - z_e]; the codebook through
||sg[z_e] - e||^2 and the encoder is pulled to its codes by the commitment term beta ||z_e - sg[e]||^2.

Stage 2, the prior: a gated PixelCNN (GatedPixelCNN) models p(codes | y) autoregressively in raster order over the
code grid of the frozen stage-1 model.

The likelihood. The posterior is deterministic (q(z | x) puts all its mass on the codes of x), so
log p(x | y) >= log p(x | z_q) + log p(z_q | y): the reported bound is -log p(x | z_q) - log p(z_q | y) in bits per
scored dimension, with ``recon`` the first term and ``kl`` the second (KL(q || p) of a point mass q is -log p(z_q)),
so ``loss = recon + kl`` as for every other family. ``stage`` picks what ``loss_nats`` optimises:

- "autoencoder": recon nats/dim + codebook loss + beta * commitment loss (the prior term is reported, not trained);
- "prior": the PixelCNN's -log p(z_q | y) in nats per scored image dimension, the encoder, codebook and decoder
  running under no_grad.

``stage_parameters(stage)`` lists the parameters each stage trains.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvae import label_vector
from family import Family
from hps import FAMILY_STAGES, Hyperparams
from vae import OutputNet
from vae_helpers import elbo_report, preprocess_images, without_autocast

STAGES = FAMILY_STAGES["vqvae"]  # ("autoencoder", "prior")


# ---------------------------------------------------------------------------------------------
# Vector quantisation
# ---------------------------------------------------------------------------------------------


class Quantized(NamedTuple):
    z_q: torch.Tensor  # (B, D, H, W): z_e + sg[e - z_e], the value of the codes with z_e's gradient
    codes: torch.Tensor  # (B, H, W) long
    codebook_loss: torch.Tensor  # mean of (sg[z_e] - e)^2: trains the codebook only
    commitment_loss: torch.Tensor  # mean of (z_e - sg[e])^2: trains the encoder only
    perplexity: torch.Tensor  # exp(entropy) of the codes' frequencies in the batch (no gradient)
    dead_codes: torch.Tensor  # codebook entries no vector of the batch used (no gradient)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is in a lower precision (autocast's bf16/fp16), else as it is."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class VectorQuantizer(nn.Module):
    """A codebook of ``K`` vectors of dimension ``D`` and nearest-code quantisation (squared Euclidean distance).

    Entries start uniform in [-1/K, 1/K] as in the paper. Distances, losses and the code statistics run in float32
    even under autocast.
    """

    def __init__(self, K: int, D: int):
        super().__init__()
        self.K, self.D = K, D
        self.codebook = nn.Embedding(K, D)
        nn.init.uniform_(self.codebook.weight, -1.0 / K, 1.0 / K)

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) of the nearest entries to z_e (B, D, H, W)."""
        with without_autocast(z_e.device.type):
            flat = _at_least_fp32(z_e.detach()).permute(0, 2, 3, 1).reshape(-1, self.D)
            e = self.codebook.weight.detach().to(flat.dtype)
            # ||z||^2 is the same for every code of one vector: argmin of ||e||^2 - 2 z.e
            dist = (e * e).sum(dim=1)[None, :] - 2.0 * flat @ e.t()
            codes = dist.argmin(dim=1)
        b, _, h, w = z_e.shape
        return codes.reshape(b, h, w)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """The codebook vectors of ``codes`` (B, H, W) as a grid (B, D, H, W)."""
        return self.codebook(codes).permute(0, 3, 1, 2)

    def forward(self, z_e: torch.Tensor) -> Quantized:
        codes = self.nearest(z_e)
        with without_autocast(z_e.device.type):
            z_e32 = _at_least_fp32(z_e)
            e = self.embed(codes).to(z_e32.dtype)
            codebook_loss = F.mse_loss(e, z_e32.detach())
            commitment_loss = F.mse_loss(z_e32, e.detach())
            z_q = z_e32 + (e - z_e32).detach()  # straight-through: forward e, backward the identity to z_e
            with torch.no_grad():
                flat_codes = codes.reshape(-1)  # index_add_, not bincount: it also runs on the meta device and compiled
                counts = torch.zeros(self.K, device=codes.device).index_add_(
                    0, flat_codes, torch.ones(flat_codes.shape, device=codes.device))
                p = counts / counts.sum()
                perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
                dead = (counts == 0).sum().float()
        return Quantized(z_q.to(z_e.dtype), codes, codebook_loss, commitment_loss, perplexity, dead)


# ---------------------------------------------------------------------------------------------
# The gated PixelCNN prior over the code grid
# ---------------------------------------------------------------------------------------------


def _shift_down(x: torch.Tensor) -> torch.Tensor:
    """Row i takes row i - 1 (row 0 zeros): features that saw rows <= i now see only rows < i."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _shift_right(x: torch.Tensor) -> torch.Tensor:
    """Column j takes column j - 1 (column 0 zeros)."""
    return F.pad(x, (1, 0, 0, 0))[..., :-1]


class VerticalConv(nn.Module):
    """A k x k convolution cropped to its top half and centre row: the output at (i, j) reads rows i - k//2 .. i,
    columns j - k//2 .. j + k//2 (a (k//2 + 1) x k kernel, padded on top and the sides). ``strict`` shifts the
    output down one row, so it reads only rows < i (the type-A first layer)."""

    def __init__(self, c_in: int, c_out: int, k: int, strict: bool = False):
        super().__init__()
        self.k, self.strict = k, strict
        self.conv = nn.Conv2d(c_in, c_out, (k // 2 + 1, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.k // 2
        out = self.conv(F.pad(x, (p, p, p, 0)))
        return _shift_down(out) if self.strict else out


class HorizontalConv(nn.Module):
    """A 1 x k convolution cropped to its left half and centre: the output at (i, j) reads row i, columns
    j - k//2 .. j. ``strict`` shifts it right one column, so it reads only columns < j (type A)."""

    def __init__(self, c_in: int, c_out: int, k: int, strict: bool = False):
        super().__init__()
        self.k, self.strict = k, strict
        self.conv = nn.Conv2d(c_in, c_out, (1, k // 2 + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(F.pad(x, (self.k // 2, 0, 0, 0)))
        return _shift_right(out) if self.strict else out


def _gate(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class GatedBlock(nn.Module):
    """One gated layer of both stacks, conditioned on the class vector y:

        v' = tanh(W_f * v + V_f y) . sigmoid(W_g * v + V_g y)
        h' = h + 1x1(tanh(W_f * h + U_f (W * v) + V_f' y) . sigmoid(...))

    The vertical stack here reads only rows strictly above (its input already does, and its kernel adds no row
    below), so it can feed the horizontal stack at the same position without a shift; the horizontal stack reads
    its own row up to the current column, whose features already read only columns to the left. Together the
    position (i, j) reads every position before it in raster order: no blind spot.
    """

    def __init__(self, channels: int, n_classes: int, k: int = 3, dropout: float = 0.0):
        super().__init__()
        c = channels
        self.dropout = nn.Dropout(dropout)  # on the residual branch, as PixelCNN++ and VQ-VAE-2's priors do
        self.v_conv = VerticalConv(c, 2 * c, k)
        self.h_conv = HorizontalConv(c, 2 * c, k)
        self.v_to_h = nn.Conv2d(2 * c, 2 * c, 1)
        self.h_out = nn.Conv2d(c, c, 1)
        # the class enters every block: one-hot (or multi-hot) y -> a bias of each gate's input
        self.cond = nn.Linear(n_classes, 4 * c, bias=False) if n_classes > 0 else None

    def forward(self, v: torch.Tensor, h: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        v_feat = self.v_conv(v)
        h_feat = self.h_conv(h) + self.v_to_h(v_feat)
        if self.cond is not None:
            cv, ch = self.cond(y.to(v_feat.dtype))[:, :, None, None].chunk(2, dim=1)
            v_feat, h_feat = v_feat + cv, h_feat + ch
        return _gate(v_feat), h + self.h_out(self.dropout(_gate(h_feat)))


class GatedPixelCNN(nn.Module):
    """p(codes | y) over a grid of codes in 0..K-1, autoregressive in raster order (conditional gated PixelCNN).

    A learned embedding of each code (``channels``), a type-A first layer (7x7, read as its vertical and horizontal
    halves), ``n_layers`` gated residual blocks (3x3), then 1x1 convolutions to 512 channels and to the K logits
    (those two in float32 even under autocast). ``n_classes`` 0 makes it unconditional. ``dropout`` acts on each
    block's residual branch while training.
    """

    def __init__(self, K: int, n_classes: int, channels: int = 64, n_layers: int = 12, hidden: int = 512,
                 first_kernel: int = 7, kernel: int = 3, dropout: float = 0.0):
        super().__init__()
        self.K, self.n_classes = K, n_classes
        self.embedding = nn.Embedding(K, channels)
        self.v_first = VerticalConv(channels, channels, first_kernel, strict=True)
        self.h_first = HorizontalConv(channels, channels, first_kernel, strict=True)
        self.blocks = nn.ModuleList(GatedBlock(channels, n_classes, kernel, dropout) for _ in range(n_layers))
        self.head1 = nn.Conv2d(channels, hidden, 1)
        self.head2 = nn.Conv2d(hidden, K, 1)

    def _y(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        y = label_vector(labels, self.n_classes)
        return None if y is None else y.to(self.embedding.weight.device)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> their embedding (B, channels, H, W)."""
        return self.embedding(codes).permute(0, 3, 1, 2)

    def logits_of_embedding(self, x: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K, H, W) from an embedded grid (B, channels, H, W) (the causality tests differentiate it)."""
        y = self._y(labels)
        v, h = self.v_first(x), self.h_first(x)
        for block in self.blocks:
            v, h = block(v, h, y)
        h = self.head1(F.relu(h))
        with without_autocast(h.device.type):  # the logits parameterise a distribution: fp32
            return self.head2(F.relu(h.to(self.head2.weight.dtype)))

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits_of_embedding(self.embed(codes), labels)

    def log_prob(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(codes | y) in nats, (B,), float32."""
        logits = self(codes, labels)
        return -F.cross_entropy(logits, codes, reduction="none").sum(dim=(1, 2))

    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None, shape: Sequence[int],
               temperature: float = 1.0, guidance: float = 0.0) -> torch.Tensor:
        """``n`` code grids (n, H, W) drawn one position at a time in raster order; the logits are divided by
        ``temperature`` (0: the most likely code at each step). ``guidance`` w > 0 draws from the logits
        (1+w) l(y) - w l(null) at every position (classifier-free guidance), then the temperature."""
        h, w = shape
        codes = torch.zeros((n, h, w), dtype=torch.long, device=self.embedding.weight.device)
        if guidance > 0:
            weights = label_vector(labels, self.n_classes)
            labels = torch.cat([weights, torch.zeros_like(weights)])  # the asked labels, then the null label
        for i in range(h):
            for j in range(w):
                if guidance > 0:
                    conditional, unconditional = self(codes.repeat(2, 1, 1), labels)[:, :, i, j].float().chunk(2)
                    logits = (1 + guidance) * conditional - guidance * unconditional
                else:
                    logits = self(codes, labels)[:, :, i, j].float()
                if temperature <= 0:
                    codes[:, i, j] = logits.argmax(dim=1)
                else:
                    codes[:, i, j] = torch.multinomial(torch.softmax(logits / temperature, dim=1), 1)[:, 0]
        return codes


# ---------------------------------------------------------------------------------------------
# The autoencoder
# ---------------------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + 1x1(relu(3x3(relu(x)))), the VQ-VAE paper's residual block."""

    def __init__(self, channels: int):
        super().__init__()
        self.c1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.c2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c2(F.relu(self.c1(F.relu(x))))


def downsample_stages(H: Hyperparams) -> int:
    """Stride-2 stages from the image to the code grid: ``vq_downsample`` when set (> 0), else 1 for images of
    8 pixels or fewer (8x8 digits -> a 4x4 grid) and 2 above (32x32 -> 8x8, the paper's CIFAR-10 grid)."""
    stages = H.vq_downsample
    if not stages:
        stages = 1 if H.image_size <= 8 else 2
    if H.image_size % 2 ** stages:
        raise ValueError(f"the vqvae's {stages} stride-2 stages need an image size divisible by {2 ** stages}, "
                         f"got {H.image_size}")
    return stages


class VQEncoder(nn.Module):
    """Image in [-1, 1] -> z_e (B, D, S / 2^n, S / 2^n): per stage a 4x4 stride-2 conv that doubles the channels
    (from ``H.conv_width``), then two residual blocks and a 1x1 conv to the code dimension."""

    def __init__(self, H: Hyperparams, code_dim: int, stages: int):
        super().__init__()
        width = H.conv_width
        layers: list[nn.Module] = [nn.Conv2d(H.image_channels, width, 3, padding=1)]
        for _ in range(stages):
            layers += [nn.ReLU(), nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)]
            width *= 2
        layers += [ResBlock(width), ResBlock(width), nn.ReLU(), nn.Conv2d(width, code_dim, 1)]
        self.net = nn.Sequential(*layers)
        self.out_width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VQDecoder(nn.Module):
    """z_q -> image-sized features (B, H.width, S, S) for ``out_net``: the encoder mirrored (a 3x3 conv, two
    residual blocks, per stage a 4x4 stride-2 transposed conv that halves the channels), then a 3x3 conv to
    ``H.width`` channels."""

    def __init__(self, H: Hyperparams, code_dim: int, stages: int):
        super().__init__()
        width = H.conv_width * 2 ** stages
        layers: list[nn.Module] = [nn.Conv2d(code_dim, width, 3, padding=1), ResBlock(width), ResBlock(width)]
        for _ in range(stages):
            layers += [nn.ReLU(), nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1)]
            width //= 2
        # a nonlinearity before the head's 1x1 conv, so the last two layers are not one linear map
        layers += [nn.ReLU(), nn.Conv2d(width, H.width, 3, padding=1), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.out_net = OutputNet(H)

    def forward(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.net(z_q)


class VQVAE(Family):
    """The VQ-VAE (``H.codebook_size`` codes of ``H.code_dim`` dimensions on a grid ``H.vq_downsample`` stride-2
    stages below the image) with a class-conditional gated PixelCNN prior ``prior`` over its code grid
    (``H.prior_channels`` channels, ``H.prior_layers`` gated blocks), trained in two stages (``stages``)."""

    family = "vqvae"
    stages = STAGES
    bound_terms = ("bound -log p(x|z_q) - log p(z_q|y)", "reconstruction -log p(x|z_q)", "prior -log p(z_q|y)")
    # no prior noise (the latent is discrete and the posterior deterministic), no groups to explore
    abilities = frozenset({"guidance"})  # the PixelCNN prior depends on the class

    def __init__(self, H: Hyperparams):
        super().__init__(H)
        self.n_classes = H.n_classes
        self.codebook_size, self.code_dim, self.beta = H.codebook_size, H.code_dim, H.commitment_beta
        stages = downsample_stages(H)
        self.grid = H.image_size // 2 ** stages
        self.encoder = VQEncoder(H, self.code_dim, stages)
        self.quantizer = VectorQuantizer(self.codebook_size, self.code_dim)
        self.decoder = VQDecoder(H, self.code_dim, stages)
        self.prior = GatedPixelCNN(self.codebook_size, H.n_classes, H.prior_channels, H.prior_layers,
                                   dropout=H.prior_dropout)

    # ---- stages: the autoencoder, then the prior ---------------------------------------------------
    def _parameters_of_stage(self, stage: str) -> list[nn.Parameter]:
        """The encoder, codebook and decoder in stage "autoencoder", the PixelCNN in stage "prior"."""
        if stage == "prior":
            return list(self.prior.parameters())
        return [*self.encoder.parameters(), *self.quantizer.parameters(), *self.decoder.parameters()]

    # ---- the latent layout: one group, the code grid ------------------------------------------------
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """The code grid (height, width): one code in 0..K-1 per position."""
        return [(self.grid, self.grid)]

    # ---- data scaling: the encoder's input differs, the likelihood's target is every family's -------
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, C, H, W) -> (encoder input: centred and scaled to [-1, 1], likelihood target)."""
        _, target = preprocess_images(self.H, images)
        device = self.quantizer.codebook.weight.device
        return (images.float() * (2.0 / 255.0) - 1.0).to(device), target.to(device)

    # ---- pieces ------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> Quantized:
        """Quantise the encoder's output for uint8 ``images``."""
        enc_in, _ = self.preprocess(images)
        return self.quantizer(self.encoder(enc_in))

    def codes_of(self, images: torch.Tensor) -> torch.Tensor:
        """The code grid (B, H, W) of uint8 ``images``."""
        return self.encode(images).codes

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Decoder features (B, H.width, S, S) of a code grid."""
        return self.decoder(self.quantizer.embed(codes))

    def _labels(self, labels: torch.Tensor | None) -> torch.Tensor | None:
        return None if labels is None else labels.to(self.quantizer.codebook.weight.device)

    # ---- the bound -----------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                noises: Sequence[torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
        """The bound -log p(x|z_q) - log p(z_q|y) of uint8 ``images`` in bits/dim (``recon`` and ``kl`` its two
        terms, ``loss`` their sum, ``loss_per_image``), ``loss_nats`` what the current stage optimises, and the
        codebook's ``perplexity``, ``dead_codes``, ``codebook_loss`` and ``commitment_loss`` of the batch.
        ``noises`` is accepted for the contract and unused (no posterior noise)."""
        labels = self._labels(labels)
        _, target = self.preprocess(images)
        ndims = self.scored_dims(images.shape[1:])
        if self.stage == "autoencoder":
            q = self.encode(images)
            recon_nats = self.decoder.out_net.nll(self.decoder(q.z_q), target)
            with torch.no_grad():
                prior_nats = -self.prior.log_prob(q.codes, labels)
            loss_nats = recon_nats.mean() / ndims + q.codebook_loss + self.beta * q.commitment_loss
        else:
            with torch.no_grad():
                q = self.encode(images)
                recon_nats = self.decoder.out_net.nll(self.decoder(q.z_q), target)
            prior_nats = -self.prior.log_prob(q.codes, labels)
            loss_nats = prior_nats.mean() / ndims
        out = elbo_report(recon_nats, prior_nats[:, None], ndims)
        out.update(loss_nats=loss_nats, perplexity=q.perplexity, dead_codes=q.dead_codes,
                   codebook_loss=q.codebook_loss.detach(), commitment_loss=q.commitment_loss.detach())
        return out

    @torch.no_grad()
    def log_importance_weights(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                               noises: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """log p(x|z_q) + log p(z_q|y) in nats, (B,): the posterior is a point mass (log q = 0), so every draw
        is this bound and the importance-weighted bound equals it."""
        labels = self._labels(labels)
        _, target = self.preprocess(images)
        q = self.encode(images)
        log_px_z = -self.decoder.out_net.nll(self.decoder(q.z_q), target)
        return log_px_z + self.prior.log_prob(q.codes, labels)

    # ---- generation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, temperature: float | Sequence[float] = 1.0,
               noises: Sequence[torch.Tensor | None] | None = None, shared_pixel_noise: bool = False,
               guidance: float = 0.0) -> torch.Tensor:
        """``n`` images as uint8 (n, C, H, W): codes drawn from the PixelCNN (for ``labels`` when conditional, the
        logits divided by ``temperature``; guided by ``guidance`` w > 0, see GatedPixelCNN.sample), decoded, and
        pixels drawn from the likelihood. ``noises``, a list of one (n, H, W) integer code grid (as prior_noise_of
        returns), decodes those codes instead of drawing them."""
        t = self._group_temperatures(temperature)[0]
        codes = noises[0] if noises is not None else None
        if codes is None:
            codes = self.prior.sample(n, self._labels(labels), (self.grid, self.grid), t, guidance)
        elif codes.is_floating_point() or tuple(codes.shape) != (n, self.grid, self.grid):
            raise ValueError(f"the vqvae family has no prior noise: noises must be one ({n}, {self.grid}, "
                             f"{self.grid}) grid of codes, got {tuple(codes.shape)} {codes.dtype}")
        features = self.decode_codes(codes.to(self.quantizer.codebook.weight.device))
        return self.levels_to_uint8(self.decoder.out_net.sample(features, shared_noise=shared_pixel_noise))

    @torch.no_grad()
    def prior_noise_of(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                       n_posterior: int | None = None) -> list[torch.Tensor]:
        """The latent of ``images`` in the form ``sample(noises=...)`` takes: their code grid (n_posterior 0: a
        grid drawn from the prior). Codes cannot be interpolated: the family declares no prior-noise ability."""
        if n_posterior == 0:
            return [self.prior.sample(len(images), self._labels(labels), (self.grid, self.grid))]
        return [self.codes_of(images)]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor | None = None, n_posterior: int | None = None,
                    temperature: float | Sequence[float] = 1.0) -> torch.Tensor:
        """Decode the quantised codes of ``images`` (through the codebook) and draw pixels; ``n_posterior`` 0 draws
        the codes from the prior at ``temperature`` instead."""
        if n_posterior == 0:
            return self.sample(len(images), labels, temperature)
        q = self.encode(images)
        return self.levels_to_uint8(self.decoder.out_net.sample(self.decoder(q.z_q)))
