"""Held-out scores of a model of any family, in bits per dimension: the negative ELBO (and its KL per latent group),
the importance-weighted bound, and the per-class ELBO that generative classification reads; for a VDVAE, also the
share of latent channels in use (``active_latents``). Shared by train.py (validation during training), evaluate.py
(the command line, through ``evaluate_checkpoint``) and bench/.

Each image's posterior noise comes from (seed, the image's index), so every figure is the same at any batch size
and any number of processes; sums accumulate in float64 on the CPU (MPS has no float64).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import numpy as np
import torch

from checkpoint import resolve_checkpoint
from data import Split, eval_batches, load_data_for
from models import class_embedding_is_zero, load_model, local_weights
from utils import Dist, pick_device

# A latent channel is active when its mean held-out KL exceeds this many nats per latent dimension. The value is
# Efficient-VDVAE's ``latent_active_threshold = 1e-4`` (Hazami et al. 2022); theirs is applied per latent group, in
# bits, to a training batch, for a debugging print, where ours is applied per channel, in nats, to held-out data.
ACTIVE_LATENT_THRESHOLD = 1e-4


def posterior_noise(model, keys: Sequence[int], seed: int, device: torch.device) -> list[torch.Tensor]:
    """Standard-normal noise for every latent group of one posterior draw per key (an image's index in its split,
    or an (image, draw) number): each key's noise comes from a generator seeded by (seed, key) alone, so a figure
    does not depend on the batch size, the number of processes or the order of the batches. Drawn on the CPU."""
    shapes = model.latent_shapes()
    sizes = [math.prod(shape) for shape in shapes]
    flat = torch.empty(len(keys), sum(sizes))
    generator = torch.Generator()
    for row, key in enumerate(keys):  # the CPU generator keeps 32 bits of a seed: mix (seed, key) into them
        generator.manual_seed(int(np.random.SeedSequence([seed % 2**32, int(key)]).generate_state(1)[0]))
        torch.randn(flat.shape[1], generator=generator, out=flat[row])
    return [chunk.reshape(len(keys), *shape).to(device) for chunk, shape in zip(flat.split(sizes, dim=1), shapes)]


@contextmanager
def channel_kl_sums(model) -> Iterator[list[torch.Tensor]]:
    """While open, every forward pass of a VDVAE (``"groups"`` in its abilities) appends to the yielded list, for
    each of its latent groups in turn, that group's KL map (B, C, H, W) summed over the batch and the positions:
    a (C,) float32 tensor on the model's device, in nats. Read through forward hooks on the decoder's blocks, so
    the ELBO's own pass yields it (vae.py's DecBlock returns the map as ``stats["kl"]``); the hooks are removed on
    leaving."""
    if "groups" not in model.abilities:
        raise ValueError(f"a {model.family} model has no latent groups to split into channels")
    sums: list[torch.Tensor] = []

    def record(block, inputs, output) -> None:
        kl = output[1].get("kl")
        if kl is not None:  # a group drawn from the prior has no KL (not in an ELBO pass)
            sums.append(kl.float().sum(dim=(0, 2, 3)))

    handles = [block.register_forward_hook(record) for block in model.decoder.dec_blocks]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def evaluate_elbo(model, split: Split, batch_size: int, device: torch.device, seed: int = 0,
                  dist: Dist | None = None, null_label: bool = False, per_channel: bool = False) -> dict:
    """Mean negative ELBO over ``split`` (bits/dim): total, reconstruction, KL, KL per latent group, and
    the per-image values (in one process). Each image's posterior noise comes from (seed, its index), so the
    figures are the same at any batch size and any number of ranks (batch b on rank b % world, sums reduced);
    the caller's RNG state is untouched. Sums accumulate in float64 on the CPU (MPS has no float64).
    ``null_label``: every image under the null label (all-zero class weights) of a model trained with
    --label_dropout, whose bound is then on -log p(x) rather than -log p(x|y).
    ``per_channel`` (a VDVAE): also ``kl_per_channel``, one (C,) float64 tensor per latent group, the KL of each
    channel in nats per latent dimension, averaged over the images and the group's positions (read from the same
    pass; see ``channel_kl_sums``). Times the group's positions and summed over its channels, a group's entry is
    its KL in nats per image, ``kl_groups`` times the scored dimensions times log 2."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    conditional = model.H.n_classes > 0
    channels = [shape[0] for shape in model.latent_shapes()] if per_channel else []
    per_image, sums = [], torch.zeros(4 + model.n_groups + sum(channels), dtype=torch.float64)
    start = 0
    with channel_kl_sums(model) if per_channel else nullcontext([]) as kl_sums:
        for b, (images, labels) in enumerate(eval_batches(split, batch_size)):
            n = len(labels)
            start, first = start + n, start
            if b % dist.world != dist.rank:
                continue
            noises = posterior_noise(model, range(first, first + n), seed, device)
            if null_label:
                labels = torch.zeros((n, model.H.n_classes))
            kl_sums.clear()
            out = model(images.to(device), labels.to(device) if conditional else None, noises=noises)
            if per_channel and len(kl_sums) != model.n_groups:
                raise RuntimeError(f"read the KL of {len(kl_sums)} latent groups of {model.n_groups}")
            loss_per_image = out["loss_per_image"].float().cpu().double()
            per_image.append(loss_per_image)
            sums += torch.cat([torch.tensor([loss_per_image.sum().item(), out["recon"].item() * n,
                                             out["kl"].item() * n, float(n)], dtype=torch.float64),
                               out["kl_groups"].float().cpu().double() * n,
                               *([torch.cat(kl_sums).cpu().double()] if per_channel else [])])
    model.train(was_training)
    totals = dist.all_reduce(sums.to(device) if device.type == "cuda" else sums)  # NCCL reduces device tensors
    totals = totals.cpu()
    loss, recon, kl, count, *groups = totals[:4 + model.n_groups].tolist()
    dims = model.scored_dims(split.images.shape[1:])
    result = {"loss": loss / count, "recon": recon / count, "kl": kl / count,
              "nats_per_image": loss / count * dims * math.log(2.0),  # how binarized MNIST is reported
              "kl_groups": [g / count for g in groups],
              "per_image": torch.cat(per_image) if dist.world == 1 else None}
    if per_channel:
        positions = [shape[1] * shape[2] for shape in model.latent_shapes()]
        result["kl_per_channel"] = [channel_sums / (count * p) for channel_sums, p
                                    in zip(totals[4 + model.n_groups:].split(channels), positions)]
    return result


