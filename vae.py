"""The class-conditional Very Deep VAE (Child 2020, "Very Deep VAEs Generalize Autoregressive Models").

A bottom-up encoder of residual blocks records its activation at every resolution. A top-down decoder
starts from learned states (plus a class embedding at its top, the stem) and, block by block, draws a
latent group z_i from the posterior q(z_i | z_<i, x, y) while training, or from the prior p(z_i | z_<i, y)
while sampling. The class therefore conditions every latent and the output likelihood.

With ``n_classes = 0`` the module tree, shapes, initialisation and input normalisation are exactly
openai/vdvae's, so its state dicts load with the same names.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from family import Family
from hps import Hyperparams, parse_layer_string, skip_slots
from vae_helpers import (Block, bernoulli_log_prob, bernoulli_sample, discretized_gaussian_log_prob, elbo_report,
                         discretized_gaussian_sample, dmol_log_prob, dmol_sample, draw_gaussian_diag_samples,
                         gaussian_analytical_kl, gaussian_log_prob, get_bottleneck_settings, get_conv,
                         get_width_settings, guided_gaussian, guides, label_weights, likelihood_param_count,
                         log_std_of, without_autocast)


# Under --grad_checkpoint blocks, runs of this many consecutive blocks are recomputed together: half the
# stored block inputs of one-block checkpoints, for the activations of one more block while recomputing.
CHECKPOINT_SEGMENT = 2


def maybe_checkpointed(fn, enabled: bool, *args):
    """``fn(*args)``; when ``enabled`` and gradients are on, its activations are recomputed in the backward
    pass instead of stored (random draws repeat exactly: the RNG state is replayed)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def group_blocks(starts_new: list[bool], size: int) -> list[list[int]]:
    """Consecutive runs of at most ``size`` block indices; a True in ``starts_new`` forces a new run."""
    segments: list[list[int]] = []
    for i, new in enumerate(starts_new):
        if new or not segments or len(segments[-1]) >= size:
            segments.append([i])
        else:
            segments[-1].append(i)
    return segments


