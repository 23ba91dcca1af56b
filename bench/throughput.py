"""Training and sampling speed and peak memory of a preset, mode by mode (a benchmark: it prints figures).

    python bench/throughput.py --hps cifar10 --n_batch 16                  # on a GPU: every mode
    python bench/throughput.py --hps cifar10 --n_batch 8 --quick           # 2 CPU cores: under 10 minutes
    python bench/throughput.py --hps digits --modes eager_fp32,default     # chosen modes only
    python bench/throughput.py --hps cifar10 --width 64 --modes default    # any train.py field overrides the preset

Each mode runs in a process of its own (so its peak memory is its own) on synthetic uint8 images with
random labels, through the same ``Trainer.step`` that train.py runs: the median of the timed training
steps after warm-up gives images/s, then ``sample`` batches of ``--n_batch_sample`` give sampling
images/s. Peak memory (of training; then with sampling too) is CUDA's max allocated, or the process's peak
RSS on the CPU. Modes:

    eager_fp32        fp32, contiguous tensors, foreach AdamW, nothing recomputed: the reference's way
    default           what train.py does on this device: the auto settings, measured by speed.py (or read from
                      its cache) for this model and batch, as a long run would choose them
    fused_adamw       eager_fp32 with the fused AdamW
    gelu_recompute    eager_fp32 recomputing the GELUs in the backward pass (less memory)
    channels_last     eager_fp32 in the channels-last memory format
    bf16 / fp16       eager_fp32 under autocast (fp16 with a gradient scaler; CUDA only)
    compile           eager_fp32 with torch.compile (its first compile is not timed)
    combined          every speed-up above that this device has, together
    default_gelu      default recomputing the GELUs in the backward pass (less memory)
    checkpoint_blocks default recomputing every block in the backward pass (least memory)
    default_compile   default with torch.compile (its first compile is not timed)
    reference         openai/vdvae's own model and training step in fp32 (bench/compare_openai.py's
                      ReferenceTrainer; needs ``--vdvae``, a clone of github.com/openai/vdvae; unconditional)

Ends with one JSON line: device (the GPU's name, or the CPU's with its vector instruction sets), torch, hps,
n_batch, every mode's train_img_s / sample_img_s / peak_mem_mb, the best (fastest-training) mode and its speed-ups
over eager_fp32, the default's speed-ups over eager_fp32, and memory_saver: the fastest mode whose training peak
memory is at most 0.6x eager_fp32's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(1, str(Path(__file__).resolve().parent))  # compare_openai, for the reference mode

from hps import DATASET_SHAPES, hparams_from_preset, parse_args  # noqa: E402
from speed import choose_speed_settings, cpu_has_bf16, machine_description  # noqa: E402
from trainer import Trainer  # noqa: E402
from utils import UserError, autocast, pick_device, run_cli  # noqa: E402

PLAIN = dict(precision="fp32", channels_last="off", compile="off", grad_checkpoint="none")
# mode -> (hyperparameter overrides, fused AdamW or None for the Trainer's choice)
MODES: dict[str, tuple[dict, bool | None]] = {
    "eager_fp32": (PLAIN, False),
    "default": ({}, None),
    "fused_adamw": (PLAIN, True),
    "gelu_recompute": (dict(PLAIN, grad_checkpoint="gelu"), False),
    "channels_last": (dict(PLAIN, channels_last="on"), False),
    "bf16": (dict(PLAIN, precision="bf16"), False),
    "fp16": (dict(PLAIN, precision="fp16"), False),
    "compile": (dict(PLAIN, compile="on"), False),
    "combined": (dict(precision="auto", channels_last="on", compile="on", grad_checkpoint="gelu"), True),
    "default_gelu": (dict(grad_checkpoint="gelu"), None),
    "checkpoint_blocks": (dict(grad_checkpoint="blocks"), None),
    "default_compile": (dict(compile="on"), None),
    "reference": (PLAIN, None),
}
ON_DEFAULT = ("default", "default_gelu", "checkpoint_blocks", "default_compile")
NOT_BY_DEFAULT = ("reference", "default_compile")  # run only when named in --modes  # the auto settings first, then the mode's overrides
# --quick on the CPU (under 10 minutes for cifar10 at batch 8 on 2 cores): the baseline, the default and the
# switches that run at CPU speed, and bf16 where the CPU has bf16 instructions. Compiling the cifar10 model takes
# minutes there, and bf16 autocast on a CPU without them had not finished 4 steps of it after 8 minutes.
QUICK_ON_CPU = ("eager_fp32", "default", "gelu_recompute", "channels_last", "default_gelu", "checkpoint_blocks")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_mode(mode: str, args) -> dict:
    """Time one mode in this process: training steps, then sampling; returns its figures."""
    device = pick_device(args.device)
    overrides, fused = MODES[mode]
    H = hparams_from_preset(args.hps, dict(args.overrides, n_batch=args.n_batch, max_steps=0, lr_decay="none"))
    H.image_size, H.image_channels = args.image_size, args.image_channels
    if mode in ON_DEFAULT:  # what a long train.py run picks here (read from the cache the probe filled)
        for field, value in choose_speed_settings(H, device, float("inf"), log=lambda m: None).items():
            setattr(H, field, value)
    for field, value in overrides.items():
        setattr(H, field, value)
    torch.manual_seed(0)
    if mode == "reference":
        if not args.vdvae:
            raise UserError("mode reference needs --vdvae, a clone of github.com/openai/vdvae")
        from compare_openai import ReferenceTrainer
        H.n_classes = 0
        trainer = ReferenceTrainer(Path(args.vdvae), H, device)
    else:
        trainer = Trainer(H, device, fused=fused)
    shape = (args.n_batch, H.image_channels, H.image_size, H.image_size)
    images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)
    labels = torch.randint(0, H.n_classes, (args.n_batch,), device=device) if H.n_classes else None

    times = []
    for i in range(args.warmup + args.steps):
        synchronize(device)
        t0 = time.perf_counter()
        skip, stats = trainer.step(images, labels)
        stats.tolist()  # wait for the step, as a log line would
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    loss = stats[0].item()
    train_peak = peak_memory_mb(device)
    ops = operator_calls(trainer, images, labels)

    sampling = {n: sampling_speed(trainer, H, n, args.sample_reps, device) for n in args.sample_batches}
    return {"train_img_s": round(args.n_batch / statistics.median(times), 3),
            "sample_img_s": sampling[args.sample_batches[0]],
            "sample_img_s_by_batch": {str(n): v for n, v in sampling.items()},
            "peak_mem_mb": round(train_peak, 1), "peak_mem_with_sampling_mb": round(peak_memory_mb(device), 1),
            "step_s": round(statistics.median(times), 4), "last_loss": round(loss, 4), "ops_per_step": ops,
            "settings": trainer.settings()}


def operator_calls(trainer, images: torch.Tensor, labels: torch.Tensor | None) -> int:
    """Leaf operator calls the host makes in one training step (torch.profiler's CPU events without children):
    what a GPU step pays host time for, one launch or more each. The fused loops inductor generates are not
    operator calls and are not counted; the kernels a GPU runs per step are the GPU check's profile figure."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.step(images, labels)[1].tolist()
    return sum(1 for event in prof.events() if not event.cpu_children)


def sampling_speed(trainer, H, n: int, reps: int, device: torch.device) -> float:
    """Images/s of prior sampling from the trainer's EMA model, ``n`` per batch: median of ``reps`` timed batches
    after an untimed one."""
    labels = torch.randint(0, H.n_classes, (n,), device=device) if H.n_classes else None
    times = []
    for i in range(1 + reps):
        synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, trainer.amp_dtype):
            trainer.ema.sample(n, labels).cpu()
        if i >= 1:
            times.append(time.perf_counter() - t0)
    return round(n / statistics.median(times), 3)