def active_latents(model, kl_per_channel: list[torch.Tensor], threshold: float = ACTIVE_LATENT_THRESHOLD) -> dict:
    """The share of a VDVAE's latent channels in use: Efficient-VDVAE's latent-use diagnostic (Hazami et al. 2022,
    who find about 3% of the latent dimensions carry the information).

    For each latent group (one per decoder block, of resolution ``block.base`` and ``block.zdim`` channels) and
    each channel c, the channel's KL is the mean over the held-out images and over the group's spatial positions of
    KL(q(z | z_above, x, y) || p(z | z_above, y)), in nats per latent dimension (``kl_per_channel`` of
    ``evaluate_elbo``). This is Efficient-VDVAE's ``div_stats`` statistic (``KLDivergenceStats`` in their synthesize
    code), which they compute on a training subset in bits; here it is held-out data and nats. A channel is active
    when its KL exceeds ``threshold`` nats (ACTIVE_LATENT_THRESHOLD, 1e-4 by default).

    Returns ``threshold_nats``, ``share`` (active channels / all channels), ``active`` and ``channels`` counts,
    and ``per_resolution``: the same three per resolution, keyed by the resolution as a string, coarse to fine.
    """
    per_res: dict[int, list[int]] = {}
    for block, kl in zip(model.decoder.dec_blocks, kl_per_channel, strict=True):
        counts = per_res.setdefault(block.base, [0, 0])
        counts[0] += int((kl > threshold).sum())
        counts[1] += kl.numel()
    active, channels = sum(a for a, _ in per_res.values()), sum(c for _, c in per_res.values())
    return {"threshold_nats": threshold, "share": active / channels, "active": active, "channels": channels,
            "per_resolution": {str(res): {"share": a / c, "active": a, "channels": c}
                               for res, (a, c) in sorted(per_res.items())}}


