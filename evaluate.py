"""Evaluate a checkpoint on held-out data, in bits per dimension (EMA weights by default).

    python evaluate.py --weights weights/digits                       # ELBO, per class, classification
    python evaluate.py --weights weights/cifar10 --iw_samples 1000    # plus an importance-weighted bound

Reports the negative ELBO split into reconstruction and KL (and KL per resolution), an importance-weighted
bound with K posterior draws (K=1 is the ELBO), the negative ELBO of each class, and generative
classification: each image is given the class whose conditional ELBO is best (a uniform p(y)), with its
accuracy and confusion matrix. Prints a table and writes one JSON file beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from data import load_data_for
from models import load_model, local_weights
from scoring import class_conditional_bpd, evaluate_elbo, importance_weighted_bpd, kl_per_resolution
from utils import UserError, check_output_file, checkpoint_script_parser, pick_device, resolve_checkpoint, run_cli


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
    if H.n_classes > 0 and not H.multi_label:  # per class and generative classification: one class per image
        result["per_class_bpd"] = {name: elbo["per_image"][labels == c].mean().item()
                                   for c, name in enumerate(class_names) if (labels == c).any()}
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


def format_table(r: dict) -> str:
    bound, recon, kl = r["terms"]
    width = max(20, len(bound) + 1, len(recon) + 3, len(kl) + 3)
    lines = [f"{r['dataset']} {r['split']} ({r['n_images']} images, {r['weights']} weights), bits/dim:",
             f"  {bound:<{width}}{r['bpd']:.4f}",
             f"    {recon:<{width - 2}}{r['recon_bpd']:.4f}",
             f"    {kl:<{width - 2}}{r['kl_bpd']:.4f}"]
    if list(r["kl_per_resolution"]) != ["z"]:  # one latent (cvae, vlae, vqvae): nothing to split
        lines += [f"      at {res:>4}x{res:<4}{'':{width - 13}}{v:.4f}" for res, v in r["kl_per_resolution"].items()]
    lines.append(f"  IW bound (K={r['iw_samples']:<5})   {r['bpd_iw']:.4f}")
    lines.append(f"  negative ELBO in nats per image: {r['nats_per_image']:.2f}")
    for name, v in r.get("per_class_bpd", {}).items():
        lines.append(f"  class {name:<14} {v:.4f}")
    if "gen_class_acc" in r:
        lines.append(f"  generative classification accuracy {r['gen_class_acc']:.4f}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = checkpoint_script_parser(__doc__)
    p.add_argument("--split", default="test", choices=["test", "valid", "train"], help="which split")
    p.add_argument("--iw_samples", type=int, default=1, help="posterior draws of the IW bound (1: the ELBO)")
    p.add_argument("--n_batch", type=int, default=64, help="rows per forward pass")
    p.add_argument("--no_classify", action="store_true", help="skip generative classification")
    p.add_argument("--data_root", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="JSON path (default: eval_<split>.json beside the checkpoint)")
    return p


def default_report_path(weights: str, split: str) -> Path:
    """eval_SPLIT.json beside the checkpoint, or in the current folder for hub weights (never into the hub's
    cache)."""
    path = Path(weights)
    beside = Path(".") if weights.startswith("hf:") else path if path.is_dir() else path.parent
    return beside / f"eval_{split}.json"


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.iw_samples < 1 or args.n_batch < 1:
        raise UserError("--iw_samples and --n_batch must be >= 1")
    out = Path(args.out) if args.out else default_report_path(args.weights, args.split)
    if args.out or out.parent.is_dir():  # (a default beside weights that do not exist: loading them says so)
        check_output_file(out, parent_must_exist=True)  # before the download, the data and the evaluation
    result = evaluate_checkpoint(args.weights, args.split, args.iw_samples, args.n_batch, not args.no_classify,
                                 args.device, args.seed, not args.raw_weights, args.data_root, args.hps)
    print(format_table(result))
    try:
        out.write_text(json.dumps(result, indent=1))
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
