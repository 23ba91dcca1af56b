"""The ``auto`` speed settings, decided by measuring on the machine at hand, the way cuDNN's benchmark mode picks
its kernels: a setting that is fastest on one machine can be slowest on the next (channels-last was 1.45x slower
than contiguous on a 2-core AVX2 EPYC and the fastest mode on an AVX-512 one).

    settings = choose_speed_settings(H, device, total_steps, log)   # before the Trainer is built

For every field left at ``auto`` (``--precision``, ``--channels_last``, ``--grad_checkpoint``) it

1. admits the activation-checkpointing modes whose memory fits what the run may use (``--memory_budget`` GB, or
   the free GPU memory or RAM): nothing recomputed when it fits, else the GELUs, else whole blocks. Activation
   memory is measured, not guessed: the bytes autograd saves in one forward pass of two images, per mode;
2. times a few training steps of every combination of the candidates (channels-last on and off; fp32 and the
   low precision the hardware has: bf16 on GPUs with native bf16 and on CPUs with AVX512-BF16 or AMX, fp16 on
   older GPUs; the admitted checkpointing modes) on synthetic images, and keeps the fastest; a low precision
   only when the loss of a fixed batch stays within 1% of fp32's;
3. with ``--compile auto``, times the winner compiled too, when the run is long enough to repay a cold compile
   out of the probe's share (COMPILE_COST_S), and keeps compile when it trains faster;
4. writes the choice and its timings into the log, and into a small cache file (``~/.cache/vdvae/speed.json``,
   or ``$VDVAE_SPEED_CACHE``), keyed by the machine (CPU model and instruction sets, or GPU name), the torch
   version, the model's shape and the batch, so that later runs skip the probe.

Explicit flags always win. When the probe would cost more than a twentieth of the run, it is skipped for the
rule below, which earlier measurements support: on a GPU channels-last and bf16 (fp16 without native bf16); on a
CPU contiguous fp32, channels-last where the CPU has AVX-512.
"""
from __future__ import annotations

import copy
import gc
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from hps import GRAD_CHECKPOINTS
from trainer import Trainer
from utils import autocast, available_memory, seeded

SPEED_FIELDS = ("precision", "channels_last", "grad_checkpoint")
PROBE_STEPS, PROBE_WARMUP = 3, 1  # timed and untimed steps per candidate
PROBE_SHARE = 0.05  # the largest share of a run's steps the probe may take
LOW_PRECISION_TOLERANCE = 0.01  # relative loss difference to fp32 on a fixed batch
# what a cold compile of the training step is expected to cost, in seconds: compile is tried only for a run
# whose probe share (PROBE_SHARE of its steps at the eager speed) covers it. Measured on the CPU: the digits model
# and its update took 159 s on a 2-core AVX2 EPYC (bench/RESULTS.md); the GPU figure is the target of regional
# compilation, unmeasured
COMPILE_COST_S = {"cuda": 120.0, "cpu": 300.0}
MEMORY_HEADROOM = 0.85  # of the memory the run may use: what activations and state may fill
STATE_BYTES_PER_PARAMETER = 20  # fp32 weights, EMA, gradients and Adam's two moments


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "asimd", "sve")


def machine_description(device: torch.device) -> dict[str, Any]:
    """What decides which settings are fastest: the GPU and its compute capability, or the CPU, its vector
    instruction sets and its cores."""
    if device.type == "cuda":
        return {"gpu": torch.cuda.get_device_name(device), "capability": list(torch.cuda.get_device_capability(device))}
    if device.type == "mps":
        return {"gpu": "mps", "cpu": cpu_name()}
    return {"cpu": cpu_name(), "flags": sorted(cpu_flags() & set(VECTOR_FLAGS)), "threads": torch.get_num_threads()}