@torch.no_grad()
def importance_weighted_bpd(model, split: Split, k: int, batch_size: int, device: torch.device,
                            seed: int = 0, n_prior: int = 0) -> torch.Tensor:
    """Per-image importance-weighted bound with ``k`` posterior draws, as bits/dim (lower is better).

    log p(x|y) >= log (1/K) sum_k p(x, z_k | y) / q(z_k | x, y); draws are batched ``batch_size`` rows at a
    time, so K=1000 fits in the memory of one evaluation batch. ``n_prior`` > 0 (a model with latent groups): the
    importance-weighted L>n_prior instead, its lowest groups drawn from the prior (VAE.log_importance_weights).
    """
    model.eval()
    conditional = model.H.n_classes > 0
    ndims = model.scored_dims(split.images.shape[1:])
    images_per_chunk = max(1, batch_size // k)
    bounds, first_image = [], 0
    for images, labels in eval_batches(split, images_per_chunk):
        rows = images.repeat_interleave(k, dim=0)
        row_labels = labels.repeat_interleave(k, dim=0)
        first_row = first_image * k  # draw j of image i has key i * k + j: independent of the chunking
        log_w = []
        for start in range(0, len(rows), batch_size):
            x = rows[start:start + batch_size].to(device)
            y = row_labels[start:start + batch_size].to(device) if conditional else None
            keys = range(first_row + start, first_row + start + len(x))
            noises = posterior_noise(model, keys, seed, device)
            extra = {"n_prior": n_prior} if n_prior else {}  # only a family with latent groups takes it
            log_w.append(model.log_importance_weights(x, y, noises, **extra).float().cpu())
        log_w = torch.cat(log_w).double().reshape(len(images), k)
        log_px = torch.logsumexp(log_w, dim=1) - math.log(k)
        bounds.append(-log_px / (ndims * math.log(2.0)))
        first_image += len(images)
    return torch.cat(bounds)


@torch.no_grad()
def class_conditional_bpd(model, split: Split, batch_size: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Negative ELBO of every image under every class label: (N, n_classes) bits/dim.

    Each class sees the same posterior noise for a given image, so differences come from the label alone.
    """
    model.eval()
    scores, first = [], 0
    for images, _ in eval_batches(split, batch_size):
        images = images.to(device)
        noises = posterior_noise(model, range(first, first + len(images)), seed, device)
        row = []
        for c in range(model.H.n_classes):
            labels = torch.full((len(images),), c, device=device, dtype=torch.long)
            row.append(model(images, labels, noises=noises)["loss_per_image"].float().cpu().double())
        scores.append(torch.stack(row, dim=1))
        first += len(images)
    return torch.cat(scores)


def kl_per_resolution(model, kl_groups: list[float]) -> dict[str, float]:
    """The KL summed over the latent groups of each resolution (a family with one latent: all of it at "z")."""
    if "groups" not in model.abilities:
        return {"z": sum(kl_groups)}
    out: dict[str, float] = {}
    for block, value in zip(model.decoder.dec_blocks, kl_groups):
        out[str(block.base)] = out.get(str(block.base), 0.0) + value
    return out


def random_subset(split: Split, n: int, seed: int) -> Split:
    """``n`` images of ``split`` drawn without replacement (seeded), in their order; the whole split for n = 0 or
    n >= its size."""
    if n <= 0 or n >= len(split):
        return split
    rows = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Split(split.images[rows], split.labels[rows])


def evaluate_checkpoint(weights: str, split_name: str = "test", iw_samples: int = 1, batch_size: int = 64,
                        classify: bool = True, device: str = "auto", seed: int = 0,
                        use_ema: bool = True, data_root: str | None = None, hps: str | None = None,
                        n_images: int = 0) -> dict:
    """Every figure this module reports, as one JSON-ready dict; on ``n_images`` of the split (0: all) drawn at
    random with ``seed`` when fewer."""

    t0 = time.perf_counter()
    dev = pick_device(device)
    weights = local_weights(weights)  # hf:ORG/NAME: the file in huggingface_hub's cache
    model, class_names = load_model(weights, dev, use_ema=use_ema, hps=hps)
    H = model.H
    data = load_data_for(H, data_root)
    split = random_subset({"test": data.test, "valid": data.valid, "train": data.train}[split_name], n_images, seed)
    groups = "groups" in model.abilities  # a VDVAE: its latent channels' use too, from the same pass
    elbo = evaluate_elbo(model, split, batch_size, dev, seed, per_channel=groups)
    result = {
        "checkpoint": str(resolve_checkpoint(weights)), "weights": "ema" if use_ema else "raw",
        "dataset": H.dataset, "split": split_name, "n_images": len(split), "pixel_levels": H.pixel_levels,
        "bpd": elbo["loss"], "recon_bpd": elbo["recon"], "kl_bpd": elbo["kl"],
        "nats_per_image": elbo["nats_per_image"],
        "kl_per_resolution": kl_per_resolution(model, elbo["kl_groups"]), "kl_per_group": elbo["kl_groups"],
        "iw_samples": iw_samples, "terms": list(model.bound_terms),
    }
    if groups:
        result["active_latents"] = active_latents(model, elbo["kl_per_channel"])
    if iw_samples > 1:
        result["bpd_iw"] = importance_weighted_bpd(model, split, iw_samples, batch_size, dev, seed).mean().item()
    else:
        result["bpd_iw"] = elbo["loss"]
    labels = split.labels
    result["class_embedding_is_zero"] = class_embedding_is_zero(model)
    if H.n_classes > 0 and not H.multi_label:  # per class and generative classification: one class per image
        result["per_class_bpd"] = {name: elbo["per_image"][labels == c].mean().item()
                                   for c, name in enumerate(class_names) if (labels == c).any()}
        if H.label_dropout > 0:  # one model, conditional and unconditional: its bound on -log p(x) too
            unconditional = evaluate_elbo(model, split, batch_size, dev, seed, null_label=True)
            result.update(bpd_unconditional=unconditional["loss"], recon_bpd_unconditional=unconditional["recon"],
                          kl_bpd_unconditional=unconditional["kl"])
        if classify:
            scores = class_conditional_bpd(model, split, batch_size, dev, seed)
            predicted = scores.argmin(dim=1)
            confusion = torch.zeros(H.n_classes, H.n_classes, dtype=torch.long)
            confusion.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)
            result["gen_class_acc"] = (predicted == labels).double().mean().item()
            result["confusion"] = confusion.tolist()
    result["class_names"] = class_names
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result
