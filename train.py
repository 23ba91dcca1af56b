"""Train a class-conditional Very Deep VAE.

    python train.py --hps digits                      # offline, a few minutes on a CPU
    python train.py --hps cifar10                     # the paper's model, on a GPU
    python train.py --hps digits --restore weights/digits   # resume a run
    python train.py --hps cifar10 --save_dir weights/job --restore latest   # start, or resume after a stop

Reads top to bottom: settings, data, model, optimiser, (resume), the loop, final evaluation and samples.
The optimiser minimises the negative ELBO in nats per dimension (so the paper's grad_clip and
skip_threshold keep their meaning); everything reported is in bits per dimension.
"""
from __future__ import annotations

import contextlib
import copy
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import DATASET_PADDING, Data, Split, binarize, epoch_batches, load_data_for, random_shift
from hps import DATASET_IMAGES, FAMILY_STAGES, Hyperparams, parse_args
from torch.nn.parallel import DistributedDataParallel as DDP

from utils import (CHECKPOINT_FORMAT, Dist, LatentTrajectory, NullLogger, RunFolderLock, RunLogger, UserError,
                   atomic_torch_save, autocast, check_output_folder, crop_padding, device_rng_state, end_distributed,
                   init_distributed, keep_copy, keep_stage_copy, load_checkpoint, load_newest_checkpoint, read_metrics,
                   remove_stale_temporaries, resolve_channels_last, resolve_precision, run_cli, save_grid,
                   saved_device_rng_state, seeded, set_device_rng_state, tensorboard_writer)
from speed import choose_speed_settings
from models import build_model, checkpoint_from_openai, is_openai_checkpoint, model_summary, require_2d_latent
from scoring import evaluate_elbo, kl_per_resolution
from vae import count_parameters
from vae_helpers import parse_layer_string

# what every family's forward returns besides its own figures (the vqvae's codebook perplexity and so on)
LOSS_KEYS = ("loss_nats", "loss", "recon", "kl")
# Fields that fix the shapes of the weights or what the model computes from them (its input normalisation,
# likelihood and targets): a checkpoint resumes only into the same values.
MODEL_FIELDS = ["model", "conv_width", "made_hidden", "codebook_size", "code_dim", "vq_downsample", "prior_channels",
                "prior_layers", "dataset", "image_size", "image_channels", "pixel_levels", "n_classes", "width",
                "custom_width_str", "enc_blocks", "dec_blocks", "zdim", "bottleneck_multiple", "num_mixtures",
                "no_bias_above", "likelihood", "gaussian_std", "data_shift", "data_scale", "vdvae_5bit", "pad",
                "multi_label"]


def on_device_if_small(split: Split, device: torch.device, max_bytes: int = 2 << 30) -> Split:
    """The split moved to ``device`` once when it is an in-memory tensor of at most ``max_bytes``, so batches
    never cross the bus. Lazy splits (image folders, memory-mapped arrays) stay lazy: copying one would decode or
    read every image on every rank before the first step (all 162,770 CelebA JPEGs)."""
    if device.type == "cpu" or not isinstance(split.images, torch.Tensor) or split.images.numel() > max_bytes:
        return split
    return Split(split.images.to(device), split.labels.to(device))


def load_data_per_node(H: Hyperparams, dist: Dist) -> Data:
    """The run's data. Under torchrun the first process of each node loads it first, downloading or converting
    it when needed, while the others wait at a barrier and then read what it wrote: one CIFAR download per
    node, not one per process, and one writer of ImageNet's caches."""
    data = load_data_for(H) if dist.local_rank == 0 else None
    dist.barrier()
    return data if data is not None else load_data_for(H)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory error, or the RuntimeError that MPS and the CPU allocator raise."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def skipped_images(data: Data) -> set[Path]:
    """Image files of lazily decoded splits that could not be decoded when their batch came up."""
    return {p for split in (data.train, data.valid, data.test) for p in getattr(split.images, "skipped", [])}


def derive_from_data(H: Hyperparams, data: Data) -> None:
    """Fill the fields the data decides, and check the ones it constrains."""
    H.image_size = data.image_size
    H.image_channels = data.channels
    H.pad = DATASET_PADDING.get(H.dataset, 0)
    H.multi_label = data.multi_label
    if H.n_classes == -1:
        H.n_classes = len(data.class_names)
    if H.n_classes not in (0, len(data.class_names)):
        raise UserError(f"--n_classes must be 0 (unconditional) or {len(data.class_names)} for {H.dataset}, "
                        f"got {H.n_classes}")
    top_res = max(r for r, _ in parse_layer_string(H.dec_blocks))
    if top_res != H.image_size:
        raise UserError(f"--dec_blocks must end at the image size {H.image_size}, ends at {top_res}")


