"""One training stage and what a run carries from stage to stage.

The Trainer holds what a stage updates (the model, its EMA copy, AdamW and its schedule, under the run's precision,
memory format and compilation) and takes one update per ``step``. Beside it: the run's counters (RunState), the
on-device running figures between log lines (Window, SkipCounter), the checkpoint dict and the resume from one, the
plan of a family's stages, and the signal that asks a run to save and stop. train.py drives these; bench/ and
speed.py time the same Trainer.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_newest_checkpoint
from data import binarize, drop_labels, random_flip, random_shift
from hps import MODEL_FIELDS, Hyperparams
from models import build_model, checkpoint_from_openai, is_openai_checkpoint
from optimizers import make_optimizer, skips_on_device
from utils import (Dist, UserError, autocast, device_rng_state, raise_recompile_limit, resolve_channels_last,
                   resolve_precision, saved_device_rng_state, set_device_rng_state)

# what every family's forward returns besides its own figures (the vqvae's codebook perplexity and so on)
LOSS_KEYS = ("loss_nats", "loss", "recon", "kl")
# --skip_threshold auto: the statistic of the log gradient norm that decides what an outlier is
AUTO_SKIP_HISTORY = 100  # norms seen before the outlier rule replaces --skip_threshold_start
AUTO_SKIP_RATE = 0.01  # weight of a new norm once the history is full: a lasting change is absorbed in 100s of steps
AUTO_SKIP_SIGMAS = 5.0  # an outlier lies this many running standard deviations above the running mean ...
AUTO_SKIP_MIN_RATIO = 2.0  # ... and at least this many times the typical norm, however steady the norms were
KL_WARMUP_MIN_BETA = 1e-4  # Efficient-VDVAE's vae_beta_min: the KL weight at the start of --kl_warmup_steps
EMA_WARMUP = 10  # the EMA's decay at update t is min(--ema_rate, (1 + t) / (EMA_WARMUP + t)): see ema_decay


@dataclass
class RunState:
    """The counters a checkpoint carries and a resume restores: the step (counted through every stage), where the
    data order stands, the updates skipped so far, and the current stage's first and last step."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # global batches of the current epoch already trained on
    skipped: int = 0
    stage_start: int = 0
    stage_end: float = 0
    attribute_means: list[float] | None = None  # multi-label data: how often each attribute is on

    def take_counters(self, ckpt: dict, stage_start: int) -> None:
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.skipped, self.stage_start = ckpt["skipped_updates"], stage_start


@torch.no_grad()
def auto_skip(statistic: torch.Tensor, grad_norm: torch.Tensor, start: float) -> torch.Tensor:
    """Whether an update is an outlier under --skip_threshold auto, decided on the device: its gradient norm lies
    more than AUTO_SKIP_SIGMAS running standard deviations (and a factor AUTO_SKIP_MIN_RATIO) above the running mean,
    both of the log norm; before AUTO_SKIP_HISTORY norms are known, the fixed ``start`` decides (-1: nothing).
    ``statistic`` (count, mean, variance of the log norm) then takes in the norm if it is finite, skipped or not,
    with weight 1/n at first (the exact mean and variance) and AUTO_SKIP_RATE once the history is full. Once warm,
    a norm enters winsorised at the threshold: a spike of any size counts as a norm just at the threshold, so it
    cannot widen the spread and disarm the rule for the burst that often follows it, while a lasting rise, entering
    at the threshold step after step, still widens the spread until the new level is typical (a few dozen steps).
    Updated in place; nothing waits for the host."""
    count, mean, var = statistic[0], statistic[1], statistic[2]
    log_norm = torch.log(grad_norm.float().clamp_min(torch.finfo(torch.float32).tiny))
    warm = count >= AUTO_SKIP_HISTORY
    margin = torch.clamp(AUTO_SKIP_SIGMAS * var.clamp_min(0).sqrt(), min=math.log(AUTO_SKIP_MIN_RATIO))
    outlier = warm & (log_norm > mean + margin)
    if start > 0:
        outlier = outlier | (~warm & (grad_norm >= start))
    rate = torch.clamp(1.0 / (count + 1.0), min=AUTO_SKIP_RATE)
    delta = torch.where(warm, torch.minimum(log_norm, mean + margin), log_norm) - mean
    updated = torch.stack([count + 1.0, mean + rate * delta, (1.0 - rate) * (var + rate * delta * delta)])
    statistic.copy_(torch.where(torch.isfinite(grad_norm), updated, statistic))
    return outlier


