"""The prepared GPU check: what users run on a CUDA card, measured and exercised in one command.

    python bench/gpu_check.py --out gpu_check1 --sections part1   # one GPU: at most 6 minutes
    python bench/gpu_check.py --out gpu_check2 --sections part2   # the rest, at most 6 minutes
    python bench/gpu_check.py --out /tmp/check --tiny          # the same code paths on the CPU at tiny sizes (tests)

A GPU is lent to this project now and then, for minutes, so the check is prepared and tested on the CPU (``--tiny``
runs every section with a tiny model, and the test suite runs it) and then run whole when a card is there. Nothing
is downloaded: the data is synthetic, written in CIFAR-10's real pickle format, or scikit-learn's bundled digits.
The reference is openai/vdvae's model code from a clone (``--vdvae``, default ``.vdvae/`` in the repository,
ignored by git), timed with its own training step (bench/compare_openai.py's ReferenceTrainer).

Sections, in order (each bounded in time; whatever does not fit in ``--budget_s`` is recorded as skipped):

  machine      the card, torch, and the measured bf16 matrix-product rate (8192^3)
  profile      the default training step under torch.profiler: top kernels, kernels, busy time and operator calls
               per step, beside its unprofiled wall time
  throughput   cifar10 at batch 16: the reference, our eager fp32, our default (speed.py's choice) and the default
               compiled: training images/s (median of 20 steps after 5 warm-up), peak memory, operator calls per
               step, sampling at batch 64 and 256; model FLOPs per training image (torch's FlopCounterMode) and the
               share of the card's dense bf16 peak
  batch_sweep  the default step at batch 16, 32, 64, 128: images/s, peak memory, share of the dense bf16 peak
  parity       200 steps on the same synthetic batches in eager fp32 and in the default mode: both loss curves
  digits       the digits preset end to end on the device (train.py, evaluate.py, sample.py): held-out bits/dim
  resume       a cifar10-architecture run on CIFAR-format files, killed (SIGKILL) after a checkpoint, resumed with
               --restore latest in another memory layout and precision (Adam moments re-laid, device RNG restored);
               its checkpoint sampled on the CPU
  torchrun     torchrun with one process against plain python at the same batch: images/s of each
  cuda_paths   evaluation under bf16 against fp32, fp32 distribution heads and the exact prior-noise round trip
               under bf16, one compiled graph for all gradient-accumulation passes
  max_batch    the largest cifar10 batch that fits for --grad_checkpoint none, gelu and blocks
  step_paths   training steps fed from a split on the GPU under set_sync_debug_mode("error") (no host sync), and
               --grad_accum 4 compiled with CUDA graphs against eager
  sampling_compile  cifar10 prior sampling at batch 256, eager and compiled (sample.py grid --compile on): seconds
               per batch of each and their ratio, the cold compile's cost and the batches that repay it

Writes OUT/summary.json (rewritten after every section, so a run cut short keeps what it measured),
OUT/gpu_check.log (every command with its output) and OUT/digits_samples.png, and prints the summary's targets.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import UserError, check_output_folder, run_cli  # noqa: E402

# A cifar10-shaped model small enough for the CPU: every code path of the real one, in seconds
TINY_ARCH = ["--width", "16", "--zdim", "4", "--enc_blocks", "32x1,32d2,16x1,16d2,8x1,8d8,1x1",
             "--dec_blocks", "1x1,8m1,8x1,16m8,16x1,32m16,32x1"]
DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # datasheets, dense (no sparsity)
N_TRAIN_FILES, PER_FILE, N_TEST = 5, 1100, 512  # synthetic CIFAR-10: 5,500 train (5,000 become validation)


# ---------------------------------------------------------------------------------------------
# Settings of a full and a tiny run
# ---------------------------------------------------------------------------------------------


def plan(tiny: bool) -> dict:
    """Sizes of every section: the full ones on a GPU, seconds' worth on the CPU."""
    if tiny:
        return dict(arch=[*TINY_ARCH, "--compile", "off", "--global_batch", "0"], n_batch=4, steps=2, warmup=1, sample_batches="4,8",
                    sample_reps=1,
                    parity_steps=12, digits=["--max_steps", "20", "--n_batch", "8", "--precision", "fp32",
                                             "--channels_last", "off", "--grad_checkpoint", "none"],
                    resume_every=2, resume_more=2, torchrun_steps=6, torchrun_log=2, max_batch_start=4,
                    max_batch_cap=8, max_batch_seconds=20, profile_steps=2, sweep=(2, 4), sweep_steps=2)
    return dict(arch=[], n_batch=16, steps=20, warmup=5, sample_batches="64,256", sample_reps=3, parity_steps=200,
                digits=[], resume_every=20, resume_more=20, torchrun_steps=90, torchrun_log=30, max_batch_start=16,
                max_batch_cap=4096, max_batch_seconds=35, profile_steps=5, sweep=(16, 32, 64, 128), sweep_steps=10)


def fixed_speed_flags(device: torch.device) -> list[str]:
    """The default mode's settings on this device, named, so that runs compared with each other skip the probe."""
    if device.type == "cuda":
        return ["--precision", "bf16", "--channels_last", "on", "--grad_checkpoint", "none"]
    return ["--precision", "fp32", "--channels_last", "off", "--grad_checkpoint", "none"]


# ---------------------------------------------------------------------------------------------
# Synthetic data in the real formats
# ---------------------------------------------------------------------------------------------


