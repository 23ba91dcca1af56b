"""Plumbing shared by the entry points: errors for users, devices, logging, checkpoints."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

CHECKPOINT_FORMAT = "vdvae-checkpoint-1"
_JOINED_PROCESS_GROUP = False  # set by init_distributed: this process took part in a torchrun job


class UserError(Exception):
    """A problem with what the user asked for: reported as one line on stderr, exit status 2."""


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run ``main``; user errors become one line on stderr and exit 2 (tracebacks only with --debug).

    A process that took part in a torchrun job leaves through ``exit_without_finalizing`` (see there)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            main(argv)
        except UserError as err:
            if "--debug" in argv:
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
        except BrokenPipeError:  # output piped into `head` and the like: stop quietly
            sys.stderr.close()
            sys.exit(1)
    except SystemExit as stop:
        if _JOINED_PROCESS_GROUP:
            exit_without_finalizing(stop.code)
        raise
    except BaseException:
        if _JOINED_PROCESS_GROUP:
            traceback.print_exc()
            exit_without_finalizing(1)
        raise
    if _JOINED_PROCESS_GROUP:
        exit_without_finalizing(0)


def exit_without_finalizing(code: int | str | None) -> None:
    """End a process that used torch.distributed with ``code``, skipping the interpreter's finalization.

    Why: gloo runs each collective on a worker thread of its own, and that thread drops its reference to a finished
    collective (and to the tensors it reduced) a moment after the caller's ``wait`` returns. When that reference is
    the last one to a tensor that Python already let go of, dropping it takes the GIL. If the interpreter is
    finalizing by then, Python ends the thread with pthread_exit, whose forced unwind meets a noexcept frame:
    ``terminate called without an active exception`` and SIGABRT, though the work was done (issue 20; the core dump
    showed exactly this stack). DistributedDataParallel keeps the process group, and so its worker threads, alive
    past ``destroy_process_group``, so they cannot be joined first. Everything this project writes is already
    flushed and closed when this runs (logs, metrics, fsync'd checkpoints); only the standard streams remain."""
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed (a broken pipe) or gone
            pass
    os._exit(code)


class CliParser(argparse.ArgumentParser):
    """argparse whose errors become one-line UserErrors (exit 2, no usage dump)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(message)


# the digits model committed in the repository (README: which command and commit made it): sample.py and app.py
# work right after the install, with no training
DEFAULT_WEIGHTS = "weights/digits.safetensors"


def checkpoint_script_parser(description: str) -> CliParser:
    """A parser with the flags every script that reads a checkpoint shares."""
    return add_checkpoint_flags(CliParser(description=description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))


def add_checkpoint_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="a checkpoint file, a run folder, an exported "
                   ".safetensors file, or hf:ORG/NAME on the Hugging Face hub (default: the digits model shipped in "
                   "weights/)")
    p.add_argument("--raw_weights", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--hps", default=None, help="the preset of an openai/vdvae .th checkpoint (cifar10, imagenet32, "
                   "imagenet64, ffhq256, ffhq1024); our own checkpoints carry theirs")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return p


# ---------------------------------------------------------------------------------------------
# Where a command writes: checked before the work, creating nothing
# ---------------------------------------------------------------------------------------------


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _cannot_create_in(folder: Path) -> str | None:
    """Why no file can be created in the existing ``folder`` (None: one can). Found by creating one and removing
    it: permission bits say nothing to root, nor of a read-only mount or /proc."""
    try:
        handle, name = tempfile.mkstemp(dir=folder, prefix=".write-check-")
    except OSError as err:
        return f"no file can be created in {folder} ({err.strerror or err})"
    os.close(handle)
    os.unlink(name)
    return None


def check_output_file(path, parent_must_exist: bool = False) -> Path:
    """Refuse, before any work, a file that could not be written later: a folder in its place, a file where its
    folder should be, or a place no file can be created in. Creates nothing (its missing folders are made when it
    is written, unless ``parent_must_exist``)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: a folder of that name exists")
    if parent_must_exist and not path.parent.is_dir():
        raise UserError(f"cannot write {path}: no folder {path.parent}")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise UserError(f"cannot write {path}: {base} is a file, not a folder")
    reason = _cannot_create_in(base)
    if reason:
        raise UserError(f"cannot write {path}: {reason}")
    return path


def check_output_folder(path, flag: str, empty: bool = False) -> Path:
    """Refuse, before any work, a folder that could not be written into later (with ``empty``, also one that
    already holds files). Creates nothing."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (empty and any(path.iterdir()))):
        if empty:
            raise UserError(f"{flag} {path} already exists and is not an empty folder: name a new one")
        raise UserError(f"cannot create {flag} {path}: a file of that name exists")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UserError(f"cannot create {flag} {path}: {base} is a file, not a folder")
    reason = _cannot_create_in(base)
    if reason:
        raise UserError(f"cannot create {flag} {path}: {reason}")
    return path


def check_port_free(host: str, port: int) -> None:
    """Refuse, before the model is loaded, a port that cannot be served on (taken, or not this machine's)."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: a closing port is free
            s.bind((host, port))
    except OSError as err:
        raise UserError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def pick_device(name: str):
    """``auto`` is cuda, else mps, else cpu; anything else must name an available device."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} does not exist; this machine has {torch.cuda.device_count()} GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("device 'mps' asked for but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; valid: auto, cpu, cuda, cuda:N, mps")
    return device


def resolve_precision(name: str, device):
    """The autocast dtype ``--precision`` means on ``device`` (None: plain fp32).

    ``auto`` is bf16 on GPUs that support it and fp16 (with a gradient scaler) on older ones; fp32 on the CPU,
    where bf16 autocast is slower without bf16 hardware (see bench/throughput.py).
    """
    import torch

    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return None
    if name == "auto":  # native bf16 only (Ampere and later): V100 and T4 emulate it slowly, fp16 is theirs
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_channels_last(setting: str, device) -> bool:
    """``auto`` is channels-last on CUDA (tensor-core convolutions want it) and off elsewhere."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def autocast(device, dtype):
    """Autocast to ``dtype`` on ``device``, or a no-op for None (fp32)."""
    import torch

    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world > 1:
            import torch.distributed as dist

            box = [value]
            dist.broadcast_object_list(box, src=0)
            value = box[0]
        return value

    def barrier(self) -> None:
        """Wait until every rank reaches this point (a no-op in one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def all_reduce(self, tensor, op: str = "sum"):
        """In-place sum or max over ranks (a no-op in one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor


def init_distributed(device_name: str):
    """torchrun's environment -> (Dist, device): NCCL with one GPU per process, gloo on the CPU. Without
    torchrun (WORLD_SIZE unset or 1): one process on ``pick_device(device_name)``."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(), pick_device(device_name)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if device_name not in ("auto", "cuda", "cpu"):
        raise UserError(f"under torchrun --device must be auto, cuda or cpu (one GPU per process), got {device_name!r}")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    global _JOINED_PROCESS_GROUP
    _JOINED_PROCESS_GROUP = True
    return Dist(rank, world, local_rank), device


def end_distributed(dist: Dist, completed: bool) -> None:
    """The end of a torchrun job on this rank. After a run that ``completed``, wait at a barrier, so that no rank
    leaves while another still needs it (rank 0 samples alone at the end), then leave the process groups. After a
    stop or a failure, touch nothing: destroying a group can wait for a collective that the other ranks will never
    join, and the process exits at once (run_cli), with its status, so that torchrun stops the others."""
    import torch.distributed as torch_dist

    if dist.world > 1 and completed and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def seeded(device, seed: int):
    """Run the block with the global RNG seeded, then restore the caller's RNG state, the CPU's and ``device``'s
    (CUDA or MPS), so that evaluation and sampling neither depend on nor disturb the training stream."""
    import torch

    cpu_state, device_state = torch.get_rng_state(), device_rng_state(device)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA and MPS generator
    try:
        yield
    finally:
        torch.set_rng_state(cpu_state)
        set_device_rng_state(device_state, device)


def device_rng_state(device) -> Any:
    """The generator state of ``device`` alone (None on the CPU, whose generator is saved on its own)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def saved_device_rng_state(rng: dict) -> Any:
    """The device generator state a checkpoint holds: this format's one state, or, from checkpoints written before
    it, the first of the list of every visible GPU's states (rank 0 wrote it: its own GPU came first)."""
    if "device" in rng:
        return rng["device"]
    states = rng.get("cuda") or []
    return states[0] if len(states) else None


def set_device_rng_state(state: Any, device) -> None:
    """Give ``device``'s generator a saved state; nothing for the CPU or when the checkpoint came from a machine
    without one (a CPU checkpoint resumed on a GPU keeps the freshly seeded GPU stream)."""
    import torch

    if state is None or device.type not in ("cuda", "mps"):
        return
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.mps.set_rng_state(state)


def available_memory() -> int | None:
    """Bytes of RAM free for new allocations (Linux and macOS), or None where it cannot be told."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def crop_padding(images, pad: int):
    """Images (..., H, W) without ``pad`` pixels on each side (unchanged for 0): what the likelihood scores of
    MNIST's padded 32x32, and so what pictures show."""
    return images[..., pad:images.shape[-2] - pad, pad:images.shape[-1] - pad] if pad else images


def labelled_grid(images, nrow: int, row_labels: list[str] | None = None, col_labels: list[str] | None = None):
    """uint8 images (N, C, H, W) as a PIL picture: a grid ``nrow`` images wide, upscaled so that small images
    (8x8 digits) stay visible, with optional text left of each row and above each column."""
    import torch
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    scale = max(1, 32 // images.shape[-1])
    x = images.float() / 255.0
    if scale > 1:
        x = torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
    grid = make_grid(x, nrow=nrow, padding=2, pad_value=0.5)
    picture = Image.fromarray(grid.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy())
    if not row_labels and not col_labels:
        return picture
    font = ImageFont.load_default()
    text_w = lambda t: font.getbbox(t)[2]  # noqa: E731
    text_h = max(font.getbbox(t)[3] for t in [*(row_labels or []), *(col_labels or []), "Ag"])
    left = max(map(text_w, row_labels)) + 8 if row_labels else 0
    top = text_h + 6 if col_labels else 0
    canvas = Image.new("RGB", (picture.width + left, picture.height + top), "white")
    canvas.paste(picture, (left, top))
    draw = ImageDraw.Draw(canvas)
    cell_h, cell_w = images.shape[-2] * scale + 2, images.shape[-1] * scale + 2
    for r, text in enumerate(row_labels or []):
        draw.text((left - 4 - text_w(text), top + 2 + r * cell_h + (cell_h - text_h) // 2), text, fill="black",
                  font=font)
    for c, text in enumerate(col_labels or []):
        draw.text((left + 2 + c * cell_w + (cell_w - text_w(text)) // 2, 2), text, fill="black", font=font)
    return canvas


def save_grid(images, path, nrow: int, row_labels: list[str] | None = None,
              col_labels: list[str] | None = None) -> None:
    """Save uint8 images (N, C, H, W) as a PNG grid (see labelled_grid)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, nrow, row_labels, col_labels).save(path)


def folder_name(text: str) -> str:
    """A class name as a folder name on every file system: runs of characters other than letters, digits and
    ``._=-`` become one underscore ("Smiling,Male=0" -> "Smiling_Male=0")."""
    import re

    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text).strip("_") or "_"


def check_empty_folder(root, flag: str) -> None:
    """Before any work: refuse a folder that already holds files (writing into it could overwrite earlier samples
    or mix two runs' images under one manifest), and create it, so that an unwritable place fails now rather
    than after the sampling."""
    root = check_output_folder(root, flag, empty=True)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {flag} {root}: {err.strerror or err}") from None


def save_image_folder(images, folders: list[str], root, records: list[dict]) -> Path:
    """Each uint8 image (N, C, H, W) as its own PNG at its native size, ``ROOT/FOLDER/00001.png`` numbered from 1
    within each folder (the layout torchvision's ImageFolder and FID tools read), and ``ROOT/manifest.csv``: a row
    per image with its file and the fields of its record. Returns the manifest's path."""
    import csv

    from PIL import Image

    root = Path(root)
    counts: dict[str, int] = {}
    rows = []
    digits = max(5, len(str(len(images))))
    try:
        for image, folder, record in zip(images, folders, records):
            counts[folder] = counts.get(folder, 0) + 1
            name = Path(folder) / f"{counts[folder]:0{digits}d}.png"
            (root / folder).mkdir(parents=True, exist_ok=True)
            array = image.permute(1, 2, 0).numpy()
            Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(root / name)
            rows.append({"file": name.as_posix(), **record})
        manifest = root / "manifest.csv"
        with open(manifest, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    except OSError as err:
        raise UserError(f"cannot write into {root}: {err.strerror or err}") from None
    return manifest


def save_gif(frames: list, path, fps: float) -> None:
    """Write PIL pictures as an animated GIF that loops forever."""
    import imageio.v3 as iio
    import numpy as np

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack([np.asarray(f.convert("RGB")) for f in frames]), extension=".gif",
                duration=1000.0 / fps, loop=0)


# ---------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------

LOCK_NAME = ".lock"


class RunFolderLock:
    """An exclusive lock on a run folder for the life of the process that trains into it: ``flock`` on
    ``FOLDER/.lock``, which the kernel releases when the process ends in any way (SIGKILL, an OOM kill, power
    loss), so a stale lock never outlives its holder. The file records the holder's pid and host.

    A second trainer on a held folder gets a one-line error naming the holder, having changed nothing there (it
    opens the lock file without truncating it, and only reads it). On file systems without working locks (some
    NFS and Lustre mounts) ``acquire`` warns and goes on unlocked."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._fh = None

    def acquire(self, warn: Callable[[str], None] = print) -> None:
        import errno
        import fcntl
        import socket

        fh = open(self.path, "a+", encoding="utf-8")  # a+: create if absent, never truncate
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fh.seek(0)
                holder = fh.read().strip() or "an unknown process"
                fh.close()
                raise UserError(f"run folder {self.path.parent} is in use by {holder}: one trainer per folder "
                                f"(wait for it, or give this run another --save_dir)") from None
            warn(f"warning: cannot lock {self.path} ({err.strerror}): this file system does not support locks, so "
                 f"nothing stops a second trainer from writing into {self.path.parent}")
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        fh.flush()
        self._fh = fh  # held open: the lock lives as long as this file descriptor

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


# ---------------------------------------------------------------------------------------------
# Logging: a human log and JSON lines side by side in the run folder
# ---------------------------------------------------------------------------------------------


class NullLogger:
    """What ranks other than 0 log: nothing."""

    def info(self, message: str) -> None:
        pass

    def metrics(self, kind: str, **values: Any) -> None:
        pass

    def curves(self) -> None:
        pass

    wants_images = False

    def image(self, tag: str, images, nrow: int, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(log_dir: Path | None = None):
    """torch's SummaryWriter into ``log_dir`` (None: only check that it can be made), or a one-line error naming the
    install command where tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard "
                        "(or pip install -r requirements-app.txt)") from None
    return None if log_dir is None else SummaryWriter(log_dir=str(log_dir))


def _scalars(values: dict, prefix: str = "") -> list[tuple[str, float]]:
    """The numbers of a metrics record as (name, value), nested dicts (KL per resolution) as name/key."""
    out = []
    for key, value in values.items():
        if isinstance(value, dict):
            out += _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
            out.append((f"{prefix}{key}", float(value)))
    return out


class RunLogger:
    """Writes ``log.txt`` (human) and ``metrics.jsonl`` (one JSON object per record) in a run folder, draws
    ``curves.png`` from the metrics when asked, and with ``tensorboard`` logs the same scalars (and sample grids)
    to TensorBoard in ``RUN/tensorboard``."""

    def __init__(self, run_dir: Path, echo: Callable[[str], None] = print, tensorboard: bool = False):
        self.run_dir = run_dir
        self.echo = echo
        self.writer = tensorboard_writer(run_dir / "tensorboard") if tensorboard else None
        self._log = open(run_dir / "log.txt", "a", encoding="utf-8")
        self._metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    @property
    def wants_images(self) -> bool:
        """Whether sample grids are worth drawing for the log (TensorBoard is on)."""
        return self.writer is not None

    def image(self, tag: str, images, nrow: int, step: int) -> None:
        """A grid of uint8 images (N, C, H, W) to TensorBoard at ``step``."""
        if self.writer is not None:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images, nrow=nrow, padding=1), step)
            self.writer.flush()

    def info(self, message: str) -> None:
        self.echo(message)
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        self._log.flush()

    def metrics(self, kind: str, **values: Any) -> None:
        record = {"kind": kind, "time": round(time.time(), 3), **values}
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.writer is not None and "step" in values:  # train/loss, valid/kl_per_resolution/4, final/test_bpd
            group = values.get("split", kind)
            for name, value in _scalars({k: v for k, v in values.items() if k != "split"}):
                self.writer.add_scalar(f"{group}/{name}", value, values["step"])
            self.writer.flush()

    def curves(self) -> Path:
        """Redraw ``curves.png`` from the metrics so far (see draw_curves)."""
        return draw_curves({self.run_dir.name: read_metrics(self.run_dir)}, self.run_dir / "curves.png")

    def close(self) -> None:
        self._log.close()
        self._metrics.close()
        if self.writer is not None:
            self.writer.close()


class LatentTrajectory:
    """Where the encoder puts fixed held-out images over training (train.py --track_latents): the ``latents``
    records of metrics.jsonl (a step, the images' labels and the 2-D posterior means) drawn as an animated GIF,
    one scatter coloured by class per evaluation, on axes that every frame shares so that motion is real."""

    def __init__(self, path: Path, class_names: list[str], records: list[dict] = ()):
        self.path, self.class_names = Path(path), class_names
        self.records = {r["step"]: r for r in records}  # a resumed run's earlier evaluations
        self._frames: dict[int, Any] = {}  # drawn frames by step, for the current axes
        self._bound = 0.0

    def add(self, record: dict) -> Path:
        """A new evaluation's record, then the GIF rewritten. Records at this step or later are dropped first: they
        come from a run that was stopped and resumed from an earlier checkpoint, and this run replaces them."""
        for step in [s for s in self.records if s >= record["step"]]:
            del self.records[step]
            self._frames.pop(step, None)
        self.records[record["step"]] = record
        return self.write()

    def bound(self) -> float:
        """Half the width of the square axes: the prior's +-3 standard deviations, widened in whole units until
        every mean fits (so the axes, and the frames drawn on them, rarely change)."""
        biggest = max((abs(v) for r in self.records.values() for point in r["means"] for v in point), default=0.0)
        return float(max(3, math.ceil(biggest * 1.05)))

    def write(self, fps: float = 2.0) -> Path:
        bound = self.bound()
        if bound != self._bound:  # new axes: every frame is drawn again on them
            self._frames, self._bound = {}, bound
        frames = []
        for step in sorted(self.records):
            if step not in self._frames:
                self._frames[step] = self._draw(self.records[step], bound)
            frames.append(self._frames[step])
        save_gif(frames, self.path, fps)
        return self.path

    def _draw(self, record: dict, bound: float):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
        from PIL import Image

        means = np.asarray(record["means"], dtype=float).reshape(-1, 2)
        labels = record.get("labels")
        fig, ax = plt.subplots(figsize=(6.0, 4.8), dpi=80)
        if labels is None or not self.class_names:  # no class per image (attributes, an unlabelled set): one colour
            ax.scatter(means[:, 0], means[:, 1], s=8, color="tab:blue")
        else:
            labels = np.asarray(labels)
            cmap = plt.get_cmap("tab10" if len(self.class_names) <= 10 else "tab20")
            for c, name in enumerate(self.class_names):
                mask = labels == c
                if mask.any():
                    ax.scatter(means[mask, 0], means[mask, 1], s=8, color=cmap(c % cmap.N), label=name)
            if len(self.class_names) <= 20:  # beyond that a legend would be taller than the plot (CIFAR-100)
                ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, markerscale=2, frameon=False)
        ax.set_xlim(-bound, bound)
        ax.set_ylim(-bound, bound)
        ax.set_aspect("equal")
        ax.set_xlabel("z1 (posterior mean)")
        ax.set_ylabel("z2")
        ax.set_title(f"step {record['step']} ({record.get('split', 'test')}, {len(means)} images)")
        fig.tight_layout()
        fig.canvas.draw()
        picture = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())).convert("RGB")
        plt.close(fig)
        return picture


# ---------------------------------------------------------------------------------------------
# Checkpoints: one plain dict, written atomically, loaded without running pickled code
# ---------------------------------------------------------------------------------------------


def atomic_torch_save(obj: Any, path: Path, keep_previous: bool = False) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``, so ``path`` is always a
    complete file. With ``keep_previous`` the file it replaces survives as ``previous.pt`` beside it."""
    import torch

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        if keep_previous and path.exists():  # a second name for the old file: ``path`` never goes missing
            _link_or_copy(path, path.with_name("previous.pt"))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _link_or_copy(source: Path, target: Path) -> None:
    """Make ``target`` the same file as ``source`` (a hard link, or a copy where links are not allowed),
    replacing whatever ``target`` was in one rename."""
    import shutil

    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the half-written ``.NAME.tmp-PID`` files that a process killed while saving left in ``run_dir``
    (those whose PID is no process on this machine); returns them."""
    removed = []
    for tmp in Path(run_dir).glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _process_alive(int(pid)):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process
        return True
    return True


def _fsync_dir(folder: Path) -> None:
    """Make renames in ``folder`` durable (not every file system allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def keep_copy(latest: Path, step: int, keep_last: int) -> Path:
    """Keep ``latest`` as ``step-N.pt`` (a hard link where possible: no second write), then delete all but the
    newest ``keep_last`` of those (0: keep all)."""
    kept = latest.with_name(f"step-{step:08d}.pt")
    _link_or_copy(latest, kept)
    if keep_last > 0:
        for old in sorted(latest.parent.glob("step-*.pt"))[:-keep_last]:
            old.unlink()
    _fsync_dir(latest.parent)
    return kept


def keep_stage_copy(latest: Path, stage: str) -> Path:
    """Keep the checkpoint that ends a training stage as ``<stage>.pt`` beside ``latest`` (a hard link where possible),
    so a later stage can be trained again from it (``--stage prior --restore RUN/autoencoder.pt``)."""
    kept = latest.with_name(f"{stage}.pt")
    _link_or_copy(latest, kept)
    _fsync_dir(latest.parent)
    return kept


def resume_candidates(run_dir: Path) -> list[Path]:
    """A run folder's checkpoints, newest first: latest.pt, previous.pt, then step-N.pt from the highest N."""
    run_dir = Path(run_dir)
    named = [run_dir / "latest.pt", run_dir / "previous.pt"]
    return [p for p in named if p.is_file()] + sorted(run_dir.glob("step-*.pt"), reverse=True)


def load_newest_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> tuple[Path, dict] | None:
    """The newest checkpoint of ``run_dir`` that loads; a damaged one is skipped with a warning. None when the
    folder holds no checkpoint at all; an error when it holds only damaged ones."""
    candidates = resume_candidates(run_dir)
    for i, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except UserError as err:
            later = f"; trying {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
            warn(f"warning: {err}{later}")
    if candidates:
        raise UserError(f"no complete checkpoint in {run_dir}: all {len(candidates)} are damaged")
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder meaning its ``latest.pt``."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "latest.pt"
        if not candidate.is_file():
            raise UserError(f"run folder {path} holds no checkpoint (expected {candidate})")
        return candidate
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    return path


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (``weights_only=True``); clear errors for bad files."""
    import pickle

    import torch

    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format tag)")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Curves: a run's metrics.jsonl as a picture (train.py's curves.png, plot.py's comparisons)
# ---------------------------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of a run folder's metrics.jsonl; a half-written last line (a run killed while writing it) is
    left out."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} holds no metrics.jsonl: not a run folder of train.py")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _curve_x(records: list[dict], x: str, start: float) -> list[float]:
    return [r["step"] if x == "step" else r["time"] - start for r in records]


def draw_curves(runs: dict[str, list[dict]], out: str | Path, x: str = "step") -> Path:
    """Four panels for one run or several overlaid (a colour each): training and validation bits/dim (and the
    final test figure), the validation KL per resolution, the gradient norm, and the skipped updates, against
    steps or (``x="time"``) seconds since each run's first record. Written as a PNG with matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    if x not in ("step", "time"):
        raise UserError(f"--x must be step or time, got {x!r}")
    fig, ((ax_bpd, ax_kl), (ax_grad, ax_skip)) = plt.subplots(2, 2, figsize=(12, 8))
    several = len(runs) > 1
    for i, (name, records) in enumerate(runs.items()):
        prefix, color = (f"{name} " if several else ""), f"C{i}"
        start = min((r["time"] for r in records if "time" in r), default=0.0)
        train = [r for r in records if r.get("kind") == "train"]
        valid = [r for r in records if r.get("kind") == "eval" and r.get("split") == "valid"]
        test = [r for r in records if r.get("kind") == "eval" and r.get("split") == "test"]
        ax_bpd.plot(_curve_x(train, x, start), [r["loss"] for r in train], color=color, alpha=0.45, lw=1,
                    label=f"{prefix}train")
        ax_bpd.plot(_curve_x(valid, x, start), [r["loss"] for r in valid], color=color, marker="o", ms=3,
                    label=f"{prefix}valid (EMA)")
        if test:
            ax_bpd.plot(_curve_x(test[-1:], x, start), [test[-1]["loss"]], color=color, marker="*", ms=12, ls="",
                        label=f"{prefix}test {test[-1]['loss']:.4f}")
        resolutions = sorted({res for r in valid for res in r.get("kl_per_resolution", {})},
                             key=lambda res: (not res.isdigit(), int(res) if res.isdigit() else 0))
        for j, res in enumerate(resolutions):
            points = [(xv, r["kl_per_resolution"][res]) for xv, r in zip(_curve_x(valid, x, start), valid)
                      if res in r.get("kl_per_resolution", {})]
            label = f"{prefix}{res}x{res}" if res.isdigit() else f"{prefix}{res}"
            ax_kl.plot(*zip(*points), color=color if several else f"C{j}", marker="o", ms=3, label=label,
                       ls=["-", "--", ":", "-."][j % 4] if several else "-")
        ax_grad.plot(_curve_x(train, x, start), [r["grad_norm"] for r in train], color=color, lw=1,
                     label=f"{prefix}gradient norm")
        ax_skip.plot(_curve_x(train, x, start), [r.get("skipped_updates", 0) for r in train], color=color,
                     label=f"{prefix}skipped updates")
    ax_bpd.set(title="negative ELBO (bits/dim)", ylabel="bits/dim")
    ax_kl.set(title="validation KL per resolution (bits/dim)", ylabel="bits/dim")
    ax_grad.set(title="gradient norm (of the loss in nats/dim)", yscale="log")
    ax_skip.set(title="skipped updates (cumulative)")
    for ax in (ax_bpd, ax_kl, ax_grad, ax_skip):
        ax.set_xlabel("step" if x == "step" else "seconds since the run's first record")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    try:
        fig.savefig(out, dpi=90)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    finally:
        plt.close(fig)
    return out