def cpu_has_bf16(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return bool({"avx512_bf16", "amx_bf16"} & flags)


# ---------------------------------------------------------------------------------------------
# Candidates and the rule
# ---------------------------------------------------------------------------------------------


def low_precision(device: torch.device) -> str | None:
    """The autocast precision worth trying on ``device`` (None: none)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if device.type == "cpu" and cpu_has_bf16():
        return "bf16"
    return None


def rule(H, device: torch.device, fitting: list[str]) -> dict[str, str]:
    """The settings without a probe (explicit values kept)."""
    if device.type == "cuda":
        guess = {"precision": low_precision(device), "channels_last": "on"}
    else:
        guess = {"precision": "fp32", "channels_last": "on" if "avx512f" in cpu_flags() else "off"}
    guess["grad_checkpoint"] = fitting[0]
    return {f: getattr(H, f) if getattr(H, f) != "auto" else guess[f] for f in SPEED_FIELDS}


def candidates(H, device: torch.device, fitting: list[str]) -> list[dict[str, str]]:
    """Every combination of the options of the fields left at auto (explicit values fixed)."""
    low = low_precision(device)
    options = {
        "precision": ["fp32"] + ([low] if low else []),
        "channels_last": ["off", "on"],
        "grad_checkpoint": fitting[:2],  # the least recomputation that fits, and the next one down
    }
    combos: list[dict[str, str]] = [{}]
    for field in SPEED_FIELDS:
        values = options[field] if getattr(H, field) == "auto" else [getattr(H, field)]
        combos = [dict(c, **{field: v}) for c in combos for v in values]
    return combos


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def activation_bytes_per_image(H, mode: str) -> int:
    """Bytes that autograd saves for the backward pass, per training image, with ``--grad_checkpoint mode``:
    counted in one forward pass of two images on the CPU, by the hooks through which autograd saves them."""
    from models import build_model

    h = copy.deepcopy(H)
    h.grad_checkpoint = mode
    with torch.device("meta"):  # shapes only: no memory, no arithmetic, whatever the model's size
        model = build_model(h).train()
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage._cdata] = storage.nbytes()  # a tensor saved twice counts once
        return tensor

    meta = torch.device("meta")
    images = torch.zeros((2, H.image_channels, H.image_size, H.image_size), dtype=torch.uint8, device=meta)
    labels = None
    if H.n_classes > 0:
        labels = torch.zeros(2, H.n_classes, device=meta) if H.multi_label else torch.zeros(2, dtype=torch.long,
                                                                                               device=meta)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images, labels)
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in parameters) // 2


def activation_memory_line(H) -> str:
    """The summary's line of the activation memory per training image under each --grad_checkpoint mode (the
    run's own first), so that presets compare before any training: what autograd keeps for the backward pass, in
    the model's own precision (fp32; about half of it under bf16 autocast), beside the parameters and optimiser
    state, which do not grow with the batch."""
    modes = [m for m in GRAD_CHECKPOINTS if m != "auto"]
    chosen = H.grad_checkpoint if H.grad_checkpoint != "auto" else "none"
    figures = {m: activation_bytes_per_image(H, m) / 2**20 for m in [chosen] + [m for m in modes if m != chosen]}
    others = ", ".join(f"{m} {mb:.1f} MB" for m, mb in list(figures.items())[1:])
    return (f"activation memory per image: {figures[chosen]:.1f} MB in fp32 with --grad_checkpoint {chosen} "
            f"({others}); times --n_batch {H.n_batch} that is {figures[chosen] * H.n_batch / 2**10:.2f} GB per device")


def memory_available(device: torch.device, budget_gb: float) -> int | None:
    """Bytes the run may use: ``--memory_budget``, else the device's free memory (None where unknown)."""
    if budget_gb > 0:
        return int(budget_gb * 2**30)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def parameter_count(H) -> int:
    from models import build_model
    from vae import count_parameters

    with torch.device("meta"):
        return count_parameters(build_model(H))


def fitting_checkpoint_modes(H, device: torch.device,
                             measure: Callable[[Any, str], int] = activation_bytes_per_image) -> tuple[list[str], dict]:
    """The checkpointing modes, least recomputation first, whose activations and state fit the memory the run may
    use (``blocks`` always, as the last resort), with the estimates in GB."""
    modes = ["none", "gelu", "blocks"] if H.grad_checkpoint == "auto" else [H.grad_checkpoint]
    available = memory_available(device, H.memory_budget)
    state = parameter_count(H) * STATE_BYTES_PER_PARAMETER
    estimates = {m: (state + measure(H, m) * H.n_batch) for m in modes}
    fitting = [m for m in modes if available is None or estimates[m] <= MEMORY_HEADROOM * available]
    info = {"available_gb": None if available is None else round(available / 2**30, 2),
            "estimate_gb": {m: round(b / 2**30, 3) for m, b in estimates.items()}}
    return fitting or modes[-1:], info


# ---------------------------------------------------------------------------------------------
# The probe and the cache
# ---------------------------------------------------------------------------------------------


def default_cache_path() -> Path:
    if os.environ.get("VDVAE_SPEED_CACHE"):
        return Path(os.environ["VDVAE_SPEED_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "vdvae" / "speed.json"


def cache_key(H, device: torch.device) -> str:
    shape = {k: getattr(H, k) for k in ("model", "conv_width", "made_hidden", "image_size", "image_channels",
                                        "n_classes", "width", "custom_width_str",
                                        "enc_blocks", "dec_blocks", "zdim", "bottleneck_multiple", "num_mixtures",
                                        "likelihood", "n_batch", "compile", "memory_budget", *SPEED_FIELDS)}
    # fields added since the cache began, in the key only where they differ from their default (older keys hold)
    defaults = type(H)()
    shape.update({k: getattr(H, k) for k in ("custom_bottleneck_str", "input_kernel", "enc_skips", "optimizer")
                  if getattr(H, k) != getattr(defaults, k)})
    return json.dumps({"machine": machine_description(device), "torch": torch.__version__, "model": shape},
                      sort_keys=True)


def read_cache(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
        return content if isinstance(content, dict) else {}
    except (OSError, ValueError):
        return {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add one entry; a cache that cannot be written only costs the next run a probe."""
    try:
        content = read_cache(path)
        content[key] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(content, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


def time_candidate(H, device: torch.device, settings: dict[str, str], timer: Callable[[], float] = time.perf_counter,
                   steps: int = PROBE_STEPS, warmup: int = PROBE_WARMUP) -> tuple[float, float]:
    """Median seconds per training step of ``settings`` on synthetic images (through the Trainer train.py runs),
    and the loss of a fixed batch under them (for the precision check)."""
    h = copy.deepcopy(H)
    for field, value in settings.items():
        setattr(h, field, value)
    torch.manual_seed(0)
    trainer = Trainer(h, device)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (H.n_batch * H.grad_accum, H.image_channels, H.image_size, H.image_size),
                           dtype=torch.uint8, generator=generator).to(device)
    labels = (torch.randint(0, max(1, H.n_classes), (len(images),), generator=generator).to(device)
              if H.n_classes > 0 and not H.multi_label else
              (torch.zeros(len(images), H.n_classes, device=device) if H.n_classes > 0 else None))
    loss = math.nan
    if not trainer.compiled:  # the precision check's figure; compiled, it would cost a compile of its own
        with torch.no_grad(), seeded(device, 0), autocast(device, trainer.amp_dtype):
            loss = float(trainer.model(images[:H.n_batch], labels[:H.n_batch] if labels is not None else None)["loss"])
    if trainer.compiled:  # the first steps compile, then (CUDA graphs) record: not what a long run's steps cost
        warmup = max(warmup, 3)
    times = []
    for i in range(warmup + steps):
        t0 = timer()
        _, stats = trainer.step(images, labels)
        stats.tolist()  # wait for the device
        if i >= warmup:
            times.append(timer() - t0)
    return statistics.median(times), loss


def choose_speed_settings(H, device: torch.device, total_steps: float,
                          log: Callable[[str], None] = print, cache_path: Path | None = None,
                          measure: Callable = time_candidate) -> dict[str, str]:
    """Concrete values for the speed fields of ``H`` that are ``auto`` and for ``--compile`` (see the module's
    docstring), each candidate timed by ``measure``."""
    fixed_compile = {} if H.compile == "auto" else {"compile": H.compile}
    if all(getattr(H, f) != "auto" for f in SPEED_FIELDS) and fixed_compile:
        return {**{f: getattr(H, f) for f in SPEED_FIELDS}, **fixed_compile}
    cache_path = cache_path or default_cache_path()
    key = cache_key(H, device)
    cached = read_cache(cache_path).get(key)
    if cached:
        log(f"speed settings from the cache {cache_path}: {cached['choice']} (measured {cached['created']})")
        return cached["choice"]
    fitting, memory = fitting_checkpoint_modes(H, device)
    combos = candidates(H, device, fitting)
    probe_steps = len(combos) * (PROBE_STEPS + PROBE_WARMUP)
    if (len(combos) == 1 and fixed_compile) or probe_steps > PROBE_SHARE * total_steps:
        choice = {**rule(H, device, fitting), "compile": H.compile if fixed_compile else "off"}
        log(f"speed settings by rule (a probe of {probe_steps} steps would cost more than "
            f"{PROBE_SHARE:.0%} of {total_steps:.0f} steps): {choice}; memory {memory}")
        return choice
    results = {}
    for settings in combos:
        try:
            # the probe's own seeds stay inside it: the run's initialisation is the same with and without a probe
            with seeded(device, 0):
                seconds, loss = measure(H, device, settings)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:  # it does not fit, or does not run here
            results[json.dumps(settings)] = {"error": str(err).splitlines()[0][:200]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        results[json.dumps(settings)] = {"step_s": round(seconds, 5), "loss": loss}
        gc.collect()  # the candidate's model and optimiser go before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
    choice = pick_fastest(results)
    choice["compile"] = fixed_compile.get("compile") or try_compiled(H, device, choice, results, total_steps,
                                                                     measure, log)
    entry = {"choice": choice, "timings": results, "memory": memory, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_cache(cache_path, key, entry)
    log(f"speed settings measured: {choice}; seconds per step: "
        + ", ".join(f"{k} {v.get('step_s', v.get('error'))}" for k, v in results.items()) + f"; memory {memory}")
    return choice


def try_compiled(H, device: torch.device, choice: dict[str, str], results: dict[str, dict], total_steps: float,
                 measure: Callable, log: Callable[[str], None]) -> str:
    """--compile auto: "on" when the fastest eager settings, timed compiled (into ``results``), train faster and the
    run is long enough to repay a cold compile (COMPILE_COST_S) within the probe's share; else "off". The compile
    the probe pays is mostly not lost: the run's Trainer reuses dynamo's compiled code of the same classes and
    inductor's on-disk cache."""
    eager_s = results[json.dumps(choice)]["step_s"]
    affordable = PROBE_SHARE * total_steps * eager_s
    if affordable < COMPILE_COST_S.get(device.type, math.inf):
        return "off"
    settings = {**choice, "compile": "on"}
    t0 = time.perf_counter()
    try:
        with seeded(device, 0):
            seconds, _ = measure(H, device, settings)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
        results[json.dumps(settings)] = {"error": str(err).splitlines()[0][:200]}
        return "off"
    results[json.dumps(settings)] = {"step_s": round(seconds, 5), "with_compile_s": round(time.perf_counter() - t0, 1)}
    log(f"compiled step: {seconds:.5f} s against {eager_s:.5f} s eager, its compile included in "
        f"{time.perf_counter() - t0:.0f} s")
    return "on" if seconds < eager_s else "off"


def pick_fastest(results: dict[str, dict]) -> dict[str, str]:
    """The fastest candidate that ran, a low precision only when its fixed-batch loss is within 1% of fp32's."""
    ran = {k: v for k, v in results.items() if "step_s" in v}
    if not ran:
        raise RuntimeError("no candidate speed setting could train a step here")
    fp32_losses = [v["loss"] for k, v in ran.items() if json.loads(k).get("precision") == "fp32"]
    reference = fp32_losses[0] if fp32_losses else None

    def admissible(key: str) -> bool:
        settings = json.loads(key)
        if reference is None or settings.get("precision") == "fp32":
            return True
        return abs(ran[key]["loss"] - reference) <= LOW_PRECISION_TOLERANCE * abs(reference)

    best = min((k for k in ran if admissible(k)), key=lambda k: ran[k]["step_s"])
    return json.loads(best)
