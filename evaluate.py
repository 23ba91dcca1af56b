"""Evaluate a checkpoint on held-out data, in bits per dimension (EMA weights by default).

    python evaluate.py --weights weights/digits                       # ELBO, per class, classification
    python evaluate.py --weights weights/cifar10 --iw_samples 1000    # plus an importance-weighted bound
    python evaluate.py --weights weights/fashion_mnist.safetensors --ood mnist --ood_root ~/mnist  # outliers

Reports the negative ELBO split into reconstruction and KL (and KL per resolution), an importance-weighted
bound with K posterior draws (K=1 is the ELBO), the negative ELBO of each class, and generative
classification: each image is given the class whose conditional ELBO is best (a uniform p(y)), with its
accuracy and confusion matrix; for a model trained with --label_dropout, also the bound under the null label (on
-log p(x), unconditional); for a VDVAE, the share of its latent channels in use (held-out KL above 1e-4 nats per
dimension: Efficient-VDVAE's diagnostic, scoring.active_latents). Prints a table and writes one JSON file beside
the checkpoint.

With ``--ood DATASET``: out-of-distribution detection (outliers.py) of the model's test images against that dataset's,
brought to the model's shape and pixel levels: for each score (the negative ELBO, the IW bound, L>k and LLR>k of
the latent groups, the class-marginal and null-label bounds, typicality), AUROC, AUPRC and FPR at 80% TPR on equal
numbers of inliers and outliers; the k of L>k and LLR>k chosen on validation inliers against ``--ood_select`` (else
on the test pair, which the report says). Writes eval_ood_DATASET.json beside the checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from hps import canonical_dataset
from outliers import format_ood_table, ood_checkpoint
from scoring import evaluate_checkpoint
from utils import UserError, check_output_file, checkpoint_script_parser, resolve_weights_flag, run_cli


def format_table(r: dict) -> str:
    bound, recon, kl = r["terms"]
    width = max(20, len(bound) + 1, len(recon) + 3, len(kl) + 3)
    lines = [f"{r['dataset']} {r['split']} ({r['n_images']} images, {r['weights']} weights), bits/dim:",
             f"  {bound:<{width}}{r['bpd']:.4f}",
             f"    {recon:<{width - 2}}{r['recon_bpd']:.4f}",
             f"    {kl:<{width - 2}}{r['kl_bpd']:.4f}"]
    if list(r["kl_per_resolution"]) != ["z"]:  # one latent (cvae, vlae, vqvae): nothing to split
        lines += [f"      at {res:>4}x{res:<4}{'':{width - 13}}{v:.4f}" for res, v in r["kl_per_resolution"].items()]
    if "active_latents" in r:  # a VDVAE: the share of its latent channels that carry information
        lines.append(format_active_latents(r["active_latents"]))
    lines.append(f"  IW bound (K={r['iw_samples']:<5})   {r['bpd_iw']:.4f}")
    lines.append(f"  negative ELBO in nats per image: {r['nats_per_image']:.2f}")
    if "bpd_unconditional" in r:  # trained with --label_dropout: the null label's bound, on -log p(x)
        lines.append(f"  unconditional (null label): {r['bpd_unconditional']:.4f} = recon "
                     f"{r['recon_bpd_unconditional']:.4f} + {r['kl_bpd_unconditional']:.4f}")
    if r.get("per_class_bpd") and r.get("class_embedding_is_zero"):
        lines.append("  the class embedding is all zeros: the model is unconditional, so the classes below differ "
                     "only in their images")
    for name, v in r.get("per_class_bpd", {}).items():
        lines.append(f"  class {name:<14} {v:.4f}")
    if "gen_class_acc" in r:
        lines.append(f"  generative classification accuracy {r['gen_class_acc']:.4f}")
    return "\n".join(lines)


def format_active_latents(a: dict) -> str:
    """One line: the share of active latent channels in all, then per resolution (coarse to fine)."""
    per_res = ", ".join(f"at {res}x{res} {v['share']:.1%} ({v['active']}/{v['channels']})"
                        for res, v in a["per_resolution"].items())
    return (f"  active latents: {a['share']:.1%} of {a['channels']} channels ({a['active']}) above "
            f"{a['threshold_nats']:.0e} nats; {per_res}")


def build_parser() -> argparse.ArgumentParser:
    p = checkpoint_script_parser(__doc__)
    p.add_argument("--split", default="test", choices=["test", "valid", "train"], help="which split")
    p.add_argument("--iw_samples", type=int, default=1, help="posterior draws of the IW bound (1: the ELBO)")
    p.add_argument("--n_batch", type=int, default=64, help="rows per forward pass")
    p.add_argument("--no_classify", action="store_true", help="skip generative classification")
    p.add_argument("--n_images", type=int, default=0, help="score this many images of the split, drawn at random "
                   "with --seed (0: all; a quicker bound, e.g. for a large --iw_samples)")
    p.add_argument("--data_root", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--out", default=None, help="JSON path (default: eval_<split>.json, or eval_ood_<dataset>.json, "
                   "beside the checkpoint)")
    p.add_argument("--ood", default=None, metavar="DATASET", help="out-of-distribution detection against this "
                   "dataset's test images (--n_images of each side; 0: as many as the smaller set)")
    p.add_argument("--ood_root", default=None, help="the outlier datasets' folder (default: the model's)")
    p.add_argument("--ood_select", default=None, metavar="DATASET", help="choose the k of L>k and LLR>k on "
                   "validation inliers against this dataset's test images (default: on the test pair)")
    p.add_argument("--ood_k", type=int, default=None, help="fix the k of L>k and LLR>k (1..the latent groups)")
    return p


def default_report_path(weights: str, name: str) -> Path:
    """eval_NAME.json beside the checkpoint, or in the current folder for hub weights (never into the hub's
    cache)."""
    path = Path(weights)
    beside = Path(".") if weights.startswith("hf:") else path if path.is_dir() else path.parent
    return beside / f"eval_{name}.json"


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    resolve_weights_flag(args)  # no --weights: ./weights.pt when here, else the shipped model (one line says which)
    if args.iw_samples < 1 or args.n_batch < 1:
        raise UserError("--iw_samples and --n_batch must be >= 1")
    if args.n_images < 0:
        raise UserError("--n_images must be >= 0 (0: the whole split)")
    if (args.ood_select or args.ood_k is not None or args.ood_root) and not args.ood:
        raise UserError("--ood_select, --ood_k and --ood_root are for --ood: give --ood DATASET too")
    name = f"ood_{canonical_dataset(args.ood)}" if args.ood else args.split
    out = Path(args.out) if args.out else default_report_path(args.weights, name)
    if args.out or out.parent.is_dir():  # (a default beside weights that do not exist: loading them says so)
        check_output_file(out, parent_must_exist=True)  # before the download, the data and the evaluation
    if args.ood:
        result = ood_checkpoint(args.weights, args.ood, args.ood_root, args.ood_select, args.n_images,
                                args.iw_samples, args.n_batch, args.device, args.seed, not args.raw_weights,
                                args.data_root, args.hps, args.ood_k)
        print(format_ood_table(result))
    else:
        result = evaluate_checkpoint(args.weights, args.split, args.iw_samples, args.n_batch, not args.no_classify,
                                     args.device, args.seed, not args.raw_weights, args.data_root, args.hps,
                                     args.n_images)
        print(format_table(result))
    try:
        out.write_text(json.dumps(result, indent=1))
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
