"""The command line and the runtime under it: errors for users, the shared flags, where a command may write,
devices and precision, the distributed runtime, and random-number state."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

_JOINED_PROCESS_GROUP = False  # set by init_distributed: this process took part in a torchrun job


class UserError(Exception):
    """A problem with what the user asked for: reported as one line on stderr, exit status 2."""


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Run ``main``; user errors, and a FloatingPointError (a sample a model cannot draw in finite numbers), become
    one line on stderr and exit 2 (tracebacks only with --debug).

    A process that took part in a torchrun job leaves through ``exit_without_finalizing`` (see there)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        try:
            main(argv)
        except (UserError, FloatingPointError) as err:  # the second: a model's maths left the finite numbers
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
    ``terminate called without an active exception`` and SIGABRT, though the work was done.
    DistributedDataParallel keeps the process group, and so its worker threads, alive
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


# the digits model committed in the repository (bench/RESULTS.md#digits-runs: which command and commit made it):
# sample.py, evaluate.py and app.py work right after the install, with no training
DEFAULT_WEIGHTS = "weights/digits.safetensors"
# weights a user downloaded into the folder they run from, as the original conditional-VDVAE repository has its users
# do ("put weights.pt in the folder, run python sample.py"): with no --weights they come first, the shipped model next
LOCAL_WEIGHTS = "./weights.pt"


def default_weights() -> tuple[str, str]:
    """The weights a command loads when no --weights is given, and why: ``./weights.pt`` in the current folder when
    there is one (recognised by its content, whatever it holds: models.weights_format), else the shipped model."""
    local = Path(LOCAL_WEIGHTS)
    if local.exists() or local.is_symlink():  # a dangling link too: loading it says it does not exist
        return LOCAL_WEIGHTS, "no --weights given"
    return DEFAULT_WEIGHTS, f"the shipped digits model: no --weights given and no {LOCAL_WEIGHTS} here"


def resolve_weights_flag(args: argparse.Namespace) -> str:
    """Fill in ``args.weights`` when it was not given (``default_weights``), saying on stdout which file that is,
    in one line; returns it."""
    if args.weights is None:
        args.weights, why = default_weights()
        print(f"weights: {args.weights} ({why})", flush=True)
    return args.weights


def checkpoint_script_parser(description: str) -> CliParser:
    """A parser with the flags every script that reads a checkpoint shares."""
    return add_checkpoint_flags(CliParser(description=description,
                                          formatter_class=argparse.RawDescriptionHelpFormatter))


def add_checkpoint_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--weights", default=None, help="a checkpoint file, a run folder, an exported .safetensors file, "
                   f"or hf:ORG/NAME on the Hugging Face hub (default: {LOCAL_WEIGHTS} when the current folder has "
                   f"one, else the digits model shipped in {DEFAULT_WEIGHTS})")
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


def _refuse_unwritable(folder: Path, refusal: str) -> None:
    """``refusal`` as a UserError, with the reason, when ``folder`` (existing or to be made) could not take a file."""
    base = _nearest_existing(folder)
    reason = f"{base} is a file, not a folder" if not base.is_dir() else _cannot_create_in(base)
    if reason:
        raise UserError(f"{refusal}: {reason}")


def check_output_file(path, parent_must_exist: bool = False) -> Path:
    """Refuse, before any work, a file that could not be written later: a folder in its place, a file where its
    folder should be, or a place no file can be created in. Creates nothing (its missing folders are made when it
    is written, unless ``parent_must_exist``)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"cannot write {path}: a folder of that name exists")
    if parent_must_exist and not path.parent.is_dir():
        raise UserError(f"cannot write {path}: no folder {path.parent}")
    _refuse_unwritable(path.parent, f"cannot write {path}")
    return path


def check_output_folder(path, flag: str, empty: bool = False) -> Path:
    """Refuse, before any work, a folder that could not be written into later (with ``empty``, also one that
    already holds files). Creates nothing."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (empty and any(path.iterdir()))):
        if empty:
            raise UserError(f"{flag} {path} already exists and is not an empty folder: name a new one")
        raise UserError(f"cannot create {flag} {path}: a file of that name exists")
    _refuse_unwritable(path, f"cannot create {flag} {path}")
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


SOLO_WAIT_S = 3 * 3600  # how long the other ranks wait while one works alone: see Dist.solo_group
DIST_TIMEOUT_S = 1800  # --dist_timeout's default: a collective of the training loop (NCCL's own default is 600 s)


def raise_recompile_limit(limit: int) -> None:
    """Let dynamo keep at least ``limit`` compiled entries of one function before it falls back to eager
    (its ``recompile_limit``, which older torch releases call ``cache_size_limit``)."""
    import torch

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


class Dist:
    """Where this process stands in a torchrun job (rank 0 of 1 without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self._solo_group = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def solo_group(self):
        """A gloo group whose collectives wait up to SOLO_WAIT_S, for the waits on work that one process does
        alone while the others stand idle: rank 0's speed probe, which may compile the model cold (470 s for the
        cifar10 blocks on a CPU), a node's first process downloading or converting a dataset, rank 0's closing
        samples. In the default group they would fail at its timeout (NCCL's: 10 minutes). Created at first use,
        which every rank reaches at the same collective."""
        if self._solo_group is None:
            import datetime

            import torch.distributed as dist

            self._solo_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=SOLO_WAIT_S))
        return self._solo_group

    def broadcast(self, value, solo: bool = False):
        """Rank 0's ``value`` on every rank (any picklable object); ``solo``: rank 0 computes it alone first, so
        the others wait in solo_group."""
        if self.world > 1:
            import torch.distributed as dist

            box = [value]
            dist.broadcast_object_list(box, src=0, group=self.solo_group() if solo else None)
            value = box[0]
        return value

    def barrier(self, solo: bool = False) -> None:
        """Wait until every rank reaches this point (a no-op in one process); ``solo``: some rank works alone
        before it, so the wait is solo_group's."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier(group=self.solo_group() if solo else None)

    def all_reduce(self, tensor, op: str = "sum"):
        """In-place sum or max over ranks (a no-op in one process)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor


def init_distributed(device_name: str, timeout_s: float = DIST_TIMEOUT_S):
    """torchrun's environment -> (Dist, device): NCCL with one GPU per process, gloo on the CPU, whose collectives
    fail after ``timeout_s``. Without torchrun (WORLD_SIZE unset or 1): one process on ``pick_device(device_name)``."""
    import datetime

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
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
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
        dist.barrier(solo=True)
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
