"""Every model family like for like: on the digits at the preset's budget, or on Fashion-MNIST at equal wall-clock
(a benchmark: it prints a table and one JSON line).

    python bench/families.py --hps digits                       # every family, each as train.py runs it
    python bench/families.py --hps digits --families cvae,vlae  # some of them
    python bench/families.py --hps digits --max_steps 200       # a quick look (any train.py field is passed on)
    python bench/families.py --hps fashion_mnist_cpu --minutes 10 --out runs/families_fashion

Each family trains in a process of its own with exactly ``python train.py --hps digits --model NAME`` (the same
data, steps, batch, optimiser and schedule: the preset's budget; the vqvae's prior then trains for the preset's
--prior_steps), then bench/quality.py scores its run on the
held-out digits: the negative ELBO and the importance-weighted bound (K=100) in bits/dim, generative
classification accuracy, and class-consistency of 1,000 samples judged by an SVC fit on the real training digits.
The per-class pixel-histogram baseline puts the figures in context. Writes each family's sample grid to
``--pictures`` (default: assets/family_NAME.png) and ends with one JSON line:

    {"baseline_bpd": ..., "families": {"vdvae": {"test_bpd", "test_bpd_iw", "gen_class_acc",
     "class_consistency", "params", "train_seconds", "perplexity"}, "cvae": {...}, ...}}

On Fashion-MNIST (``--hps fashion_mnist_cpu``) every family trains for the same ``--minutes`` of training time on
this machine: a short calibration run of each family (``--calibration_steps`` steps of each stage, long enough for
train.py's speed probe to choose its settings, which the timed run is then given) measures its training speed, from
which its steps are set (a family trained in stages gives each stage the same steps), so that
its schedule, warm-up and cosine decay included, fits the minutes. Then the table gives the negative ELBO on the
10,000 test images (train.py's closing evaluation), the importance-weighted bound on ``--iw_images`` of them drawn
at random, and bench/judge.py's class-consistency and Frechet distance (in its classifier's features: not the
Inception FID) of ``--judge_samples`` samples at the preset's temperature, with parameters and training seconds.
Every run is kept in ``--out`` (a finished one is reused when run again). A family trains at the preset's learning
rate unless ``--lr_of`` gives its own (default FASHION_LR_OF: the preset's rate is the vdvae's, and the cvae's loss
turns non-finite at it); a family whose run fails anyway is a table row that says why, and the others still run.
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
sys.path.insert(1, str(Path(__file__).resolve().parent))  # judge: the Fashion-MNIST sample judge

from hps import MODELS  # noqa: E402
from runlog import read_metrics, run_finished  # noqa: E402
from utils import UserError, check_output_file, check_output_folder, run_cli  # noqa: E402

FASHION_PRESETS = ("fashion_mnist_cpu", "fashion_mnist")
# Fashion-MNIST: the families' own learning rate where the preset's (tuned for the vdvae: 8e-3 on fashion_mnist_cpu)
# does not train them. Each is the highest rate tried at which its 10-minute run stayed finite: the cvae's encoder
# (plain convs, no normalisation) diverged at 8e-3 within 100 steps and at 2e-3 by step 400 of one run, its
# posterior log-sigma reaching 303; the vlae diverged at 2e-3 and 1e-3 (bench/RESULTS.md)
FASHION_LR_OF = "cvae=1e-3,vlae=5e-4,vqvae=2e-3"

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
    p.add_argument("--iw_samples", type=int, default=0, help="posterior draws of the IW bound (0: 100 on the "
                   "digits, 20 on Fashion-MNIST's --iw_images)")
    p.add_argument("--out", default="", help="folder for the runs (default: a temporary folder)")
    p.add_argument("--pictures", default=str(ROOT / "assets" / "family_NAME.png"),
                   help="where each family's sample grid goes, NAME standing for the family ('' for none)")
    p.add_argument("--minutes", type=float, default=0.0, help="Fashion-MNIST: training minutes of every family")
    p.add_argument("--calibration_steps", type=int, default=400, help="Fashion-MNIST: steps of the speed run (enough "
                   "for train.py's speed probe to run in it; the timed run trains with the settings it chose)")
    p.add_argument("--iw_images", type=int, default=1000, help="Fashion-MNIST: test images of the IW bound")
    p.add_argument("--judge_samples", type=int, default=2000, help="Fashion-MNIST: samples the judge scores")
    p.add_argument("--data_root", default="./data", help="Fashion-MNIST: where its files are (or go)")
    p.add_argument("--lr_of", default=None, help="Fashion-MNIST: a family's own --lr, as NAME=LR,... (default: "
                   f"{FASHION_LR_OF}; the others train at the preset's)")
    p.add_argument("--judge_cache", default=None, help="Fashion-MNIST: where bench/judge.py's trained classifier is "
                   "kept ('' for nowhere; default: judge.py's)")
    args, passed = p.parse_known_args(argv)
    args.iw_samples = args.iw_samples or (20 if args.hps in FASHION_PRESETS else 100)
    if args.hps in FASHION_PRESETS:
        return main_fashion(args, passed)
    if args.hps != "digits":
        raise UserError(f"bench/families.py judges samples of the digits or of Fashion-MNIST: --hps digits or "
                        f"{' or '.join(FASHION_PRESETS)}")
    names = family_names(args.families)
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


def family_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        raise UserError(f"unknown family {unknown[0] if unknown else '(none)'!r}; valid: {', '.join(MODELS)}")
    return names


def parse_lr_of(text: str) -> dict[str, str]:
    """NAME=LR,... -> {name: lr as given}; an unknown family or a rate that is not a positive number: one line."""
    out = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, _, value = item.partition("=")
        family_names(name)
        try:
            ok = float(value) > 0
        except ValueError:
            ok = False
        if not ok:
            raise UserError(f"--lr_of takes NAME=LR with a positive LR, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def stage_speeds(run_dir: Path) -> dict[str, float]:
    """Steps per second of each stage of a run: the steps between its last two training records over the time
    between them (so neither the start, the warm-up of the first window, nor a change of stage is counted)."""
    records = [r for r in read_metrics(run_dir) if r.get("kind") == "train"]
    speeds = {}
    for before, after in zip(records, records[1:]):
        if before["stage"] == after["stage"] and after["time"] > before["time"]:
            speeds[after["stage"]] = (after["step"] - before["step"]) / (after["time"] - before["time"])
    if not speeds:
        raise UserError(f"{run_dir}: too few training records to measure a speed (raise --calibration_steps)")
    return speeds


def calibrated_speed_args(run_dir: Path) -> list[str]:
    """The calibration run's speed settings as train.py flags, so that the timed run trains with exactly them
    (its own speed probe could choose otherwise: the probe times noisy steps, and a calibration too short for
    the probe trains by its rule)."""
    from speed import SPEED_FIELDS

    hps = last_record(run_dir, "config")["hps"]
    return [arg for field in (*SPEED_FIELDS, "compile") for arg in (f"--{field}", str(hps[field]))]


def speed_settings(run_dir: Path) -> str:
    """The speed settings a run trained with, as its log says them ('' when it does not)."""
    lines = [line for line in (run_dir / "log.txt").read_text().splitlines() if "speed settings: " in line]
    return lines[-1].split("speed settings: ", 1)[1] if lines else ""


def calibrate(name: str, args, passed: list[str], out: Path) -> tuple[int, dict[str, float]]:
    """The steps per stage that fit ``--minutes`` of training, from a short run's measured speed (``passed``
    carries the family's own --lr, if any)."""
    probe = out / f"{name}-speed"
    steps = args.calibration_steps
    if not run_finished(probe):
        run([sys.executable, str(ROOT / "train.py"), "--hps", args.hps, "--model", name, "--save_dir", str(probe),
             "--max_steps", str(steps), "--prior_steps", str(steps), "--log_every", str(max(1, steps // 3)),
             "--eval_every", "0", "--save_every", str(steps), "--data_root", args.data_root, *passed])
    speeds = stage_speeds(probe)
    seconds_per_step = sum(1.0 / v for v in speeds.values())  # one step of every stage
    return max(1, int(args.minutes * 60 / seconds_per_step)), speeds


def measure_family_fashion(name: str, args, passed: list[str], out: Path, judge) -> dict:
    """Train one family for the minutes, then its held-out bounds and the judge's figures; a family whose run
    fails (a loss that turns non-finite, say) is a row that says so, and the others still run."""
    lr = args.lr_of.get(name)
    passed = [*passed, *(["--lr", lr] if lr else [])]
    try:
        return train_and_score_fashion(name, args, passed, out, judge) | {"lr": lr or "preset"}
    except UserError as err:
        return {"failed": str(err), "lr": lr or "preset"}


def train_and_score_fashion(name: str, args, passed: list[str], out: Path, judge) -> dict:
    """One family's run for the minutes, its held-out bounds and the judge's figures."""
    import torch

    from judge import draw, score_samples
    from models import load_model
    from scoring import evaluate_checkpoint
    from vae import count_parameters

    steps, speeds = calibrate(name, args, passed, out)
    run_dir = out / name
    if not run_finished(run_dir):
        run([sys.executable, str(ROOT / "train.py"), "--hps", args.hps, "--model", name, "--save_dir", str(run_dir),
             "--max_steps", str(steps), "--prior_steps", str(steps), "--data_root", args.data_root,
             *calibrated_speed_args(out / f"{name}-speed"), *passed])
    final = last_record(run_dir, "final")
    # the timed run is given the calibration's settings; this checks that it trained with them (a calibration timed
    # with other settings than its run measures the wrong speed: 60 steps in fp32 once measured the cvae 1.3x and
    # the vqvae 1.6x slower than their bf16 runs)
    matched = speed_settings(out / f"{name}-speed") == speed_settings(run_dir)
    if not matched:
        print(f"{name}: the calibration trained with other speed settings than the run ({speed_settings(run_dir)}): "
              f"its steps do not fit the minutes", flush=True)
    report = evaluate_checkpoint(str(run_dir), "test", iw_samples=args.iw_samples, batch_size=250, classify=False,
                                 device="cpu", data_root=args.data_root, n_images=args.iw_images)
    model, _ = load_model(str(run_dir), torch.device("cpu"))
    net, test_features = judge
    labels = torch.arange(model.H.n_classes).repeat_interleave(args.judge_samples // model.H.n_classes)
    images = draw(model, labels, model.H.temperature, 0.0, seed=0)
    scores = score_samples(net, images, labels, test_features)
    if args.pictures:
        picture = Path(args.pictures.replace("NAME", name))
        picture.parent.mkdir(parents=True, exist_ok=True)
        run([sys.executable, str(ROOT / "sample.py"), "grid", "--weights", str(run_dir), "--n", "10", "--out",
             str(picture)])
    return {"test_bpd": final["test_bpd"], "test_bpd_iw": report["bpd_iw"], "iw_images": report["n_images"],
            "class_consistency": scores["consistency"], "frechet": scores["frechet"],
            "precision": scores["precision"], "recall": scores["recall"], "params": count_parameters(model),
            "train_seconds": final["train_seconds"], "steps": steps, "steps_per_s": speeds,
            "calibration_matched": matched}


def main_fashion(args, passed: list[str]) -> None:
    from data import load_data
    from hps import DATASET_SHAPES
    from judge import DEFAULT_CACHE, batched, fit_judge
    from images import crop_padding

    if args.minutes <= 0:
        raise UserError("--hps fashion_mnist_cpu compares the families at equal wall-clock: give --minutes M")
    if args.calibration_steps < 6 or args.iw_images < 0 or args.judge_samples < 10:
        raise UserError("--calibration_steps must be >= 6, --iw_images >= 0 and --judge_samples >= 10")
    names = family_names(args.families)
    args.lr_of = parse_lr_of(FASHION_LR_OF if args.lr_of is None else args.lr_of)
    if args.out:
        check_output_folder(args.out, "--out")
    for name in names if args.pictures else ():
        check_output_file(args.pictures.replace("NAME", name))
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="families-fashion-"))
    data = load_data("fashion_mnist", args.data_root)
    cache = DEFAULT_CACHE if args.judge_cache is None else Path(args.judge_cache) if args.judge_cache else None
    pad = DATASET_SHAPES["fashion_mnist"].pad
    net, accuracy = fit_judge(data, pad=pad, cache=cache)
    test_features = batched(net.features, crop_padding(data.test.images, pad)).numpy()
    print(f"judge: test accuracy {accuracy:.4f}", flush=True)
    results = {}
    for name in names:
        r = results[name] = measure_family_fashion(name, args, passed, out, (net, test_features))
        if "failed" in r:
            print(f"{name:6s} failed at lr {r['lr']}: {r['failed']}", flush=True)
            continue
        print(f"{name:6s} {r['steps']} steps in {r['train_seconds']:.0f} s at lr {r['lr']}: test {r['test_bpd']:.4f} "
              f"bits/dim, IW {r['test_bpd_iw']:.4f}, consistency {r['class_consistency']:.3f}, Frechet "
              f"{r['frechet']:.2f}, {r['params']:,} parameters", flush=True)
    print(f"\n| family | lr | steps | training s | test bits/dim | IW bound (K={args.iw_samples}, {args.iw_images} "
          f"images) | class-consistency | Frechet (judge) | precision | recall | parameters |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "failed" in r:
            print(f"| {name} | {r['lr']} | failed: {r['failed']} | | | | | | | | |")
            continue
        print(f"| {name} | {r['lr']} | {r['steps']:,} | {r['train_seconds']:.0f} | {r['test_bpd']:.4f} | "
              f"{r['test_bpd_iw']:.4f} | {r['class_consistency']:.3f} | {r['frechet']:.2f} | {r['precision']:.3f} | "
              f"{r['recall']:.3f} | {r['params']:,} |")
    print(json.dumps({"hps": args.hps, "minutes": args.minutes, "judge_test_accuracy": accuracy, "runs": str(out),
                      "families": results}))


if __name__ == "__main__":
    run_cli(main)