def synthetic_images(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Learnable images with labels: smooth random fields around a per-class pattern, plus pixel noise.
    uint8 (n, C, size, size) and int labels 0..9."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(12345).normal(size=(10, channels, 4, 4))
    labels = rng.integers(0, 10, n)
    low = torch.tensor(rng.normal(size=(n, channels, 4, 4)) + 1.5 * patterns[labels], dtype=torch.float32)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False).numpy()
    pixels = 128 + 45 * smooth + rng.normal(scale=6.0, size=smooth.shape)
    return np.clip(np.round(pixels), 0, 255).astype(np.uint8), labels


def write_cifar10(root: Path) -> Path:
    """CIFAR-10's python pickles (data_batch_1..5, test_batch, batches.meta) of synthetic images in ``root``."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    files = [(f"data_batch_{i + 1}", PER_FILE, i) for i in range(N_TRAIN_FILES)] + [("test_batch", N_TEST, 99)]
    for name, n, seed in files:
        images, labels = synthetic_images(n, seed=seed)
        batch = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": images.reshape(n, -1),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return root


# ---------------------------------------------------------------------------------------------
# Running commands: bounded in time, logged, never fatal to the check
# ---------------------------------------------------------------------------------------------


class Check:
    """The run's state: where it writes, its clock and budget, the summary it keeps rewriting."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.work = Path(args.work) if args.work else self.out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu_check.log"
        self.start = time.perf_counter()
        self.summary: dict = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "tiny": args.tiny,
                              "sections": {}}
        self.P = plan(args.tiny)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", VDVAE_SPEED_CACHE=str(self.work / "speed.json"))

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.start)

    def log(self, text: str) -> None:
        with open(self.log_path, "a") as fh:
            fh.write(text if text.endswith("\n") else text + "\n")

    def save(self) -> None:
        self.summary["elapsed_s"] = round(time.perf_counter() - self.start, 1)
        (self.out / "summary.json").write_text(json.dumps(self.summary, indent=1))

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run ``cmd`` from the repository root; its output goes to the log. A timeout is a failed result."""
        timeout = max(1.0, min(timeout, self.left()))
        self.log(f"\n$ {' '.join(cmd)}   (timeout {timeout:.0f} s)")
        t0 = time.perf_counter()
        # a session of its own, so that a timeout stops the command's own workers too (torchrun's, throughput's)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            self.log((out + err)[-20000:] + f"\n[timed out after {timeout:.0f} s]")
            return subprocess.CompletedProcess(cmd, 124, out, f"timed out after {timeout:.0f} s")
        self.log((out + err)[-20000:] + f"\n[exit {proc.returncode} after {time.perf_counter() - t0:.1f} s]")
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)

    def python(self, script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        return self.run([sys.executable, str(ROOT / script), *args], timeout)

    def worker(self, name: str, *args: str, timeout: float) -> dict:
        """One of this script's workers in a process of its own (its own peak memory, its own CUDA context)."""
        proc = self.run([sys.executable, __file__, "--worker", name, "--out", str(self.out), "--work", str(self.work),
                         *(["--tiny"] if self.args.tiny else []), "--device", self.args.device, *args], timeout)
        return last_json(proc)


def has_reference(vdvae: str) -> bool:
    return (Path(vdvae) / "vae.py").is_file() and (Path(vdvae) / "vae_helpers.py").is_file()


def last_json(proc: subprocess.CompletedProcess) -> dict:
    """The JSON object a command printed last, or an error naming its last line of output."""
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    tail = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
    return {"error": f"exit {proc.returncode}: {tail[-300:]}"}


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---------------------------------------------------------------------------------------------
# Sections (each returns its figures; an exception becomes the section's error)
# ---------------------------------------------------------------------------------------------


def section_machine(c: Check) -> dict:
    result = c.worker("machine", timeout=90)
    smi = c.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv"],
                timeout=20) if c.args.device != "cpu" else None
    if smi is not None and smi.returncode == 0:
        result["nvidia_smi"] = smi.stdout.strip().splitlines()[-1]
    return result


def section_throughput(c: Check) -> dict:
    P = c.P
    reference = has_reference(c.args.vdvae)  # --tiny goes on without a clone (CI has none): the rest still runs
    cmd = ["--hps", "cifar10", "--device", c.args.device, "--n_batch", str(P["n_batch"]), "--n_batch_sample",
           P["sample_batches"], "--steps", str(P["steps"]), "--warmup", str(P["warmup"]), "--sample_reps",
           str(P["sample_reps"]), "--modes", ("reference," if reference else "") + "eager_fp32,default"
           + ("" if c.args.tiny else ",default_compile"), "--vdvae", str(c.args.vdvae), *P["arch"]]
    result = last_json(c.python("bench/throughput.py", *cmd, timeout=300))
    if not reference:
        result["reference"] = f"not measured: no openai/vdvae clone at {c.args.vdvae}"
    result["flops"] = c.worker("flops", timeout=120)
    return result


