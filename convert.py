"""Load openai/vdvae's published checkpoints (``*-model.th``, ``*-model-ema.th``) into this implementation.

    python convert.py cifar10-seed0-iter-900000-model-ema.th --hps cifar10 --out weights/vdvae-cifar10.pt
    python convert.py imagenet32-iter-1700000-model-ema.th --hps imagenet32 --out imagenet32.safetensors
    python convert.py cifar10-seed0-iter-900000-model-ema.th --hps cifar10 --n_classes 10 --out c10-cond.pt

Their files are plain PyTorch state dicts (loaded with ``weights_only=True``: no code runs), possibly with
DistributedDataParallel's ``module.`` prefix. With ``n_classes = 0`` our module tree is theirs name for name,
so conversion checks every name and shape against the preset's model and reports any missing, unexpected or
reshaped key by name. ``--n_classes N`` gives a class-conditional starting point instead: their weights plus a
class embedding initialised to zero, which leaves the model's outputs exactly as they were until it trains.

``sample.py``, ``evaluate.py`` and ``train.py --restore`` read ``.th`` files directly (with ``--hps``); this
command writes one of our checkpoints (``.pt``, with the weights as both model and EMA) or a ``.safetensors``.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from hps import DATASET_IMAGES, Hyperparams, hparams_from_preset
from utils import (CHECKPOINT_FORMAT, CliParser, UserError, atomic_torch_save, run_cli)
from vae import VAE

# the presets openai/vdvae published checkpoints for, and the class names their hps do not carry
OPENAI_PRESETS = ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def is_openai_checkpoint(path: str | Path) -> bool:
    return str(path).endswith(".th")


def openai_hparams(preset: str, n_classes: int = 0) -> Hyperparams:
    """The preset's hyperparameters for one of openai/vdvae's models, with the image fields filled in."""
    if preset not in OPENAI_PRESETS:
        raise UserError(f"--hps {preset!r} has no openai/vdvae checkpoint; they exist for "
                        f"{', '.join(OPENAI_PRESETS)}")
    h = hparams_from_preset(preset, {"n_classes": n_classes, "vdvae_5bit": preset == "ffhq256"})
    h.image_size, h.image_channels = DATASET_IMAGES[preset]
    return h


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.th`` file as a plain name -> tensor dict."""
    if not Path(path).is_file():
        raise UserError(f"openai/vdvae checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same thing to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read openai/vdvae checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors (openai/vdvae's *-model.th / *-model-ema.th)")
    return state


def convert_state_dict(state: dict[str, torch.Tensor], H: Hyperparams, source: str = "the checkpoint") -> dict:
    """openai/vdvae names -> our state dict for the model ``H`` describes, every name and shape checked; a
    conditional ``H`` gets a zero class embedding (no effect on the outputs until it trains)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # as DistributedDataParallel saved it
    expected = VAE(H).state_dict()
    ours_only = {k for k in expected if k.startswith("decoder.class_emb.")}
    missing = sorted(set(expected) - set(state) - ours_only)
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k} {tuple(state[k].shape)} there, {tuple(expected[k].shape)} here"
                for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    if reshaped:
        problems.append(f"{len(reshaped)} shape mismatch(es): {'; '.join(reshaped[:3])}")
    if problems:
        raise UserError(f"{source} does not fit the {H.hps} model: {' | '.join(problems)}")
    converted = {k: state[k].float() for k in expected if k not in ours_only}
    converted.update({k: torch.zeros_like(expected[k]) for k in ours_only})
    return converted


def step_of(path: str | Path) -> int:
    """The iteration in openai/vdvae's file names (``...-iter-900000-...``), else 0."""
    found = re.search(r"iter-(\d+)", Path(path).name)
    return int(found.group(1)) if found else 0


def checkpoint_from_openai(path: str | Path, preset: str, n_classes: int = 0) -> dict:
    """One of our checkpoint dicts holding an openai/vdvae file's weights as both model and EMA."""
    H = openai_hparams(preset, n_classes)
    weights = convert_state_dict(read_state_dict(path), H, str(path))
    class_names = CIFAR10_CLASSES if preset == "cifar10" else [str(c) for c in range(1000)]
    return {"format": CHECKPOINT_FORMAT, "model": weights, "ema": {k: v.clone() for k, v in weights.items()},
            "hps": H.to_dict(), "class_names": class_names[:n_classes] if n_classes else [],
            "step": step_of(path), "source": str(path)}


def build_parser() -> CliParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="openai/vdvae's *-model.th or *-model-ema.th")
    p.add_argument("--hps", required=True, choices=OPENAI_PRESETS,
                   help="the preset the checkpoint was trained with")
    p.add_argument("--out", required=True, help="our checkpoint (.pt) or exported weights (.safetensors)")
    p.add_argument("--n_classes", type=int, default=0, help="0: as trained; the dataset's class count: a "
                   "class-conditional starting point with a zero class embedding")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


def main(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    allowed = {"cifar10": 10, "imagenet32": 1000, "imagenet64": 1000}.get(args.hps, 0)
    if args.n_classes not in (0, allowed):
        raise UserError(f"--n_classes must be 0 or {allowed} for {args.hps}" if allowed else
                        f"{args.hps} is unconditional: --n_classes must be 0")
    out = Path(args.out)
    if out.suffix not in (".pt", ".safetensors"):
        raise UserError(f"--out must end in .pt or .safetensors, got {args.out!r}")
    ckpt = checkpoint_from_openai(args.checkpoint, args.hps, args.n_classes)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".pt":
            atomic_torch_save(ckpt, out)
        else:
            from sample import write_safetensors
            write_safetensors(ckpt, out, use_ema=True)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    print(f"converted {len(ckpt['model'])} tensors of {args.checkpoint} ({args.hps}, step {ckpt['step']}) to {out}")


if __name__ == "__main__":
    run_cli(main)
