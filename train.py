"""Train a class-conditional Very Deep VAE.

    python train.py --hps digits                      # offline, a few minutes on a CPU
    python train.py --hps cifar10                     # the paper's model, on a GPU
    python train.py --hps digits --restore weights/digits   # resume a run
    python train.py --hps cifar10 --save_dir weights/job --restore latest   # start, or resume after a stop

Reads top to bottom: ``main`` parses the settings and starts the processes; ``train`` checks everything and opens
the run folder, trains each stage of the family (most have one; the vqvae trains its autoencoder, then its prior),
then evaluates the held-out split and draws samples. The Trainer that takes each update lives in trainer.py.
The optimiser minimises the negative ELBO in nats per dimension (so the paper's grad_clip and skip_threshold keep
their meaning); everything reported is in bits per dimension.
"""
from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import RunFolderLock, atomic_torch_save, keep_copy, keep_stage_copy, remove_stale_temporaries
from data import Data, Split, epoch_batches, load_data_for
from hps import FAMILY_STAGES, Hyperparams, fill_derived, hparams_without_data, parse_args, resolve_global_batch
from images import crop_padding, save_grid
from models import build_model, is_openai_checkpoint, model_summary, require_2d_latent
from runlog import LatentTrajectory, NullLogger, RunLogger, read_metrics, tensorboard_writer
from scoring import evaluate_elbo, kl_per_resolution
from speed import SPEED_FIELDS, activation_memory_line, choose_speed_settings
from trainer import (RunState, SkipCounter, StageStart, StopSignal, Trainer, Window, auto_skip_limit,
                     check_same_model, checkpoint_dict, checkpoint_to_resume, load_compile_cache, plan_stages,
                     restore_run, save_compile_cache, stage_budget, start_after_stage)
from utils import (Dist, UserError, autocast, check_output_folder, end_distributed, init_distributed, run_cli,
                   seeded)
from vae import count_parameters


def main(argv: list[str]) -> None:
    H, args = parse_args(argv, __doc__)
    if getattr(args, "summary", False):  # the model's table and nothing else: no data, processes or run folder
        h = hparams_without_data(H)
        print(model_summary(h))
        print(activation_memory_line(h))
        return
    dist, device = init_distributed(H.device, H.dist_timeout)  # torchrun: one process per device; else one process
    completed = False
    try:
        with contextlib.ExitStack() as cleanup:  # the run folder's lock, released however train ends
            train(H, dist, device, cleanup, given=frozenset(vars(args)))
        completed = True
    finally:  # every way out leaves the process group: a normal end, a signal, too many skips, an error
        end_distributed(dist, completed)


def train(H: Hyperparams, dist: Dist, device: torch.device, cleanup: contextlib.ExitStack,
          given: frozenset[str] = frozenset()) -> None:
    """One run; ``given``: the fields the command line set (a resumed run keeps its other speed settings)."""
    run = prepare_run(H, dist, device, given)  # every check passes before anything is written
    open_run_folder(run, cleanup)
    choose_speed(run)
    trainer, train_seconds = train_stages(run)
    finish(run, trainer, train_seconds)


