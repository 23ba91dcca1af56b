"""Out-of-distribution detection with a trained model: scores of in-distribution test images against another
dataset's, and how well each score separates them (evaluate.py --ood).

Every score is oriented so that a higher value says "outlier", in bits/dim:
- ``elbo``: the negative ELBO; ``iw``: the importance-weighted bound (K posterior draws). Likelihood models famously
  give simpler datasets *higher* likelihood than their own (Nalisnick et al. 2019), so these may rank below chance.
- ``L>k`` and ``LLR>k`` (a model with latent groups): the negative bound with the k lowest (finest) groups drawn
  from the conditional prior, and LLR>k = ELBO - L>k in bits/dim (Havtorn et al. 2021, "Hierarchical VAEs Know
  What They Don't Know"): how much the image's details, not its coarse content, carry its likelihood. Also by
  resolution: k = every group at a resolution and finer, the natural unit of a VDVAE.
- For a class-conditional model, ``class_marginal``: -log sum_y p(y) exp(ELBO(x|y)), a bound on -log p(x) with a
  uniform p(y); ``null_label`` (trained with --label_dropout): the bound under the null label, also on -log p(x).
- ``typicality`` (Nalisnick et al. 2019b, one image at a time): |ELBO(x) - the mean ELBO of validation inliers|.

A class-conditional model scores the ELBO, IW and L>k under the null label when it was trained with label dropout
(the unconditional model it contains), else under the class whose ELBO is best. The metrics treat outliers as the
positives: AUROC, AUPRC (average precision) and the false-positive rate at 80% true positives (FPR80).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from checkpoint import resolve_checkpoint
from data import Split, binarized, eval_batches, load_data, load_data_for
from hps import canonical_dataset, dataset_shape
from images import crop_padding
from models import load_model, local_weights
from scoring import class_conditional_bpd, importance_weighted_bpd, posterior_noise, random_subset
from utils import UserError, pick_device

# Validation inliers whose mean ELBO is typicality's reference when no selection set is given
TYPICALITY_IMAGES = 1000


# ---- metrics -------------------------------------------------------------------------------------------------


def detection_metrics(inlier_scores: np.ndarray, outlier_scores: np.ndarray) -> dict[str, float]:
    """AUROC, AUPRC and FPR80 of scores that are higher for outliers (the positives). Ties count half in the AUROC
    (the Mann-Whitney statistic); FPR80 is the false-positive rate of the highest threshold at which at least 80%
    of the outliers score at or above it."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores = np.concatenate([inlier_scores, outlier_scores]).astype(np.float64)
    truth = np.concatenate([np.zeros(len(inlier_scores)), np.ones(len(outlier_scores))])
    fpr, tpr, _ = roc_curve(truth, scores)
    return {"auroc": float(roc_auc_score(truth, scores)), "auprc": float(average_precision_score(truth, scores)),
            "fpr80": float(fpr[np.argmax(tpr >= 0.8)])}


# ---- outlier images in the model's shape ----------------------------------------------------------------------


def to_model_images(images: torch.Tensor, source_pad: int, H) -> torch.Tensor:
    """uint8 images (N, C, h, w) of another dataset, ``source_pad`` pixels of zero border around them, as the model
    sees its own: its channels (only equal counts: no colour is invented or thrown away), its scored size (resized:
    area averaging down, bilinear up) inside its border, and its pixel levels."""
    _, channels, height, width = images.shape
    if channels != H.image_channels:
        raise UserError(f"cannot bring {channels}-channel images to this {H.image_channels}-channel model")
    if height != width:
        raise UserError(f"cannot bring {height}x{width} images to this model's square ones")
    content = crop_padding(images, source_pad).float()
    target = H.image_size - 2 * H.pad
    if content.shape[-1] != target:
        mode = "area" if content.shape[-1] > target else "bilinear"
        content = F.interpolate(content, size=(target, target), mode=mode,
                                **({} if mode == "area" else {"align_corners": False}))
    top = H.pixel_levels - 1  # the model's levels, stored on 0..255 as its own loader stores them
    levels = torch.round(content.clamp(0, 255) * top / 255.0)
    out = torch.round(levels * 255.0 / top).to(torch.uint8)
    return F.pad(out, (H.pad,) * 4) if H.pad else out


def outlier_split(data, name: str, H) -> Split:
    """The test split of a loaded dataset ``name``, brought to the model's images (``to_model_images``); labels
    kept."""
    source = data.test
    images = to_model_images(source.images[:len(source)], dataset_shape(name).pad, H)
    out = Split(images, source.labels)
    return binarized(out) if H.likelihood == "bernoulli" else out


