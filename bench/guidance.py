"""Classifier-free guidance on the digits, family by family (a benchmark: it prints figures).

    python bench/guidance.py                                  # vdvae, vlae and vqvae, with and without dropout
    python bench/guidance.py --families vqvae --runs runs/cfg  # one family; run folders kept (and reused) there
    python bench/guidance.py --families vdvae --no_baseline    # only the label-dropout run

For each family whose prior depends on the class, trains the digits preset with ``--label_dropout P`` (and, for
the bound's cost, without it) through train.py, then for each guidance scale W of ``--scales`` draws 100 samples
of every class at the preset's temperature and reports

- class-consistency: the share the independent judge (bench/quality.py's SVC, fit on the real training digits)
  assigns to the asked class;
- diversity: the mean pairwise distance between samples of one class (pixels in 0..1, L2), averaged over the
  classes, as a ratio to the same figure of the held-out digits (1: as varied as the data);
- for the vdvae, the share of latent dimensions whose guided prior fell back to mean-only guidance;

and, per run, the held-out negative ELBO (conditional, and under the null label: the bound on -log p(x)).
A run folder that already holds a finished run is reused. Writes PICTURE (a grid at W = 0 beside one at the W of
best class-consistency, from the first family) and ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # quality: the judge

from data import load_digits  # noqa: E402
from images import labelled_grid  # noqa: E402
from models import load_model  # noqa: E402
from quality import fit_classifier  # noqa: E402
from runlog import run_finished  # noqa: E402
from scoring import evaluate_checkpoint  # noqa: E402
from utils import UserError, check_output_file, run_cli, seeded  # noqa: E402

GUIDABLE = ("vdvae", "vlae", "vqvae")


def train(run_dir: Path, family: str, label_dropout: float, extra: list[str]) -> None:
    if run_finished(run_dir):
        print(f"reusing {run_dir}", flush=True)
        return
    command = [sys.executable, str(ROOT / "train.py"), "--hps", "digits", "--model", family, "--label_dropout",
               str(label_dropout), "--save_dir", str(run_dir), "--restore", "latest", *extra]
    print("$ " + " ".join(command), flush=True)
    if subprocess.run(command, check=False).returncode != 0:  # train.py has said why, in one line
        raise UserError(f"the training run failed: {' '.join(command)}")


def mean_pairwise_distance(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean L2 distance between two different images of one class (pixels in 0..1), averaged over the classes."""
    per_class = []
    for c in labels.unique():
        x = images[labels == c].reshape(int((labels == c).sum()), -1).double() / 255.0
        d = torch.cdist(x, x)
        n = len(x)
        per_class.append((d.sum() / (n * (n - 1))).item())
    return float(np.mean(per_class))


def vdvae_fallback_share(model, labels: torch.Tensor, w: float, temperature: float, seed: int) -> float:
    """The share of all latent dimensions whose guided prior fell back to mean-only guidance (one draw)."""
    weights = torch.nn.functional.one_hot(labels, model.H.n_classes).float()
    with torch.no_grad(), seeded(torch.device("cpu"), seed):
        _, stats = model.decoder(None, torch.cat([weights, torch.zeros_like(weights)]), batch=2 * len(labels),
                                 temperature=temperature, guidance=w)
    sizes = [s["z"][0].numel() for s in stats]
    return float(sum(s["guidance_fallback"].item() * n for s, n in zip(stats, sizes)) / sum(sizes))


def measure_scales(model, classifier, scales: list[float], real_diversity: float, n_per_class: int,
                   seed: int) -> tuple[dict, dict]:
    """Per scale: class-consistency, diversity ratio (and the vdvae's fallback share); and the samples drawn."""
    labels = torch.arange(model.H.n_classes).repeat_interleave(n_per_class)
    t = model.H.temperature
    figures, drawn = {}, {}
    for w in scales:
        with seeded(torch.device("cpu"), seed):
            images = model.sample(len(labels), labels, t, **({"guidance": w} if w > 0 else {}))
        features = images.reshape(len(images), -1).float().numpy() * 16.0 / 255.0
        row = {"class_consistency": round(float((classifier.predict(features) == labels.numpy()).mean()), 4),
               "diversity_ratio": round(mean_pairwise_distance(images, labels) / real_diversity, 4)}
        if model.family == "vdvae" and w > 0:
            row["fallback_share"] = round(vdvae_fallback_share(model, labels[::10], w, t, seed), 4)
        figures[f"{w:g}"] = row
        drawn[f"{w:g}"] = images
        print(f"  W={w:<4g} class-consistency {row['class_consistency']:.4f}  diversity {row['diversity_ratio']:.4f}"
              + (f"  fallback {row['fallback_share']:.4f}" if "fallback_share" in row else ""), flush=True)
    return figures, drawn