# ---------------------------------------------------------------------------------------------
# The run: its settings, data, folder, log and counters
# ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What every step of a run reads: the settings, processes, device, data and run folder, what the run starts
    from (``resume``, ``start``) and which of the family's stages it trains, the log, and the counters."""

    H: Hyperparams
    dist: Dist
    device: torch.device
    data: Data
    run_dir: Path
    resume: tuple[Path, dict] | None
    stages: tuple[str, ...]  # the family's
    run_stages: list[str]  # the ones this run trains, in order
    start: StageStart  # how the first of them begins
    warnings: list[str]
    state: RunState
    given: frozenset[str] = frozenset()  # the fields the command line set
    batch_plan: str = ""  # how --global_batch is reached here (hps.resolve_global_batch)
    log: RunLogger | NullLogger = field(default_factory=NullLogger)
    trajectory: LatentTrajectory | None = None  # --track_latents (rank 0)
    tracked: tuple[torch.Tensor, torch.Tensor, list[int]] | None = None  # its fixed test images
    train_images: Split | None = None
    skips: SkipCounter | None = None  # of the stage being trained
    latest_extras: dict[str, float] = field(default_factory=dict)  # the last log window's family figures
    reported_skips: set[Path] = field(default_factory=set)  # unreadable images already logged

    @property
    def global_batch(self) -> int:  # images per update
        return self.H.n_batch * self.dist.world * self.H.grad_accum

    @property
    def conditional(self) -> bool:
        return self.H.n_classes > 0

    def stage_total(self, stage: str) -> float:
        """The step at which ``stage`` ends: its budget, at most num_epochs epochs."""
        steps_per_epoch = len(self.data.train) // self.global_batch
        return min(stage_budget(self.H, self.stages.index(stage))[0] or math.inf, self.H.num_epochs * steps_per_epoch)


def prepare_run(H: Hyperparams, dist: Dist, device: torch.device, given: frozenset[str] = frozenset()) -> Run:
    """Check the run folder can be written, read the data, fill the fields it decides, read and check what
    ``--restore`` names and plan the stages; nothing is written yet, so a refusal leaves nothing behind."""
    if H.tensorboard:
        tensorboard_writer()  # missing: one line before anything is loaded or written
    run_dir = Path(dist.broadcast(str(choose_run_dir(H)) if dist.main else None))  # rank 0 picks, all agree
    if dist.main:  # before the data is read or downloaded
        check_output_folder(run_dir, "run folder")
    torch.manual_seed(H.seed)
    np.random.seed(H.seed)
    data = load_data_per_node(H, dist)  # binarized held-out splits for --likelihood bernoulli
    fill_derived(H, data.image_size, data.channels, data.multi_label, len(data.class_names))
    batch_plan = resolve_global_batch(H, dist.world, given)  # the preset's paper batch on this many processes
    global_batch = H.n_batch * dist.world * H.grad_accum
    if len(data.train) < global_batch:
        raise UserError(f"the global batch (--n_batch {H.n_batch} x {dist.world} processes x --grad_accum "
                        f"{H.grad_accum}) is larger than the training set ({len(data.train)} images)")
    if H.track_latents:
        with torch.device("meta"):
            require_2d_latent(build_model(H), "--track_latents", "this run")
    H.save_dir = str(run_dir)
    warnings: list[str] = []
    resume = checkpoint_to_resume(H, run_dir, warnings.append)
    if resume is not None:
        check_same_model(*resume, H)
    stages = FAMILY_STAGES[H.model]
    run_stages, start = plan_stages(H, stages, resume)
    state = RunState(attribute_means=data.train.labels.float().mean(0).tolist() if data.multi_label else None)
    return Run(H, dist, device, data, run_dir, resume, stages, run_stages, start, warnings, state, given, batch_plan,
               train_images=on_device_if_small(data.train, device))


def open_run_folder(run: Run, cleanup: contextlib.ExitStack) -> None:
    """Create the run folder and hold its lock for the whole run (rank 0 alone writes), open the log, and pick up
    a resumed run's latent trajectory."""
    H, dist = run.H, run.dist
    if dist.main:
        create_run_dir(run.run_dir)
        lock = RunFolderLock(run.run_dir)  # one trainer per folder
        lock.acquire(warn=run.warnings.append)
        cleanup.callback(lock.release)
        run.log = RunLogger(run.run_dir, echo=tqdm.write, tensorboard=H.tensorboard)
    for warning in [*run.warnings, *run.data.notes]:
        run.log.info(warning)
    if dist.main:
        for tmp in remove_stale_temporaries(run.run_dir):
            run.log.info(f"removed {tmp.name}, a checkpoint left half-written by a process that was killed while "
                         f"saving")
    if H.track_latents and dist.main:
        earlier = [r for r in read_metrics(run.run_dir) if r.get("kind") == "latents"]  # a resumed run's frames
        run.trajectory = LatentTrajectory(run.run_dir / "latents.gif", run.data.class_names, earlier)
        run.tracked = tracked_images(run.data.test, H.track_latents)