def choose_run_dir(H: Hyperparams) -> Path:
    """The run folder (not created here): --save_dir, the folder of a restored checkpoint (weights/<hps> for
    ``--restore latest``), or a new weights/<hps>[-N]."""
    if H.save_dir:
        return Path(H.save_dir)
    if H.restore == "latest":
        return Path("weights") / H.hps
    if H.restore and not is_openai_checkpoint(H.restore):
        restore = Path(H.restore)
        return restore if restore.is_dir() else restore.parent
    run_dir, n = Path("weights") / H.hps, 2
    while (run_dir / "latest.pt").exists():  # never overwrite an earlier run
        run_dir = Path("weights") / f"{H.hps}-{n}"
        n += 1
    return run_dir


def create_run_dir(run_dir: Path) -> None:
    """Make the run folder (checked writable before the data was read)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run folder {run_dir}: {err.strerror}") from None


def stage_budget(H: Hyperparams, index: int) -> tuple[int, float, float]:
    """(steps, peak learning rate, weight decay) of the family's training stage ``index``: --max_steps, --lr and --wd
    for the first (the only one of most families), --prior_steps, --prior_lr and --prior_wd for the second (0, 0
    and -1: the first's)."""
    if index == 0:
        return H.max_steps, H.lr, H.wd
    return H.prior_steps or H.max_steps, H.prior_lr or H.lr, H.wd if H.prior_wd == -1 else H.prior_wd


def lr_factor(H: Hyperparams, step: int, steps: int) -> float:
    """Linear warm-up to the peak rate, then constant (the paper) or cosine decay to 0 at the stage's ``steps``
    (``step`` counts from the stage's start)."""
    warm = min(1.0, step / H.warmup_iters) if H.warmup_iters > 0 else 1.0
    if H.lr_decay == "cosine" and step > H.warmup_iters:
        progress = min(1.0, (step - H.warmup_iters) / max(1, steps - H.warmup_iters))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm


@torch.no_grad()
def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], rate: float) -> None:
    torch._foreach_lerp_(ema_params, params, 1.0 - rate)


@torch.no_grad()
def sample_grid(model: torch.nn.Module, row_labels: torch.Tensor | None, n_per_row: int, temperature: float,
                device: torch.device, seed: int = 0) -> torch.Tensor:
    """``n_per_row`` samples for each row label (class indices, or attribute vectors), or 10 rows of
    unconditional samples when ``row_labels`` is None: uint8 images on the CPU."""
    model.eval()
    n_rows = len(row_labels) if row_labels is not None else 10
    labels = row_labels.to(device).repeat_interleave(n_per_row, dim=0) if row_labels is not None else None
    with seeded(device, seed):
        images = model.sample(n_rows * n_per_row, labels, temperature)
    return images.cpu()