def modes_to_run(args, device: torch.device) -> list[str]:
    if args.modes:
        names = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in names if m not in MODES]
        if unknown:
            raise UserError(f"unknown mode {unknown[0]!r}; valid: {', '.join(MODES)}")
        return names
    names = [m for m in MODES if (m != "fp16" or device.type == "cuda") and m not in NOT_BY_DEFAULT]  # fp16 autocast is for older GPUs
    if args.quick and device.type == "cpu":  # bf16 too where the CPU has bf16 instructions
        names = [m for m in names if m in QUICK_ON_CPU or (m == "bf16" and cpu_has_bf16())]
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hps", default="cifar10", help="preset whose architecture is measured")
    p.add_argument("--n_batch", type=int, default=16, help="training images per step")
    p.add_argument("--n_batch_sample", default="16", help="images per sampling batch; several, comma-separated, "
                   "are each timed (the first is sample_img_s)")
    p.add_argument("--image_size", type=int, default=None, help="image size (default: the preset's dataset)")
    p.add_argument("--image_channels", type=int, default=None, help="channels (default: the preset's dataset)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per mode (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--sample_reps", type=int, default=5, help="timed sampling batches per mode")
    p.add_argument("--quick", action="store_true", help="3 timed steps and 2 sampling batches per mode; "
                   "on the CPU only the modes in QUICK_ON_CPU")
    p.add_argument("--modes", default="", help=f"comma-separated subset of: {', '.join(MODES)}")
    p.add_argument("--vdvae", default="", help="a clone of github.com/openai/vdvae, for the reference mode")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: measure this one mode
    return p