def choose_speed(run: Run) -> None:
    """The ``auto`` speed fields, measured on this machine (or read from the cache of an earlier measurement) by
    rank 0 and shared; a resumed run first takes its checkpoint's (keep_resumed_speed)."""
    H, dist = run.H, run.dist
    keep_resumed_speed(run)
    total = run.stage_total(run.run_stages[0])
    if H.compile != "off":  # an earlier process of this run compiled: the probe and the run start warm
        load_compile_cache(run.run_dir, run.log.info)
    settings = dist.broadcast(choose_speed_settings(H, run.device, total, log=run.log.info) if dist.main else None,
                              solo=True)  # the others wait for rank 0's probe, which may compile for minutes
    for name, value in settings.items():
        setattr(H, name, value)


def keep_resumed_speed(run: Run) -> None:
    """A resumed run goes on with the precision, memory layout, recomputation and compilation its checkpoint was
    trained with, except the fields the command line sets: a new probe (a wiped cache, another node) could switch
    them half-way, and compiling changes the noise draws. A checkpoint from another kind of device, or a weights-only
    one, keeps nothing: this device's settings are chosen afresh."""
    if run.resume is None or "optimizer" not in run.resume[1]:
        return
    path, ckpt = run.resume
    trained_on = ckpt.get("device_type", run.device.type)  # older checkpoints: this device's kind
    if trained_on != run.device.type:
        run.log.info(f"{path} was trained on {trained_on}, this run is on {run.device.type}: its speed settings are "
                     f"chosen afresh")
        return
    saved = {**Hyperparams().to_dict(), **ckpt["hps"]}
    kept = {f: saved[f] for f in (*SPEED_FIELDS, "compile") if f not in run.given and saved[f] != "auto"}
    for name, value in kept.items():
        setattr(run.H, name, value)
    if kept:
        run.log.info("resumed with the checkpoint's speed settings: " + ", ".join(f"{k} {v}" for k, v in kept.items())
                     + " (a flag on the command line overrides one)")


# ---------------------------------------------------------------------------------------------
# The stages and their loop
# ---------------------------------------------------------------------------------------------


def train_stages(run: Run) -> tuple[Trainer, float]:
    """Train each stage this run trains, each with a Trainer of its own, saving at its end; a later stage begins
    from the one just finished. Returns the last Trainer and the seconds spent in the loops."""
    H, dist, state = run.H, run.dist, run.state
    start, seconds = run.start, 0.0
    for n, stage in enumerate(run.run_stages):
        trainer = Trainer(H, run.device, dist=dist, stage=stage, stage_steps=run.stage_total(stage))
        begin_stage(run, trainer, start, first=n == 0)
        seconds += run_steps(run, trainer, state.stage_end)
        path = save(run, trainer)
        start = StageStart("next", checkpoint_dict(H, trainer, state, run.data.class_names))  # on every rank
        if stage != run.stages[-1]:  # a finished stage that a later one starts from: kept as <stage>.pt
            if dist.main:
                keep_stage_copy(path, stage)
            run.log.info(f"stage {stage} finished at step {state.step}: {run.run_dir / f'{stage}.pt'}")
            run_eval(run, trainer, "valid", run.data.valid)
    return trainer, seconds