def side_by_side(drawn: dict, scales: tuple[str, str], classes: list[str], out: Path, per_row: int = 8) -> None:
    """Two labelled grids (a row per class, ``per_row`` samples) at two scales, next to each other."""
    pictures = []
    for w in scales:
        images = drawn[w]
        n_classes = len(classes)
        per_class = len(images) // n_classes
        rows = torch.cat([images[c * per_class:c * per_class + per_row] for c in range(n_classes)])
        pictures.append(labelled_grid(rows, nrow=per_row, row_labels=classes, col_labels=None))
    canvas = Image.new("RGB", (sum(p.width for p in pictures) + 24, max(p.height for p in pictures)), "white")
    x = 0
    for p in pictures:
        canvas.paste(p.convert("RGB"), (x, 0))
        x += p.width + 24
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(GUIDABLE), help="comma-separated: " + ", ".join(GUIDABLE))
    p.add_argument("--label_dropout", type=float, default=0.1, help="P of the guided runs")
    p.add_argument("--scales", default="0,0.5,1,2,4", help="guidance scales W, comma-separated")
    p.add_argument("--n_per_class", type=int, default=100, help="samples per class and scale")
    p.add_argument("--runs", default="", help="folder of the run folders (default: a new temporary one)")
    p.add_argument("--no_baseline", action="store_true", help="skip the runs without label dropout")
    p.add_argument("--picture", default="guidance_digits.png", help="the side-by-side grid (PNG)")
    p.add_argument("--seed", type=int, default=0)
    args, extra = p.parse_known_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in GUIDABLE]
    if unknown:
        raise UserError(f"--families: {unknown[0]!r} cannot be guided (its prior ignores the class, or it is not a "
                        f"family); choose from {', '.join(GUIDABLE)}")
    try:
        scales = sorted({float(w) for w in args.scales.split(",")})
    except ValueError:
        raise UserError(f"--scales takes numbers, comma-separated, not {args.scales!r}") from None
    if not 0 < args.label_dropout < 1 or min(scales) < 0 or args.n_per_class < 2:
        raise UserError("--label_dropout must be in (0, 1), --scales >= 0 and --n_per_class >= 2")
    picture = check_output_file(args.picture)
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="guidance-digits-"))

    data = load_digits()
    classifier, judge_accuracy = fit_classifier(data)
    real_diversity = mean_pairwise_distance(data.test.images, data.test.labels)
    summary = {"label_dropout": args.label_dropout, "judge_accuracy": round(judge_accuracy, 4),
               "real_diversity": round(real_diversity, 4), "families": {}}
    for n, family in enumerate(families):
        guided = runs / f"{family}-dropout{args.label_dropout:g}"
        train(guided, family, args.label_dropout, extra)
        result = {"run": str(guided)}
        report = evaluate_checkpoint(str(guided), "test", batch_size=400, device="cpu", classify=False)
        result.update(test_bpd=round(report["bpd"], 4), test_bpd_unconditional=round(report["bpd_unconditional"], 4))
        if not args.no_baseline:
            plain = runs / f"{family}-plain"
            train(plain, family, 0.0, extra)
            base = evaluate_checkpoint(str(plain), "test", batch_size=400, device="cpu", classify=False)
            result.update(test_bpd_without_dropout=round(base["bpd"], 4),
                          dropout_cost_bpd=round(report["bpd"] - base["bpd"], 4))
        print(f"{family}: held-out {result['test_bpd']:.4f} bits/dim (null label {result['test_bpd_unconditional']:.4f})"
              + (f", without label dropout {result['test_bpd_without_dropout']:.4f}" if not args.no_baseline else ""),
              flush=True)
        model, class_names = load_model(str(guided), torch.device("cpu"))
        result["scales"], drawn = measure_scales(model, classifier, scales, real_diversity, args.n_per_class,
                                                 args.seed)
        best = max(result["scales"], key=lambda w: result["scales"][w]["class_consistency"])
        result["best_scale"] = float(best)
        if n == 0:
            side_by_side(drawn, (f"{scales[0]:g}", best), class_names, picture)
            result["picture"] = f"{picture} (W={scales[0]:g} left, W={best} right)"
        summary["families"][family] = result
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
