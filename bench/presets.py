"""What each preset costs before it is trained: parameters, memory, and the time its budget takes (a benchmark: it
prints figures; bench/RESULTS.md keeps them).

    python bench/presets.py                                  # every preset: parameters and memory (seconds)
    python bench/presets.py --measure digits,mnist,cifar10   # also time training steps of these on this machine
    python bench/presets.py --memory_gb 139                  # the largest batch that fits 139 GiB (2^30 bytes)

Parameters and activation memory come from speed.py's meta-device measurement (no memory, no arithmetic, at any
size): the bytes autograd saves per training image with each --grad_checkpoint mode, plus 20 bytes per parameter of
weights, EMA, gradients and AdamW's moments. ``--measure`` times training steps at the preset's batch on this
machine, fp32 and contiguous, nothing recomputed (the median of ``--steps`` after one untimed step): steps per
second, and the days its ``max_steps`` budget takes at that speed. Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hps import PRESETS, hparams_from_preset, hparams_without_data  # noqa: E402
from speed import (MEMORY_HEADROOM, STATE_BYTES_PER_PARAMETER, activation_bytes_per_image,  # noqa: E402
                   machine_description, parameter_count, time_candidate)
from utils import UserError, run_cli  # noqa: E402

PLAIN = {"precision": "fp32", "channels_last": "off", "grad_checkpoint": "none"}
MODES = ("none", "gelu", "blocks")


def preset_hparams(name: str):
    n_classes = {"folder": 10}.get(name)  # the folder preset takes its class count from the data: assume ten
    return hparams_without_data(hparams_from_preset(name, {"n_classes": n_classes} if n_classes else {}))


def memory_figures(name: str, memory_gb: float) -> dict:
    """Parameters, activation MB per image for each checkpointing mode, GB at the preset's batch, and the largest
    batch per mode that fits ``memory_gb`` (within speed.py's headroom)."""
    H = preset_hparams(name)
    params = parameter_count(H)
    state = params * STATE_BYTES_PER_PARAMETER
    per_image = {mode: activation_bytes_per_image(H, mode) for mode in MODES}
    room = MEMORY_HEADROOM * memory_gb * 2**30 - state
    return {"preset": name, "model": H.model, "params": params, "n_batch": H.n_batch,
            "global_batch": H.global_batch or H.n_batch, "max_steps": H.max_steps,
            "activation_mb_per_image": {m: round(b / 2**20, 1) for m, b in per_image.items()},
            "gb_at_batch": round((state + per_image["none"] * H.n_batch) / 2**30, 2),
            "largest_batch": {m: max(0, int(room // b)) for m, b in per_image.items()}}


def measured_speed(name: str, steps: int) -> dict:
    """Training passes per second at the preset's --n_batch on this machine (fp32, contiguous, nothing recomputed),
    its images per second, and the days its budget takes at the paper's global batch (the preset's --global_batch,
    which one machine reaches by accumulating passes)."""
    H = preset_hparams(name)
    seconds, _ = time_candidate(H, torch.device("cpu"), PLAIN, steps=steps, warmup=1)
    rate = 1.0 / seconds
    img_per_s = rate * H.n_batch
    images = H.max_steps * (H.global_batch or H.n_batch)
    return {"steps_per_s": round(rate, 4), "img_per_s": round(img_per_s, 2),
            "days_to_budget": round(images / img_per_s / 86400, 3) if H.max_steps else None}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets (default: all)")
    p.add_argument("--measure", default="", help="comma-separated presets whose training steps to time here")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measured preset")
    p.add_argument("--memory_gb", type=float, default=80.0,
                   help="memory for the largest-batch column, in GiB (2^30 bytes)")
    args = p.parse_args(argv)
    names = [n for n in args.presets.split(",") if n]
    measured = [n for n in args.measure.split(",") if n]
    unknown = sorted(set(names + measured) - set(PRESETS))
    if unknown:
        raise UserError(f"unknown preset {unknown[0]!r}; valid: {', '.join(PRESETS)}")
    if args.steps < 1 or args.memory_gb <= 0:
        raise UserError("--steps must be >= 1 and --memory_gb > 0")
    rows = [memory_figures(n, args.memory_gb) for n in names]
    speeds = {n: measured_speed(n, args.steps) for n in measured}
    print(f"| preset | family | parameters | batch (global) | activations MB/image (none / gelu / blocks) | GB at its batch | "
          f"largest batch in {args.memory_gb:g} GB (none / blocks) | budget (steps) | here: steps/s | days to budget |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["activation_mb_per_image"], r["largest_batch"]
        s = speeds.get(r["preset"], {})
        print(f"| {r['preset']} | {r['model']} | {r['params']:,} | {r['n_batch']} ({r['global_batch']}) | "
              f"{a['none']} / {a['gelu']} / {a['blocks']} | {r['gb_at_batch']} | {b['none']} / {b['blocks']} | {r['max_steps']:,} | "
              f"{s.get('steps_per_s', '')} | {s.get('days_to_budget', '')} |")
    print(json.dumps({"machine": machine_description(torch.device("cpu")), "memory_gb": args.memory_gb,
                      "presets": rows, "measured": speeds}))


if __name__ == "__main__":
    run_cli(main)