def begin_stage(run: Run, trainer: Trainer, start: StageStart, first: bool) -> None:
    """Load where ``trainer``'s stage begins from, fix the step it ends at, and log it (the run's header too, for
    the first stage)."""
    H, state, log = run.H, run.state, run.log
    if start.kind == "resume":
        restore_run(start.path, start.ckpt, H, trainer, state)
        log.info(f"resumed from {start.path} at step {state.step}" if "optimizer" in start.ckpt else
                 f"initialised from the weights of {start.path}; a new run starts at step 0")
    elif start.kind == "next":
        start_after_stage(start.ckpt, trainer, state)
        where = (f"the finished {start.ckpt['stage']} stage of {start.path} (its EMA weights)" if start.path else
                 f"the {start.ckpt['stage']} stage's EMA weights")
        log.info(f"stage {trainer.stage} starts at step {state.step} from {where}")
    elif H.restore == "latest":
        log.info(f"--restore latest: no checkpoint in {run.run_dir} yet, starting a fresh run")
    if start.path is not None:  # batch_in_epoch counts global batches: rescale for a new count
        state.batch_in_epoch = state.batch_in_epoch * start.ckpt.get("global_batch", H.n_batch) // run.global_batch
    state.stage_end = state.stage_start + run.stage_total(trainer.stage)
    if first:
        log_run_header(run, trainer)
    if len(run.stages) > 1:
        log.info(f"stage {trainer.stage} ({run.stages.index(trainer.stage) + 1} of {len(run.stages)}): trains "
                 f"{sum(p.numel() for p in trainer.trained):,} parameters from step {state.step} to "
                 f"{state.stage_end:.0f}, peak lr {trainer.scheduler.base_lrs[0]:g}")


def log_run_header(run: Run, trainer: Trainer) -> None:
    H, dist, data, log = run.H, run.dist, run.data, run.log
    n_params = count_parameters(trainer.model)
    log.info(f"processes {dist.world} | global batch {run.global_batch} (n_batch {H.n_batch} x {dist.world} "
             f"processes x grad_accum {H.grad_accum})" + (f" | {run.batch_plan}" if run.batch_plan else ""))
    log.info(f"run folder {run.run_dir} | device {run.device} | dataset {H.dataset}: {len(data.train)} train, "
             f"{len(data.valid)} valid, {len(data.test)} test, {len(data.class_names)} classes")
    log.info(f"model parameters: {n_params:,} ({n_params}) | conditional: {run.conditional}")
    log.info(f"speed settings: {trainer.settings()}")
    log.info("hyperparameters: " + ", ".join(f"{k}={v}" for k, v in H.to_dict().items()))
    log.metrics("config", n_params=n_params, hps=H.to_dict(), class_names=data.class_names,
                resumed_from_step=run.state.step)


def run_steps(run: Run, trainer: Trainer, total: float) -> float:
    """Train ``trainer``'s stage from the current step to ``total``; returns the seconds it took."""
    H, dist, device, state = run.H, run.dist, run.device, run.state
    bar = tqdm(total=total, initial=state.step, desc=f"train {trainer.stage}" if len(run.stages) > 1 else "train",
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr, disable=not dist.main)
    window = Window(device, dist)
    run.skips = SkipCounter(state.skipped, device)
    stop = StopSignal(dist)
    start_time = time.perf_counter()
    trainer.model.train()
    try:
        while state.step < total:
            batches = epoch_batches(run.train_images, H.n_batch, H.seed, state.epoch, state.batch_in_epoch,
                                    dist.rank, dist.world, H.grad_accum)
            for images, labels in batches:
                skip, stats = trainer.step(images.to(device, non_blocking=True),
                                           labels.to(device, non_blocking=True) if run.conditional else None)
                state.step += 1
                state.batch_in_epoch += 1
                run.skips.add(skip)
                window.add(skip, stats)
                bar.update(1)
                after_step(run, trainer, window, bar, stop, total)
                if state.step >= total:
                    break
            else:  # the epoch ran out: the next one starts from its first batch
                state.epoch += 1
                state.batch_in_epoch = 0
    except BaseException as err:  # a stop (signal, too many skips) or a failure: the log is complete up to here
        run.log.close()
        if is_out_of_memory(err):
            raise UserError(out_of_memory_advice(H, device, state.step + 1)) from None
        raise
    finally:
        bar.close()
        stop.close()
    state.skipped = run.skips.count()
    return time.perf_counter() - start_time


