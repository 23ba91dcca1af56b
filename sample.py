"""Sample and explore a trained class-conditional VDVAE (EMA weights by default).

    python sample.py           # 10 samples of each class into samples.png, from ./weights.pt when the current
                               # folder has one, else from weights/digits.safetensors
    python sample.py --weights weights/digits --classes 3,7 --n 10 --out digits.png   # grid, the default mode
    python sample.py recon   --weights weights/digits --n 8 --out recon.png
    python sample.py interp  --weights weights/digits --images 3,17 --out interp.png   # also writes interp.gif
    python sample.py interp  --weights weights/digits --classes 3,8 --out morph.png
    python sample.py explore --weights weights/digits --class 7 --out explore.png
    python sample.py swap    --weights weights/digits --n 6 --out swap.png
    python sample.py manifold --weights runs/digits-cvae-z2 --class 3 --n 20 --out manifold.png
    python sample.py grid    --weights weights/digits --n 100 --outdir samples/   # samples/CLASS/00001.png ...
    python sample.py --weights weights/digits --export digits.safetensors

Modes (``python sample.py MODE --help`` lists each one's options):
  grid     samples from the prior, a row per class with its name; ``--out x.npz`` writes arrays instead
  recon    held-out images reconstructed from the top k latent groups of their posterior, the rest drawn from
           the prior, for several k side by side: how much each level of the hierarchy carries
  interp   interpolation in latent space between two held-out images (``--images``) or two seeds (``--seeds``)
           for a fixed class, or between two classes (``--classes``) for a fixed latent: a PNG strip and a GIF
  explore  one latent group's noise varied while every other group's stays fixed, for each group in turn
  swap     held-out images encoded under their own class and decoded under every class (class-conditional
           style transfer): rows are inputs, columns are target classes
  manifold a cvae's or vlae's 2-D latent (--zdim 2) decoded on an n x n grid at evenly spaced quantiles of the
           prior, one picture per class (OUT_CLASS.png) or the one --class

``--weights`` is a checkpoint file, a run folder (its latest checkpoint) or an exported ``.safetensors`` file.
``--temperature`` is one value, one per latent group (comma-separated), or ``RES:T`` pairs per resolution
(``1:1.0,4:0.8,8:0.6``; resolutions left out stay at 1.0). The same ``--seed`` gives the same pictures.
``grid`` and ``recon`` with ``--outdir DIR`` write every image as its own PNG, DIR/CLASS/00001.png, and
DIR/manifest.csv (file, class, seed, ...) instead of one picture: what FID tools and other pipelines read.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from models import (HUB_WEIGHTS, export_folder, export_safetensors, load_model, local_weights, model_summary,
                    write_model_card)
from sampling import MODES, RUNNERS, Session, build_parser, check_outputs, run_grid
from utils import UserError, resolve_weights_flag, run_cli
from vae import count_parameters


def export_with_card(args: argparse.Namespace) -> str:
    """``--export DIR --card``: the weights and settings, a sample grid drawn from the exported file itself, and a
    model card with the evaluation figures found beside the checkpoint (evaluate.py's eval_*.json)."""
    out = Path(args.export)
    source = Path(local_weights(args.weights))
    use_ema = not args.raw_weights
    ckpt = export_folder(str(source), out, use_ema=use_ema, hps=args.hps)
    evaluations = {}
    for path in sorted((source if source.is_dir() else source.parent).glob("eval_*.json")):
        try:
            report = json.loads(path.read_text())
            evaluations[report["split"]] = report
        except (OSError, ValueError, KeyError):
            continue  # not one of evaluate.py's reports: the card leaves it out
    args.weights, args.raw_weights, args.hps = str(out / HUB_WEIGHTS), False, None  # the file just written
    args.out = str(out / "samples.png")
    session = Session(args)
    run_grid(session)
    card = write_model_card(out, ckpt, evaluations, count_parameters(session.model), "samples.png", use_ema)
    return (f"wrote {out}: {HUB_WEIGHTS}, config.json, samples.png and the model card {card.name} "
            f"({len(evaluations)} evaluation(s) found beside {source})")


def main(argv: list[str]) -> None:
    if not argv or (argv[0] not in MODES and argv[0] not in ("-h", "--help")):
        argv = ["grid", *argv]  # no mode: the grid
    args = build_parser(__doc__).parse_args(argv)
    resolve_weights_flag(args)  # no --weights: ./weights.pt when here, else the shipped model (one line says which)
    if args.mode == "grid" and args.card and not args.export:
        raise UserError("--card goes with --export DIR: the folder to write")
    if args.mode == "grid" and args.export and args.card and args.export.endswith(".safetensors"):
        raise UserError(f"--export with --card names a folder, got {args.export!r}")
    if args.mode == "grid" and args.export and not args.card and not args.export.endswith(".safetensors"):
        raise UserError(f"--export must end in .safetensors, got {args.export!r}")
    check_outputs(args)  # before the weights are loaded (or downloaded) and before any sampling
    if args.mode == "grid" and args.summary:
        print(model_summary(load_model(args.weights, torch.device("cpu"), not args.raw_weights, args.hps)[0].H))
        return
    if args.mode == "grid" and args.card:
        print(export_with_card(args))
        return
    if args.mode == "grid" and args.export:
        export_safetensors(args.weights, Path(args.export), use_ema=not args.raw_weights, hps=args.hps)
        print(f"wrote {'raw' if args.raw_weights else 'EMA'} weights and settings to {args.export}")
        return
    if args.mode == "grid" and args.n_per_class is not None and args.n_per_class <= 0:
        raise UserError(f"--n_per_class must be > 0, got {args.n_per_class}")
    print(RUNNERS[args.mode](Session(args)))


if __name__ == "__main__":
    run_cli(main)