class Encoder(nn.Module):
    """Bottom-up residual network. Returns, at every resolution, its last activation there (``--enc_skips last``,
    openai/vdvae) or the list of every block's output there, before any pooling, in order (``every``,
    Efficient-VDVAE's skip from every bottom-up block)."""

    def __init__(self, H: Hyperparams):
        super().__init__()
        self.checkpoint_blocks = H.grad_checkpoint == "blocks"
        self.every_skip = H.enc_skips == "every"
        self.widths = get_width_settings(H.width, H.custom_width_str)
        bottlenecks = get_bottleneck_settings(H.bottleneck_multiple, H.custom_bottleneck_str)
        self.in_conv = get_conv(H.image_channels, H.width, H.input_kernel)
        specs = parse_layer_string(H.enc_blocks)
        blocks = []
        # --enc_skips every reads a pooling block's output before it pools: the encoder pools it, not the block
        self.pool_rates = [d if self.every_skip else None for _, d in specs]
        for res, down_rate in specs:
            w = self.widths[res]
            blocks.append(Block(w, int(w * bottlenecks[res]), w, down_rate=None if self.every_skip else down_rate,
                                residual=True, use_3x3=res > 2))
        for block in blocks:  # residual branches start small so deep stacks begin near identity
            block.c4.weight.data *= math.sqrt(1.0 / len(specs))
        self.enc_blocks = nn.ModuleList(blocks)
        # a pooling block runs alone, so the last activation before it is recorded for its resolution
        down = [d is not None for _, d in specs]
        self.segments = group_blocks([d or (i > 0 and down[i - 1]) for i, d in enumerate(down)],
                                     CHECKPOINT_SEGMENT if self.checkpoint_blocks else 1)

    def forward(self, x: torch.Tensor) -> dict[int, torch.Tensor] | dict[int, list[torch.Tensor]]:
        x = self.in_conv(x)
        if self.every_skip:
            skips: dict[int, list[torch.Tensor]] = {}
            for segment in self.segments:
                x, outputs = maybe_checkpointed(self._run_segment_every, self.checkpoint_blocks and self.training,
                                                segment, x)
                for out in outputs:
                    skips.setdefault(out.shape[2], []).append(out)
            return skips
        activations = {x.shape[2]: x}
        for segment in self.segments:
            x = maybe_checkpointed(self._run_segment, self.checkpoint_blocks and self.training, segment, x)
            activations[x.shape[2]] = x
        return activations

    def _widen(self, x: torch.Tensor) -> torch.Tensor:
        res = x.shape[2]
        if x.shape[1] < self.widths[res]:  # custom widths: a narrower stage feeds a wider one
            x = F.pad(x, (0, 0, 0, 0, 0, self.widths[res] - x.shape[1]))
        return x

    def _run_segment(self, segment: list[int], x: torch.Tensor) -> torch.Tensor:
        for i in segment:
            x = self._widen(self.enc_blocks[i](x))
        return x

    def _run_segment_every(self, segment: list[int], x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outputs = []
        for i in segment:
            x = self.enc_blocks[i](x)
            outputs.append(x)  # a pooling block's skip is taken before it pools, at its own resolution
            if self.pool_rates[i] is not None:
                x = self._widen(F.avg_pool2d(x, kernel_size=self.pool_rates[i], stride=self.pool_rates[i]))
        return x, outputs


class DecBlock(nn.Module):
    """One top-down block: prior and posterior over a latent group, then a residual block.

    The prior network maps the state h to (prior mean, prior log-sigma, a feature added to h); the
    posterior network sees h concatenated with the encoder's activation at this resolution.
    """

    def __init__(self, H: Hyperparams, res: int, mixin: int | None, n_blocks: int):
        super().__init__()
        self.base = res
        self.mixin = mixin
        self.zdim = H.zdim
        self.latent_std = H.latent_std  # how the log-sigmas come from the nets' outputs (vae_helpers.log_std_of)
        width = get_width_settings(H.width, H.custom_width_str)[res]
        cond_width = int(width * get_bottleneck_settings(H.bottleneck_multiple, H.custom_bottleneck_str)[res])
        use_3x3 = res > 2
        self.enc = Block(width * 2, cond_width, H.zdim * 2, residual=False, use_3x3=use_3x3)
        self.prior = Block(width, cond_width, H.zdim * 2 + width, residual=False, use_3x3=use_3x3,
                           zero_last=True)
        # the heads that output the Gaussians' means and log-sigmas run their last 1x1 conv in fp32 under autocast,
        # so the KL and the draws (and fixed noise handed to the prior: prior_noise_of) are not rounded to bf16
        self.enc.fp32_last = self.prior.fp32_last = True
        self.z_proj = get_conv(H.zdim, width, 1)
        self.z_proj.weight.data *= math.sqrt(1.0 / n_blocks)
        self.resnet = Block(width, cond_width, width, residual=True, use_3x3=use_3x3)
        self.resnet.c4.weight.data *= math.sqrt(1.0 / n_blocks)
        self.noise_shard = (0, 1)  # (index, count): this pass's slice of a global batch; see draw_gaussian_diag_samples

    def forward(self, x: torch.Tensor, acts: torch.Tensor | None, temperature: float = 1.0,
                noise: torch.Tensor | None = None, log_ratio: bool = False,
                prior_noise: bool = False, guidance: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, dict]:
        """Draw z (posterior when ``acts`` is given, else prior at ``temperature``) and update the state.

        Returns the new state and stats: z, and for the posterior the KL map (nats, fp32) and, when
        ``log_ratio``, log q(z|x) - log p(z) at the drawn z (for importance-weighted bounds). With
        ``prior_noise``, also ``eps`` = (z - prior mean) / prior sigma: the standard-normal noise from which
        the prior, fed it as ``noise``, draws this same z. With ``guidance`` w > 0 (prior only) the batch is two
        halves, the states under the asked labels and under the null label: z is drawn once from the guided
        prior (vae_helpers.guided_gaussian, then the temperature) and both halves go on with it; stats then hold
        ``guidance_fallback``, the share of dimensions that fell back to mean-only guidance. A 0-dim tensor
        ``guidance`` always guides (vae_helpers.guides).
        """
        feats = self.prior(x)
        pm, plogs, xpp = feats[:, :self.zdim], feats[:, self.zdim:2 * self.zdim], feats[:, 2 * self.zdim:]
        plogs = log_std_of(plogs, self.latent_std)
        stats = {}
        unit_plogs = plogs
        if acts is not None:
            qm, qlogs = self.enc([x, acts]).chunk(2, dim=1)  # reads cat([x, acts]) without storing it
            qlogs = log_std_of(qlogs, self.latent_std)
            z = draw_gaussian_diag_samples(qm, qlogs, noise, self.noise_shard)
            stats["kl"] = gaussian_analytical_kl(qm, pm, qlogs, plogs)
            if log_ratio:
                stats["log_ratio"] = gaussian_log_prob(z, qm, qlogs) - gaussian_log_prob(z, pm, plogs)
        else:
            if guides(guidance):
                half = len(pm) // 2
                pm, plogs, fell_back = guided_gaussian(pm[:half], plogs[:half], pm[half:], plogs[half:], guidance)
                stats["guidance_fallback"] = fell_back.float().mean()
            if temperature != 1.0:  # a temperature t scales the prior's standard deviation by t
                plogs = plogs + math.log(temperature)
            z = draw_gaussian_diag_samples(pm, plogs, noise)
            if guides(guidance):
                z = torch.cat([z, z]).to(x.dtype)
        if prior_noise:
            stats["eps"] = ((z.float() - pm.float()) * torch.exp(-unit_plogs.float())).to(z.dtype)
        x = x + xpp
        x = x + self.z_proj(z)
        stats["z"] = z
        return self.resnet(x), stats


class OutputNet(nn.Module):
    """Output head: a 1x1 conv to the parameters of the pixel likelihood (``H.likelihood``: the discretized
    mixture of logistics, Bernoulli logits, or a discretized Gaussian), scored on the central image when
    ``H.pad`` pixels of padding surround it (MNIST's 28x28 in 32x32)."""

    def __init__(self, H: Hyperparams):
        super().__init__()
        self.kind, self.channels, self.levels = H.likelihood, H.image_channels, H.pixel_levels
        self.num_mixtures, self.fixed_std, self.pad = H.num_mixtures, H.gaussian_std, H.pad
        self.dmol_scale = H.dmol_scale
        n_params = likelihood_param_count(H.likelihood, H.image_channels, H.num_mixtures, H.gaussian_std <= 0)
        self.out_conv = get_conv(H.width, n_params, 1)
        # pixels are drawn for the first ``draw_rows`` images only (None: all). The compiled sampler (sampling.py)
        # decodes a last, short batch padded to its fixed size; drawing the padding's pixels would shift the random
        # stream, and the real images would no longer be the ones eager sampling draws with the same seed
        self.draw_rows: int | None = None

    def forward(self, px_z: torch.Tensor) -> torch.Tensor:
        # the likelihood's parameters in fp32 even under autocast: bf16 would round the DMOL's means and scales
        with without_autocast(px_z.device.type):
            return self.out_conv(px_z.float())

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        p = self.pad
        return t[..., p:t.shape[-2] - p, p:t.shape[-1] - p] if p else t

    def nll(self, px_z: torch.Tensor, x_target: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood in nats per image (summed over the scored pixels and channels)."""
        params, x = self.forward(self.crop(px_z)), self.crop(x_target)  # a 1x1 conv: crop before or after
        if self.kind == "bernoulli":
            log_prob = bernoulli_log_prob(params, x)
        elif self.kind == "gaussian":
            log_prob = discretized_gaussian_log_prob(params, x, self.levels, self.fixed_std)
        else:
            log_prob = dmol_log_prob(params, x, self.levels, self.num_mixtures, self.dmol_scale)
        return -log_prob.sum(dim=(1, 2))

    def sample(self, px_z: torch.Tensor, shared_noise: bool = False) -> torch.Tensor:
        """Integer pixel levels (B, C, H, W) (the first ``draw_rows`` when set); ``shared_noise``: see
        dmol_sample."""
        params = self.forward(px_z if self.draw_rows is None else px_z[:self.draw_rows])
        if self.kind == "bernoulli":
            return bernoulli_sample(params, shared_noise=shared_noise)
        if self.kind == "gaussian":
            return discretized_gaussian_sample(params, self.channels, self.levels, self.fixed_std,
                                               shared_noise=shared_noise)
        return dmol_sample(params, self.channels, self.levels, self.num_mixtures, shared_noise=shared_noise,
                           scale=self.dmol_scale)

    def scored_dims(self, image_shape: Sequence[int]) -> float:
        """Dimensions the likelihood scores per image of shape (C, H, W) (bits/dim divides by these)."""
        c, h, w = image_shape
        return float(c * (h - 2 * self.pad) * (w - 2 * self.pad))


class Decoder(nn.Module):
    """Top-down network of DecBlocks over the resolutions of ``dec_blocks``."""

    def __init__(self, H: Hyperparams):
        super().__init__()
        self.image_size = H.image_size
        self.checkpoint_blocks = H.grad_checkpoint == "blocks"
        self.widths = get_width_settings(H.width, H.custom_width_str)
        specs = parse_layer_string(H.dec_blocks)
        self.dec_blocks = nn.ModuleList(DecBlock(H, res, mixin, n_blocks=len(specs)) for res, mixin in specs)
        # --enc_skips every: the encoder skip each block reads, counted from its resolution's last (skip_slots)
        self.skip_slots = skip_slots(H.dec_blocks) if H.enc_skips == "every" else None
        # a run of blocks shares one resolution and only its first block mixes in a coarser state
        starts = [m is not None or i == 0 or r != specs[i - 1][0] for i, (r, m) in enumerate(specs)]
        self.segments = group_blocks(starts, CHECKPOINT_SEGMENT if self.checkpoint_blocks else 1)
        self.resolutions = sorted({res for res, _ in specs})
        self.bias_resolutions = [r for r in self.resolutions if r <= H.no_bias_above]
        self.bias_xs = nn.ParameterList(nn.Parameter(torch.zeros(1, self.widths[r], r, r))
                                        for r in self.bias_resolutions)
        self.stem_res = specs[0][0]
        if H.n_classes > 0:  # the class enters at the top of the decoder and flows down through it
            self.class_emb = nn.Embedding(H.n_classes, self.widths[self.stem_res])
        self.out_net = OutputNet(H)
        self.gain = nn.Parameter(torch.ones(1, H.width, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, H.width, 1, 1))

    @property
    def n_groups(self) -> int:
        return len(self.dec_blocks)

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(channels, height, width) of each latent group, top (coarsest) first."""
        return [(block.zdim, block.base, block.base) for block in self.dec_blocks]

    def _initial_states(self, labels: torch.Tensor | None, batch: int) -> dict[int, torch.Tensor]:
        xs = {r: b.expand(batch, -1, -1, -1) for r, b in zip(self.bias_resolutions, self.bias_xs)}
        if hasattr(self, "class_emb"):
            if labels is None:
                raise ValueError("this model is class-conditional: pass labels")
            if labels.is_floating_point():  # (B, n_classes) weights: a mix of class embeddings
                emb = (labels.to(self.class_emb.weight.dtype) @ self.class_emb.weight)[:, :, None, None]
            else:
                emb = self.class_emb(labels)[:, :, None, None]
            stem = xs.get(self.stem_res)
            xs[self.stem_res] = emb.expand(-1, -1, self.stem_res, self.stem_res) if stem is None else stem + emb
        return xs

    def forward(self, activations: dict[int, torch.Tensor] | dict[int, list[torch.Tensor]] | None,
                labels: torch.Tensor | None,
                batch: int | None = None, n_posterior: int | None = None,
                temperature: float | Sequence[float] = 1.0,
                noises: Sequence[torch.Tensor | None] | None = None,
                log_ratio: bool = False, prior_noise: bool = False,
                guidance: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, list[dict]]:
        """Run the decoder top-down.

        ``activations``: the encoder's (Encoder.forward). Groups ``0..n_posterior-1`` draw from the posterior
        (all of them by default when ``activations`` is given), the rest from the prior at ``temperature`` (a
        float, or one per group). ``noises`` fixes the standard-normal noise of chosen groups. ``labels`` are
        class indices (B,), or (B, n_classes) weights that mix the class embeddings. ``guidance`` w > 0 (prior
        groups only): ``labels`` are the asked labels, then as many null labels, ``batch`` counts both halves,
        and every group draws from the guided prior (see DecBlock). Returns the output features and per-group
        stats (see DecBlock).
        """
        if batch is None:
            first = next(iter(activations.values())) if activations else None
            batch = len(labels) if first is None else len(first[0] if isinstance(first, list) else first)
        if n_posterior is None:
            n_posterior = self.n_groups if activations is not None else 0
        # an isinstance check, which torch.compile traces (np.isscalar would break its graph)
        temps = ([float(temperature)] * self.n_groups if isinstance(temperature, numbers.Real)
                 else [float(t) for t in temperature])
        if len(temps) != self.n_groups:
            raise ValueError(f"expected {self.n_groups} temperatures (one per latent group), got {len(temps)}")
        xs = self._initial_states(labels, batch)
        stats = []
        for segment in self.segments:
            x = self._state_in(segment[0], xs, batch)
            acts = self._skips(activations, segment)
            x, segment_stats = maybe_checkpointed(self._run_segment, self.checkpoint_blocks and self.training,
                                                  segment, x, acts, temps, noises, log_ratio, n_posterior,
                                                  prior_noise, guidance)
            xs[self.dec_blocks[segment[0]].base] = x
            stats += segment_stats
        return self._output(xs), stats

    def forward_with_prior_below(self, activations: dict[int, torch.Tensor] | dict[int, list[torch.Tensor]],
                                 labels: torch.Tensor | None, ks: Sequence[int],
                                 noises: Sequence[torch.Tensor | None] | None = None
                                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each k in ``ks``, the decoder with its k lowest (last) groups drawn from the conditional prior and
        the rest from the posterior: (output features, per-group KL in nats of shape (B, n_groups), zero for the
        prior groups). Equal to ``forward(activations, labels, n_posterior=n_groups - k, noises=noises)`` for
        each k, but the posterior blocks run once: the decoder's state before block n_groups - k is kept (its
        tensors are never changed in place) and only the k prior blocks run again. Every k therefore shares the
        same posterior draws above its cut, which also makes ELBO - L>k a lower-variance difference."""
        first = next(iter(activations.values()))
        batch = len(first[0] if isinstance(first, list) else first)
        cuts = {self.n_groups - self.checked_k(k) for k in ks}
        xs = self._initial_states(labels, batch)
        kept, kls = {}, []
        for i in range(self.n_groups):
            if i in cuts:
                kept[i] = dict(xs)
            xs, block_stats = self._step(i, xs, batch, self._skips(activations, [i])[0], noises)
            kls.append(block_stats["kl"].sum(dim=(1, 2, 3)))
        kept[self.n_groups] = xs
        results = []
        for k in ks:
            cut = self.n_groups - k
            xs = kept[cut]
            for i in range(cut, self.n_groups):
                xs, _ = self._step(i, xs, batch, None, noises)
            zeros = [torch.zeros_like(kls[0])] * k
            results.append((self._output(xs), torch.stack(kls[:cut] + zeros, dim=1)))
        return results

    def checked_k(self, k: int) -> int:
        """``k`` itself when 0 <= k <= n_groups (a count of lowest groups drawn from the prior), else ValueError."""
        if not 0 <= k <= self.n_groups:
            raise ValueError(f"k must be in 0..{self.n_groups} (the latent groups), got {k}")
        return k

    def _state_in(self, i: int, xs: dict[int, torch.Tensor], batch: int) -> torch.Tensor:
        """The state block ``i`` reads: its resolution's, plus the coarser state it mixes in (upsampled)."""
        block = self.dec_blocks[i]
        res = block.base
        x = xs.get(res)
        if x is None:
            x = torch.zeros(batch, self.widths[res], res, res, device=self.gain.device, dtype=self.gain.dtype)
        if block.mixin is not None:
            up = xs[block.mixin][:, :x.shape[1]]
            x = x + F.interpolate(up, scale_factor=res // block.mixin)
        return x

    def _step(self, i: int, xs: dict[int, torch.Tensor], batch: int, acts: torch.Tensor | None,
              noises) -> tuple[dict[int, torch.Tensor], dict]:
        """Block ``i`` alone (posterior when ``acts`` is given, else the prior at temperature 1), on a new states
        dict: ``xs`` is left as it was."""
        x, stats = self.dec_blocks[i](self._state_in(i, xs, batch), acts, 1.0,
                                      noises[i] if noises is not None else None)
        return {**xs, self.dec_blocks[i].base: x}, stats

    def _output(self, xs: dict[int, torch.Tensor]) -> torch.Tensor:
        return xs[self.image_size] * self.gain + self.bias

    def _skips(self, activations, segment: list[int]) -> list[torch.Tensor | None]:
        """The encoder activation each block of ``segment`` reads (None without an encoder pass)."""
        if activations is None:
            return [None] * len(segment)
        res = self.dec_blocks[segment[0]].base
        if self.skip_slots is None:
            return [activations[res]] * len(segment)
        at_res = activations[res]
        return [at_res[len(at_res) - 1 - self.skip_slots[i]] for i in segment]

    def _run_segment(self, segment: list[int], x: torch.Tensor, acts: list[torch.Tensor | None], temps: list[float],
                     noises, log_ratio: bool, n_posterior: int, prior_noise: bool = False,
                     guidance: float | torch.Tensor = 0.0) -> tuple[torch.Tensor, list[dict]]:
        stats = []
        for j, i in enumerate(segment):
            x, block_stats = self.dec_blocks[i](x, acts[j] if i < n_posterior else None, temps[i],
                                                noises[i] if noises is not None else None, log_ratio, prior_noise,
                                                guidance if i >= n_posterior else 0.0)
            stats.append(block_stats)
        return x, stats


class VAE(Family):
    """Encoder + decoder + output likelihood; losses are in bits per dimension.

    The ``vdvae`` model family: its latent groups are the decoder's blocks, each drawing its own posterior noise.
    """

    family = "vdvae"
    # optional abilities sampling modes may rely on: latent groups to explore, prior noise (interpolation and class
    # swaps), a temperature per group
    abilities = frozenset({"groups", "prior_noise", "per_group_temperature", "guidance"})

    def __init__(self, H: Hyperparams):
        super().__init__(H)
        self.encoder = Encoder(H)
        self.decoder = Decoder(H)
        for module in self.modules():
            if isinstance(module, Block):
                module.recompute_gelu = H.grad_checkpoint in ("gelu", "blocks")  # also inside a recomputed block

    def compile_regions(self, **options) -> bool:
        """Family.compile_regions: every encoder block and every decoder block (its prior, posterior, KL and
        residual block) is a region. Blocks of one shape share one compiled graph, so the cifar10 model compiles
        about ten graphs rather than tracing its 109 blocks; the glue between them (pooling, upsampling, the
        likelihood) stays eager."""
        for block in self.encoder.enc_blocks:
            block.compile(**options)
        for block in self.decoder.dec_blocks:
            block.compile(**options)
        return True

    # ---- the latent layout: one group per decoder block ------------------------------------------
    def latent_shapes(self) -> list[tuple[int, ...]]:
        """(channels, height, width) of each latent group, top (coarsest) first."""
        return self.decoder.latent_shapes()

    def set_noise_shard(self, index: int | torch.Tensor, count: int) -> None:
        """Family.set_noise_shard, handed to every decoder block: each draws its own group's noise."""
        super().set_noise_shard(index, count)
        for block in self.decoder.dec_blocks:
            block.noise_shard = (index, count)

    # ---- the ELBO -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                noises: Sequence[torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Negative ELBO of uint8 ``images``: per-image bits/dim split into reconstruction and KL.

        Returns means over the batch (``loss``, ``recon``, ``kl`` in bits/dim, ``loss_nats`` for the
        optimiser) and per-image vectors (``loss_per_image``), plus per-group KL (``kl_groups``). ``noises``
        (one tensor per latent group) fixes the standard-normal noise of the posterior draws.
        """
        enc_in, target = self.preprocess(images)
        activations = self.encoder(enc_in)
        px_z, stats = self.decoder(activations, labels, noises=noises)
        ndims = self.scored_dims(images.shape[1:])  # MNIST: its 28x28, not the padded 32x32
        recon_nats = self.decoder.out_net.nll(px_z, target)  # (B,)
        kl_groups = torch.stack([s["kl"].sum(dim=(1, 2, 3)) for s in stats], dim=1)  # (B, G)
        return elbo_report(recon_nats, kl_groups, ndims)

    @torch.no_grad()
    def log_importance_weights(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                               noises: Sequence[torch.Tensor] | None = None, n_prior: int = 0) -> torch.Tensor:
        """One posterior draw per image: log p(x|z,y) + log p(z|y) - log q(z|x,y) in nats, shape (B,).

        The mean over draws is the ELBO; log-mean-exp over K draws is the importance-weighted bound
        (Burda et al. 2016), which tightens towards log p(x|y) as K grows. With ``n_prior`` = k > 0 the k lowest
        (last, finest) groups are drawn from their conditional prior given the draws above and leave the weight:
        one draw of the importance-weighted L>k of Havtorn et al. 2021 (see ``bounds_with_prior_below``).
        """
        enc_in, target = self.preprocess(images)
        px_z, stats = self.decoder(self.encoder(enc_in), labels, n_posterior=self._n_posterior(n_prior),
                                   log_ratio=True, noises=noises)
        log_px_z = -self.decoder.out_net.nll(px_z, target)
        return log_px_z - sum(s["log_ratio"].sum(dim=(1, 2, 3)) for s in stats if "log_ratio" in s)

    @torch.no_grad()
    def bounds_with_prior_below(self, images: torch.Tensor, labels: torch.Tensor | None, ks: Sequence[int],
                                noises: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """The negative bound L>k of Havtorn et al. 2021 ("Hierarchical VAEs Know What They Don't Know") for each
        k in ``ks``, in bits/dim, shape (B, len(ks)).

        L>k = E[log p(x|z)] - sum over the groups above the k lowest of KL(q(z_i|z_<i,x,y) || p(z_i|z_<i,y)), the
        expectation over the posterior above and the conditional prior p(z_i|z_<i,y) for the k lowest (finest)
        groups: the bound as it would be if the model had to guess the image's details from its coarse latents.
        k = 0 is the ELBO (forward's ``loss_per_image`` to the bit); k = n_groups decodes a draw of the prior alone.
        One encoder pass and one posterior pass serve every k (Decoder.forward_with_prior_below), so every k shares
        the posterior draws above its cut; ``noises`` fixes every group's standard-normal noise (posterior or
        prior)."""
        enc_in, target = self.preprocess(images)
        ndims = self.scored_dims(images.shape[1:])
        branches = self.decoder.forward_with_prior_below(self.encoder(enc_in), labels, ks, noises)
        return torch.stack([elbo_report(self.decoder.out_net.nll(px_z, target), kl_groups, ndims)["loss_per_image"]
                            for px_z, kl_groups in branches], dim=1)

    def _n_posterior(self, n_prior: int) -> int:
        return self.n_groups - self.decoder.checked_k(n_prior)

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, labels: torch.Tensor | None = None, temperature: float | Sequence[float] = 1.0,
               noises: Sequence[torch.Tensor | None] | None = None, shared_pixel_noise: bool = False,
               guidance: float | torch.Tensor = 0.0) -> torch.Tensor:
        """``n`` images from the prior (for ``labels`` when conditional), as uint8 (n, C, H, W). ``noises``
        fixes the latent noise of chosen groups; ``shared_pixel_noise`` draws the pixels of every image with
        the same uniforms (see dmol_sample); ``guidance`` w > 0 draws every latent group from
        p(z|y)^(1+w) / p(z|null)^w (classifier-free guidance; a model trained with --label_dropout; a 0-dim
        tensor always guides, see vae_helpers.guides)."""
        if guides(guidance):  # the asked labels, then the null label: the decoder guides every group's prior
            weights = label_weights(labels, self.H.n_classes)
            px_z, _ = self.decoder(None, torch.cat([weights, torch.zeros_like(weights)]), batch=2 * n,
                                   temperature=temperature, noises=noises, guidance=guidance)
            px_z = px_z[:n]
        else:
            px_z, _ = self.decoder(None, labels, batch=n, temperature=temperature, noises=noises)
        if not torch.isfinite(px_z).all():  # NaN pixel logits would fail deep in the sampler, or give noise silently
            cause = ("the guided latents left the range it was trained on: lower --guidance" if guides(guidance)
                     else "lower --temperature, or check the weights")
            raise FloatingPointError(f"sampling stopped: the decoder's output is not finite ({cause})")
        return self.levels_to_uint8(self.decoder.out_net.sample(px_z, shared_noise=shared_pixel_noise))

    @torch.no_grad()
    def prior_noise_of(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                       n_posterior: int | None = None) -> list[torch.Tensor]:
        """The latent code of ``images`` as standard-normal noise for the prior: ``sample(n, labels,
        noises=prior_noise_of(images, labels))`` decodes the posterior means of the top ``n_posterior`` groups
        (all by default) exactly, and draws the groups below from the prior. Interpolating and swapping
        classes act on this noise, because the prior of each group depends on the groups above it."""
        enc_in, _ = self.preprocess(images)
        n_posterior = self.decoder.n_groups if n_posterior is None else n_posterior
        zeros = [torch.zeros((len(images), *shape), device=images.device) if i < n_posterior else None
                 for i, shape in enumerate(self.decoder.latent_shapes())]  # zero noise: the posterior mean
        _, stats = self.decoder(self.encoder(enc_in), labels, n_posterior=n_posterior, noises=zeros,
                                prior_noise=True)
        return [s["eps"] for s in stats]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor | None = None, n_posterior: int | None = None,
                    temperature: float | Sequence[float] = 1.0) -> torch.Tensor:
        """Decode the top ``n_posterior`` latent groups from the posterior, the rest from the prior."""
        enc_in, _ = self.preprocess(images)
        activations = self.encoder(enc_in)
        px_z, _ = self.decoder(activations, labels, n_posterior=n_posterior, temperature=temperature)
        return self.levels_to_uint8(self.decoder.out_net.sample(px_z))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
