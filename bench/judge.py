"""An independent judge of Fashion-MNIST samples (a benchmark: it prints figures and one JSON line).

    python bench/judge.py --weights weights/fashion_mnist.safetensors             # temperatures 1.0, 0.9, 0.8
    python bench/judge.py --weights RUN --temperatures 1.0 --guidance 0,1,2       # guided (--label_dropout runs)

The judge is a small convolutional classifier trained here, on the 60,000 real training images only (its accuracy
on the 10,000 test images is reported); it is kept in ``--cache`` and reused while its settings are unchanged. For
each setting (a temperature, or a guidance scale at ``--guidance_temperature``) it draws ``--n_samples`` samples,
as many of every class, and reports

- **class-consistency**: the share of samples the judge assigns to the asked class;
- **Frechet distance** between the samples and the test images in the judge's penultimate features (128 of them),
  beside the same distance between 10,000 training images and the test images, the floor a perfect model would
  reach at this sample size. It is the FID's formula in another network's features: *not* the Inception FID, and
  not comparable with published FIDs;
- **precision and recall** of Kynkaanniemi et al. 2019 in the same features (k nearest neighbours, k=3): the share
  of samples inside the real images' manifold, and the share of real images inside the samples'.

Images are the 28x28 pixels the likelihood scores (the 32x32 padding cropped).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data import Data, load_data  # noqa: E402
from images import crop_padding  # noqa: E402
from models import load_model  # noqa: E402
from sampling import sample_batched  # noqa: E402
from utils import UserError, run_cli, seeded  # noqa: E402

JUDGE_EPOCHS = 4
JUDGE_SEED = 0
FEATURES = 128  # the width of the penultimate layer: the space of the Frechet distance and of precision/recall
KNN_K = 3  # Kynkaanniemi et al.'s default
DEFAULT_CACHE = Path.home() / ".cache" / "vdvae" / "judge_fashion_mnist.pt"


class JudgeNet(nn.Module):
    """Two stages of two 3x3 convolutions and a max-pool (28 -> 14 -> 7), a 128-unit hidden layer (the features)
    and a linear read-out of the classes. Inputs: uint8 images (N, 1, 28, 28)."""

    def __init__(self, n_classes: int = 10, channels: int = 1):
        super().__init__()

        def stage(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                                 nn.ReLU(), nn.MaxPool2d(2))

        self.body = nn.Sequential(stage(channels, 32), stage(32, 64), nn.Flatten(), nn.LazyLinear(FEATURES), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(FEATURES, n_classes))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 255.0 - 0.5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def batched(fn, images: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


def judge_key(data: Data, epochs: int, seed: int) -> str:
    """What the judge depends on: its recipe and the training images it saw."""
    digest = hashlib.sha256()
    digest.update(repr((epochs, seed, FEATURES, JudgeNet.__doc__)).encode())
    for split in (data.train, data.valid):
        digest.update(split.images.numpy().tobytes())
        digest.update(split.labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def fit_judge(data: Data, pad: int, epochs: int = JUDGE_EPOCHS, seed: int = JUDGE_SEED,
              cache: Path | None = None, log=print) -> tuple[JudgeNet, float]:
    """The judge trained on every training image (the train and validation splits: the 60,000 of Fashion-MNIST),
    with its accuracy on the test images; loaded from ``cache`` when a judge of the same recipe and data is there."""
    images = crop_padding(torch.cat([data.train.images, data.valid.images]), pad)
    labels = torch.cat([data.train.labels, data.valid.labels])
    test_images = crop_padding(data.test.images, pad)
    n_classes = len(data.class_names)
    torch.manual_seed(seed)
    net = JudgeNet(n_classes, images.shape[1])
    net(images[:2])  # sizes the lazy layer
    key = judge_key(data, epochs, seed)
    if cache is not None and cache.exists():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            net.load_state_dict(saved["state"])
            net.eval()
            return net, saved["test_accuracy"]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    steps = epochs * -(-len(images) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), 128):
            idx = order[start:start + 128]
            loss = F.cross_entropy(net(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        net.eval()
        accuracy = accuracy_of(net, test_images, data.test.labels)
        log(f"judge epoch {epoch + 1}/{epochs}: test accuracy {accuracy:.4f} ({time.perf_counter() - t0:.0f} s)")
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "state": net.state_dict(), "test_accuracy": accuracy}, cache)
    return net, accuracy


def accuracy_of(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor) -> float:
    predicted = batched(lambda x: net(x).argmax(1), images)
    return float((predicted == labels).float().mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fit to two sets of feature rows: |mu_a - mu_b|^2 + tr(S_a + S_b -
    2 (S_a S_b)^(1/2)), the FID's formula (Heusel et al. 2017). The trace of the root is taken as that of the
    symmetric S_a^(1/2) S_b S_a^(1/2), whose eigenvalues are those of S_a S_b: exact for the singular covariances of
    ReLU features that never fire, where a general matrix square root is ill-conditioned."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(cov_a)
    half = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    inner = np.linalg.eigvalsh(half @ cov_b @ half)
    root_trace = np.sqrt(np.clip(inner, 0.0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * root_trace)


def _kth_neighbour_radius(x: torch.Tensor, k: int, batch: int = 2000) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = []
    for start in range(0, len(x), batch):
        d = torch.cdist(x[start:start + batch], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the k+1-th smallest: the row itself is at distance 0
    return torch.cat(radii)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, batch: int = 2000) -> torch.Tensor:
    """For each row of ``points``: does it lie within the radius of at least one centre (inclusive)?"""
    inside = []
    for start in range(0, len(points), batch):
        d = torch.cdist(points[start:start + batch], centres)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = KNN_K) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around
    its points reaching their k-th nearest neighbour in the same set. Precision: the share of ``fake`` inside the
    real manifold; recall: the share of ``real`` inside the fake one."""
    real_t, fake_t = torch.as_tensor(real, dtype=torch.float64), torch.as_tensor(fake, dtype=torch.float64)
    precision = _covered(fake_t, real_t, _kth_neighbour_radius(real_t, k)).double().mean()
    recall = _covered(real_t, fake_t, _kth_neighbour_radius(fake_t, k)).double().mean()
    return float(precision), float(recall)


