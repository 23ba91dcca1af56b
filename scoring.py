"""Held-out scores of a model of any family, in bits per dimension: the negative ELBO (and its KL per latent group),
the importance-weighted bound, and the per-class ELBO that generative classification reads. Shared by train.py
(validation during training), evaluate.py (the command line, through ``evaluate_checkpoint``) and bench/.

Each image's posterior noise comes from (seed, the image's index), so every figure is the same at any batch size
and any number of processes; sums accumulate in float64 on the CPU (MPS has no float64).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch

from checkpoint import resolve_checkpoint
from data import Split, eval_batches, load_data_for
from models import class_embedding_is_zero, load_model, local_weights
from utils import Dist, pick_device


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


@torch.no_grad()
def evaluate_elbo(model, split: Split, batch_size: int, device: torch.device, seed: int = 0,
                  dist: Dist | None = None, null_label: bool = False) -> dict:
    """Mean negative ELBO over ``split`` (bits/dim): total, reconstruction, KL, KL per latent group, and
    the per-image values (in one process). Each image's posterior noise comes from (seed, its index), so the
    figures are the same at any batch size and any number of ranks (batch b on rank b % world, sums reduced);
    the caller's RNG state is untouched. Sums accumulate in float64 on the CPU (MPS has no float64).
    ``null_label``: every image under the null label (all-zero class weights) of a model trained with
    --label_dropout, whose bound is then on -log p(x) rather than -log p(x|y)."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    conditional = model.H.n_classes > 0
    per_image, sums = [], torch.zeros(4 + model.n_groups, dtype=torch.float64)
    start = 0
    for b, (images, labels) in enumerate(eval_batches(split, batch_size)):
        n = len(labels)
        start, first = start + n, start
        if b % dist.world != dist.rank:
            continue
        noises = posterior_noise(model, range(first, first + n), seed, device)
        if null_label:
            labels = torch.zeros((n, model.H.n_classes))
        out = model(images.to(device), labels.to(device) if conditional else None, noises=noises)
        loss_per_image = out["loss_per_image"].float().cpu().double()
        per_image.append(loss_per_image)
        sums += torch.cat([torch.tensor([loss_per_image.sum().item(), out["recon"].item() * n, out["kl"].item() * n,
                                         float(n)], dtype=torch.float64),
                           out["kl_groups"].float().cpu().double() * n])
    model.train(was_training)
    totals = dist.all_reduce(sums.to(device) if device.type == "cuda" else sums)  # NCCL reduces device tensors
    loss, recon, kl, count, *groups = totals.tolist()
    dims = model.scored_dims(split.images.shape[1:])
    return {"loss": loss / count, "recon": recon / count, "kl": kl / count,
            "nats_per_image": loss / count * dims * math.log(2.0),  # how binarized MNIST is reported
            "kl_groups": [g / count for g in groups],
            "per_image": torch.cat(per_image) if dist.world == 1 else None}


@torch.no_grad()
def importance_weighted_bpd(model, split: Split, k: int, batch_size: int, device: torch.device,
                            seed: int = 0) -> torch.Tensor:
    """Per-image importance-weighted bound with ``k`` posterior draws, as bits/dim (lower is better).

    log p(x|y) >= log (1/K) sum_k p(x, z_k | y) / q(z_k | x, y); draws are batched ``batch_size`` rows at a
    time, so K=1000 fits in the memory of one evaluation batch.
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
            log_w.append(model.log_importance_weights(x, y, posterior_noise(model, keys, seed, device)).float().cpu())
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


def evaluate_checkpoint(weights: str, split_name: str = "test", iw_samples: int = 1, batch_size: int = 64,
                        classify: bool = True, device: str = "auto", seed: int = 0,
                        use_ema: bool = True, data_root: str | None = None, hps: str | None = None) -> dict:
    """Every figure this module reports, as one JSON-ready dict."""

    t0 = time.perf_counter()
    dev = pick_device(device)
    weights = local_weights(weights)  # hf:ORG/NAME: the file in huggingface_hub's cache
    model, class_names = load_model(weights, dev, use_ema=use_ema, hps=hps)
    H = model.H
    data = load_data_for(H, data_root)
    split = {"test": data.test, "valid": data.valid, "train": data.train}[split_name]
    elbo = evaluate_elbo(model, split, batch_size, dev, seed)
    result = {
        "checkpoint": str(resolve_checkpoint(weights)), "weights": "ema" if use_ema else "raw",
        "dataset": H.dataset, "split": split_name, "n_images": len(split), "pixel_levels": H.pixel_levels,
        "bpd": elbo["loss"], "recon_bpd": elbo["recon"], "kl_bpd": elbo["kl"],
        "nats_per_image": elbo["nats_per_image"],
        "kl_per_resolution": kl_per_resolution(model, elbo["kl_groups"]), "kl_per_group": elbo["kl_groups"],
        "iw_samples": iw_samples, "terms": list(model.bound_terms),
    }
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