def equal_sets(inliers: Split, outliers: Split, n: int, seed: int) -> tuple[Split, Split]:
    """As many inliers as outliers: ``n`` of each (0: as many as the smaller set holds), drawn without replacement
    from each, seeded."""
    size = min(len(inliers), len(outliers)) if n <= 0 else n
    if size > min(len(inliers), len(outliers)):
        raise UserError(f"--n_images {n} is more than the {min(len(inliers), len(outliers))} images the smaller "
                        f"set holds")
    return random_subset(inliers, size, seed), random_subset(outliers, size, seed + 1)


# ---- scores ----------------------------------------------------------------------------------------------------


@dataclass
class ScoreSettings:
    """How images are scored: the IW draws, the batch, the device and the seed of the posterior noise."""

    iw_samples: int
    batch_size: int
    device: torch.device
    seed: int = 0


def score_labels(model, split: Split, batch_size: int, device: torch.device, seed: int,
                 label_free: bool = True) -> tuple[dict, torch.Tensor | None]:
    """The label-free scores of a class-conditional model (class-marginal; skipped without ``label_free`` where the
    labels need no class pass) and the labels under which the other scores are taken: the null label after label
    dropout, else each image's best class."""
    H = model.H
    if H.n_classes == 0 or H.multi_label:
        return {}, None
    if H.label_dropout > 0 and not label_free:
        return {}, torch.zeros(len(split), H.n_classes)
    per_class = class_conditional_bpd(model, split, batch_size, device, seed)  # (N, classes) bits/dim
    dims = model.scored_dims(split.images.shape[1:])
    log_joint = -per_class * dims * math.log(2.0) - math.log(H.n_classes)  # ELBO(x|y) + log p(y), uniform p(y)
    scores = {"class_marginal": (-torch.logsumexp(log_joint, dim=1) / (dims * math.log(2.0))).numpy()}
    if H.label_dropout > 0:
        return scores, torch.zeros(len(split), H.n_classes)
    return scores, per_class.argmin(dim=1)


@torch.no_grad()
def group_bounds(model, split: Split, labels: torch.Tensor | None, ks: list[int],
                 settings: ScoreSettings) -> torch.Tensor:
    """(N, len(ks)) negative L>k in bits/dim (k = 0: the ELBO) under ``labels``; each image's noise from (seed,
    its index), the same for every k."""
    model.eval()
    rows, first = [], 0
    for images, _ in eval_batches(split, settings.batch_size):
        n = len(images)
        noises = posterior_noise(model, range(first, first + n), settings.seed, settings.device)
        y = None if labels is None else labels[first:first + n].to(settings.device)
        if "groups" in model.abilities:
            rows.append(model.bounds_with_prior_below(images.to(settings.device), y, ks, noises).float().cpu())
        else:  # one latent: the ELBO only
            rows.append(model(images.to(settings.device), y, noises=noises)["loss_per_image"].float().cpu()[:, None])
        first += n
    return torch.cat(rows).double()


def iw_bounds(model, split: Split, labels: torch.Tensor | None, k: int, settings: ScoreSettings) -> np.ndarray:
    """(N,) the importance-weighted negative L>k (k = 0: the IW bound) with ``settings.iw_samples`` draws under
    ``labels``, in bits/dim."""
    relabelled = split if labels is None else Split(split.images, labels)
    return importance_weighted_bpd(model, relabelled, settings.iw_samples, settings.batch_size, settings.device,
                                   settings.seed, n_prior=k).numpy()


def resolution_ks(model) -> dict[str, int]:
    """For each resolution of a VDVAE's latent groups, the k that puts that resolution and every finer one under
    the prior (the decoder runs coarse to fine, so they are its last k groups)."""
    bases = [block.base for block in model.decoder.dec_blocks]
    return {str(res): sum(b >= res for b in bases) for res in sorted(set(bases), reverse=True)}


def all_scores(model, split: Split, ks: list[int], settings: ScoreSettings, valid_mean: float | None = None,
               label_free: bool = True) -> dict:
    """Every score of every image of ``split`` (numpy arrays, higher = outlier), with ``per_k``: the (N, len(ks))
    negative L>k, and the ``labels`` the scores were taken under. ``valid_mean``: the validation inliers' mean
    ELBO, for typicality (None: not scored); ``label_free``: the class-marginal bound too."""
    extra, labels = score_labels(model, split, settings.batch_size, settings.device, settings.seed, label_free)
    bounds = group_bounds(model, split, labels, ks, settings)
    elbo = bounds[:, 0]
    scores = {"elbo": elbo.numpy(), **extra}
    if labels is not None and model.H.label_dropout > 0 and label_free:
        scores["null_label"] = elbo.numpy()  # the ELBO is taken under the null label: the same numbers
    if valid_mean is not None:
        scores["typicality"] = (elbo - valid_mean).abs().numpy()
    return {"scores": scores, "per_k": bounds.numpy(), "labels": labels}