def score_samples(net: JudgeNet, images: torch.Tensor, labels: torch.Tensor, test_features: np.ndarray) -> dict:
    """Consistency, Frechet distance and precision/recall of uint8 samples (N, C, 28, 28) drawn for ``labels``."""
    logits = batched(net, images)
    features = batched(net.features, images).numpy()
    precision, recall = precision_recall(test_features, features)
    return {"consistency": float((logits.argmax(1) == labels).float().mean()),
            "frechet": frechet_distance(features, test_features), "precision": precision, "recall": recall}


def draw(model, labels: torch.Tensor, temperature: float, guidance: float, seed: int) -> torch.Tensor:
    with seeded(torch.device("cpu"), seed):
        images = sample_batched(model, len(labels), labels, temperature, 500, None, guidance=guidance)
    return crop_padding(images, model.H.pad)


def parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated numbers, got {text!r}") from None


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="a run folder, checkpoint or exported .safetensors")
    p.add_argument("--data_root", default="./data", help="where the Fashion-MNIST files are (or go)")
    p.add_argument("--temperatures", default="1.0,0.9,0.8", help="comma-separated sampling temperatures")
    p.add_argument("--guidance", default="", help="comma-separated guidance scales (a model trained with "
                   "--label_dropout), at --guidance_temperature")
    p.add_argument("--guidance_temperature", type=float, default=1.0)
    p.add_argument("--n_samples", type=int, default=10_000, help="samples per setting, as many of every class")
    p.add_argument("--epochs", type=int, default=JUDGE_EPOCHS, help="the judge's training epochs")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help="where the trained judge is kept ('' for nowhere)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    temperatures = parse_floats(args.temperatures, "--temperatures")
    scales = parse_floats(args.guidance, "--guidance")

    model, class_names = load_model(args.weights, torch.device("cpu"))
    H = model.H
    if H.dataset != "fashion_mnist":
        raise UserError(f"bench/judge.py judges Fashion-MNIST models; {args.weights} models {H.dataset}")
    if scales and any(s > 0 for s in scales) and H.label_dropout <= 0:
        raise UserError(f"--guidance needs a model trained with --label_dropout; {args.weights} was trained without")
    n_classes = H.n_classes
    if args.n_samples < n_classes:
        raise UserError(f"--n_samples must be at least the {n_classes} classes")
    data = load_data("fashion_mnist", args.data_root)
    net, accuracy = fit_judge(data, H.pad, args.epochs, cache=Path(args.cache) if args.cache else None)
    print(f"judge: test accuracy {accuracy:.4f} on the {len(data.test):,} test images")

    test_images = crop_padding(data.test.images, H.pad)
    test_features = batched(net.features, test_images).numpy()
    train_pool = crop_padding(torch.cat([data.train.images, data.valid.images]), H.pad)
    pick = torch.randperm(len(train_pool), generator=torch.Generator().manual_seed(args.seed))[:len(test_images)]
    floor_features = batched(net.features, train_pool[pick]).numpy()
    floor_precision, floor_recall = precision_recall(test_features, floor_features)
    floor = {"frechet": frechet_distance(floor_features, test_features), "precision": floor_precision,
             "recall": floor_recall, "consistency": accuracy_of(net, train_pool[pick], torch.cat(
                 [data.train.labels, data.valid.labels])[pick])}

    labels = torch.arange(n_classes).repeat_interleave(args.n_samples // n_classes)
    settings = [(t, 0.0) for t in temperatures] + [(args.guidance_temperature, w) for w in scales]
    rows = []
    for temperature, scale in settings:
        t0 = time.perf_counter()
        images = draw(model, labels, temperature, scale, args.seed)
        row = {"temperature": temperature, "guidance": scale, **score_samples(net, images, labels, test_features),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"t={temperature} guidance={scale}: consistency {row['consistency']:.4f}, Frechet {row['frechet']:.2f},"
              f" precision {row['precision']:.3f}, recall {row['recall']:.3f} ({row['seconds']:.0f} s)", flush=True)

    print(f"\n| samples ({len(labels):,}) | class-consistency | Frechet distance (judge's features) | precision | "
          "recall |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = f"t={r['temperature']}" + (f", guidance {r['guidance']:g}" if r["guidance"] else "")
        print(f"| {name} | {r['consistency']:.4f} | {r['frechet']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} |")
    print(f"| {len(pick):,} training images (floor) | {floor['consistency']:.4f} | {floor['frechet']:.2f} | "
          f"{floor['precision']:.3f} | {floor['recall']:.3f} |")
    print(json.dumps({"weights": args.weights, "judge_test_accuracy": round(accuracy, 4), "floor": floor,
                      "samples": rows, "n_samples": len(labels)}))


if __name__ == "__main__":
    run_cli(main)