def field_overrides(preset: str, flags: list[str]) -> dict:
    """train.py's per-field flags (``--width 64``) given after this script's own, as hyperparameter overrides."""
    if not flags:
        return {}
    _, namespace = parse_args(["--hps", preset, *flags], "")
    return {k: v for k, v in vars(namespace).items() if k not in ("hps", "debug")}


def main(argv: list[str]) -> None:
    args, rest = build_parser().parse_known_args(argv)
    args.overrides = field_overrides(args.hps, rest)
    if args.quick:
        args.steps, args.warmup, args.sample_reps = 3, 1, 2
    try:
        args.sample_batches = [int(n) for n in str(args.n_batch_sample).split(",")]
    except ValueError:
        raise UserError(f"--n_batch_sample takes whole numbers, comma-separated, not {args.n_batch_sample!r}") from None
    args.n_batch_sample = args.sample_batches[0]
    if min(args.n_batch, *args.sample_batches, args.steps, args.sample_reps) <= 0 or args.warmup < 0:
        raise UserError("--n_batch, --n_batch_sample, --steps and --sample_reps must be > 0")
    H = hparams_from_preset(args.hps, args.overrides)
    shape = DATASET_SHAPES.get(H.dataset)
    size, channels = (shape.image_size, shape.channels) if shape else (None, None)
    args.image_size = args.image_size or size
    args.image_channels = args.image_channels or channels
    if args.worker == "probe":  # speed.py's measurement for the default mode, in a process of its own
        device = pick_device(args.device)
        H = hparams_from_preset(args.hps, dict(args.overrides, n_batch=args.n_batch, max_steps=0, lr_decay="none"))
        H.image_size, H.image_channels = args.image_size, args.image_channels
        print(json.dumps(choose_speed_settings(H, device, float("inf"), log=lambda m: None)))
        return
    if args.worker:
        print(json.dumps(measure_mode(args.worker, args)))
        return

    device = pick_device(args.device)
    results = {}
    if set(ON_DEFAULT) & set(modes_to_run(args, device)):  # its probe runs first, so the default mode reads its choice from
        t0 = time.perf_counter()                 # the cache and its peak memory is its own
        proc = subprocess.run([sys.executable, __file__, *argv, "--worker", "probe"], capture_output=True, text=True,
                              env=dict(os.environ), check=False)
        probe = proc.stdout.strip().splitlines()[-1] if proc.returncode == 0 else proc.stderr.strip()[-300:]
        print(f"speed.py chose {probe} in {time.perf_counter() - t0:.0f} s (cached for train.py)", flush=True)
    for mode in modes_to_run(args, device):
        cmd = [sys.executable, __file__, *argv, "--worker", mode]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), check=False)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{mode:18s} failed: {last}", flush=True)
            results[mode] = {"error": last}
            continue
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:18s} train {r['train_img_s']:9.2f} img/s  sample {r['sample_img_s']:9.2f} img/s  "
              f"peak {r['peak_mem_mb']:9.1f} MB  ops/step {r['ops_per_step']:6d}  loss {r['last_loss']:.3f}  "
              f"({r['settings']})", flush=True)

    ok = {m: r for m, r in results.items() if "error" not in r}
    best = max(ok, key=lambda m: ok[m]["train_img_s"]) if ok else None
    base = ok.get("eager_fp32")
    savers = [m for m in ok if base and ok[m]["peak_mem_mb"] <= 0.6 * base["peak_mem_mb"]]
    saver = max(savers, key=lambda m: ok[m]["train_img_s"]) if savers else None

    def ratio(mode: str | None, key: str) -> float | None:
        return round(ok[mode][key] / base[key], 3) if mode in ok and base else None
    summary = {
        "device": machine_description(device), "cores": os.cpu_count(), "torch": torch.__version__,
        "hps": args.hps, "n_batch": args.n_batch, "n_batch_sample": args.n_batch_sample,
        "modes": results, "best_mode": best, "best": ok.get(best),
        "speedup_train": ratio(best, "train_img_s"), "speedup_sample": ratio(best, "sample_img_s"),
        "default_speedup_train": ratio("default", "train_img_s"),
        "default_speedup_sample": ratio("default", "sample_img_s"),
        # the compiled step's host work: leaf operator calls per step against eager fp32's
        "compile_ops_vs_eager": ratio("compile", "ops_per_step"),
        "default_compile_ops_vs_eager": ratio("default_compile", "ops_per_step"),
        "memory_saver": {"mode": saver, "train_vs_eager": ratio(saver, "train_img_s"),
                         "peak_mem_vs_eager": ratio(saver, "peak_mem_mb")},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    run_cli(main)
