"""Checkpoint files: one plain dict written atomically and loaded without running pickled code, the copies a run
keeps, the candidates a resume falls back through, and the lock that keeps one trainer per run folder."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from utils import UserError

CHECKPOINT_FORMAT = "vdvae-checkpoint-1"


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