def after_step(run: Run, trainer: Trainer, window: Window, bar: tqdm, stop: StopSignal, total: float) -> None:
    """What follows an update when its step asks for it: a log line, the skip limit, a signal to stop, an
    evaluation, a checkpoint."""
    H, step = run.H, run.state.step
    if step % H.log_every == 0 or step == total:
        log_training(run, trainer, window, bar)
    check_every = min(H.log_every, H.skip_limit) if H.skip_limit else H.log_every  # reading skips costs a sync
    if H.skip_limit and step % check_every == 0 and run.skips.longest_in_a_row.item() >= H.skip_limit:
        path = save(run, trainer)  # skipped updates leave the weights alone: these are the last good ones
        raise UserError(f"stopped at step {step}: {H.skip_limit} updates in a row were skipped (non-finite loss "
                        f"or gradient, or gradient norm over --skip_threshold); {path} holds the last good weights. "
                        f"Lower --lr, raise --skip_threshold or --skip_limit, or check the data")
    received = stop.agreed()  # the same answer on every rank, at most two steps after the signal
    if received is not None:
        path = save(run, trainer)
        run.log.info(f"{signal.Signals(received).name} at step {step}: saved {path}; resume with --save_dir "
                     f"{run.run_dir} --restore latest")
        sys.exit(128 + received)
    if H.eval_every and step % H.eval_every == 0 and step < total:
        run_eval(run, trainer, "valid", run.data.valid)
    if (step % H.save_every == 0 or (H.keep_every and step % H.keep_every == 0)) and step < total:
        save(run, trainer)  # a keep_every step saves too, whatever save_every is, so that step-N.pt is N


def log_training(run: Run, trainer: Trainer, window: Window, bar: tqdm) -> None:
    """The training figures of the window since the last log line: the bar, metrics.jsonl and TensorBoard."""
    state, H = run.state, run.H
    report_skipped_images(run)
    summary = window.summary(run.global_batch, trainer.metric_names)
    # the time left at this window's speed, to the end of the stage (evaluations and saves not counted)
    left = (state.stage_end - state.step) * run.global_batch / summary["img_per_s"] if summary["img_per_s"] else None
    run.latest_extras.update({k: summary[k] for k in trainer.extra_metrics})
    state.skipped = run.skips.count()
    bar.set_postfix(bpd=f"{summary['loss']:.3f}", gnorm=f"{summary['grad_norm']:.1f}", skipped=state.skipped,
                    img_s=f"{summary['img_per_s']:.0f}")
    auto = {"skip_above": auto_skip_limit(trainer.skip_statistic, run.H.skip_threshold_start)} \
        if run.H.skip_threshold == "auto" else {}  # the gradient norm the outlier rule skips above now
    run.log.metrics("train", step=state.step, epoch=state.epoch, stage=trainer.stage,
                    lr=trainer.scheduler.get_last_lr()[0], skipped_updates=state.skipped, **auto, **summary,
                    time_left_s=None if left is None else round(left))
    every = H.eval_every or 10 * H.log_every
    if left is not None and state.step % every == 0 and state.step < state.stage_end:
        run.log.info(f"step {state.step} | about {duration(left)} left to step {state.stage_end:.0f} at "
                     f"{summary['img_per_s']:.0f} img/s")


def save(run: Run, trainer: Trainer) -> Path:
    """Write the checkpoint as latest.pt (rank 0; the one it replaces stays as previous.pt), and keep a copy as
    step-N.pt at every --keep_every steps."""
    latest, state = run.run_dir / "latest.pt", run.state
    if run.skips is not None:
        state.skipped = run.skips.count()
    if run.dist.main:
        try:
            atomic_torch_save(checkpoint_dict(run.H, trainer, state, run.data.class_names), latest,
                              keep_previous=True)
            if run.H.keep_every and state.step % run.H.keep_every == 0:
                keep_copy(latest, state.step, run.H.keep_last)
            if trainer.compiled and not trainer.compile_cache_saved:  # once a stage: the graphs compile once
                save_compile_cache(run.run_dir)
                trainer.compile_cache_saved = True
        except OSError as err:  # a full disk, a quota, a vanished mount: the last checkpoint is intact
            held = f"{latest} still holds the checkpoint before it, intact" if latest.exists() else \
                "no checkpoint was written"
            raise UserError(f"cannot write the step {state.step} checkpoint into {run.run_dir} "
                            f"({err.strerror or err}); {held}") from None
    return latest


