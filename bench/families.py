"""Every model family on the digits, like for like (a benchmark: it prints a table and one JSON line).

    python bench/families.py --hps digits                       # every family, each as train.py runs it
    python bench/families.py --hps digits --families cvae,vlae  # some of them
    python bench/families.py --hps digits --max_steps 200       # a quick look (any train.py field is passed on)

Each family trains in a process of its own with exactly ``python train.py --hps digits --model NAME`` (the same
data, steps, batch, optimiser and schedule: the preset's budget; the vqvae's prior then trains for the preset's
--prior_steps), then bench/quality.py scores its run on the
held-out digits: the negative ELBO and the importance-weighted bound (K=100) in bits/dim, generative
classification accuracy, and class-consistency of 1,000 samples judged by an SVC fit on the real training digits.
The per-class pixel-histogram baseline puts the figures in context. Writes each family's sample grid to
``--pictures`` (default: assets/family_NAME.png) and ends with one JSON line:

    {"baseline_bpd": ..., "families": {"vdvae": {"test_bpd", "test_bpd_iw", "gen_class_acc",
     "class_consistency", "params", "train_seconds", "perplexity"}, "cvae": {...}, ...}}
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hps import MODELS  # noqa: E402
from runlog import read_metrics  # noqa: E402
from utils import UserError, check_output_file, check_output_folder, run_cli  # noqa: E402

KEYS = ("test_bpd", "test_bpd_iw", "gen_class_acc", "class_consistency", "params", "train_seconds", "perplexity")


def run(cmd: list[str]) -> str:
    """Run a command from the repository root; its stdout, or a UserError with its last line of output."""
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
        raise UserError(f"{' '.join(Path(c).name if c.endswith('.py') else c for c in cmd[:4])} ... failed: {tail}")
    return proc.stdout


def last_record(run_dir: Path, kind: str) -> dict:
    return next(r for r in reversed(read_metrics(run_dir)) if r.get("kind") == kind)


def measure_family(name: str, args, passed: list[str], out: Path) -> dict:
    """Train one family with the preset's settings, score it with bench/quality.py, draw its grid."""
    run_dir = out / name
    t0 = time.perf_counter()
    run([sys.executable, str(ROOT / "train.py"), "--hps", args.hps, "--model", name, "--save_dir", str(run_dir),
         *passed])
    wall = time.perf_counter() - t0
    quality = json.loads(run([sys.executable, str(ROOT / "bench" / "quality.py"), "--weights", str(run_dir),
                              "--iw_samples", str(args.iw_samples)]).strip().splitlines()[-1])
    if args.pictures:
        picture = Path(args.pictures.replace("NAME", name))
        picture.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, str(ROOT / "sample.py"), "grid", "--weights", str(run_dir), "--n", "10", "--out",
             str(picture)])
    result = {k: quality.get(k) for k in KEYS}
    result.update(train_seconds=last_record(run_dir, "final")["train_seconds"], wall_seconds=round(wall, 1),
                  baseline_bpd=quality["baseline_bpd"],
                  # a family with a codebook logs its usage: the perplexity of the codes of the last batches
                  perplexity=last_record(run_dir, "train").get("perplexity"))
    return result


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hps", default="digits", help="preset (digits: the only one with an offline sample judge)")
    p.add_argument("--families", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    p.add_argument("--iw_samples", type=int, default=100, help="posterior draws of the IW bound")
    p.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    p.add_argument("--pictures", default=str(ROOT / "assets" / "family_NAME.png"),
                   help="where each family's sample grid goes, NAME standing for the family ('' for none)")
    args, passed = p.parse_known_args(argv)
    if args.hps != "digits":
        raise UserError("bench/families.py scores samples with a classifier of the real digits: --hps digits only")
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise UserError(f"unknown family {unknown[0] if unknown else '(none)'!r}; valid: {', '.join(MODELS)}")
    if args.out:  # every output checked before the first family trains
        check_output_folder(args.out, "--out")
    for name in names if args.pictures else ():
        check_output_file(args.pictures.replace("NAME", name))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="families-"))
    results = {}
    for name in names:
        results[name] = measure_family(name, args, passed, out)
        r = results[name]
        usage = f", codebook perplexity {r['perplexity']:.1f}" if r["perplexity"] is not None else ""
        print(f"{name:6s} trained in {r['train_seconds']:.0f} s: test {r['test_bpd']:.4f} bits/dim, "
              f"IW {r['test_bpd_iw']:.4f}, gen. class. {r['gen_class_acc']:.3f}, consistency "
              f"{r['class_consistency']:.3f}, {r['params']:,} parameters{usage}", flush=True)
    baseline = next(iter(results.values()))["baseline_bpd"]
    print(f"\n| family | test bits/dim | IW bound (K={args.iw_samples}) | generative class. | class-consistency | "
          f"parameters | training s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['test_bpd']:.4f} | {r['test_bpd_iw']:.4f} | {r['gen_class_acc']:.3f} | "
              f"{r['class_consistency']:.3f} | {r['params']:,} | {r['train_seconds']:.0f} |")
    print(f"| per-class pixel histograms | {baseline:.4f} | | | | | |")
    print(json.dumps({"baseline_bpd": baseline, "runs": str(out),
                      "families": {n: {k: r[k] for k in KEYS} for n, r in results.items()}}))


if __name__ == "__main__":
    run_cli(main)
