"""Draw class-conditional samples from a trained VDVAE (EMA weights by default).

    python sample.py --weights weights/digits --classes 3,7 --n_per_class 10 --out digits.png
    python sample.py --weights weights/cifar10/latest.pt --classes horse,airplane --out samples.npz

``--weights`` is a checkpoint file or a run folder (meaning its latest checkpoint). The output is a PNG
grid with a row per class, or an ``.npz`` with ``images`` (uint8, N x H x W x C) and ``labels`` (N,).
``--temperature`` is one value, or one per latent group (comma-separated) to cool chosen levels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hps import PRECISIONS, Hyperparams
from utils import (UserError, autocast, checkpoint_script_parser, load_checkpoint, pick_device, resolve_precision,
                   run_cli, save_grid)
from vae import VAE

SAFETENSORS_FORMAT = "vdvae-weights-1"


def load_model(weights: str, device: torch.device, use_ema: bool = True) -> tuple[VAE, list[str]]:
    """Build the model a checkpoint (``.pt``, or an exported ``.safetensors``) describes and load its (EMA)
    weights; returns it with the class names."""
    if str(weights).endswith(".safetensors"):
        state, hps, class_names = load_safetensors(weights)
    else:
        ckpt = load_checkpoint(weights)
        state, hps, class_names = ckpt["ema" if use_ema else "model"], ckpt["hps"], ckpt["class_names"]
    model = VAE(Hyperparams.from_dict(hps))
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"weights in {weights} do not fit the model they describe: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), list(class_names)


def export_safetensors(weights: str, out: Path, use_ema: bool = True) -> None:
    """Write one set of weights (EMA by default) with the hyperparameters and class names as metadata."""
    from safetensors.torch import save_file

    ckpt = load_checkpoint(weights)
    state = {k: v.contiguous() for k, v in ckpt["ema" if use_ema else "model"].items()}
    metadata = {"format": SAFETENSORS_FORMAT, "hps": json.dumps(ckpt["hps"]),
                "class_names": json.dumps(ckpt["class_names"]), "step": str(ckpt["step"]),
                "weights": "ema" if use_ema else "model"}
    try:
        save_file(state, str(out), metadata=metadata)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None


def load_safetensors(path: str) -> tuple[dict, dict, list[str]]:
    """Weights, hyperparameters and class names of an exported file (no code can run: no pickle)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {str(err).strip().splitlines()[0]}") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise UserError(f"{path} was not exported by this project (no '{SAFETENSORS_FORMAT}' metadata)")
    return state, json.loads(metadata["hps"]), json.loads(metadata["class_names"])


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
    p.add_argument("--export", default="", help="instead of sampling, write the weights (EMA unless "
                   "--raw_weights) and settings to this .safetensors file")
    p.add_argument("--n_batch", type=int, default=256, help="samples drawn per forward pass")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="autocast precision (auto: bf16 on GPUs that have it, fp32 on CPU)")
    return p


def sample_batched(model: VAE, n: int, labels: torch.Tensor | None, temperature, n_batch: int,
                   amp_dtype) -> torch.Tensor:
    """``n`` samples drawn ``n_batch`` at a time (uint8, on the CPU)."""
    chunks = []
    with autocast(next(model.parameters()).device, amp_dtype):
        for start in range(0, n, n_batch):
            chunk_labels = labels[start:start + n_batch] if labels is not None else None
            chunks.append(model.sample(min(n_batch, n - start), chunk_labels, temperature).cpu())
    return torch.cat(chunks)


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.export:
        if not args.export.endswith(".safetensors"):
            raise UserError(f"--export must end in .safetensors, got {args.export!r}")
        export_safetensors(args.weights, Path(args.export), use_ema=not args.raw_weights)
        print(f"wrote {'raw' if args.raw_weights else 'EMA'} weights and settings to {args.export}")
        return
    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise UserError(f"--out must end in .png or .npz, got {args.out!r}")
    if args.n_per_class <= 0 or args.n <= 0 or args.n_batch <= 0:
        raise UserError("--n_per_class, --n and --n_batch must be > 0")
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
    images = sample_batched(model, n, labels, temperature, args.n_batch, resolve_precision(args.precision, device))
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
