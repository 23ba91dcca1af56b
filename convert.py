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
from pathlib import Path

# the conversion itself lives in models.py, beside the registry, where every entry point loads weights from
from models import OPENAI_PRESETS, checkpoint_from_openai, write_safetensors
from checkpoint import atomic_torch_save
from utils import CliParser, UserError, check_output_file, run_cli


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
    check_output_file(out)  # before the conversion
    ckpt = checkpoint_from_openai(args.checkpoint, args.hps, args.n_classes)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".pt":
            atomic_torch_save(ckpt, out)
        else:
            write_safetensors(ckpt, out, use_ema=True)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    print(f"converted {len(ckpt['model'])} tensors of {args.checkpoint} ({args.hps}, step {ckpt['step']}) to {out}")


if __name__ == "__main__":
    run_cli(main)
