"""Draw class-conditional samples from a trained VDVAE (EMA weights by default).

    python sample.py --weights weights/digits --classes 3,7 --n_per_class 10 --out digits.png
    python sample.py --weights weights/cifar10/latest.pt --classes horse,airplane --out samples.npz

``--weights`` is a checkpoint file or a run folder (meaning its latest checkpoint). The output is a PNG
grid with a row per class, or an ``.npz`` with ``images`` (uint8, N x H x W x C) and ``labels`` (N,).
``--temperature`` is one value, or one per latent group (comma-separated) to cool chosen levels.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from hps import Hyperparams
from utils import UserError, checkpoint_script_parser, load_checkpoint, pick_device, run_cli, save_grid
from vae import VAE


def load_model(weights: str, device: torch.device, use_ema: bool = True) -> tuple[VAE, list[str]]:
    """Build the model a checkpoint describes and load its (EMA) weights; returns it with class names."""
    ckpt = load_checkpoint(weights)
    H = Hyperparams.from_dict(ckpt["hps"])
    model = VAE(H)
    try:
        model.load_state_dict(ckpt["ema" if use_ema else "model"])
    except RuntimeError as err:
        raise UserError(f"weights in {weights} do not fit the model they describe: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), list(ckpt["class_names"])


def parse_classes(text: str, class_names: list[str]) -> list[int]:
    """Comma-separated class names or indices -> indices (empty text: every class)."""
    if not text:
        return list(range(len(class_names)))
    indices = []
    for item in (t.strip() for t in text.split(",")):
        if item in class_names:
            indices.append(class_names.index(item))
        elif item.lstrip("-").isdigit():
            idx = int(item)
            if not 0 <= idx < len(class_names):
                raise UserError(f"class index {idx} out of range 0..{len(class_names) - 1}")
            indices.append(idx)
        else:
            raise UserError(f"unknown class {item!r}; valid: {', '.join(class_names)} (or 0..{len(class_names) - 1})")
    return indices


def parse_temperature(text: str, n_groups: int) -> float | list[float]:
    """One temperature, or one per latent group."""
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--temperature must be a number or a comma-separated list, got {text!r}") from None
    if any(not v > 0 for v in values):
        raise UserError(f"--temperature must be > 0, got {text}")
    if len(values) == 1:
        return values[0]
    if len(values) != n_groups:
        raise UserError(f"--temperature lists {len(values)} values; this model has {n_groups} latent groups")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = checkpoint_script_parser(__doc__)
    p.add_argument("--classes", default="", help="comma-separated class names or indices (default: all)")
    p.add_argument("--n_per_class", type=int, default=10, help="samples per class (conditional models)")
    p.add_argument("--n", type=int, default=100, help="number of samples (unconditional models)")
    p.add_argument("--temperature", default="1.0", help="prior temperature, or one per latent group")
    p.add_argument("--out", default="samples.png", help="output .png grid or .npz arrays")
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {args.out!r}")
    if args.n_per_class <= 0 or args.n <= 0:
        raise UserError("--n_per_class and --n must be > 0")
    device = pick_device(args.device)
    model, class_names = load_model(args.weights, device, use_ema=not args.raw_weights)
    temperature = parse_temperature(args.temperature, model.decoder.n_groups)
    if model.H.n_classes > 0:
        classes = parse_classes(args.classes, class_names)
        labels = torch.tensor(classes, device=device).repeat_interleave(args.n_per_class)
        nrow = args.n_per_class
    else:
        if args.classes:
            raise UserError(f"{args.weights} is an unconditional model: it takes no --classes")
        labels, nrow = None, int(np.ceil(np.sqrt(args.n)))
    torch.manual_seed(args.seed)
    n = len(labels) if labels is not None else args.n
    images = model.sample(n, labels, temperature).cpu()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            label_array = labels.cpu().numpy() if labels is not None else np.full(n, -1)
            np.savez(out, images=images.permute(0, 2, 3, 1).numpy(), labels=label_array.astype(np.int64))
        else:
            save_grid(images, out, nrow=nrow)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    print(f"wrote {n} samples to {out}")


if __name__ == "__main__":
    run_cli(main)