def metrics_per_k(inlier_bounds: np.ndarray, outlier_bounds: np.ndarray, ks: list[int]) -> dict[str, dict]:
    """The metrics of L>k and LLR>k for every k > 0 in ``ks`` (columns of the (N, len(ks)) bounds, k = 0 first)."""
    out = {}
    for col, k in enumerate(ks):
        if k == 0:
            continue
        out[f"L>{k}"] = detection_metrics(inlier_bounds[:, col], outlier_bounds[:, col])
        out[f"LLR>{k}"] = detection_metrics(inlier_bounds[:, col] - inlier_bounds[:, 0],
                                            outlier_bounds[:, col] - outlier_bounds[:, 0])
    return out


def best_k(metrics: dict[str, dict], prefix: str, candidates: list[int]) -> int:
    """The k among ``candidates`` whose ``prefix``>k score has the highest AUROC (the smaller k on a tie)."""
    return max(candidates, key=lambda k: (metrics[f"{prefix}>{k}"]["auroc"], -k))


def check_k(model, k: int | None) -> None:
    """A fixed k (--ood_k) must name some of the model's latent groups."""
    if k is None:
        return
    if "groups" not in model.abilities:
        raise UserError(f"--ood_k needs a model with latent groups; a {model.family} model has one latent")
    if not 1 <= k <= model.n_groups:
        raise UserError(f"--ood_k {k} is not a k of this model: 1..{model.n_groups} (its latent groups)")


def ood_report(model, inliers: Split, outliers: Split, valid_inliers: Split, select_outliers: Split | None,
               settings: ScoreSettings, fixed_k: int | None = None) -> dict:
    """Every score's metrics on the (equal-sized) test pair; L>k and LLR>k for every k, with the k of each (and of
    each by resolution) chosen on the validation inliers against ``select_outliers``, or on the test pair itself
    when None (said in ``k_chosen_on``), or ``fixed_k``; the per-image scores of the headline ones. With
    ``settings.iw_samples`` > 1, also the IW bound and the IW LLR>k at the chosen k."""
    check_k(model, fixed_k)
    groups = "groups" in model.abilities
    ks = list(range(model.n_groups + 1)) if groups else [0]
    selecting = groups and select_outliers is not None and fixed_k is None
    valid = all_scores(model, valid_inliers, ks if selecting else [0], settings, label_free=False)
    valid_mean = float(valid["per_k"][:, 0].mean())
    test_in, test_out = (all_scores(model, s, ks, settings, valid_mean) for s in (inliers, outliers))
    metrics = {name: detection_metrics(test_in["scores"][name], test_out["scores"][name])
               for name in test_in["scores"]}
    report = {"n_inliers": len(inliers), "n_outliers": len(outliers), "n_valid_inliers": len(valid_inliers),
              "score_label": None if test_in["labels"] is None else
              "null" if model.H.label_dropout > 0 else "best class",
              "valid_mean_elbo": valid_mean, "metrics": metrics}
    per_image = {"elbo": (test_in["scores"]["elbo"], test_out["scores"]["elbo"])}
    if groups:
        per_k = metrics_per_k(test_in["per_k"], test_out["per_k"], ks)
        by_res = resolution_ks(model)
        if fixed_k is not None:
            chooser, report["k_chosen_on"] = None, "--ood_k"
        elif selecting:
            chooser = metrics_per_k(valid["per_k"], all_scores(model, select_outliers, ks, settings,
                                                               label_free=False)["per_k"], ks)
            report["k_chosen_on"] = "validation inliers against the selection outliers (--ood_select)"
            report["n_select_outliers"] = len(select_outliers)
        else:
            chooser, report["k_chosen_on"] = per_k, "the test pair itself (no --ood_select): an optimistic choice"
        chosen = {}
        for prefix in ("L", "LLR"):
            chosen[prefix] = fixed_k or best_k(chooser, prefix, ks[1:])
            if chooser is not None:
                chosen[f"{prefix} by resolution"] = best_k(chooser, prefix, sorted(set(by_res.values())))
        report.update(n_groups=model.n_groups, resolution_ks=by_res, chosen_k=chosen, per_k=per_k)
        k = chosen["LLR"]
        per_image[f"LLR>{k}"] = (test_in["per_k"][:, k] - test_in["per_k"][:, 0],
                                 test_out["per_k"][:, k] - test_out["per_k"][:, 0])
    if settings.iw_samples > 1:
        iw_in = iw_bounds(model, inliers, test_in["labels"], 0, settings)
        iw_out = iw_bounds(model, outliers, test_out["labels"], 0, settings)
        metrics[f"iw (K={settings.iw_samples})"] = detection_metrics(iw_in, iw_out)
        per_image[f"iw (K={settings.iw_samples})"] = (iw_in, iw_out)
        if groups:
            k = report["chosen_k"]["LLR"]
            llr_in = iw_bounds(model, inliers, test_in["labels"], k, settings) - iw_in
            llr_out = iw_bounds(model, outliers, test_out["labels"], k, settings) - iw_out
            name = f"LLR>{k} (IW, K={settings.iw_samples})"
            metrics[name] = detection_metrics(llr_in, llr_out)
            per_image[name] = (llr_in, llr_out)
    report["per_image"] = {name: {"inliers": np.round(a, 5).tolist(), "outliers": np.round(b, 5).tolist()}
                           for name, (a, b) in per_image.items()}
    return report


