"""Each Efficient-VDVAE option on the digits: held-out bits/dim against the digits preset (a benchmark: it prints
figures).

    python bench/efficient.py                          # every variant, run folders in a temporary folder
    python bench/efficient.py --runs runs/efficient    # run folders kept (and finished ones reused) there
    python bench/efficient.py --variants digits,adamax
    python bench/efficient.py --jobs 2                 # two runs at a time, one thread each (2 cores)

Trains the digits preset as it is (twice, seeds 0 and 1, for the run-to-run spread), then once with each option of
the cifar10_efficient preset turned on alone, and once with all of them, through train.py. Their values are
scaled to a 2,500-step run where theirs count steps of an 800,000-step one (the decay's start and floor, the KL
warm-up and balancing). Reports the held-out negative ELBO (EMA weights, the final record), its KL, the share of
active latent channels (evaluate.py's diagnostic) and the training time (with ``--jobs`` above 1 the runs share
the machine, so their times are not each one's alone); ends with one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runlog import read_metrics, run_finished  # noqa: E402
from scoring import evaluate_checkpoint  # noqa: E402
from utils import UserError, run_cli  # noqa: E402

# --enc_skips every reads one skip per encoder block (digits: 3 at 8x8, 4 at 4x4, 1 at 1x1): the digits decoder
# with one more block at 8x8 (its 4x4 blocks unchanged in number, two of them reading the skip before them)
EVERY_SKIP_DECODER = "1x1,4m1,4x3,4s2,8m4,8x2"
OPTIONS = {  # name -> train.py overrides of the digits preset
    "digits": [],
    "digits seed 1": ["--seed", "1"],
    "adamax": ["--optimizer", "adamax", "--adam_beta2", "0.999"],
    "softplus latent std": ["--latent_std", "softplus"],
    "softplus DMOL scales": ["--dmol_scale", "softplus"],
    "skip from every encoder block": ["--enc_skips", "every", "--dec_blocks", EVERY_SKIP_DECODER],
    "1x1 input conv": ["--input_kernel", "1"],
    # theirs: decay from 50k of 800k steps down to a fifth of the peak
    "narrow cosine": ["--lr_decay_start", "156", "--lr_min", "4e-4"],
    # theirs: from step 21 over 5,000 (beta 1 at 5,042), balancing 10,000 steps: here a fifth of the run each
    "KL warm-up + balancing": ["--kl_warmup_start", "21", "--kl_warmup_steps", "458", "--kl_balance_steps", "500"],
    "horizontal flips": ["--augment_flip", "true"],
    "no clipping or skip below 800": ["--grad_clip", "0", "--skip_threshold", "800"],
}
OPTIONS["all of them"] = [a for name, args in OPTIONS.items() if name not in ("digits", "digits seed 1")
                          for a in args]
FIXED = ["--hps", "digits", "--curves", "false"]


def train_variant(name: str, run_dir: Path, threads: int | None) -> None:
    if not run_finished(run_dir):
        t0 = time.perf_counter()
        env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *FIXED, *OPTIONS[name], "--save_dir",
                               str(run_dir)], capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise UserError(f"{name}: train.py failed: {done.stderr.strip().splitlines()[-1:]}")
        print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)


def variant_figures(name: str, run_dir: Path) -> dict:
    final = next(r for r in read_metrics(run_dir) if r.get("kind") == "final")
    report = evaluate_checkpoint(str(run_dir), "test", classify=False, device="cpu")
    return {"test_bpd": report["bpd"], "kl_bpd": report["kl_bpd"], "train_seconds": final.get("train_seconds"),
            "active_share": report["active_latents"]["share"], "active": report["active_latents"]["active"],
            "channels": report["active_latents"]["channels"], "overrides": " ".join(OPTIONS[name])}


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", default=None, help="folder for the run folders (default: a temporary one)")
    p.add_argument("--variants", default=",".join(OPTIONS), help=f"comma-separated, of: {', '.join(OPTIONS)}")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at a time (each then with cores/jobs threads)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise UserError(f"unknown variants {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    runs = Path(args.runs) if args.runs else Path(tempfile.mkdtemp(prefix="efficient-"))
    folders = {name: runs / name.replace(" ", "_").replace("+", "and") for name in names}
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(lambda name: train_variant(name, folders[name], threads), names))
    results = {name: variant_figures(name, folders[name]) for name in names}
    base = results.get("digits", {}).get("test_bpd")
    print("| variant | overrides of --hps digits | held-out bits/dim | vs digits | KL bits/dim | active latents "
          "| training s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        delta = f"{r['test_bpd'] - base:+.4f}" if base is not None else "-"
        print(f"| {name} | `{r['overrides'] or '-'}` | {r['test_bpd']:.4f} | {delta} | {r['kl_bpd']:.4f} | "
              f"{100 * r['active_share']:.1f}% of {r['channels']} | {r['train_seconds']:.0f} |")
    print(json.dumps({"runs": str(runs), "results": results}))


if __name__ == "__main__":
    run_cli(main)