def run_eval(run: Run, trainer: Trainer, split_name: str, split: Split) -> dict:
    """The EMA weights' bound on ``split``, logged; at each evaluation of the last stage also a frame of the latent
    trajectory and, with TensorBoard, a sample grid."""
    H, device, log = run.H, run.device, run.log
    with autocast(device, trainer.amp_dtype):  # the training precision; likelihood and KL stay fp32
        result = evaluate_elbo(trainer.ema, split, H.n_batch_eval, device, dist=run.dist)
    result.pop("per_image")
    result["kl_per_resolution"] = kl_per_resolution(trainer.ema, result["kl_groups"])
    nats = f" | {result['nats_per_image']:.2f} nats per image" if H.likelihood == "bernoulli" else ""
    extras = "".join(f" | {k} {v:.2f}" for k, v in run.latest_extras.items())
    log.info(f"step {run.state.step} | {split_name} bits/dim (EMA) {result['loss']:.4f} "
             f"= recon {result['recon']:.4f} + kl {result['kl']:.4f}{nats}{extras}")
    log.metrics("eval", step=run.state.step, split=split_name, stage=trainer.stage, **result)
    if H.curves:
        log.curves()  # curves.png: the run so far, at every evaluation
    last_stage = trainer.stage == run.stages[-1]
    if run.trajectory is not None and last_stage:
        record_latents(run, trainer)
    if log.wants_images and split_name == "valid" and last_stage:
        with autocast(device, trainer.amp_dtype):
            grid = sample_grid(trainer.ema, grid_rows(H, run.data)[0], 10, H.temperature, device, seed=H.seed)
        log.image("samples", crop_padding(grid, H.pad), 10, run.state.step)
    return result


def record_latents(run: Run, trainer: Trainer) -> None:
    """--track_latents: one ``latents`` record in metrics.jsonl, one more frame of latents.gif."""
    images, labels, indices = run.tracked
    with autocast(run.device, trainer.amp_dtype):  # the posterior's head runs in fp32 under autocast
        means = posterior_means(trainer.ema, images, labels if run.conditional else None, run.H.n_batch_eval,
                                run.device)
    values = {"step": run.state.step, "split": "test", "images": indices,
              "labels": None if run.data.multi_label else labels.tolist(),
              "means": [[round(a, 5), round(b, 5)] for a, b in means.tolist()]}
    run.log.metrics("latents", **values)
    run.trajectory.add(values)


def report_skipped_images(run: Run) -> None:
    """Log each image file that could not be decoded when its batch came up (another of its class stood in)."""
    for path in sorted(skipped_images(run.data) - run.reported_skips):
        run.reported_skips.add(path)
        run.log.info(f"warning: skipped unreadable image {path} (another image of its class stood in); "
                     f"{len(run.reported_skips)} so far")


# ---------------------------------------------------------------------------------------------
# The end: held-out evaluation and samples
# ---------------------------------------------------------------------------------------------


