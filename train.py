"""Train a class-conditional Very Deep VAE.

    python train.py --hps digits                      # offline, a few minutes on a CPU
    python train.py --hps cifar10                     # the paper's model, on a GPU
    python train.py --hps digits --restore weights/digits   # resume a run

Reads top to bottom: settings, data, model, optimiser, (resume), the loop, final evaluation and samples.
The optimiser minimises the negative ELBO in nats per dimension (so the paper's grad_clip and
skip_threshold keep their meaning); everything reported is in bits per dimension.
"""
from __future__ import annotations

import copy
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data import Data, Split, epoch_batches, load_data, random_shift
from hps import Hyperparams, parse_args
from evaluate import evaluate_elbo
from utils import (CHECKPOINT_FORMAT, RunLogger, UserError, atomic_torch_save, load_checkpoint, pick_device,
                   run_cli, save_grid, seeded)
from vae import VAE, count_parameters
from vae_helpers import parse_layer_string

# Fields that fix the shapes of the weights: a checkpoint resumes only into the same values.
ARCHITECTURE_FIELDS = ["dataset", "image_size", "image_channels", "pixel_levels", "n_classes", "width",
                       "custom_width_str", "enc_blocks", "dec_blocks", "zdim", "bottleneck_multiple",
                       "num_mixtures", "no_bias_above"]


def derive_from_data(H: Hyperparams, data: Data) -> None:
    """Fill the fields the data decides, and check the ones it constrains."""
    H.image_size = data.image_size
    H.image_channels = data.channels
    if H.n_classes not in (0, len(data.class_names)):
        raise UserError(f"--n_classes must be 0 (unconditional) or {len(data.class_names)} for {H.dataset}, "
                        f"got {H.n_classes}")
    top_res = max(r for r, _ in parse_layer_string(H.dec_blocks))
    if top_res != H.image_size:
        raise UserError(f"--dec_blocks must end at the image size {H.image_size}, ends at {top_res}")


def make_run_dir(H: Hyperparams) -> Path:
    """The run folder: --save_dir, the folder of a restored checkpoint, or a new weights/<hps>[-N]."""
    if H.save_dir:
        run_dir = Path(H.save_dir)
    elif H.restore:
        restore = Path(H.restore)
        run_dir = restore if restore.is_dir() else restore.parent
    else:
        run_dir = Path("weights") / H.hps
        n = 2
        while (run_dir / "latest.pt").exists():  # never overwrite an earlier run
            run_dir = Path("weights") / f"{H.hps}-{n}"
            n += 1
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run folder {run_dir}: {err.strerror}") from None
    H.save_dir = str(run_dir)
    return run_dir


def lr_factor(H: Hyperparams, step: int) -> float:
    """Linear warm-up to the peak rate, then constant (the paper) or cosine decay to 0 at max_steps."""
    warm = min(1.0, step / H.warmup_iters) if H.warmup_iters > 0 else 1.0
    if H.lr_decay == "cosine" and step > H.warmup_iters:
        progress = min(1.0, (step - H.warmup_iters) / max(1, H.max_steps - H.warmup_iters))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1.0 - rate)