def section_efficient(c: Check) -> dict:
    """The Efficient-VDVAE presets beside cifar10 (measured in the throughput section): training and sampling img/s
    and peak memory at their own batch of 32, eager fp32 and in the default mode (docs/efficient_vdvae.md)."""
    P = c.P
    result = {}
    for preset in ("cifar10_efficient", "cifar10_efficient_c1"):
        cmd = ["--hps", preset, "--device", c.args.device, "--n_batch", str(2 * P["n_batch"]), "--n_batch_sample",
               P["sample_batches"].split(",")[0], "--steps", str(max(2, P["steps"] // 2)), "--warmup",
               str(P["warmup"]), "--sample_reps", "2", "--modes", "eager_fp32,default", *P["arch"]]
        result[preset] = last_json(c.python("bench/throughput.py", *cmd, timeout=240))
    return result


def section_parity(c: Check) -> dict:
    return c.worker("parity", timeout=180)


def section_digits(c: Check) -> dict:
    run_dir = c.work / "digits"
    t0 = time.perf_counter()
    train = c.python("train.py", "--hps", "digits", "--save_dir", str(run_dir), "--device", c.args.device,
                     "--data_root", str(c.work / "data"), *c.P["digits"], timeout=300)
    wall = time.perf_counter() - t0
    final = [m for m in metrics(run_dir) if m.get("kind") == "final" or "test_bpd" in m]
    result = {"train_rc": train.returncode, "wall_s": round(wall, 1),
              "final": final[-1] if final else None}
    evaluate = c.python("evaluate.py", "--weights", str(run_dir), "--device", c.args.device,
                        *(["--no_classify"] if c.args.tiny else []), timeout=120)
    result["evaluate_rc"] = evaluate.returncode
    result["evaluate"] = last_json(evaluate) if evaluate.returncode == 0 else evaluate.stderr.strip()[-300:]
    eval_file = run_dir / "eval_test.json"
    if eval_file.exists():
        result["evaluate"] = json.loads(eval_file.read_text())
    picture = c.out / "digits_samples.png"
    sample = c.python("sample.py", "grid", "--weights", str(run_dir), "--device", c.args.device, "--out",
                      str(picture), timeout=60)
    result["sample_rc"] = sample.returncode
    result["ok"] = train.returncode == 0 and evaluate.returncode == 0 and sample.returncode == 0 and picture.exists()
    return result


def section_resume(c: Check) -> dict:
    """Train, SIGKILL after a kept checkpoint, resume in the other layout and precision, sample on the CPU."""
    P, run_dir = c.P, c.work / "resume"
    every = P["resume_every"]
    kill_at = 2 * every
    common = ["--hps", "cifar10", "--data_root", str(c.work / "data"), "--save_dir", str(run_dir), "--device",
              c.args.device, "--n_batch", str(P["n_batch"]), "--eval_every", "0", "--log_every", str(every // 2 or 1),
              "--save_every", str(every), "--keep_every", str(every), "--grad_checkpoint", "none", *P["arch"]]
    first = [sys.executable, str(ROOT / "train.py"), *common, "--max_steps", "1000000", "--precision", "fp32",
             "--channels_last", "off"]
    c.log(f"\n$ {' '.join(first)}   (killed with SIGKILL once step-{kill_at}.pt exists)")
    proc = subprocess.Popen(first, cwd=ROOT, env=c.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.perf_counter() + min(150, c.left())
    while kept_steps(run_dir) < kill_at and proc.poll() is None and time.perf_counter() < deadline:
        time.sleep(0.1)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate()
    c.log(out[-20000:] + f"\n[{'killed' if killed else 'ended by itself'}; rc {proc.returncode}]")
    result = {"killed": killed, "newest_kept_checkpoint": kept_steps(run_dir)}
    ckpt = torch.load(run_dir / "latest.pt", map_location="cpu", weights_only=False)
    killed_step = ckpt.get("step")
    device_rng = ckpt.get("rng", {}).get("device")
    result.update(killed_at_checkpoint_step=killed_step, rng_device_state=(
        None if device_rng is None else {"type": type(device_rng).__name__, "numel": int(device_rng.numel())}))
    target = (killed_step or kill_at) + P["resume_more"]
    low = ["bf16", "on"] if c.args.device != "cpu" else ["fp32", "on"]
    resumed = c.python("train.py", *common, "--restore", "latest", "--max_steps", str(target), "--precision",
                       low[0], "--channels_last", low[1], timeout=180)
    log_text = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").exists() else ""
    final = [m for m in metrics(run_dir) if "test_bpd" in m]
    result.update(resume_rc=resumed.returncode, resumed_to_step=final[-1]["step"] if final else None,
                  test_bpd=final[-1]["test_bpd"] if final else None,
                  log_says_resumed=f"step {killed_step}" in log_text and "resum" in log_text.lower())
    picture = c.out / "resume_cpu_samples.png"
    on_cpu = c.python("sample.py", "grid", "--weights", str(run_dir), "--device", "cpu", "--n", "2", "--out",
                      str(picture), timeout=120)
    result.update(cpu_sample_rc=on_cpu.returncode, cpu_sample_written=picture.exists())
    result["ok"] = bool(killed and resumed.returncode == 0 and result["resumed_to_step"] == target
                        and on_cpu.returncode == 0 and picture.exists())
    return result


def kept_steps(run_dir: Path) -> int:
    """The step of the newest step-N.pt in ``run_dir`` (0 when none)."""
    return max([int(p.stem.split("-")[1]) for p in run_dir.glob("step-*.pt")] or [0])


def section_torchrun(c: Check) -> dict:
    """Images/s of train.py under torchrun (one process) and under plain python, same settings."""
    P = c.P
    device = torch.device("cuda" if c.args.device != "cpu" else "cpu")
    common = ["--hps", "cifar10", "--data_root", str(c.work / "data"), "--device", c.args.device, "--n_batch",
              str(P["n_batch"]), "--max_steps", str(P["torchrun_steps"]), "--log_every", str(P["torchrun_log"]),
              "--eval_every", "0", "--save_every", str(10 * P["torchrun_steps"]), *fixed_speed_flags(device),
              *P["arch"]]
    result = {}
    for name, launcher in [("python", [sys.executable]),
                           ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "1"])]:
        run_dir = c.work / f"launch_{name}"
        proc = c.run([*launcher, str(ROOT / "train.py"), *common, "--save_dir", str(run_dir)], timeout=150)
        windows = [m["img_per_s"] for m in metrics(run_dir) if "img_per_s" in m]
        result[name] = {"rc": proc.returncode, "img_per_s_windows": windows,
                        "img_per_s": statistics.median(windows[1:]) if len(windows) > 1 else None}
    a, b = result["torchrun"]["img_per_s"], result["python"]["img_per_s"]
    result["torchrun_vs_python"] = round(a / b, 3) if a and b else None
    result["ok"] = result["torchrun"]["rc"] == 0 and result["python"]["rc"] == 0
    return result


def section_cuda_paths(c: Check) -> dict:
    return c.worker("cuda_paths", timeout=240)


def section_step_paths(c: Check) -> dict:
    return c.worker("step_paths", timeout=240)


def section_profile(c: Check) -> dict:
    return c.worker("profile", timeout=120)


def section_max_batch(c: Check) -> dict:
    result = {}
    for mode in ("none", "gelu", "blocks"):
        result[mode] = c.worker("max_batch", "--mode", mode, timeout=c.P["max_batch_seconds"] + 60)
    return result


def section_batch_sweep(c: Check) -> dict:
    return c.worker("batch_sweep", timeout=240)


def section_sampling_compile(c: Check) -> dict:
    return c.worker("sampling_compile", timeout=240)


SECTIONS: list[tuple[str, Callable[[Check], dict], float]] = [  # name, function, least seconds worth starting
    ("machine", section_machine, 10), ("profile", section_profile, 20), ("throughput", section_throughput, 60),
    ("batch_sweep", section_batch_sweep, 40), ("parity", section_parity, 30), ("digits", section_digits, 40),
    ("resume", section_resume, 40), ("torchrun", section_torchrun, 40), ("cuda_paths", section_cuda_paths, 30),
    ("max_batch", section_max_batch, 40), ("efficient", section_efficient, 60),
    ("step_paths", section_step_paths, 30),
    ("sampling_compile", section_sampling_compile, 60),
]
# each part is one command of at most 6 minutes (its --budget_s default), so that 15 minutes of a lent GPU hold both
# with a rerun to spare; the first holds what no card has measured yet
PARTS = {"part1": ("machine", "profile", "throughput", "batch_sweep", "efficient", "sampling_compile"),
         # cuda_paths evaluates the checkpoint resume leaves
         "part2": ("parity", "digits", "resume", "torchrun", "cuda_paths", "step_paths", "max_batch")}


# ---------------------------------------------------------------------------------------------
# Workers: run in a process of their own, print one JSON line
# ---------------------------------------------------------------------------------------------


def worker_hparams(args, **overrides):
    """The cifar10 preset (tiny architecture with --tiny) for a worker, images 32x32x3."""
    from hps import parse_args

    flags = ["--hps", "cifar10", *plan(args.tiny)["arch"]]
    for key, value in overrides.items():
        flags += [f"--{key}", str(value)]
    H, _ = parse_args(flags, "")
    H.image_size, H.image_channels = 32, 3
    return H


def apply_default_speed(H, device: torch.device) -> None:
    """Set H's auto speed fields to what a long train.py run picks here (speed.py: its cache, else its probe)."""
    from speed import choose_speed_settings

    for field, value in choose_speed_settings(H, device, float("inf"), log=lambda m: None).items():
        setattr(H, field, value)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker_machine(args, device: torch.device) -> dict:
    from speed import machine_description

    n = 8192 if device.type == "cuda" else 512
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    rate = 10 * 2 * n**3 / (time.perf_counter() - t0)
    return {"device": machine_description(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "matmul_tflops": round(rate / 1e12, 1),
            "matmul": f"{n}^3 {str(dtype).replace('torch.', '')}"}


def worker_flops(args, device: torch.device) -> dict:
    """Model FLOPs of one training image (forward and backward of the negative ELBO), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from vae import VAE

    H = worker_hparams(args, grad_checkpoint="none")
    batch = 4
    with torch.device("meta"):
        model = VAE(H)
        images = torch.zeros((batch, 3, 32, 32), dtype=torch.uint8)
        labels = torch.zeros(batch, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        model(images, labels)["loss_nats"].backward()
    per_image = counter.get_total_flops() / batch
    peak = next((v for k, v in DENSE_BF16_PEAK.items() if device.type == "cuda" and k in
                 torch.cuda.get_device_name(device)), None)
    return {"train_flops_per_image": per_image, "counted": "FlopCounterMode, forward + backward, batch 4, meta device",
            "dense_bf16_peak_flops": peak}


def parity_batches(n_steps: int, n_batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = synthetic_images(min(n_steps * n_batch, 1600), seed=7)
    return torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)


def worker_parity(args, device: torch.device) -> dict:
    """The same init, batches and noise in eager fp32 and in the default mode: both loss curves."""
    from trainer import Trainer

    P = plan(args.tiny)
    images, labels = parity_batches(P["parity_steps"], P["n_batch"], device)
    curves = {}
    for name in ("eager_fp32", "default"):
        H = worker_hparams(args, n_batch=P["n_batch"], precision="fp32", channels_last="off", grad_checkpoint="none")
        if name == "default":
            H.precision = H.channels_last = H.grad_checkpoint = "auto"
            apply_default_speed(H, device)
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(0)
        trainer = Trainer(H, device, fused=False if name == "eager_fp32" else None)
        losses = []
        for step in range(P["parity_steps"]):
            start = (step * P["n_batch"]) % (len(images) - P["n_batch"] + 1)
            batch = slice(start, start + P["n_batch"])
            _, stats = trainer.step(images[batch], labels[batch])
            losses.append(stats[0])
        curves[name] = {"settings": trainer.settings(), "loss_bpd": [round(x, 5) for x in torch.stack(losses).tolist()]}
        del trainer
        gc.collect()
    tail = max(1, P["parity_steps"] // 10)
    a = statistics.mean(curves["eager_fp32"]["loss_bpd"][-tail:])
    b = statistics.mean(curves["default"]["loss_bpd"][-tail:])
    return {"steps": P["parity_steps"], "curves": curves, "final_mean_of_last": tail, "final_fp32": a,
            "final_default": b, "final_rel_diff": abs(b - a) / abs(a)}


def worker_cuda_paths(args, device: torch.device) -> dict:
    """The device-specific paths on this device: evaluation precision, fp32 heads, one compiled accumulation graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    import trainer as trainer_module
    from data import load_data_for
    from scoring import evaluate_elbo
    from models import load_model
    from utils import autocast

    result: dict = {}
    low = torch.bfloat16 if device.type == "cuda" or args.tiny else None
    # evaluation of the resumed cifar10 checkpoint in fp32 and under bf16 autocast (likelihood and KL in fp32)
    work = Path(args.work) if args.work else Path(args.out) / "work"
    run_dir = work / "resume"
    if (run_dir / "latest.pt").exists():
        model, _ = load_model(str(run_dir), device)
        split = load_data_for(model.H, str(work / "data")).test
        fp32 = evaluate_elbo(model, split, 64, device)["loss"]
        with autocast(device, low):
            bf16 = evaluate_elbo(model, split, 64, device)["loss"]
        result["eval_fp32_bpd"], result["eval_bf16_bpd"] = fp32, bf16
        result["eval_rel_diff"] = abs(bf16 - fp32) / fp32
        # the distribution heads in fp32 and the prior-noise round trip under bf16 (the top group exactly)
        images, labels = split.images[:8].to(device), split.labels[:8].to(device)
        enc_in, _ = model.preprocess(images)
        zeros = [torch.zeros(8, *s, device=device) for s in model.decoder.latent_shapes()]
        with torch.no_grad(), autocast(device, low):
            px_q, stats_q = model.decoder(model.encoder(enc_in), labels, noises=zeros)
            eps = model.prior_noise_of(images, labels)
            _, stats_p = model.decoder(None, labels, batch=8, noises=eps)
            head_dtype = model.decoder.out_net(px_q).dtype
        result["head_dtype"] = str(head_dtype)
        result["latent_dtypes"] = sorted({str(s["z"].dtype) for s in stats_q + stats_p})
        result["top_group_roundtrip_max_err"] = (stats_p[0]["z"] - stats_q[0]["z"]).abs().max().item()
        result["all_groups_roundtrip_max_err"] = max((p["z"] - q["z"]).abs().max().item()
                                                     for p, q in zip(stats_p, stats_q))
    # one compiled graph serves every accumulation pass (the pass index is a device tensor)
    counter = CompileCounterWithBackend("inductor" if device.type == "cuda" else "eager")
    real_compile = torch.compile
    trainer_module.torch.compile = lambda module, **options: real_compile(
        module, **{k: v for k, v in options.items() if k != "mode"}, backend=counter)
    try:
        torch._dynamo.reset()
        H = worker_hparams(args, n_batch=4, grad_accum=4, compile="on", precision="bf16" if low else "fp32",
                           channels_last="on", grad_checkpoint="none")
        if not args.tiny:  # a small model: compiling the full one is the compile section's work
            H.width, H.zdim = 64, 8
            H.enc_blocks, H.dec_blocks = TINY_ARCH[5], TINY_ARCH[7]
        trainer = trainer_module.Trainer(H, device)
        images, labels = synthetic_images(16, seed=3)
        images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)
        frames = []
        for index in range(4):
            trainer._forward(images[:4], labels[:4], (index, 4))
            frames.append(counter.frame_count)
        skip, stats = trainer.step(images, labels)
        result["compiled_accum_frames_after_each_pass"] = frames
        result["compiled_step_loss"] = stats[0].item()
    finally:
        trainer_module.torch.compile = real_compile
    result["ok"] = bool(frames == [frames[0]] * 4 and math.isfinite(result["compiled_step_loss"])
                        and result.get("head_dtype", "torch.float32") == "torch.float32"
                        and result.get("top_group_roundtrip_max_err", 0.0) < 1e-4)
    return result


def worker_step_paths(args, device: torch.device) -> dict:
    """Two properties of the training step on this device. ``sync_free``: steps fed by epoch_batches from a split
    held on the device run under torch.cuda.set_sync_debug_mode("error"), so that any operator that makes the host
    wait for the GPU raises. ``accum_graphs``: two updates of --grad_accum 4 compiled with reduce-overhead (CUDA
    graphs, whose outputs the next pass's replay overwrites) equal eager's (on the CPU, --tiny, dynamo's eager
    backend stands in: there are no graphs to replay)."""
    import trainer as trainer_module
    from data import Split, epoch_batches

    result: dict = {}
    arch = {} if args.tiny else dict(width=64, zdim=8, enc_blocks=TINY_ARCH[5], dec_blocks=TINY_ARCH[7])
    H = worker_hparams(args, n_batch=8, compile="off", precision="auto", channels_last="auto",
                       grad_checkpoint="none", skip_threshold="auto", **arch)
    torch.manual_seed(0)
    trainer = trainer_module.Trainer(H, device)
    images, labels = synthetic_images(256, seed=5)
    split = Split(torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device))
    batches = epoch_batches(split, H.n_batch, seed=0, epoch=0)
    trainer.step(*next(batches))  # cuDNN's benchmark and the lazy start-ups may wait: not the steady state
    synchronize(device)
    checked = device.type == "cuda"
    try:
        if checked:
            torch.cuda.set_sync_debug_mode("error")
        for _ in range(3):
            skip, stats = trainer.step(*next(batches))
        result["sync_free"] = True
    except RuntimeError as err:
        result["sync_free"], result["sync_error"] = False, str(err).splitlines()[0][:200]
    finally:
        if checked:
            torch.cuda.set_sync_debug_mode("default")
    result["sync_debug_mode"] = "error" if checked else "not on this device"

    real_compile = torch.compile
    if device.type != "cuda":
        trainer_module.torch.compile = lambda model=None, **options: real_compile(
            model, **{k: v for k, v in options.items() if k not in ("mode", "backend")}, backend="eager")
    figures, weights = {}, {}
    try:
        torch._dynamo.reset()
        for mode in ("off", "reduce-overhead"):
            H = worker_hparams(args, n_batch=4, grad_accum=4, compile="off" if mode == "off" else "on",
                               precision="fp32", channels_last="off", grad_checkpoint="none", **arch)
            torch.manual_seed(0)
            accum_trainer = trainer_module.Trainer(H, device, compile_mode=mode)
            images, labels = synthetic_images(16, seed=3)
            images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)
            torch.manual_seed(1)
            with torch._inductor.config.patch(fallback_random=True):  # the same posterior noise as eager
                figures[mode] = [accum_trainer.step(images, labels)[1].cpu() for _ in range(2)]
            weights[mode] = [p.detach().float().cpu() for p in accum_trainer.model.parameters()]
    finally:
        trainer_module.torch.compile = real_compile
    # the Trainer turns TF32 on for a GPU's fp32 in both modes, so they compare like for like
    loss_diff = max(abs(a[0].item() - b[0].item()) / abs(a[0].item())
                    for a, b in zip(figures["off"], figures["reduce-overhead"]))
    weight_diff = max((a - b).abs().max().item() for a, b in zip(weights["off"], weights["reduce-overhead"]))
    result["accum_graphs"] = {"grad_accum": 4, "loss_rel_diff": loss_diff, "weight_max_abs_diff": weight_diff,
                              "losses_eager": [f[0].item() for f in figures["off"]],
                              "losses_compiled": [f[0].item() for f in figures["reduce-overhead"]]}
    result["ok"] = bool(result["sync_free"] and loss_diff < 1e-3 and weight_diff < 1e-3)
    return result