def finish(run: Run, trainer: Trainer, train_seconds: float) -> None:
    """The closing lines: the held-out bound of the EMA weights and a sample grid, a row per class (or, when the
    stage trained is not the family's last, the command that trains the next)."""
    H, state, log = run.H, run.state, run.log
    log.info(f"trained to step {state.step} in {train_seconds:.0f} s ({state.skipped} updates skipped); "
             f"checkpoint {run.run_dir / 'latest.pt'}")
    if trainer.stage != run.stages[-1]:  # --stage autoencoder: the prior that sampling needs is not trained yet
        following = run.stages[run.stages.index(trainer.stage) + 1]
        log.info(f"the {following} stage is next: python train.py --hps {H.hps} --model {H.model} --stage "
                 f"{following} --restore {run.run_dir}")
        log.close()
        return
    result = run_eval(run, trainer, "test", run.data.test)
    report_skipped_images(run)
    if not run.dist.main:  # rank 0 alone draws the samples; the others wait for it in end_distributed
        return
    with autocast(run.device, trainer.amp_dtype):
        rows, row_names = grid_rows(H, run.data)
        images = crop_padding(sample_grid(trainer.ema, rows, 10, H.temperature, run.device, seed=H.seed), H.pad)
    grid_path = run.run_dir / "samples.png"
    save_grid(images, grid_path, nrow=10, row_labels=row_names)
    log.image("samples", images, 10, state.step)
    log.info(f"samples (a row per class, t={H.temperature}): {grid_path}")
    if run.trajectory is not None:
        log.info(f"posterior means of {len(run.tracked[2])} test images at {len(run.trajectory.records)} "
                 f"evaluations: {run.trajectory.path} (and the latents records of metrics.jsonl)")
    log.metrics("final", step=state.step, train_seconds=round(train_seconds, 1), test_bpd=result["loss"],
                test_recon=result["recon"], test_kl=result["kl"], skipped_updates=state.skipped)
    log.close()


# ---------------------------------------------------------------------------------------------
# Helpers of the steps above
# ---------------------------------------------------------------------------------------------


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


def load_data_per_node(H: Hyperparams, dist: Dist) -> Data:
    """The run's data. Under torchrun the first process of each node loads it first, downloading or converting
    it when needed, while the others wait at a barrier and then read what it wrote: one CIFAR download per
    node, not one per process, and one writer of ImageNet's caches."""
    data = load_data_for(H) if dist.local_rank == 0 else None
    dist.barrier(solo=True)  # a download or conversion may take longer than a training collective may wait
    return data if data is not None else load_data_for(H)


def on_device_if_small(split: Split, device: torch.device, max_bytes: int = 2 << 30) -> Split:
    """The split moved to ``device`` once when it is an in-memory tensor of at most ``max_bytes``, so batches
    never cross the bus. Lazy splits (image folders, memory-mapped arrays) stay lazy: copying one would decode or
    read every image on every rank before the first step (all 162,770 CelebA JPEGs)."""
    if device.type == "cpu" or not isinstance(split.images, torch.Tensor) or split.images.numel() > max_bytes:
        return split
    return Split(split.images.to(device), split.labels.to(device))


def duration(seconds: float) -> str:
    """A time span as a person reads it: 45 s, 12 min, 3.5 h, 2.9 days."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 36 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's out-of-memory error, or the RuntimeError that MPS and the CPU allocator raise."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_advice(H: Hyperparams, device: torch.device, step: int) -> str:
    return (f"out of memory on {device} at step {step} with --n_batch {H.n_batch} (and --n_batch_eval "
            f"{H.n_batch_eval} for evaluation): lower --n_batch, recompute activations with --grad_checkpoint "
            f"blocks, or keep the global batch with --n_batch {max(1, H.n_batch // 2)} --grad_accum "
            f"{2 * H.grad_accum}; nothing was saved from this step")


def skipped_images(data: Data) -> set[Path]:
    """Image files of lazily decoded splits that could not be decoded when their batch came up."""
    return {p for split in (data.train, data.valid, data.test) for p in getattr(split.images, "skipped", [])}


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


def grid_rows(H: Hyperparams, data: Data) -> tuple[torch.Tensor | None, list[str] | None]:
    """What the end-of-run picture shows, a row each: every class (10 spread over them when there are more); for
    attributes, those of the first 10 test images; nothing for an unconditional model."""
    if H.n_classes == 0:
        return None, None
    if H.multi_label:
        return data.test.labels[:10], [f"test #{i}" for i in range(min(10, len(data.test)))]
    classes = torch.arange(H.n_classes) if H.n_classes <= 10 else torch.linspace(0, H.n_classes - 1, 10).long()
    return classes, [data.class_names[c] for c in classes.tolist()]


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


if __name__ == "__main__":
    run_cli(main)