def auto_skip_limit(statistic: torch.Tensor, start: float) -> float | None:
    """The gradient norm above which --skip_threshold auto skips now (None: none); reading it waits for the
    device, so it is read only for a log line."""
    count, mean, var = statistic.tolist()
    if count < AUTO_SKIP_HISTORY:
        return start if start > 0 else None
    return math.exp(mean + max(AUTO_SKIP_SIGMAS * math.sqrt(max(var, 0.0)), math.log(AUTO_SKIP_MIN_RATIO)))


def stage_budget(H: Hyperparams, index: int) -> tuple[int, float, float]:
    """(steps, peak learning rate, weight decay) of the family's training stage ``index``: --max_steps, --lr and --wd
    for the first (the only one of most families), --prior_steps, --prior_lr and --prior_wd for the second (0, 0
    and -1: the first's)."""
    if index == 0:
        return H.max_steps, H.lr, H.wd
    return H.prior_steps or H.max_steps, H.prior_lr or H.lr, H.wd if H.prior_wd == -1 else H.prior_wd

def lr_factor(H: Hyperparams, step: int, steps: int, peak_lr: float) -> float:
    """The learning rate at ``step`` (counted from the stage's start) as a fraction of ``peak_lr``: a linear warm-up
    over --warmup_iters, then constant (openai/vdvae), or with --lr_decay cosine, constant until --lr_decay_start
    (0: the end of warm-up) and then a half cosine over --lr_decay_steps (0: until the stage's ``steps``) from the
    peak down to --lr_min, which it keeps after (Efficient-VDVAE's NarrowCosineDecay as their JAX code runs it)."""
    warm = min(1.0, step / H.warmup_iters) if H.warmup_iters > 0 else 1.0
    start = H.lr_decay_start or H.warmup_iters
    if H.lr_decay == "cosine" and step > start:
        progress = min(1.0, (step - start) / max(1, H.lr_decay_steps or steps - start))
        floor = H.lr_min / peak_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm


def kl_beta(H: Hyperparams, step: int) -> float:
    """The weight of the KL term in the training loss at ``step``: 1, or under --kl_warmup_steps Efficient-VDVAE's
    linear warm-up clip((step - start) / (start + steps), KL_WARMUP_MIN_BETA, 1) (their LinearBetaSchedule, whose
    denominator counts the start too)."""
    if H.kl_warmup_steps <= 0:
        return 1.0
    ramp = (step - H.kl_warmup_start) / (H.kl_warmup_start + H.kl_warmup_steps)
    return min(1.0, max(KL_WARMUP_MIN_BETA, ramp))


def kl_balance(kl_groups: torch.Tensor, latent_sizes: torch.Tensor) -> torch.Tensor:
    """NVAE's KL balancing coefficients (Vahdat and Kautz 2020, appendix A), as Efficient-VDVAE uses them: with
    a_i the batch's KL per latent dimension of group i, alpha_i = G a_i / sum_j a_j, so they average 1 and a group
    that carries little KL gets a small weight and is not pushed to collapse while the others learn. No gradient
    flows through them. ``kl_groups``: the batch's KL of each group (any unit), ``latent_sizes``: its dimensions."""
    per_dim = kl_groups.detach().float() / latent_sizes
    return len(per_dim) * per_dim / per_dim.sum().clamp_min(torch.finfo(torch.float32).tiny)