@torch.no_grad()
def sample_grid(model: VAE, class_names: list[str], n_per_class: int, temperature: float,
                device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_per_class`` samples of every class (or 10 rows of unconditional samples): uint8 images, labels."""
    model.eval()
    n_rows = len(class_names) if model.H.n_classes > 0 else 10
    labels = torch.arange(n_rows, device=device).repeat_interleave(n_per_class)
    with seeded(device, seed):
        images = model.sample(len(labels), labels if model.H.n_classes > 0 else None, temperature)
    return images.cpu(), labels.cpu()


def train_step(H: Hyperparams, model: VAE, ema: VAE, optimizer, scheduler, images, labels) -> dict:
    """One update on the negative ELBO (nats/dim); skipped when the loss or gradient is not finite or
    the gradient norm exceeds ``skip_threshold``. The schedule and the EMA advance either way, as in
    openai/vdvae."""
    out = model(images, labels)
    optimizer.zero_grad(set_to_none=True)
    out["loss_nats"].backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), H.grad_clip or math.inf)
    # one device-to-host transfer for every figure the skip decision and the log need
    grad_norm, loss, recon, kl = torch.stack([grad_norm, out["loss"], out["recon"], out["kl"]]).tolist()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    skip = not finite or (H.skip_threshold > 0 and grad_norm >= H.skip_threshold)
    if not skip:
        optimizer.step()
    scheduler.step()
    ema_update(ema, model, H.ema_rate)
    return {"skipped": int(skip), "loss": loss, "recon": recon, "kl": kl, "grad_norm": grad_norm}


class Window:
    """Running means of the training figures between two log lines (skipped updates left out)."""

    KEYS = ("loss", "recon", "kl", "grad_norm")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.n, self.steps, self.t0 = 0, 0, time.perf_counter()

    def add(self, stats: dict) -> None:
        self.steps += 1
        if not stats["skipped"]:
            self.n += 1
            for key in self.KEYS:
                self.sums[key] += stats[key]

    def summary(self, batch_size: int) -> dict:
        elapsed = time.perf_counter() - self.t0
        out = {k: v / max(1, self.n) for k, v in self.sums.items()}
        out["img_per_s"] = round(self.steps * batch_size / elapsed, 2) if elapsed > 0 else 0.0
        self.reset()
        return out


def checkpoint_dict(H: Hyperparams, model, ema, optimizer, scheduler, state: dict, class_names) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": state["step"],
        "epoch": state["epoch"],
        "batch_in_epoch": state["batch_in_epoch"],
        "skipped_updates": state["skipped"],
        "hps": H.to_dict(),
        "class_names": list(class_names),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }


def restore_run(path: str, H: Hyperparams, model, ema, optimizer, scheduler, state: dict) -> None:
    """Load weights, EMA, optimiser, schedule, counters and RNG state from a checkpoint of the same model."""
    ckpt = load_checkpoint(path)
    saved = ckpt["hps"]
    differ = [f"{k} ({saved.get(k)!r} there, {getattr(H, k)!r} here)" for k in ARCHITECTURE_FIELDS
              if saved.get(k) != getattr(H, k)]
    if differ:
        raise UserError(f"cannot resume {path}: the model differs in {'; '.join(differ)}")
    model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    state.update(step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
                 skipped=ckpt["skipped_updates"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if torch.cuda.is_available() and ckpt["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


def main(argv: list[str]) -> None:
    # ---- settings, data, run folder -----------------------------------------------------------
    H, _ = parse_args(argv, __doc__)
    device = pick_device(H.device)
    torch.manual_seed(H.seed)
    np.random.seed(H.seed)
    data = load_data(H.dataset, H.data_root)
    derive_from_data(H, data)
    user_chose_folder = bool(H.save_dir or H.restore)
    run_dir = make_run_dir(H)
    log = RunLogger(run_dir, echo=tqdm.write)
    conditional = H.n_classes > 0

    # ---- model, EMA, optimiser ----------------------------------------------------------------
    model = VAE(H).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=H.lr, weight_decay=H.wd,
                                  betas=(H.adam_beta1, H.adam_beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(H, step))
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "skipped": 0}
    if H.restore:
        restore_run(H.restore, H, model, ema, optimizer, scheduler, state)

    n_params = count_parameters(model)
    log.info(f"run folder {run_dir} | device {device} | dataset {H.dataset}: {len(data.train)} train, "
             f"{len(data.valid)} valid, {len(data.test)} test, {len(data.class_names)} classes")
    log.info(f"model parameters: {n_params:,} ({n_params}) | conditional: {conditional}")
    log.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in H.to_dict().items()))
    log.metrics("config", n_params=n_params, hps=H.to_dict(), class_names=data.class_names,
                resumed_from_step=state["step"])

    def save(tag: str = "latest") -> None:
        ckpt = checkpoint_dict(H, model, ema, optimizer, scheduler, state, data.class_names)
        atomic_torch_save(ckpt, run_dir / f"{tag}.pt")

    def run_eval(split_name: str, split: Split) -> dict:
        result = evaluate_elbo(ema, split, H.n_batch_eval, device)
        result.pop("per_image")
        log.info(f"step {state['step']} | {split_name} bits/dim (EMA) {result['loss']:.4f} "
                 f"= recon {result['recon']:.4f} + kl {result['kl']:.4f}")
        log.metrics("eval", step=state["step"], split=split_name, **result)
        return result

    # ---- the loop -----------------------------------------------------------------------------
    steps_per_epoch = len(data.train) // H.n_batch
    if steps_per_epoch == 0:
        raise UserError(f"--n_batch {H.n_batch} is larger than the training set ({len(data.train)} images)")
    total = min(H.max_steps or math.inf, H.num_epochs * steps_per_epoch)
    bar = tqdm(total=total, initial=state["step"], desc="train", dynamic_ncols=True, mininterval=1.0,
               file=sys.stderr)
    window = Window()
    start_time = time.perf_counter()
    model.train()
    while state["step"] < total:
        batches = epoch_batches(data.train, H.n_batch, H.seed, state["epoch"], state["batch_in_epoch"])
        for images, labels in batches:
            images = random_shift(images.to(device), H.augment_shift)
            stats = train_step(H, model, ema, optimizer, scheduler, images,
                               labels.to(device) if conditional else None)
            state["step"] += 1
            state["batch_in_epoch"] += 1
            state["skipped"] += stats["skipped"]
            window.add(stats)
            bar.update(1)
            step = state["step"]
            if step % H.log_every == 0 or step == total:
                summary = window.summary(H.n_batch)
                bar.set_postfix(bpd=f"{summary['loss']:.3f}", gnorm=f"{summary['grad_norm']:.1f}",
                                skipped=state["skipped"], img_s=f"{summary['img_per_s']:.0f}")
                log.metrics("train", step=step, epoch=state["epoch"], lr=scheduler.get_last_lr()[0],
                            skipped_updates=state["skipped"], **summary)
            if H.eval_every and step % H.eval_every == 0 and step < total:
                run_eval("valid", data.valid)
            if step % H.save_every == 0 and step < total:
                save()
            if step >= total:
                break
        else:  # the epoch ran out: the next one starts from its first batch
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
    bar.close()
    train_seconds = time.perf_counter() - start_time

    # ---- the end: checkpoint, held-out evaluation, samples ------------------------------------
    save()
    log.info(f"trained to step {state['step']} in {train_seconds:.0f} s ({state['skipped']} updates skipped); "
             f"checkpoint {run_dir / 'latest.pt'}")
    result = run_eval("test", data.test)
    images, _ = sample_grid(ema, data.class_names, 10, H.temperature, device, seed=H.seed)
    grid_path = run_dir / "samples.png"
    save_grid(images, grid_path, nrow=10)
    if Path("assets").is_dir() and not user_chose_folder:  # a default run from the repository: refresh
        shutil.copyfile(grid_path, Path("assets") / f"{H.hps}_samples.png")  # the preset's README picture
    log.info(f"samples (a row per class, t={H.temperature}): {grid_path}")
    log.metrics("final", step=state["step"], train_seconds=round(train_seconds, 1), test_bpd=result["loss"],
                test_recon=result["recon"], test_kl=result["kl"], skipped_updates=state["skipped"])
    log.close()


if __name__ == "__main__":
    run_cli(main)