def tracked_images(split: Split, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``n`` images of ``split`` (images, labels, indices) drawn with a fixed seed, the same in every run whatever
    --seed, so that runs' latent trajectories show the same images."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(0))[:min(n, len(split))]
    return split.images[order], split.labels[order], order.tolist()


@torch.no_grad()
def posterior_means(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None, n_batch: int,
                    device: torch.device) -> torch.Tensor:
    """The means of q(z | x, y), (N, zdim) float32 on the CPU, ``n_batch`` images at a time."""
    chunks = []
    for start in range(0, len(images), n_batch):
        part = None if labels is None else labels[start:start + n_batch].to(device)
        chunks.append(model.posterior_mean(images[start:start + n_batch].to(device), part).float().cpu())
    return torch.cat(chunks)


def grid_rows(H: Hyperparams, data: Data) -> tuple[torch.Tensor | None, list[str] | None]:
    """What the end-of-run picture shows, a row each: every class (10 spread over them when there are more); for
    attributes, those of the first 10 test images; nothing for an unconditional model."""
    if H.n_classes == 0:
        return None, None
    if H.multi_label:
        return data.test.labels[:10], [f"test #{i}" for i in range(min(10, len(data.test)))]
    classes = torch.arange(H.n_classes) if H.n_classes <= 10 else torch.linspace(0, H.n_classes - 1, 10).long()
    return classes, [data.class_names[c] for c in classes.tolist()]


class Trainer:
    """What one training stage updates: the model, its EMA copy, AdamW over the stage's parameters and its schedule,
    under the run's precision, memory format and compilation settings. ``step`` is one update. Most families train
    in one stage; the vqvae trains its autoencoder, then its prior (``stage``), each with a Trainer of its own."""

    def __init__(self, H: Hyperparams, device: torch.device, fused: bool | None = None, dist: Dist | None = None,
                 stage: str | None = None):
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
        self.stage_steps, stage_lr, stage_wd = stage_budget(H, self.model.stages.index(self.stage))
        # DDP and the compiled wrapper only run the forward pass; checkpoints hold self.model's plain weights
        self.ddp = None
        if self.dist.world > 1:  # gradients are averaged over ranks in the backward pass
            self.ddp = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        wrapped = self.ddp or self.model
        self.forward = torch.compile(wrapped) if H.compile else wrapped
        # fused AdamW can skip an update on the device (found_inf), so a step needs no host round trip;
        # ``fused=False`` (bench/throughput.py's baseline) keeps the foreach implementation
        self.fused = device.type in ("cuda", "cpu") if fused is None else fused
        self.optimizer = torch.optim.AdamW(self.trained, lr=stage_lr, weight_decay=stage_wd,
                                           betas=(H.adam_beta1, H.adam_beta2), fused=self.fused or None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer,
                                                           lambda step: lr_factor(H, step, self.stage_steps))
        self.scaler = torch.amp.GradScaler(device.type) if self.amp_dtype == torch.float16 else None
        self.noise_index = torch.zeros((), dtype=torch.long, device=device)  # see _forward
        self.extra_metrics: tuple[str, ...] | None = None  # a family's own batch figures (codebook perplexity)

    def settings(self) -> str:
        precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + scaler"}
        return (f"precision {precision[self.amp_dtype]}, channels_last {self.channels_last}, "
                f"compile {self.H.compile}, grad_checkpoint {self.H.grad_checkpoint}, fused AdamW {self.fused}")

    def step(self, images: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on the negative ELBO (nats/dim) from this rank's share of a global batch (``grad_accum``
        passes of ``n_batch`` images, as epoch_batches yields it), skipped when a loss or the gradient is not
        finite or the gradient norm reaches ``skip_threshold``; the schedule and the EMA advance either way, as
        in openai/vdvae. Returns device tensors: skipped (bool) and the figures ``metric_names`` names (loss, recon,
        kl in bits/dim, grad norm, then the family's own scalars, such as the vqvae's codebook perplexity)."""
        H, accum = self.H, self.H.grad_accum
        passes = zip(images.chunk(accum), labels.chunk(accum) if labels is not None else [None] * accum)
        rng = (torch.get_rng_state(), device_rng_state(self.device)) if accum > 1 else None
        self.optimizer.zero_grad(set_to_none=True)
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
                if H.likelihood == "bernoulli":  # dynamic binarization: a fresh draw of the pixels every step
                    x = binarize(x, shard=shard)
                out = self._forward(x, y, shard)
                loss = out["loss_nats"] / accum  # the mean over the global batch: equal-sized passes
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if self.extra_metrics is None:  # every 0-dim output beyond the loss terms, in the family's order
                self.extra_metrics = tuple(name for name, v in out.items() if name not in LOSS_KEYS and v.ndim == 0)
            figures = [out["loss"], out["recon"], out["kl"], *(out[k] for k in self.extra_metrics)]
            figures = torch.stack([f.detach().float() for f in figures]) / accum
            stats = figures if stats is None else stats + figures
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, H.grad_clip or math.inf)
        # every rank takes the same decision: the averaged gradient is the same everywhere, the losses are not
        bad_loss = self.dist.all_reduce((~torch.isfinite(stats[0])).float(), op="max") > 0
        skip = bad_loss | ~torch.isfinite(grad_norm)
        if H.skip_threshold > 0:
            skip = skip | (grad_norm >= H.skip_threshold)
        self._update(skip)
        self.scheduler.step()
        ema_update(*self.ema_pairs, H.ema_rate)
        return skip, torch.cat([stats[:3], grad_norm.detach().float()[None], stats[3:]])

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
        with autocast(self.device, self.amp_dtype):
            return self.forward(images, labels)

    def _update(self, skip: torch.Tensor) -> None:
        if self.scaler is not None:  # fp16: the scaler also skips overflowing steps and adapts its scale
            if not skip.item():
                self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.fused:
            self.optimizer.found_inf = skip.float()  # 1 leaves weights, moments and step count untouched
            self.optimizer.step()
        elif not skip.item():
            self.optimizer.step()


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


def checkpoint_dict(H: Hyperparams, trainer: Trainer, state: dict, class_names) -> dict:
    return {
        # what batch_in_epoch counts, for a resume with another number of processes or passes
        "global_batch": H.n_batch * trainer.dist.world * H.grad_accum,
        "format": CHECKPOINT_FORMAT,
        "model": trainer.model.state_dict(),
        "ema": trainer.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler is not None else None,
        "step": state["step"],
        "epoch": state["epoch"],
        "batch_in_epoch": state["batch_in_epoch"],
        "skipped_updates": state["skipped"],
        "hps": H.to_dict(),
        "class_names": list(class_names),
        "attribute_means": state.get("attribute_means"),  # multi-label data: how often each attribute is on
        # the training stage (the vqvae's autoencoder or prior; "model" for the others), the step it began at and
        # the step it ends at: a later stage starts only from a finished one
        "stage": trainer.stage,
        "stage_start": state["stage_start"],
        "stage_end": state["stage_end"],
        # the CPU's and this process's own device's generator: every rank draws the same stream by design, so
        # rank 0's states are every rank's (a list of all visible GPUs' states would not survive a resume on
        # fewer GPUs, and would hand the other ranks rank 0's GPU state by index)
        "rng": {"torch": torch.get_rng_state(), "device": device_rng_state(trainer.device)},
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


def restore_run(path: Path, ckpt: dict, H: Hyperparams, trainer: Trainer, state: dict) -> None:
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
    state.update(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                 skipped=ckpt["skipped_updates"], stage_start=ckpt.get("stage_start", 0))
    torch.set_rng_state(ckpt["rng"]["torch"])
    set_device_rng_state(saved_device_rng_state(ckpt["rng"]), trainer.device)
    reshape_optimizer_state_like_parameters(trainer.optimizer)


def start_after_stage(ckpt: dict, trainer: Trainer, state: dict) -> None:
    """Begin ``trainer``'s stage where the finished stage of ``ckpt`` (a checkpoint dict, read from a file or just
    built in this process) left off: from its EMA weights, raw and EMA alike (the stage-1 weights a VQ-VAE's prior
    learns the codes of are the ones sampling and evaluation use), with a fresh optimiser and schedule, the steps
    counting on, and its RNG state: the same run whether the stages ran in one process or two."""
    trainer.model.load_state_dict(ckpt["ema"])
    trainer.ema.load_state_dict(ckpt["ema"])
    state.update(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                 skipped=ckpt["skipped_updates"], stage_start=ckpt["step"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    set_device_rng_state(saved_device_rng_state(ckpt["rng"]), trainer.device)


def plan_stages(H: Hyperparams, stages: tuple[str, ...], resume: tuple[Path, dict] | None) -> tuple[list[str], str]:
    """The stages this run trains, in order (``--stage all``: each of the family's from where the run stands; else
    the one named), and how the first begins: "fresh", "resume" (the checkpoint's own stage, where it stopped; also a
    weights-only checkpoint) or "next" (after the checkpoint's finished stage, from its EMA weights)."""
    wanted = list(stages) if H.stage == "all" else [H.stage]
    if resume is None:
        if wanted[0] != stages[0]:
            raise UserError(f"--stage {H.stage} trains on top of a finished {stages[stages.index(H.stage) - 1]} "
                            f"stage: name that run with --restore RUN")
        return wanted, "fresh"
    path, ckpt = resume
    saved = ckpt.get("stage", stages[0])  # older checkpoints: single-stage families
    if saved in wanted:
        return wanted[wanted.index(saved):], "resume"
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
    return wanted, "next"


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


def hparams_without_data(H: Hyperparams) -> Hyperparams:
    """``H`` with the fields the data decides filled from the dataset's known image size and padding, for
    ``--summary``, which reads no data."""
    h = copy.deepcopy(H)
    h.image_size, h.image_channels = DATASET_IMAGES[h.dataset]
    h.pad = DATASET_PADDING.get(h.dataset, 0)
    h.multi_label = h.dataset == "celeba64"  # its 40 binary attributes
    if h.n_classes == -1:
        raise UserError(f"--summary of --hps {h.hps} needs the class count of its data: give --n_classes")
    top_res = max(r for r, _ in parse_layer_string(h.dec_blocks))
    if h.model == "vdvae" and top_res != h.image_size:
        raise UserError(f"--dec_blocks must end at the image size {h.image_size}, ends at {top_res}")
    return h


def main(argv: list[str]) -> None:
    H, args = parse_args(argv, __doc__)
    if getattr(args, "summary", False):  # (fields default to SUPPRESS) the model's table, and nothing else: no data, processes, optimiser or run folder
        print(model_summary(hparams_without_data(H)))
        return
    dist, device = init_distributed(H.device)  # torchrun: one process per device; else one process
    completed = False
    try:
        with contextlib.ExitStack() as cleanup:  # the run folder's lock, released however train ends
            train(H, dist, device, cleanup)
        completed = True
    finally:  # every way out leaves the process group: a normal end, a signal, too many skips, an error
        end_distributed(dist, completed)


def train(H: Hyperparams, dist: Dist, device: torch.device, cleanup: contextlib.ExitStack) -> None:
    # ---- settings, data, run folder -----------------------------------------------------------
    if H.tensorboard:
        tensorboard_writer()  # missing: one line before anything is loaded or written
    user_chose_folder = bool(H.save_dir or H.restore)
    run_dir = Path(dist.broadcast(str(choose_run_dir(H)) if dist.main else None))  # rank 0 picks, all agree
    if dist.main:  # before the data is read or downloaded; the folder itself is made once every check passed
        check_output_folder(run_dir, "run folder")
    torch.manual_seed(H.seed)
    np.random.seed(H.seed)
    data = load_data_per_node(H, dist)  # binarized held-out splits for --likelihood bernoulli
    derive_from_data(H, data)
    global_batch = H.n_batch * dist.world * H.grad_accum  # images per update
    if len(data.train) < global_batch:
        raise UserError(f"the global batch (--n_batch {H.n_batch} x {dist.world} processes x --grad_accum "
                        f"{H.grad_accum}) is larger than the training set ({len(data.train)} images)")
    if H.track_latents:  # a model without a 2-D latent: one line before any folder is written
        with torch.device("meta"):
            require_2d_latent(build_model(H), "--track_latents", "this run")
    H.save_dir = str(run_dir)
    # what --restore names is read and checked against this model, and the stages planned, before anything is written
    warnings: list[str] = []
    resume = checkpoint_to_resume(H, run_dir, warnings.append)
    if resume is not None:
        check_same_model(*resume, H)
    # one stage for most families; the vqvae trains its autoencoder, then its prior, each with its own optimiser,
    # steps and checkpoints in this run folder (the step count runs on through both)
    stages = FAMILY_STAGES[H.model]
    run_stages, begin = plan_stages(H, stages, resume)
    lock = RunFolderLock(run_dir)  # one trainer per folder (rank 0 holds it for the job), for the whole run
    if dist.main:
        create_run_dir(run_dir)
        lock.acquire(warn=warnings.append)
        cleanup.callback(lock.release)
    # rank 0 alone writes
    log = RunLogger(run_dir, echo=tqdm.write, tensorboard=H.tensorboard) if dist.main else NullLogger()
    for warning in [*warnings, *data.notes]:
        log.info(warning)
    if dist.main:
        for tmp in remove_stale_temporaries(run_dir):
            log.info(f"removed {tmp.name}, a checkpoint left half-written by a process that was killed while saving")
    conditional = H.n_classes > 0
    trajectory = None  # --track_latents: the posterior means of fixed test images at every evaluation (rank 0)
    if H.track_latents and dist.main:
        earlier = [r for r in read_metrics(run_dir) if r.get("kind") == "latents"]  # a resumed run's frames
        trajectory = LatentTrajectory(run_dir / "latents.gif", data.class_names, earlier)
        tracked = tracked_images(data.test, H.track_latents)

    # ---- speed settings ----------------------------------------------------------------------------
    steps_per_epoch = len(data.train) // global_batch

    def stage_total(stage: str) -> float:  # the stage's steps, at most num_epochs epochs
        return min(stage_budget(H, stages.index(stage))[0] or math.inf, H.num_epochs * steps_per_epoch)

    # the auto fields, measured on this machine (or read from the cache of an earlier measurement) by rank 0
    settings = dist.broadcast(choose_speed_settings(H, device, stage_total(run_stages[0]), Trainer, log=log.info)
                              if dist.main else None)
    for field, value in settings.items():
        setattr(H, field, value)
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped": 0, "stage_start": 0, "stage_end": 0,
             "attribute_means": data.train.labels.float().mean(0).tolist() if data.multi_label else None}

    def save(trainer: Trainer) -> Path:
        latest = run_dir / "latest.pt"
        if dist.main:
            try:
                atomic_torch_save(checkpoint_dict(H, trainer, state, data.class_names), latest, keep_previous=True)
                if H.keep_every and state["step"] % H.keep_every == 0:
                    keep_copy(latest, state["step"], H.keep_last)
            except OSError as err:  # a full disk, a quota, a vanished mount: the last checkpoint is intact
                held = f"{latest} still holds the checkpoint before it, intact" if latest.exists() else \
                    "no checkpoint was written"
                raise UserError(f"cannot write the step {state['step']} checkpoint into {run_dir} "
                                f"({err.strerror or err}); {held}") from None
        return latest

    def run_eval(trainer: Trainer, split_name: str, split: Split) -> dict:
        with autocast(device, trainer.amp_dtype):  # the training precision; likelihood and KL stay fp32
            result = evaluate_elbo(trainer.ema, split, H.n_batch_eval, device, dist=dist)
        result.pop("per_image")
        result["kl_per_resolution"] = kl_per_resolution(trainer.ema, result["kl_groups"])
        nats = f" | {result['nats_per_image']:.2f} nats per image" if H.likelihood == "bernoulli" else ""
        # the family's own figures (the vqvae's codebook perplexity and unused codes) of the latest training batches
        extras = "".join(f" | {k} {v:.2f}" for k, v in latest_extras.items())
        log.info(f"step {state['step']} | {split_name} bits/dim (EMA) {result['loss']:.4f} "
                 f"= recon {result['recon']:.4f} + kl {result['kl']:.4f}{nats}{extras}")
        log.metrics("eval", step=state["step"], split=split_name, stage=trainer.stage, **result)
        if H.curves:
            log.curves()  # curves.png: the run so far, at every evaluation
        if trajectory is not None and trainer.stage == stages[-1]:
            record_latents(trainer)
        if log.wants_images and split_name == "valid" and trainer.stage == stages[-1]:  # TensorBoard: a grid too
            with autocast(device, trainer.amp_dtype):
                log.image("samples", crop_padding(sample_grid(trainer.ema, grid_rows(H, data)[0], 10, H.temperature,
                                                              device, seed=H.seed), H.pad), 10, state["step"])
        return result

    def record_latents(trainer: Trainer) -> None:  # --track_latents: one record, one more frame of latents.gif
        images, labels, indices = tracked
        with autocast(device, trainer.amp_dtype):  # the posterior's head runs in fp32 under autocast
            means = posterior_means(trainer.ema, images, labels if conditional else None, H.n_batch_eval, device)
        values = {"step": state["step"], "split": "test", "images": indices,
                  "labels": None if data.multi_label else labels.tolist(),
                  "means": [[round(a, 5), round(b, 5)] for a, b in means.tolist()]}
        log.metrics("latents", **values)
        trajectory.add(values)

    reported_skips: set[Path] = set()
    latest_extras: dict[str, float] = {}  # the last log window's means of a family's own figures

    def report_skipped_images() -> None:  # image files that could not be decoded when their batch came up
        for path in sorted(skipped_images(data) - reported_skips):
            reported_skips.add(path)
            log.info(f"warning: skipped unreadable image {path} (another image of its class stood in); "
                     f"{len(reported_skips)} so far")
    train_images = on_device_if_small(data.train, device)

    # ---- the loop of one stage ------------------------------------------------------------------
    def run_steps(trainer: Trainer, total: float) -> float:
        """Train ``trainer``'s stage from state["step"] to ``total``; returns the seconds it took."""
        bar = tqdm(total=total, initial=state["step"], desc=f"train {trainer.stage}" if len(stages) > 1 else "train",
                   dynamic_ncols=True, mininterval=1.0, file=sys.stderr, disable=not dist.main)
        window = Window(device, dist)
        skipped = torch.tensor(state["skipped"], device=device)  # read back only when logged or saved
        skip_run = torch.zeros((), dtype=torch.long, device=device)  # updates skipped in a row, and the longest
        longest_skip_run = torch.zeros((), dtype=torch.long, device=device)
        check_every = min(H.log_every, H.skip_limit) if H.skip_limit else H.log_every  # reading skips costs a sync
        stop = StopSignal(dist)
        start_time = time.perf_counter()
        trainer.model.train()
        try:
            while state["step"] < total:
                batches = epoch_batches(train_images, H.n_batch, H.seed, state["epoch"], state["batch_in_epoch"],
                                        dist.rank, dist.world, H.grad_accum)
                for images, labels in batches:
                    skip, stats = trainer.step(images.to(device, non_blocking=True),
                                               labels.to(device, non_blocking=True) if conditional else None)
                    state["step"] += 1
                    state["batch_in_epoch"] += 1
                    skipped += skip
                    skip_run = (skip_run + 1) * skip
                    longest_skip_run = torch.maximum(longest_skip_run, skip_run)
                    window.add(skip, stats)
                    bar.update(1)
                    step = state["step"]
                    if step % H.log_every == 0 or step == total:
                        report_skipped_images()
                        summary = window.summary(global_batch, trainer.metric_names)
                        latest_extras.update({k: summary[k] for k in trainer.extra_metrics})
                        state["skipped"] = int(skipped)
                        bar.set_postfix(bpd=f"{summary['loss']:.3f}", gnorm=f"{summary['grad_norm']:.1f}",
                                        skipped=state["skipped"], img_s=f"{summary['img_per_s']:.0f}")
                        log.metrics("train", step=step, epoch=state["epoch"], stage=trainer.stage,
                                    lr=trainer.scheduler.get_last_lr()[0], skipped_updates=state["skipped"],
                                    **summary)
                    if H.skip_limit and step % check_every == 0 and longest_skip_run.item() >= H.skip_limit:
                        state["skipped"] = int(skipped)
                        path = save(trainer)  # skipped updates leave the weights alone: these are the last good ones
                        raise UserError(f"stopped at step {step}: {H.skip_limit} updates in a row were skipped "
                                        f"(non-finite loss or gradient, or gradient norm >= --skip_threshold); {path} "
                                        f"holds the last good weights. Lower --lr, raise --skip_threshold or "
                                        f"--skip_limit, or check the data")
                    received = stop.agreed()  # the same answer on every rank, at most two steps after the signal
                    if received is not None:
                        state["skipped"] = int(skipped)
                        path = save(trainer)
                        name = signal.Signals(received).name
                        log.info(f"{name} at step {step}: saved {path}; resume with --save_dir {run_dir} "
                                 f"--restore latest")
                        sys.exit(128 + received)
                    if H.eval_every and step % H.eval_every == 0 and step < total:
                        run_eval(trainer, "valid", data.valid)
                    if (step % H.save_every == 0 or (H.keep_every and step % H.keep_every == 0)) and step < total:
                        state["skipped"] = int(skipped)
                        save(trainer)  # a keep_every step saves too, whatever save_every is, so that step-N.pt is N
                    if step >= total:
                        break
                else:  # the epoch ran out: the next one starts from its first batch
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
        except BaseException as err:  # a stop (signal, too many skips) or a failure: the log is complete up to here
            log.close()
            if is_out_of_memory(err):
                raise UserError(f"out of memory on {device} at step {state['step'] + 1} with --n_batch {H.n_batch} "
                                f"(and --n_batch_eval {H.n_batch_eval} for evaluation): lower --n_batch, recompute "
                                f"activations with --grad_checkpoint blocks, or keep the global batch with --n_batch "
                                f"{max(1, H.n_batch // 2)} --grad_accum {2 * H.grad_accum}; nothing was saved from "
                                f"this step") from None
            raise
        finally:
            bar.close()
            stop.close()
        state["skipped"] = int(skipped)
        return time.perf_counter() - start_time

    # ---- each stage: model, EMA, optimiser, (resume), the loop, its checkpoint ----------------------
    handover: dict | None = None  # the checkpoint dict of the stage just finished, where the next one begins
    train_seconds = 0.0
    for stage in run_stages:
        trainer = Trainer(H, device, dist=dist, stage=stage)
        if handover is not None:
            start_after_stage(handover, trainer, state)
            log.info(f"stage {stage} starts at step {state['step']} from the {handover['stage']} stage's EMA weights")
        elif begin == "resume":
            restore_run(*resume, H, trainer, state)
            log.info(f"resumed from {resume[0]} at step {state['step']}" if "optimizer" in resume[1] else
                     f"initialised from the weights of {resume[0]}; a new run starts at step 0")
        elif begin == "next":
            start_after_stage(resume[1], trainer, state)
            log.info(f"stage {stage} starts at step {state['step']} from the finished {resume[1]['stage']} stage "
                     f"of {resume[0]} (its EMA weights)")
        elif H.restore == "latest":
            log.info(f"--restore latest: no checkpoint in {run_dir} yet, starting a fresh run")
        if handover is None and begin != "fresh":  # batch_in_epoch counts global batches: rescale for a new count
            saved_global = resume[1].get("global_batch", H.n_batch)
            state["batch_in_epoch"] = state["batch_in_epoch"] * saved_global // global_batch
        state["stage_end"] = state["stage_start"] + stage_total(stage)
        n_params, n_trained = count_parameters(trainer.model), sum(p.numel() for p in trainer.trained)
        if handover is None:  # the run's header, once
            log.info(f"processes {dist.world} | global batch {global_batch} (n_batch {H.n_batch} x {dist.world} "
                     f"processes x grad_accum {H.grad_accum})")
            log.info(f"run folder {run_dir} | device {device} | dataset {H.dataset}: {len(data.train)} train, "
                     f"{len(data.valid)} valid, {len(data.test)} test, {len(data.class_names)} classes")
            log.info(f"model parameters: {n_params:,} ({n_params}) | conditional: {conditional}")
            log.info(f"speed settings: {trainer.settings()}")
            log.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in H.to_dict().items()))
            log.metrics("config", n_params=n_params, hps=H.to_dict(), class_names=data.class_names,
                        resumed_from_step=state["step"])
        if len(stages) > 1:
            log.info(f"stage {stage} ({stages.index(stage) + 1} of {len(stages)}): trains {n_trained:,} parameters "
                     f"from step {state['step']} to {state['stage_end']:.0f}, peak lr "
                     f"{trainer.scheduler.base_lrs[0]:g}")
        train_seconds += run_steps(trainer, state["stage_end"])
        path = save(trainer)
        handover = checkpoint_dict(H, trainer, state, data.class_names)  # every rank: where the next stage begins
        if stage != stages[-1]:  # a finished stage that a later one starts from: kept as <stage>.pt
            if dist.main:
                keep_stage_copy(path, stage)
            log.info(f"stage {stage} finished at step {state['step']}: {run_dir / f'{stage}.pt'}")
            run_eval(trainer, "valid", data.valid)

    # ---- the end: held-out evaluation, samples ------------------------------------------------------
    log.info(f"trained to step {state['step']} in {train_seconds:.0f} s ({state['skipped']} updates skipped); "
             f"checkpoint {run_dir / 'latest.pt'}")
    if trainer.stage != stages[-1]:  # --stage autoencoder: the prior that sampling needs is not trained yet
        following = stages[stages.index(trainer.stage) + 1]
        log.info(f"the {following} stage is next: python train.py --hps {H.hps} --model {H.model} --stage "
                 f"{following} --restore {run_dir}")
        log.close()
        return
    result = run_eval(trainer, "test", data.test)
    report_skipped_images()
    if not dist.main:  # rank 0 alone draws the samples; the others wait for it in end_distributed
        return
    with autocast(device, trainer.amp_dtype):
        rows, row_names = grid_rows(H, data)
        images = sample_grid(trainer.ema, rows, 10, H.temperature, device, seed=H.seed)
    grid_path = run_dir / "samples.png"
    save_grid(crop_padding(images, H.pad), grid_path, nrow=10, row_labels=row_names)
    log.image("samples", crop_padding(images, H.pad), 10, state["step"])
    if Path("assets").is_dir() and not user_chose_folder:  # a default run from the repository: refresh
        shutil.copyfile(grid_path, Path("assets") / f"{H.hps}_samples.png")  # the preset's README pictures
        if H.curves:
            shutil.copyfile(run_dir / "curves.png", Path("assets") / f"{H.hps}_curves.png")
    log.info(f"samples (a row per class, t={H.temperature}): {grid_path}")
    if trajectory is not None:
        log.info(f"posterior means of {len(tracked[2])} test images at {len(trajectory.records)} evaluations: "
                 f"{trajectory.path} (and the latents records of metrics.jsonl)")
    log.metrics("final", step=state["step"], train_seconds=round(train_seconds, 1), test_bpd=result["loss"],
                test_recon=result["recon"], test_kl=result["kl"], skipped_updates=state["skipped"])
    log.close()


if __name__ == "__main__":
    run_cli(main)