def ema_decay(rate: float, step: int) -> float:
    """The EMA's decay at the stage's update ``step`` (from 0): --ema_rate, lowered at first to (1 + t) / (10 + t)
    as TensorFlow's ExponentialMovingAverage does with num_updates. Without the warm-up the EMA starts as a copy of
    the initial weights and keeps rate**t of them: 11% after 2,217 updates at 0.999, which made a short run's EMA
    much worse than its raw weights. With it the EMA averages roughly the last tenth of the updates until that
    window reaches 1 / (1 - rate) updates."""
    return min(rate, (1.0 + step) / (EMA_WARMUP + step))


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], weight: torch.Tensor | float) -> None:
    """ema += weight * (params - ema), tensor by tensor; ``weight`` is 1 - decay, or 0 for a skipped update (a 0-dim
    device tensor, so that the skip needs no host round trip and a compiled update serves every step). Not
    ``_foreach_lerp_``: it reads a tensor weight back to the host, and its per-tensor form leaves the multi-tensor
    kernels for a weight broadcast to each shape."""
    change = torch._foreach_sub(params, ema_params)
    torch._foreach_mul_(change, weight)
    torch._foreach_add_(ema_params, change)

class Trainer:
    """What one training stage updates: the model, its EMA copy, AdamW over the stage's parameters and its schedule,
    under the run's precision, memory format and compilation settings. ``step`` is one update. Most families train
    in one stage; the vqvae trains its autoencoder, then its prior (``stage``), each with a Trainer of its own."""

    def __init__(self, H: Hyperparams, device: torch.device, fused: bool | None = None, dist: Dist | None = None,
                 stage: str | None = None, compile_mode: str | None = "auto", stage_steps: float | None = None):
        """``stage_steps``: the steps the stage trains, which the learning-rate schedule spans (train.py's: the
        stage's budget, or fewer where --num_epochs ends it first); None: the budget."""
        self.H, self.device, self.dist = H, device, dist or Dist()
        if device.type == "cuda":  # TF32 for what stays fp32; fixed shapes let cuDNN pick its fastest kernels
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        self.amp_dtype = resolve_precision(H.precision, device)
        self.channels_last = resolve_channels_last(H.channels_last, device)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model = build_model(H).to(device, memory_format=memory_format)
        self.stage = stage or self.model.stages[0]
        self.model.stage = self.stage  # what the loss optimises (the vqvae: its autoencoder's or its prior's)
        self.trained = self.model.stage_parameters(self.stage)
        trained_ids = {id(p) for p in self.trained}
        for p in self.model.parameters():  # frozen in this stage: no gradient for DDP to wait for
            p.requires_grad_(id(p) in trained_ids)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        ema_params = dict(self.ema.named_parameters())
        # the EMA follows the trained parameters; the frozen ones equal their EMA (a stage starts from it)
        self.ema_pairs = ([ema_params[n] for n, p in self.model.named_parameters() if id(p) in trained_ids],
                          self.trained)
        budget, stage_lr, stage_wd = stage_budget(H, self.model.stages.index(self.stage))
        self.stage_steps = budget if stage_steps is None else stage_steps
        # DDP and the compiled wrapper only run the forward pass; checkpoints hold self.model's plain weights
        self.ddp = None
        if self.dist.world > 1:  # gradients are averaged over ranks in the backward pass
            self.ddp = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.compiled = H.compile == "on"  # auto is decided before a run builds its Trainer (speed.py)
        self.compile_mode: str | None = None
        self.compile_cache_saved = False  # train.py writes the run's compile cache at this stage's first save
        wrapped = self.ddp or self.model
        self.forward = self._compile(wrapped, compile_mode) if self.compiled else wrapped
        # under CUDA graphs a pass's gradients are outputs of a graph, in its memory pool: a gradient slot left
        # empty (zero_grad's set_to_none) would take that very tensor, which the next pass's replay overwrites. So
        # gradients live in buffers of their own from the start, zeroed in place, and each pass adds into them.
        self.persistent_grads = self.compile_mode == "reduce-overhead"
        if self.persistent_grads:
            for p in self.trained:
                p.grad = torch.zeros_like(p)
        # on the CPU the multi-tensor (foreach) operations of the gradient norm, clipping and EMA run one operator
        # per parameter tensor; compiled, they are a few fused loops. CUDA runs them as multi-tensor kernels already,
        # and compiling lists of the cifar10 model's 1,394 tensors costs minutes, so there they stay eager.
        compile_update = self.compiled and device.type == "cpu"
        self._clip_and_decide = torch.compile(self.clip_and_decide) if compile_update else self.clip_and_decide
        self._ema_update = torch.compile(ema_update) if compile_update else ema_update
        # fused AdamW can skip an update on the device (found_inf), so a step needs no host round trip;
        # ``fused=False`` (bench/throughput.py's baseline) keeps the foreach implementation
        self.fused = device.type in ("cuda", "cpu") if fused is None else fused
        # persistent and changed in place, so that the optimiser reads the same tensor every step (a captured
        # graph needs that); 1 leaves weights, moments and step count untouched
        self.found_inf = torch.zeros((), device=device)
        self.optimizer = make_optimizer(H.optimizer, self.trained, stage_lr, (H.adam_beta1, H.adam_beta2), stage_wd,
                                        self.fused, self.found_inf)
        self.skips_on_device = skips_on_device(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(H, step, self.stage_steps, stage_lr))
        # the training loss's KL weights (--kl_warmup_steps, --kl_balance_steps): the dimensions of each latent group
        self.latent_sizes = torch.tensor([math.prod(s) for s in self.model.latent_shapes()], device=device,
                                         dtype=torch.float32) if H.kl_balance_steps > 0 else None
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.noise_index = torch.zeros((), dtype=torch.long, device=device)  # see _forward
        # --skip_threshold auto: count, mean and variance of the log gradient norm (see auto_skip)
        self.skip_statistic = torch.zeros(3, device=device)
        self.extra_metrics: tuple[str, ...] | None = None  # a family's own batch figures (codebook perplexity)

    def _compile(self, wrapped: torch.nn.Module, mode: str | None) -> torch.nn.Module:
        """The model's forward (and so its backward) compiled: region by region where the family has repeated
        blocks (Family.compile_regions), else whole. ``mode`` "auto": with CUDA graphs on a GPU (reduce-overhead,
        a replay per region instead of a launch per kernel), inductor's default on the CPU. Shapes are static: a
        training step's never change, and reduce-overhead skips its graphs on dynamic ones."""
        if mode == "auto":
            mode = "reduce-overhead" if self.device.type == "cuda" else None
        # each distinct block shape (five resolutions, train and eval) is one compiled entry of the block's code;
        # past dynamo's default limit of 8 the rest would silently run eager
        raise_recompile_limit(64)
        self.compile_mode = mode
        if self.model.compile_regions(mode=mode, dynamic=False):
            return wrapped
        return torch.compile(wrapped, mode=mode, dynamic=False)

    def settings(self) -> str:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + scaler"}
        compiled = (self.compile_mode or "default mode") if self.compiled else "off"
        optimizer = f"fused AdamW {self.fused}" if self.H.optimizer == "adamw" else "Adamax"
        return (f"precision {precision[self.amp_dtype]}, channels_last {self.channels_last}, compile {compiled}, "
                f"grad_checkpoint {self.H.grad_checkpoint}, {optimizer}")

    def step(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on the negative ELBO (nats/dim) from this rank's share of a global batch (``grad_accum``
        passes of ``n_batch`` images, as epoch_batches yields it), skipped when a loss or the gradient is not
        finite or the gradient norm reaches ``skip_threshold`` (with auto: is an outlier, see auto_skip). A skipped
        update leaves the weights, the optimiser's state and the EMA as they were, and the schedule advances either
        way, as in openai/vdvae (whose EMA moves only with a taken update). Returns device tensors: skipped (bool) and the
        figures ``metric_names`` names (loss, recon, kl in bits/dim, grad norm, then the family's own scalars, such
        as the vqvae's codebook perplexity)."""
        H, accum = self.H, self.H.grad_accum
        passes = zip(images.chunk(accum), labels.chunk(accum) if labels is not None else [None] * accum)
        rng = (torch.get_rng_state(), device_rng_state(self.device)) if accum > 1 else None
        self.optimizer.zero_grad(set_to_none=not self.persistent_grads)
        stats = None
        for k, (x, y) in enumerate(passes):
            if k > 0:  # every pass draws the global batch's shifts and noise from the same state and takes its slice
                torch.set_rng_state(rng[0])
                set_device_rng_state(rng[1], self.device)
            shard = (k * self.dist.world + self.dist.rank, accum * self.dist.world)
            last = k == accum - 1
            # gradients sum locally over the passes; DDP averages them over ranks in the last backward only
            with self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext():
                x = random_shift(x, H.augment_shift, shard=shard)
                if H.augment_flip:
                    x = random_flip(x, shard=shard)
                if H.likelihood == "bernoulli":  # dynamic binarization: a fresh draw of the pixels every step
                    x = binarize(x, shard=shard)
                if H.label_dropout > 0:  # one model, conditional and unconditional (see data.drop_labels)
                    y = drop_labels(y, H.label_dropout, H.n_classes, shard=shard)
                out = self._forward(x, y, shard)
                loss = self.training_loss(out) / accum  # the mean over the global batch: equal-sized passes
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if self.extra_metrics is None:  # every 0-dim output beyond the loss terms, in the family's order
                self.extra_metrics = tuple(name for name, v in out.items() if name not in LOSS_KEYS and v.ndim == 0)
            figures = [out["loss"], out["recon"], out["kl"], *(out[k] for k in self.extra_metrics)]
            figures = torch.stack([f.detach().float() for f in figures]) / accum
            stats = figures if stats is None else stats + figures
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # every rank takes the same decision: the averaged gradient is the same everywhere, the losses are not
        bad_loss = self.dist.all_reduce((~torch.isfinite(stats[0])).float(), op="max") > 0
        skip, grad_norm = self._clip_and_decide(bad_loss)
        self._update(skip)
        # the decay comes from the host's step count, the skip from the device: a 0-dim weight, no round trip
        ema_weight = (~skip).float() * (1.0 - ema_decay(H.ema_rate, self.scheduler.last_epoch))
        self.scheduler.step()
        self._ema_update(*self.ema_pairs, ema_weight)
        return skip, torch.cat([stats[:3], grad_norm.float()[None], stats[3:]])

    def training_loss(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the update descends, in nats/dim: the negative ELBO, or while --kl_warmup_steps or --kl_balance_steps
        run, the reconstruction plus the KL of each latent group weighted by kl_beta and kl_balance. The step is
        the stage's, a host integer: no device value is read."""
        step = self.scheduler.last_epoch
        beta = kl_beta(self.H, step)
        balancing = step < self.H.kl_balance_steps
        if beta == 1.0 and not balancing:
            return out["loss_nats"]
        kl_groups = out["kl_groups"].float()  # bits/dim, batch means
        weights = kl_balance(kl_groups, self.latent_sizes) if balancing else torch.ones_like(kl_groups)
        return math.log(2.0) * (out["recon"].float() + beta * (weights * kl_groups).sum())

    def clip_and_decide(self, bad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip the gradient to ``grad_clip`` and decide on the device whether the update is skipped: a loss that is
        not finite on some rank (``bad_loss``), a gradient norm that is not finite, or one at ``skip_threshold``
        (with auto: an outlier, see auto_skip). Returns skip (bool) and the norm before clipping."""
        H = self.H
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, H.grad_clip or math.inf).detach()
        skip = bad_loss | ~torch.isfinite(grad_norm)
        if H.skip_threshold == "auto":
            skip = skip | auto_skip(self.skip_statistic, grad_norm, H.skip_threshold_start)
        elif H.skip_threshold > 0:
            skip = skip | (grad_norm >= H.skip_threshold)
        return skip, grad_norm

    @property
    def metric_names(self) -> tuple[str, ...]:
        """What the figures ``step`` returns are, in order."""
        return ("loss", "recon", "kl", "grad_norm", *(self.extra_metrics or ()))

    def _forward(self, images: torch.Tensor, labels: torch.Tensor | None, shard: tuple[int, int]) -> dict:
        if shard[1] > 1:  # posterior noise: this pass's slice of the global batch's draw
            # the slice index is a device tensor changed in place, not a Python int on the modules: compiled, one
            # graph serves every accumulation pass (an int attribute made each pass compile a graph of its own)
            self.noise_index.fill_(shard[0])
            self.model.set_noise_shard(self.noise_index, shard[1])
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.compile_mode == "reduce-overhead":  # each pass replays the CUDA graphs anew
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(self.device, self.amp_dtype):
            return self.forward(images, labels)

    def _update(self, skip: torch.Tensor) -> None:
        if self.scaler is not None:  # fp16: the scaler also skips overflowing steps and adapts its scale
            if not skip.item():
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.skips_on_device:
            self.found_inf.copy_(skip)
            self.optimizer.step()
        elif not skip.item():
            self.optimizer.step()

COMPILE_CACHE = "compile_cache.bin"  # in the run folder: what torch.compile compiled, for a resume to start warm


def load_compile_cache(run_dir: Path, log) -> bool:
    """Hand torch.compile the artifacts an earlier process of this run saved (save_compile_cache), so that a
    resumed run, on this machine or another with the same GPU and torch, starts warm. True when some were loaded;
    a cache from another torch or device is ignored with a log line."""
    path = run_dir / COMPILE_CACHE
    if not path.exists():
        return False
    if not hasattr(torch.compiler, "load_cache_artifacts"):  # torch's "mega-cache" arrived in 2.7
        log(f"compile cache {path} not used: torch {torch.__version__} cannot load one; compiling afresh")
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as err:  # noqa: BLE001 - a stale cache only costs a cold compile
        log(f"compile cache {path} not used ({type(err).__name__}: {str(err)[:120]}); compiling afresh")
        return False
    log(f"compile cache {path} loaded ({path.stat().st_size / 2**20:.1f} MB)")
    return True


def save_compile_cache(run_dir: Path) -> None:
    """Write what torch.compile has compiled in this process (inductor's and autograd's cached graphs and kernels)
    to the run folder, atomically; nothing when there is nothing, it cannot be written, or this torch (before 2.7)
    has no such cache."""
    saved = torch.compiler.save_cache_artifacts() if hasattr(torch.compiler, "save_cache_artifacts") else None
    if not saved:
        return
    path = run_dir / COMPILE_CACHE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(saved[0])
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


@torch.no_grad()
def reshape_optimizer_state_like_parameters(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter optimiser tensor (Adam's moments) its parameter's memory layout.
    ``load_state_dict`` keeps the saved strides, so moments saved contiguous (CPU) and resumed channels-last (CUDA),
    or the reverse, fail the fused kernel's same-layout check; the speed settings may differ on resume."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    optimizer.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

class Window:
    """Running means of the training figures between two log lines (skipped updates left out), kept on
    the device so that only a log line waits for it."""

    def __init__(self, device: torch.device, dist: Dist | None = None):
        self.device, self.dist = device, dist or Dist()
        self.reset()

    def reset(self) -> None:
        self.sums: torch.Tensor | int = 0  # a tensor of the step's figures once one is added
        self.kept = torch.zeros((), device=self.device)
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, skip: torch.Tensor, stats: torch.Tensor) -> None:
        self.steps += 1
        self.sums = self.sums + torch.where(skip, 0.0, stats)
        self.kept += (~skip).float()

    def summary(self, global_batch: int, names: tuple[str, ...]) -> dict:
        """The means of the figures ``names`` names (Trainer.metric_names) and the images per second."""
        elapsed = time.perf_counter() - self.t0
        *sums, kept = self.dist.all_reduce(torch.cat([self.sums, self.kept[None]])).tolist()  # over all ranks
        out = {k: v / max(1.0, kept) for k, v in zip(names, sums)}
        out["img_per_s"] = round(self.steps * global_batch / elapsed, 2) if elapsed > 0 else 0.0
        self.reset()
        return out

class SkipCounter:
    """Updates skipped so far and the longest run of them in a row, kept on the device so that a step never waits
    for the host; read back only where the log, a checkpoint or the skip limit needs the figure."""

    def __init__(self, skipped: int, device: torch.device):
        self.total = torch.tensor(skipped, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.longest_in_a_row = torch.zeros((), dtype=torch.long, device=device)

    def add(self, skip: torch.Tensor) -> None:
        self.total += skip
        self.in_a_row = (self.in_a_row + 1) * skip
        self.longest_in_a_row = torch.maximum(self.longest_in_a_row, self.in_a_row)

    def count(self) -> int:
        return int(self.total)


def checkpoint_dict(H: Hyperparams, trainer: Trainer, state: RunState, class_names) -> dict:
    """The checkpoint: one plain dict of tensors, numbers, strings and lists (loadable with weights_only)."""
    return {
        # what batch_in_epoch counts, for a resume with another number of processes or passes
        "global_batch": H.n_batch * trainer.dist.world * H.grad_accum,
        "format": CHECKPOINT_FORMAT,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "skipped_updates": state.skipped,
        "hps": H.to_dict(),
        "class_names": list(class_names),
        "attribute_means": state.attribute_means,  # multi-label data: how often each attribute is on
        # the training stage (the vqvae's autoencoder or prior; "model" for the others), the step it began at and
        # the step it ends at: a later stage starts only from a finished one
        "stage": trainer.stage,
        "stage_start": state.stage_start,
        "stage_end": state.stage_end,
        # the CPU's and this process's own device's generator: every rank draws the same stream by design, so
        # rank 0's states are every rank's (a list of all visible GPUs' states would not survive a resume on
        # fewer GPUs, and would hand the other ranks rank 0's GPU state by index)
        "rng": {"torch": torch.get_rng_state(), "device": device_rng_state(trainer.device)},
        "device_type": trainer.device.type,  # where the speed settings in "hps" were chosen (a resume keeps them)
        **({"skip_statistic": trainer.skip_statistic.cpu()} if H.skip_threshold == "auto" else {}),
    }

def checkpoint_to_resume(H: Hyperparams, run_dir: Path, warn) -> tuple[Path, dict] | None:
    """What ``--restore`` names: a file (exactly that one), or a folder or ``latest`` (the folder's newest
    checkpoint that loads, falling back past damaged ones; ``latest`` in a folder without any: a fresh run)."""
    if not H.restore:
        return None
    if is_openai_checkpoint(H.restore):  # their weights as a starting point (a zero class embedding if conditional)
        return Path(H.restore), checkpoint_from_openai(H.restore, H.hps, H.n_classes)
    if H.restore != "latest" and not Path(H.restore).is_dir():
        return Path(H.restore), load_checkpoint(H.restore)
    folder = run_dir if H.restore == "latest" else Path(H.restore)
    found = load_newest_checkpoint(folder, warn)
    if found is None and H.restore != "latest":
        raise UserError(f"run folder {folder} holds no checkpoint (use --restore latest to start one there)")
    return found

def check_same_model(path: Path, ckpt: dict, H: Hyperparams) -> None:
    """A checkpoint resumes only into a model that computes the same function: every field of MODEL_FIELDS
    must match (a missing field in an older checkpoint counts as its default)."""
    saved = {**Hyperparams().to_dict(), **ckpt["hps"]}
    differ = [f"--{k} ({saved[k]!r} there, {getattr(H, k)!r} here)" for k in MODEL_FIELDS if saved[k] != getattr(H, k)]
    if differ:
        raise UserError(f"cannot resume {path}: the model differs in {'; '.join(differ)}")

def restore_run(path: Path, ckpt: dict, H: Hyperparams, trainer: Trainer, state: RunState) -> None:
    """Load weights, EMA, optimiser, schedule, scaler, counters and RNG state from a checkpoint of the same
    model (only the weights from a weights-only one, such as a converted openai/vdvae file)."""
    check_same_model(path, ckpt, H)
    trainer.model.load_state_dict(ckpt["model"])
    trainer.ema.load_state_dict(ckpt["ema"])
    if "optimizer" not in ckpt:  # weights only (converted from openai/vdvae): a new run starts from them
        return
    trainer.optimizer.load_state_dict(ckpt["optimizer"])
    trainer.scheduler.load_state_dict(ckpt["scheduler"])
    if trainer.scaler is not None and ckpt.get("scaler"):
        trainer.scaler.load_state_dict(ckpt["scaler"])
    state.take_counters(ckpt, stage_start=ckpt.get("stage_start", 0))
    if "skip_statistic" in ckpt:  # --skip_threshold auto: the recent norms' statistic goes on where it stopped
        trainer.skip_statistic.copy_(ckpt["skip_statistic"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    set_device_rng_state(saved_device_rng_state(ckpt["rng"]), trainer.device)
    reshape_optimizer_state_like_parameters(trainer.optimizer)

def start_after_stage(ckpt: dict, trainer: Trainer, state: RunState) -> None:
    """Begin ``trainer``'s stage where the finished stage of ``ckpt`` (a checkpoint dict, read from a file or just
    built in this process) left off: from its EMA weights, raw and EMA alike (the stage-1 weights a VQ-VAE's prior
    learns the codes of are the ones sampling and evaluation use), with a fresh optimiser and schedule, the steps
    counting on, and its RNG state: the same run whether the stages ran in one process or two."""
    trainer.model.load_state_dict(ckpt["ema"])
    trainer.ema.load_state_dict(ckpt["ema"])
    state.take_counters(ckpt, stage_start=ckpt["step"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    set_device_rng_state(saved_device_rng_state(ckpt["rng"]), trainer.device)

@dataclass
class StageStart:
    """Where a stage begins: "fresh" (new weights), "resume" (a checkpoint of this stage, where it stopped; also a
    weights-only checkpoint) or "next" (after a finished stage, from its EMA weights), with that checkpoint's dict
    and the file it came from (None: the stage this process has just trained)."""

    kind: str
    ckpt: dict | None = None
    path: Path | None = None


def plan_stages(H: Hyperparams, stages: tuple[str, ...],
                resume: tuple[Path, dict] | None) -> tuple[list[str], StageStart]:
    """The stages this run trains, in order (``--stage all``: each of the family's from where the run stands; else
    the one named), and where the first begins."""
    wanted = list(stages) if H.stage == "all" else [H.stage]
    if resume is None:
        if wanted[0] != stages[0]:
            raise UserError(f"--stage {H.stage} trains on top of a finished {stages[stages.index(H.stage) - 1]} "
                            f"stage: name that run with --restore RUN")
        return wanted, StageStart("fresh")
    path, ckpt = resume
    saved = ckpt.get("stage", stages[0])  # older checkpoints: single-stage families
    if saved in wanted:
        return wanted[wanted.index(saved):], StageStart("resume", ckpt, path)
    first, done = stages.index(wanted[0]), stages.index(saved)
    if first < done:
        raise UserError(f"{path} is in its {saved} stage, after the {wanted[0]} stage: to train that stage again, "
                        f"start a new run folder (--save_dir) without --restore")
    if first > done + 1:
        raise UserError(f"{path} has finished no {stages[first - 1]} stage yet: train it first "
                        f"(--stage {stages[first - 1]})")
    if ckpt["step"] < ckpt.get("stage_end", 0):
        raise UserError(f"the {saved} stage of {path} is unfinished (step {ckpt['step']} of {ckpt['stage_end']}): "
                        f"finish it with --stage {saved} --restore {path}, or train both with --stage all")
    return wanted, StageStart("next", ckpt, path)

class StopSignal:
    """SIGINT or SIGTERM (a cluster's notice of pre-emption) asks the loop to save and exit after the current
    step; the handler is then taken away, so a second signal stops the process at once.

    Under torchrun the signal may reach one rank, or reach them at different steps, while all must save and leave
    at the same step. Each step every rank posts what it received to a non-blocking all-reduce (max) on a gloo
    group of its own, which works beside NCCL on CPU tensors, and reads the previous step's result: every rank
    learns of a signal one or two steps after it arrived, with no device synchronisation. torchrun and SLURM send
    SIGKILL some 30 s after SIGTERM, so waiting for a log step (100 steps of cifar10) was too late."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, dist: Dist | None = None):
        self.received: int | None = None
        self.world = (dist or Dist()).world
        self._group = torch.distributed.new_group(backend="gloo") if self.world > 1 else None
        self._pending: tuple | None = None  # (work, flag) of the previous step's vote
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def agreed(self) -> int | None:
        """The signal to stop on, the same on every rank (None: carry on); call once per step on every rank."""
        if self.world == 1:
            return self.received
        result = None
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            result = int(flag) or None
        flag = torch.tensor(self.received or 0)
        work = torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group,
                                            async_op=True)
        self._pending = (work, flag)
        return result

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
