"""Datasets as uint8 tensors (N, C, H, W) in 0..255 with integer labels, plus seeded batching.

- ``cifar10``: the official python pickle batches, downloaded by torchvision into ``data_root`` when
  absent. Train 45,000 / validation 5,000 (openai/vdvae's split, seed 11172018) / test = the 10,000
  official test images.
- ``digits``: scikit-learn's bundled 8x8 digits (17 grey levels 0..16, written as round(v * 255 / 16)),
  a stratified 80/20 train/test split with seed 0; the test split doubles as the validation split.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from utils import UserError

DATASETS = ("cifar10", "digits")


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    """The splits of one dataset and what it describes about itself."""

    train: Split
    valid: Split
    test: Split
    class_names: list[str]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]


def load_data(name: str, data_root: str) -> Data:
    """Load dataset ``name`` (one of DATASETS)."""
    if name == "cifar10":
        return load_cifar10(Path(data_root))
    if name == "digits":
        return load_digits()
    raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_SPLIT_SEED = 11172018
CIFAR10_VALID = 5000


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as err:
        raise UserError(f"cannot read CIFAR-10 file {path}: {err}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise UserError(f"CIFAR-10 file {path} is not in the python batch format: {err}") from None
    return images, labels


def _ensure_cifar10(root: Path) -> Path:
    folder = root / CIFAR10_FOLDER
    needed = CIFAR10_TRAIN_FILES + [CIFAR10_TEST_FILE, "batches.meta"]
    if all((folder / f).is_file() for f in needed):
        return folder
    try:
        import torchvision

        torchvision.datasets.CIFAR10(str(root), train=True, download=True)
    except Exception as err:  # noqa: BLE001 - any download failure means the same thing to the user
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"CIFAR-10 is not in {folder} and could not be downloaded ({reason}); put "
                        f"cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, extracted, "
                        f"at {folder}") from None
    return folder


def load_cifar10(root: Path) -> Data:
    """CIFAR-10 from the official python batches (downloading them into ``root`` when absent)."""
    folder = _ensure_cifar10(root)
    parts = [_read_cifar_batch(folder / f) for f in CIFAR10_TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    meta = _read_pickle(folder / "batches.meta")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", [])]
    if len(names) != 10:
        raise UserError(f"{folder / 'batches.meta'} should name 10 classes, found {len(names)}")
    order = np.random.RandomState(CIFAR10_SPLIT_SEED).permutation(len(train_x))
    n_valid = min(CIFAR10_VALID, len(train_x) // 10)  # 5,000 of the real 50,000; a tenth of a small test set
    tr, va = order[:-n_valid], order[-n_valid:]
    t = torch.from_numpy
    return Data(train=Split(t(train_x[tr]), t(train_y[tr])), valid=Split(t(train_x[va]), t(train_y[va])),
                test=Split(t(test_x), t(test_y)), class_names=names)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------

DIGITS_SPLIT_SEED = 0


def load_digits() -> Data:
    """The 1,797 8x8 digits: stratified 80/20 split (seed 0), 17 grey levels stored as 0..255."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    levels = bunch.images.astype(np.float64)  # 0..16
    images = np.round(levels * 255.0 / 16.0).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                           random_state=DIGITS_SPLIT_SEED)
    t = torch.from_numpy
    train = Split(t(images[idx_train]), t(labels[idx_train]))
    test = Split(t(images[idx_test]), t(labels[idx_test]))
    return Data(train=train, valid=test, test=test, class_names=[str(d) for d in range(10)])


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def epoch_batches(split: Split, batch_size: int, seed: int, epoch: int, start: int = 0, rank: int = 0,
                  world: int = 1, accum: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches of one epoch; the order depends only on (seed, epoch), so a resumed run
    can skip the ``start`` batches it has already seen and continue with exactly the same data.

    A global batch (B = batch_size * world * accum images) is cut into world * accum shards of batch_size;
    shard s = k * world + rank is what ``rank`` feeds its k-th accumulation pass. Each yield is this rank's
    ``accum`` shards in order (accum * batch_size images): together the ranks and passes see exactly what one
    process with batch B would."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(split), generator=gen)
    global_batch = batch_size * world * accum
    for i in range(start, len(split) // global_batch):
        shards = order[i * global_batch:(i + 1) * global_batch].view(accum, world, batch_size)
        idx = shards[:, rank].reshape(-1).to(split.images.device)
        yield split.images[idx], split.labels[idx]


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(split), batch_size):
        yield split.images[i:i + batch_size], split.labels[i:i + batch_size]


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator | None = None,
                 shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels in x and y, filling with zeros (black). With
    ``shard = (index, count)`` the offsets are slice ``index`` of those drawn for ``count`` such batches (one
    global batch cut into shards: see epoch_batches)."""
    if max_shift <= 0:
        return images
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    index, count = shard
    offsets = torch.randint(0, 2 * max_shift + 1, (n * count, 2), generator=generator,
                            device=images.device)[index * n:(index + 1) * n]
    rows = (offsets[:, 0, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (offsets[:, 1, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch_idx = torch.arange(n, device=images.device)[:, None, None, None]
    chan_idx = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch_idx, chan_idx, rows, cols]