def load_outliers(name: str, root: str, H) -> Split:
    """Dataset ``name``'s test split from ``root``, in the model's shape (``outlier_split``)."""
    return outlier_split(load_data(name, root, H.image_size), name, H)


def ood_checkpoint(weights: str, dataset: str, ood_root: str | None = None, select: str | None = None,
                   n_images: int = 0, iw_samples: int = 1, batch_size: int = 64, device: str = "auto",
                   seed: int = 0, use_ema: bool = True, data_root: str | None = None, hps: str | None = None,
                   fixed_k: int | None = None) -> dict:
    """evaluate.py --ood: the model's test images against ``dataset``'s (from ``ood_root``, default the model's
    data folder), ``n_images`` of each drawn at random with ``seed`` (0: as many as the smaller set holds), every
    score's metrics (``ood_report``), as one JSON-ready dict."""
    t0 = time.perf_counter()
    dev = pick_device(device)
    weights = local_weights(weights)
    model, _ = load_model(weights, dev, use_ema=use_ema, hps=hps)
    check_k(model, fixed_k)  # before any data is read
    H = model.H
    root = ood_root or data_root or H.data_root
    outliers = load_outliers(dataset, root, H)
    own = load_data_for(H, data_root)
    inliers, outliers = equal_sets(own.test, outliers, n_images, seed)
    if select:
        valid, select_outliers = equal_sets(own.valid, load_outliers(select, root, H), 0, seed)
    else:
        valid, select_outliers = random_subset(own.valid, TYPICALITY_IMAGES, seed), None
    report = ood_report(model, inliers, outliers, valid, select_outliers,
                        ScoreSettings(iw_samples, batch_size, dev, seed), fixed_k)
    header = {"checkpoint": str(resolve_checkpoint(weights)), "weights": "ema" if use_ema else "raw",
              "family": model.family, "dataset": H.dataset, "ood": canonical_dataset(dataset),
              "select": canonical_dataset(select) if select else None, "iw_samples": iw_samples, "seed": seed,
              "drawn": f"{report['n_inliers']} of the {H.dataset} test images and as many of the {dataset} test "
                       f"images, each drawn at random without replacement (seed {seed} and {seed + 1})"}
    return {**header, **report, "seconds": round(time.perf_counter() - t0, 1)}


def format_ood_table(r: dict) -> str:
    """The report as lines: every score's AUROC, AUPRC and FPR80, then AUROC per k."""
    lines = [f"{r['dataset']} against {r['ood']}: {r['drawn']}; outliers are the positives, higher scores say "
             f"outlier" + (f"; scores taken under the {r['score_label']} label" if r["score_label"] else ""),
             f"  {'score':<34}{'AUROC':>8}{'AUPRC':>8}{'FPR80':>8}"]
    rows = dict(r["metrics"])
    if "chosen_k" in r:
        for name, k in r["chosen_k"].items():
            prefix = name.split()[0]
            res = next(res for res, v in r["resolution_ks"].items() if v == k) if "resolution" in name else None
            label = f"{prefix}>{k}" + (f" (from {res}x{res} down)" if res else "") + " *"
            rows[label] = r["per_k"][f"{prefix}>{k}"]
    for name, m in rows.items():
        lines.append(f"  {name:<34}{m['auroc']:8.4f}{m['auprc']:8.4f}{m['fpr80']:8.4f}")
    if "per_k" in r:
        lines.append(f"  * k chosen on {r['k_chosen_on']}")
        lines.append("  AUROC per k (L>k / LLR>k): " + ", ".join(
            f"k={k} {r['per_k'][f'L>{k}']['auroc']:.3f}/{r['per_k'][f'LLR>{k}']['auroc']:.3f}"
            for k in range(1, r["n_groups"] + 1)))
    return "\n".join(lines)