def worker_profile(args, device: torch.device) -> dict:
    """The default training step under torch.profiler: the operators and kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    from trainer import Trainer

    P = plan(args.tiny)
    H = worker_hparams(args, n_batch=P["n_batch"])
    apply_default_speed(H, device)
    trainer = Trainer(H, device)
    images, labels = synthetic_images(P["n_batch"], seed=5)
    images, labels = torch.from_numpy(images).to(device), torch.from_numpy(labels).long().to(device)
    for _ in range(3 if not trainer.compiled else 5):  # compiled: compile, then record the CUDA graphs
        trainer.step(images, labels)[1].tolist()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(P["profile_steps"]):
        trainer.step(images, labels)[1].tolist()
    step_s = (time.perf_counter() - t0) / P["profile_steps"]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(P["profile_steps"]):
            trainer.step(images, labels)[1].tolist()
    on_device = device.type == "cuda"
    events = prof.key_averages()
    all_events = prof.events()
    host = [e for e in all_events if e.device_type == torch.autograd.DeviceType.CPU]
    kernels = [e for e in all_events if e.device_type != torch.autograd.DeviceType.CPU]
    per_step = {"step_s_unprofiled": round(step_s, 5),
                "operator_calls": sum(1 for e in host if not e.cpu_children) // P["profile_steps"],
                "kernels": len(kernels) // P["profile_steps"] if on_device else None,
                # busy time of the kernels against the step's wall time: far below it, the host holds the card back
                "kernel_ms": round(sum(e.time_range.elapsed_us() for e in kernels) / 1000 / P["profile_steps"], 2)
                if on_device else None}

    def own_time(e) -> float:  # microseconds of the event itself (kernels on the GPU, operators on the CPU)
        if on_device:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total
    total = sum(own_time(e) for e in events) or 1.0
    top = sorted(events, key=own_time, reverse=True)[:15]
    return {"settings": trainer.settings(), "steps": P["profile_steps"], "per_step": per_step,
            "what": "GPU kernels" if on_device else
            "CPU operators", "total_ms_per_step": round(total / 1000 / P["profile_steps"], 2),
            "top": [{"name": e.key[:90], "ms_per_step": round(own_time(e) / 1000 / P["profile_steps"], 3),
                     "share": round(own_time(e) / total, 3), "calls_per_step": e.count // P["profile_steps"]}
                    for e in top]}


def worker_max_batch(args, device: torch.device) -> dict:
    """The largest training batch that fits with this --grad_checkpoint mode (default precision and layout):
    double until out of memory, then bisect."""
    from trainer import Trainer

    P = plan(args.tiny)
    H = worker_hparams(args, n_batch=P["max_batch_start"])
    apply_default_speed(H, device)
    H.grad_checkpoint = args.mode
    trainer = Trainer(H, device)
    deadline = time.perf_counter() + P["max_batch_seconds"]

    def fits(batch: int) -> bool:
        try:
            images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
            labels = torch.randint(0, 10, (batch,), device=device)
            trainer.step(images, labels)[1].tolist()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()

    ok, failed = 0, None
    batch = P["max_batch_start"]
    while batch <= P["max_batch_cap"] and time.perf_counter() < deadline:
        if not fits(batch):
            failed = batch
            break
        ok, batch = batch, batch * 2
    while failed and failed - ok > max(1, ok // 16) and time.perf_counter() < deadline:
        middle = (ok + failed) // 2
        ok, failed = (middle, failed) if fits(middle) else (ok, middle)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"grad_checkpoint": args.mode, "settings": trainer.settings(), "largest_fitting": ok,
            "smallest_failing": failed, "capped_at": P["max_batch_cap"] if failed is None else None,
            "peak_gb": round(peak, 1) if peak else None}


def worker_batch_sweep(args, device: torch.device) -> dict:
    """The default training step at growing batches: images/s (median of timed steps), peak memory, and the share
    of the card's dense bf16 peak the model's arithmetic reaches."""
    from trainer import Trainer

    P = plan(args.tiny)
    flops = worker_flops(args, device)
    H = worker_hparams(args, n_batch=P["sweep"][0])
    apply_default_speed(H, device)
    result = {"settings": None, "train_flops_per_image": flops["train_flops_per_image"], "batches": {}}
    for batch in P["sweep"]:
        H.n_batch = batch
        torch.manual_seed(0)
        try:
            trainer = Trainer(H, device)
            result["settings"] = trainer.settings()
            images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
            labels = torch.randint(0, 10, (batch,), device=device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = []
            for i in range(3 + P["sweep_steps"]):
                synchronize(device)
                t0 = time.perf_counter()
                trainer.step(images, labels)[1].tolist()
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            img_s = batch / statistics.median(times)
            peak = flops["dense_bf16_peak_flops"]
            result["batches"][str(batch)] = {
                "img_s": round(img_s, 2),
                "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
                else None,
                "share_of_dense_bf16_peak": round(img_s * flops["train_flops_per_image"] / peak, 4) if peak else None}
        except torch.OutOfMemoryError:
            result["batches"][str(batch)] = {"error": "out of memory"}
        finally:
            trainer = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return result


def worker_sampling_compile(args, device: torch.device) -> dict:
    """Prior sampling of the cifar10 model (untrained; tiny with --tiny) at one fixed batch in the default precision,
    eager and compiled as sample.py grid --compile on draws it (the decoder's blocks compiled, CUDA graphs on a GPU):
    seconds per batch of each (median of timed batches after the untimed ones), their ratio, what the first two
    compiled calls cost (the cold compile; CUDA graphs then record), the batches that repay them, and the share of
    pixels both drew alike under one seed."""
    from models import build_model
    from sampling import sample_batched
    from utils import resolve_precision

    batch, reps = (4, 2) if args.tiny else (256, 5)
    H = worker_hparams(args)
    torch.manual_seed(0)
    model = build_model(H).to(device).eval()
    amp_dtype = resolve_precision("auto", device)
    labels = torch.arange(batch, device=device) % H.n_classes

    def draw(compile: str) -> tuple[torch.Tensor, float]:
        synchronize(device)
        t0 = time.perf_counter()
        torch.manual_seed(1)
        images = sample_batched(model, batch, labels, 1.0, batch, amp_dtype, compile=compile)  # .cpu(): synchronised
        return images, time.perf_counter() - t0

    eager_images, _ = draw("off")  # untimed: CUDA's and cuDNN's lazy start-up
    eager_s = statistics.median(draw("off")[1] for _ in range(reps))
    compiled_images, first_s = draw("on")  # compiles (and on CUDA runs the graphs' warm-up pass)
    second_s = draw("on")[1]  # on CUDA: records the graphs
    compiled_s = statistics.median(draw("on")[1] for _ in range(reps))
    saved = eager_s - compiled_s  # per batch; the compile's extra cost over the first two calls, repaid by it
    repay = math.ceil((first_s + second_s - 2 * compiled_s) / saved) if saved > 0 else None
    return {"batch": batch, "precision": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "eager_s_per_batch": round(eager_s, 5), "compiled_s_per_batch": round(compiled_s, 5),
            "eager_img_s": round(batch / eager_s, 1), "compiled_img_s": round(batch / compiled_s, 1),
            "compiled_vs_eager": round(eager_s / compiled_s, 3), "first_compiled_call_s": round(first_s, 1),
            "second_compiled_call_s": round(second_s, 2),
            "batches_to_repay_compile": repay,
            "same_pixels_share": round((eager_images == compiled_images).float().mean().item(), 5)}


WORKERS = {"machine": worker_machine, "batch_sweep": worker_batch_sweep, "flops": worker_flops, "parity": worker_parity,
           "cuda_paths": worker_cuda_paths, "profile": worker_profile, "max_batch": worker_max_batch,
           "sampling_compile": worker_sampling_compile, "step_paths": worker_step_paths}


# ---------------------------------------------------------------------------------------------
# Targets and the command line
# ---------------------------------------------------------------------------------------------


def targets(summary: dict) -> dict:
    """The speed targets (bench/RESULTS.md), from what was measured (None where a figure is missing)."""
    s = summary["sections"]
    modes = s.get("throughput", {}).get("modes", {})
    ref, eager, default = (modes.get(m, {}) for m in ("reference", "eager_fp32", "default"))

    def ratio(a, b):
        return round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    out = {"default_train_vs_reference": ratio(default.get("train_img_s"), ref.get("train_img_s")),
           "eager_fp32_train_vs_reference": ratio(eager.get("train_img_s"), ref.get("train_img_s")),
           "parity_final_rel_diff": s.get("parity", {}).get("final_rel_diff")}
    for n, v in (default.get("sample_img_s_by_batch") or {}).items():
        out[f"default_sampling_vs_eager_fp32_batch{n}"] = ratio(v, (eager.get("sample_img_s_by_batch") or {}).get(n))
    flops = s.get("throughput", {}).get("flops", {})
    if flops.get("dense_bf16_peak_flops") and default.get("train_img_s"):
        out["default_share_of_dense_bf16_peak"] = round(
            default["train_img_s"] * flops["train_flops_per_image"] / flops["dense_bf16_peak_flops"], 4)
    compiled = modes.get("default_compile", {})
    out["default_compile_train_vs_reference"] = ratio(compiled.get("train_img_s"), ref.get("train_img_s"))
    out["default_compile_ops_vs_eager"] = ratio(compiled.get("ops_per_step"), eager.get("ops_per_step"))
    sweep = s.get("batch_sweep", {}).get("batches", {})
    shares = [b["share_of_dense_bf16_peak"] for b in sweep.values() if b.get("share_of_dense_bf16_peak")]
    out["batch_sweep_best_share_of_dense_bf16_peak"] = max(shares) if shares else None
    out["functions_ok"] = {name: s.get(name, {}).get("ok") for name in ("digits", "resume", "torchrun", "cuda_paths")}
    return out


def errors_in(result, where: str = "") -> list[str]:
    """Every "error" entry in a section's (nested) result, named by where it sits."""
    if not isinstance(result, dict):
        return []
    found = [f"{where or 'error'}: {result['error']}"] if "error" in result else []
    for key, value in result.items():
        found += errors_in(value, f"{where}.{key}" if where else key)
    return found


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (summary.json, gpu_check.log, pictures)")
    p.add_argument("--work", default="", help="folder for the data and run folders (default: OUT/work; gigabytes "
                   "of checkpoints on a GPU run)")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: every section in about a minute")
    p.add_argument("--device", default=None, help="cuda (default), or cpu (the default with --tiny)")
    p.add_argument("--vdvae", default=str(ROOT / ".vdvae"), help="a clone of github.com/openai/vdvae")
    p.add_argument("--budget_s", type=float, default=330.0, help="seconds for all sections (the default keeps one "
                   "part within 6 minutes with start-up); the ones left when it runs out are recorded as skipped")
    p.add_argument("--sections", default="", help="comma-separated parts (part1, part2) or sections: "
                   + ", ".join(n for n, *_ in SECTIONS))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = args.device or ("cpu" if args.tiny else "cuda")
    if args.worker:
        device = torch.device(args.device)
        print(json.dumps(WORKERS[args.worker](args, device)))
        return
    if args.device != "cpu" and not torch.cuda.is_available():
        raise UserError("no CUDA device here: run on a GPU, or use --tiny (the CPU at tiny sizes)")
    if not has_reference(args.vdvae) and not args.tiny:
        raise UserError(f"no openai/vdvae clone at {args.vdvae}: clone github.com/openai/vdvae there (it is ignored "
                        f"by git), or name one with --vdvae")
    named = [n.strip() for n in args.sections.split(",") if n.strip()] or [n for n, *_ in SECTIONS]
    chosen = [section for n in named for section in PARTS.get(n, (n,))]
    unknown = sorted(set(chosen) - {n for n, *_ in SECTIONS})
    if unknown:
        raise UserError(f"unknown section {unknown[0]!r}; valid: {', '.join([*PARTS, *(n for n, *_ in SECTIONS)])}")

    check_output_folder(args.out, "--out")  # both checked before anything is written
    if args.work:
        check_output_folder(args.work, "--work")
    c = Check(args)
    write_cifar10(c.work / "data")
    for name, function, least in SECTIONS:
        if name not in chosen:
            continue
        if c.left() < least:
            c.summary["sections"][name] = {"skipped": f"{c.left():.0f} s of the budget left"}
            print(f"{name:11s} skipped: {c.left():.0f} s left", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            c.summary["sections"][name] = function(c)
        except Exception as err:  # a broken section is a finding, not the end of the check
            c.summary["sections"][name] = {"error": f"{type(err).__name__}: {err}"[:500]}
            c.log(f"[section {name} raised {type(err).__name__}: {err}]")
        c.summary["sections"][name]["section_s"] = round(time.perf_counter() - t0, 1)
        c.summary["targets"] = targets(c.summary)
        c.save()
        state = c.summary["sections"][name]
        problems = errors_in(state)
        verdict = "; ".join(problems) if problems else ("ok" if state.get("ok", True) else "FAILED")
        print(f"{name:11s} {state['section_s']:6.1f} s  {str(verdict)[:150]}", flush=True)
    c.summary["targets"] = targets(c.summary)  # also when every section was skipped
    c.save()
    print(json.dumps(c.summary["targets"]))


if __name__ == "__main__":
    run_cli(main)
