"""Sample and likelihood quality of a preset, end to end on the CPU (a benchmark: it prints figures).

    python bench/quality.py --hps digits                 # trains exactly what `train.py --hps digits` trains
    python bench/quality.py --weights weights/digits     # or measures an existing run

Reports on the held-out split: the negative ELBO and an importance-weighted bound (K=100) in bits/dim,
generative classification accuracy, and class-consistency: the share of 1,000 class-conditional samples
(100 per class) that an independent classifier (scikit-learn's SVC, fit on the real training split) assigns
to the asked class, at the preset's temperature and at 1.0 and 0.8, and the share of test digits that
``sample.py swap`` decodes under each other class which it assigns to that class. A baseline puts the bits/dim in
context: independent per-class pixel histograms over the pixel levels. Ends with one JSON line.
Only for the digits (8x8, 17 levels), whose classifier needs no download.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import Data, load_digits  # noqa: E402
from models import load_model  # noqa: E402
from scoring import evaluate_checkpoint  # noqa: E402
from utils import UserError, run_cli, seeded  # noqa: E402
from vae import count_parameters  # noqa: E402


def histogram_baseline_bpd(data: Data, levels: int, conditional: bool = True, alpha: float = 0.5) -> float:
    """Held-out bits/dim of independent per-pixel categorical distributions over the levels (per class when
    ``conditional``), fit on the training split with add-``alpha`` smoothing (0.5: Jeffreys' prior)."""
    def to_levels(images: torch.Tensor) -> np.ndarray:
        flat = images.numpy().reshape(len(images), -1).astype(np.float64)
        return np.round(flat * (levels - 1) / 255.0).astype(np.int64)

    train_x, test_x = to_levels(data.train.images), to_levels(data.test.images)
    train_y = data.train.labels.numpy() if conditional else np.zeros(len(train_x), dtype=np.int64)
    test_y = data.test.labels.numpy() if conditional else np.zeros(len(test_x), dtype=np.int64)
    n_pixels = train_x.shape[1]
    total = 0.0
    for c in np.unique(test_y):
        counts = np.full((n_pixels, levels), alpha)
        np.add.at(counts, (np.tile(np.arange(n_pixels), (train_y == c).sum()), train_x[train_y == c].ravel()), 1)
        log_p = np.log2(counts / counts.sum(axis=1, keepdims=True))
        rows = test_x[test_y == c]
        total += -log_p[np.arange(n_pixels)[None, :], rows].sum()
    return total / (len(test_x) * n_pixels)


def class_consistency(model, classifier, temperature: float, n_per_class: int = 100, seed: int = 0) -> float:
    labels = torch.arange(model.H.n_classes).repeat_interleave(n_per_class)
    with seeded(torch.device("cpu"), seed):
        images = model.sample(len(labels), labels, temperature)
    features = images.reshape(len(images), -1).float().numpy() * 16.0 / 255.0
    return float((classifier.predict(features) == labels.numpy()).mean())


def swap_consistency(model, classifier, data: Data, n_images: int = 100, seed: int = 0) -> float:
    """``sample.py swap`` judged: ``n_images`` test digits encoded under their own class (all latent groups) and
    decoded under each of the 10 classes; the share the classifier assigns to the target class."""
    idx = torch.randperm(len(data.test), generator=torch.Generator().manual_seed(seed))[:n_images]
    images, labels = data.test.images[idx], data.test.labels[idx]
    with seeded(torch.device("cpu"), seed):
        noise = model.prior_noise_of(images, labels)
    decoded, targets = [], []
    for c in range(model.H.n_classes):
        target = torch.full((n_images,), c)
        with seeded(torch.device("cpu"), seed):
            decoded.append(model.sample(n_images, target, noises=noise, shared_pixel_noise=True))
        targets.append(target)
    features = torch.cat(decoded).reshape(-1, 64).float().numpy() * 16.0 / 255.0
    return float((classifier.predict(features) == torch.cat(targets).numpy()).mean())


def fit_classifier(data: Data):
    """The judge: an RBF SVC on the real training digits (about 98-99% on the real held-out digits)."""
    from sklearn.svm import SVC

    features = data.train.images.reshape(len(data.train), -1).float().numpy() * 16.0 / 255.0
    clf = SVC(gamma=0.001).fit(features, data.train.labels.numpy())
    test = data.test.images.reshape(len(data.test), -1).float().numpy() * 16.0 / 255.0
    return clf, float((clf.predict(test) == data.test.labels.numpy()).mean())


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hps", default="digits", help="preset to train (digits only)")
    parser.add_argument("--weights", default=None, help="measure this run instead of training one")
    parser.add_argument("--iw_samples", type=int, default=100, help="posterior draws of the IW bound")
    args, overrides = parser.parse_known_args(argv)
    if args.hps != "digits":
        parser.error("only the digits preset has an offline classifier to judge samples")

    train_seconds = None
    weights = args.weights
    if weights is None:
        weights = tempfile.mkdtemp(prefix="quality-digits-")
        t0 = time.perf_counter()
        command = [sys.executable, str(ROOT / "train.py"), "--hps", args.hps, "--save_dir", weights, *overrides]
        if subprocess.run(command, check=False).returncode != 0:  # train.py has said why, in one line
            raise UserError(f"the training run failed: {' '.join(command)}")
        train_seconds = round(time.perf_counter() - t0, 1)

    report = evaluate_checkpoint(weights, "test", iw_samples=args.iw_samples, batch_size=400, device="cpu")
    data = load_digits()
    model, _ = load_model(weights, torch.device("cpu"))
    classifier, judge_accuracy = fit_classifier(data)
    temps = sorted({model.H.temperature, 1.0, 0.8}, reverse=True)
    consistency = {str(t): class_consistency(model, classifier, t) for t in temps}
    # a class swap re-decodes an image's prior noise under other classes: a family without it (the vqvae, whose
    # decoder does not see the class) has no swap to judge
    swapped = swap_consistency(model, classifier, data) if "prior_noise" in model.abilities else None
    baseline = histogram_baseline_bpd(data, model.H.pixel_levels)
    baseline_uncond = histogram_baseline_bpd(data, model.H.pixel_levels, conditional=False)

    print(f"held-out negative ELBO      {report['bpd']:.4f} bits/dim "
          f"(recon {report['recon_bpd']:.4f} + KL {report['kl_bpd']:.4f})")
    print(f"IW bound, K={args.iw_samples:<4}          {report['bpd_iw']:.4f} bits/dim")
    print(f"histogram baseline          {baseline:.4f} bits/dim per class, {baseline_uncond:.4f} unconditional")
    print(f"generative classification   {report['gen_class_acc']:.4f}")
    print(f"judge (SVC) on real digits  {judge_accuracy:.4f}")
    for t, value in consistency.items():
        print(f"class-consistency at t={t:<4} {value:.4f}")
    if swapped is not None:
        print(f"class swap (sample.py swap) {swapped:.4f} of 100 test digits x 10 classes judged the target class")
    if train_seconds is not None:
        print(f"training wall time          {train_seconds:.0f} s")
    print(json.dumps({"test_bpd": round(report["bpd"], 4), "test_bpd_iw": round(report["bpd_iw"], 4),
                      "baseline_bpd": round(baseline, 4), "gen_class_acc": round(report["gen_class_acc"], 4),
                      "class_consistency": round(consistency[str(model.H.temperature)], 4),
                      "class_consistency_by_t": consistency, "swap_consistency": swapped and round(swapped, 4),
                      "params": count_parameters(model), "family": model.family,
                      "train_seconds": train_seconds}))


if __name__ == "__main__":
    run_cli(main)
