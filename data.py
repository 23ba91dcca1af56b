"""Datasets as uint8 images (N, C, H, W) in 0..255 with labels, plus seeded batching.

Every loader reads the dataset's own on-disk files; missing or damaged files are a one-line UserError that
says where the files go. Splits are train / validation / test; "seeded" hold-outs use a fixed
RandomState permutation, so every run, process and machine sees the same split. Where the real dataset is
tiny (tests), a hold-out of K images becomes a tenth of the training images (at least one).

- ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}`` (python pickles), downloaded
  by torchvision when absent. Train 45,000 / validation 5,000 (openai/vdvae's split, seed 11172018) / test =
  the 10,000 official test images. 10 named classes, int64 labels.
- ``cifar100``: ``cifar-100-python/{train,test,meta}`` (pickles; ``fine_labels``), torchvision download. The
  same 45,000 / 5,000 (seed 11172018) / 10,000 scheme; 100 named fine classes, int64 labels.
- ``mnist``: the idx files ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` (torchvision's
  layout and download). 28x28 zero-padded to 32x32 (1 channel, 8-bit; binarizing is the trainer's job).
  Train 55,000 / validation 5,000 (seed 0) / test = the 10,000 official test images; classes "0".."9".
- ``fashion_mnist`` (aliases ``fashion-mnist``, ``fmnist``): Fashion-MNIST (Xiao et al. 2017), the same four idx
  files in ``FashionMNIST/raw/``; when they are not there, those of Debian's package dataset-fashion-mnist
  (``/usr/share/datasets/fashion-mnist``, a note says so), else torchvision's download. Padded to 32x32 like MNIST;
  train 55,000 / validation 5,000 (seed 0) / test = the 10,000 official test images; the ten official class names
  ("T-shirt/top", "Trouser", ..., "Ankle boot").
- ``svhn``: ``svhn/{train,test}_32x32.mat`` (MATLAB v5; X (32, 32, 3, N), y (N, 1) with 10 meaning digit 0),
  torchvision download; the files may also sit in ``data_root`` itself. Train 68,257 / validation 5,000
  (seed 0) / test = the 26,032 official test images; classes "0".."9" (``extra_32x32.mat`` is not used).
- ``celeba64``: ``celeba/img_align_celeba/*.jpg`` with ``celeba/list_attr_celeba.txt`` and
  ``celeba/list_eval_partition.txt`` (torchvision download, else by hand). The usual VAE CelebA-64 protocol:
  centre crop 148x148, resize to 64x64. The official partition: 162,770 / 19,867 / 19,962. Labels are the 40
  attributes as float32 multi-hot (N, 40) (``Data.multi_label``); class names are the attribute names.
  Images are decoded when indexed (a lazy ``ImageFiles``).
- ``imagenet32``, ``imagenet64``: downsampled ImageNet (Chrabaszcz et al. 2017) ``train_data_batch_1..10.npz``
  and ``val_data.npz`` (``data`` (N, 3*S*S) channel-major, ``labels`` 1..1000) in ``data_root/imagenet32``
  (resp. 64) or ``data_root``; no download (it needs an image-net.org account). Converted once into uint8
  ``.npy`` caches beside them and memory-mapped (a lazy ``MappedImages``). Train 1,276,167 / validation 5,000
  (seed 42, as openai/vdvae) / test = the 50,000 official validation images. 1,000
  classes named "0".."999" (or by ``map_clsloc.txt`` when present), int64 labels.
- ``ffhq256``, ``ffhq1024``: the 70,000 FFHQ PNGs under ``data_root/ffhq256`` (resp. ffhq1024) or ``data_root``
  (recursively, sorted by file name), resized to ``size`` (default 256 / 1024) when they differ; lazy
  ``ImageFiles``. Unconditional (no classes, int64 zero labels). The test split is openai/vdvae's held-out set:
  FFHQ-256 holds out 7,000 at random (seed 5) and FFHQ-1024 the last 5,000 by file number (65000..69999), and
  vdvae reports its figures on those. Validation (what training monitors) is a seeded 1,000 of the remaining
  training images (seed 1; a tenth, at least one, of small folders), so the test images stay unseen.
  vdvae's ``ffhq-256.npy`` (N, 256, 256, 3) is also accepted for ffhq256 at size 256 (memory-mapped).
- ``folder``: any image folder (PNG, JPEG, BMP, WebP, GIF, TIFF, PPM/PGM), images centre-cropped to a square
  and resized to ``size`` (default: the first image's shorter side); grey when the first image is grey.
  Sub-folders with images are classes (sorted, like torchvision's ImageFolder), else unconditional. Test = a
  seeded 10% (seed 0, at least one image), validation = a seeded 10% of the rest (seed 1), unless the folder has
  ``train/`` and ``test/`` sub-folders: then those, with ``valid/`` (or ``val/``) as validation when present,
  else a seeded 10% of ``train/``. The first image decides the channels (grey or RGB) and the default size.
- ``digits``: scikit-learn's bundled 8x8 digits (17 grey levels 0..16, written as round(v * 255 / 16)),
  a stratified 80/20 train/test split with seed 0 (the 360 test images), and a stratified 10% of the training
  images as validation (seed 1): 1,293 train / 144 validation / 360 test.

``load_data_for(H)`` is what the entry points call: the dataset at the size the model's decoder ends at, with
held-out splits binarized once for ``--likelihood bernoulli`` (``binarize`` draws the training images' fresh
binarization every step).
"""
from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
import threading
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from hps import DATASET_SHAPES, canonical_dataset, parse_layer_string
from utils import UserError

DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "celeba64", "imagenet32", "imagenet64", "ffhq256",
            "ffhq1024", "folder", "digits")


# ---------------------------------------------------------------------------------------------
# Lazy images: decoded or copied only for the rows a batch asks for
# ---------------------------------------------------------------------------------------------


class LazyImages:
    """A uint8 (N, C, H, W) image array whose rows are produced on indexing (``images[idx]``, ``images[a:b]``)."""

    dtype = torch.uint8
    device = torch.device("cpu")

    def __init__(self, shape: tuple[int, int, int, int]):
        self.shape = torch.Size(shape)

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        """The images at positions ``rows`` (int64, each in range) as a uint8 array (len(rows), C, H, W)."""
        raise NotImplementedError

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def dim(self) -> int:
        return 4

    def __getitem__(self, key) -> torch.Tensor:
        rest = ()
        if isinstance(key, tuple):  # images[i, c, y, x]: rows first, then the tensor does the rest
            key, rest = key[0], key[1:]
        if isinstance(key, slice):
            rows = np.arange(len(self), dtype=np.int64)[key]
        else:
            if isinstance(key, torch.Tensor):
                key = key.cpu().numpy()
            if np.asarray(key).dtype == bool:
                raise TypeError("lazy images take integer indices or a slice, not a mask")
            rows = np.asarray(key, dtype=np.int64)
        single = rows.ndim == 0
        rows = rows.reshape(-1)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        out = torch.from_numpy(self._rows(np.where(rows < 0, rows + len(self), rows)))
        out = out[0] if single else out
        return out[rest] if rest else out

    def to(self, device, *args, **kwargs) -> torch.Tensor:
        """All the images, loaded, as a tensor on ``device`` (only for splits that fit in memory)."""
        return self[:].to(device, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.shape)})"


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads that decode a batch's image files (PIL releases the GIL while decoding and resizing)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="decode")
        return _POOL


GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _decode(path: Path, size: int, channels: int, crop: int | None) -> np.ndarray:
    """One image file as uint8 (C, size, size): centre crop (to ``crop``, else the largest square), then resize."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"cannot read image {path}: {_reason(err)}") from None
    w, h = im.size
    side = min(w, h) if crop is None else crop
    if side > min(w, h):
        raise UserError(f"image {path} is {w}x{h}, smaller than the {side}x{side} centre crop")
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if side != size:
        im = im.resize((size, size), Image.Resampling.BILINEAR)  # antialiased, like torchvision's Resize
    pixels = np.asarray(im, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


class ImageFiles(LazyImages):
    """Image files decoded when indexed, in a small thread pool: centre-cropped (to ``crop`` pixels, else to the
    largest square) and resized to ``size``, as 1 (grey) or 3 (RGB) channels.

    A file that cannot be decoded (damaged after the start-up check, or truncated past its header) does not end
    the run: the next file of the same class (of any class when none is left) stands in for it, and it is listed
    in ``skipped`` for the log."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int = 3, crop: int | None = None,
                 labels: Sequence[int] | None = None):
        super().__init__((len(paths), channels, size, size))
        self.paths = [Path(p) for p in paths]
        self.size, self.channels, self.crop = size, channels, crop
        self.labels = list(labels) if labels is not None else None
        self.skipped: list[Path] = []
        self._skipped_lock = threading.Lock()

    def _one(self, row: int) -> np.ndarray:
        n = len(self.paths)
        order = [r % n for r in range(row, row + n)]
        if self.labels is not None:  # the same class first; any image when none of its class is left
            order = ([r for r in order if self.labels[r] == self.labels[row]] +
                     [r for r in order if self.labels[r] != self.labels[row]])
        for candidate in order:
            try:
                return _decode(self.paths[candidate], self.size, self.channels, self.crop)
            except UserError:
                with self._skipped_lock:
                    if self.paths[candidate] not in self.skipped:
                        self.skipped.append(self.paths[candidate])
        raise UserError(f"no image of {self.paths[row].parent} like {self.paths[row].name} can be decoded "
                        f"({len(self.skipped)} unreadable files)")

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)
        images = map(self._one, rows.tolist()) if len(rows) <= 1 else _pool().map(self._one, rows.tolist())
        for i, image in enumerate(images):
            out[i] = image
        return out


class MappedImages(LazyImages):
    """Rows ``rows`` of a memory-mapped uint8 array (M, C, H, W), or (M, H, W, C) with ``channels_last``; only
    the indexed rows are read from disk."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, channels_last: bool = False):
        _, *shape = array.shape
        c, h, w = (shape[2], shape[0], shape[1]) if channels_last else shape
        super().__init__((len(rows), c, h, w))
        self.array, self.rows, self.channels_last = array, np.asarray(rows, dtype=np.int64), channels_last

    def _rows(self, rows: np.ndarray) -> np.ndarray:
        wanted = self.rows[rows]
        order = np.argsort(wanted, kind="stable")  # read the file front to back, then put rows back in order
        out = np.empty((len(rows), *self.array.shape[1:]), dtype=np.uint8)
        out[order] = self.array[wanted[order]]
        return np.ascontiguousarray(out.transpose(0, 3, 1, 2)) if self.channels_last else out


@dataclass
class Split:
    images: torch.Tensor | LazyImages  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,), or float32 (N, A) multi-hot for multi-label data

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    """The splits of one dataset and what it describes about itself."""

    train: Split
    valid: Split
    test: Split
    class_names: list[str]
    multi_label: bool = False  # labels are (N, len(class_names)) float32 multi-hot attributes
    notes: list[str] = field(default_factory=list)  # what loading found worth a line in the run's log

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.train.images.shape[1]


def load_data(name: str, data_root: str, size: int | None = None) -> Data:
    """Load dataset ``name`` (one of DATASETS, or an alias: hps.DATASET_ALIASES); ``size`` is the image size for
    folder and FFHQ datasets."""
    root = Path(data_root)
    name = canonical_dataset(name)
    if size is not None and size < 1:
        raise UserError(f"image size must be positive, got {size}")
    loaders: dict[str, Callable[[], Data]] = {
        "cifar10": lambda: load_cifar10(root),
        "cifar100": lambda: load_cifar100(root),
        "mnist": lambda: load_mnist(root),
        "fashion_mnist": lambda: load_fashion_mnist(root),
        "svhn": lambda: load_svhn(root),
        "celeba64": lambda: load_celeba64(root),
        "imagenet32": lambda: load_imagenet(root, 32),
        "imagenet64": lambda: load_imagenet(root, 64),
        "ffhq256": lambda: load_ffhq(root, 256, size),
        "ffhq1024": lambda: load_ffhq(root, 1024, size),
        "folder": lambda: load_folder(root, size),
        "digits": load_digits,
    }
    if name not in loaders:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    return loaders[name]()


# ---------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------


def _reason(err: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _download(what: str, folder: Path, fetch: Callable[[], object], manual: str) -> None:
    """Run a torchvision download; any failure becomes one line saying where to put the files by hand, and
    leaves nothing behind: the folders it created and the partial files it wrote beside ``folder`` are removed."""
    base = Path(os.path.abspath(folder)).parent  # torchvision writes into the folder or, for CIFAR, beside it
    while not base.exists():
        base = base.parent
    watched = [p for p in (base, Path(folder)) if p.is_dir()]
    before = {p for w in watched for p in w.iterdir()}
    try:
        fetch()
    except Exception as err:  # noqa: BLE001 - any download failure means the same thing to the user
        for path in {p for w in watched if w.is_dir() for p in w.iterdir()} - before:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() and not path.is_symlink() else path.unlink()
        raise UserError(f"{what} is not in {folder} and could not be downloaded ({_reason(err)}); {manual}") from None


def _missing(folder: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if not (folder / n).is_file()]


def _holdout(n: int, n_valid: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation rows: the last ``n_valid`` of a seeded permutation of ``n`` (a tenth, at least one,
    when ``n`` is too small to spare ``n_valid``)."""
    if n < 2:
        raise UserError(f"need at least 2 training images to hold some out for validation, found {n}")
    n_valid = min(n_valid, max(1, n // 10))
    order = np.random.RandomState(seed).permutation(n)
    return order[:n - n_valid], order[n - n_valid:]


VALID_SPLIT_SEED = 1  # the validation images carved from a training set whose dataset has no validation split


def _carve_validation(rows: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows and validation rows: ``cap`` of ``rows`` at random (a tenth, at least one, when fewer can be
    spared), so that training is monitored on images that are neither trained on nor the test split."""
    tr, va = _holdout(len(rows), cap, VALID_SPLIT_SEED)
    return np.sort(rows[tr]), np.sort(rows[va])


def _in_memory(train: tuple[np.ndarray, np.ndarray], rows: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray], class_names: list[str]) -> Data:
    """Data from in-memory arrays: train rows ``rows[0]``, validation rows ``rows[1]``, the test arrays whole."""
    (x, y), (tr, va), t = train, rows, torch.from_numpy
    return Data(train=Split(t(x[tr]), t(y[tr])), valid=Split(t(x[va]), t(y[va])),
                test=Split(t(np.ascontiguousarray(test[0])), t(test[1])), class_names=class_names)


def _check_labels(labels: np.ndarray, n_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise UserError(f"{path} has labels outside 0..{n_classes - 1} (found {labels.min()}..{labels.max()})")


def _names(values) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


# ---------------------------------------------------------------------------------------------
# CIFAR-10 and CIFAR-100
# ---------------------------------------------------------------------------------------------

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_TEST_FILE = "test_batch"
CIFAR10_SPLIT_SEED = 11172018
CIFAR10_VALID = 5000
CIFAR100_FOLDER = "cifar-100-python"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


# What the CIFAR python pickles hold (dicts, lists, bytes, numbers and numpy arrays) and nothing else: a crafted file in
# --data_root cannot name a callable such as os.system. numpy 2 renamed numpy.core to numpy._core.
_PICKLE_GLOBALS = {
    **{(module, name): None for module in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
    **{(module, "_frombuffer"): None for module in ("numpy.core.numeric", "numpy._core.numeric")},  # protocol 5
    ("numpy", "ndarray"): None, ("numpy", "dtype"): None, ("_codecs", "encode"): None,
}


class _DatasetUnpickler(pickle.Unpickler):
    """An unpickler that admits only the types dataset batch files are made of."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: dataset files hold only arrays and "
                                         f"plain values")
        return super().find_class(module, name)


def _read_pickle(path: Path, what: str = "CIFAR-10") -> dict:
    try:
        with open(path, "rb") as fh:
            content = _DatasetUnpickler(fh, encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - unpickling damaged bytes can raise almost anything
        raise UserError(f"cannot read {what} file {path}: {_reason(err)}") from None
    if not isinstance(content, dict):
        raise UserError(f"{what} file {path} holds a {type(content).__name__}, not the python batch dictionary")
    return content


def _read_cifar_batch(path: Path, label_key: bytes = b"labels", what: str = "CIFAR-10"
                      ) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path, what)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as err:
        raise UserError(f"{what} file {path} is not in the python batch format: {_reason(err)}") from None
    if len(images) != len(labels):
        raise UserError(f"{what} file {path} has {len(images)} images but {len(labels)} labels")
    return images, labels


def _ensure_cifar(root: Path, folder_name: str, files: list[str], name: str, archive: str) -> Path:
    """The extracted CIFAR folder in ``root``, downloaded there through torchvision when files are missing."""
    folder = root / folder_name
    if not _missing(folder, files):
        return folder
    import torchvision

    dataset = torchvision.datasets.CIFAR10 if name == "CIFAR-10" else torchvision.datasets.CIFAR100
    _download(name, folder, lambda: dataset(str(root), train=True, download=True),
              f"put {archive} from {CIFAR_URL}, extracted, at {folder}")
    return folder


def load_cifar10(root: Path) -> Data:
    """CIFAR-10 from the official python batches (downloading them into ``root`` when absent)."""
    folder = _ensure_cifar(root, CIFAR10_FOLDER, CIFAR10_TRAIN_FILES + [CIFAR10_TEST_FILE, "batches.meta"],
                           "CIFAR-10", "cifar-10-python.tar.gz")
    parts = [_read_cifar_batch(folder / f) for f in CIFAR10_TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    names = _names(_read_pickle(folder / "batches.meta").get(b"label_names", []))
    if len(names) != 10:
        raise UserError(f"{folder / 'batches.meta'} should name 10 classes, found {len(names)}")
    _check_labels(np.concatenate([train_y, test_y]), 10, folder)
    rows = _holdout(len(train_x), CIFAR10_VALID, CIFAR10_SPLIT_SEED)  # 5,000 of 50,000, as openai/vdvae
    return _in_memory((train_x, train_y), rows, (test_x, test_y), names)


def load_cifar100(root: Path) -> Data:
    """CIFAR-100 (fine labels) from the official python pickles, split 45,000 / 5,000 / 10,000 like CIFAR-10."""
    folder = _ensure_cifar(root, CIFAR100_FOLDER, ["train", "test", "meta"], "CIFAR-100", "cifar-100-python.tar.gz")
    train_x, train_y = _read_cifar_batch(folder / "train", b"fine_labels", "CIFAR-100")
    test_x, test_y = _read_cifar_batch(folder / "test", b"fine_labels", "CIFAR-100")
    names = _names(_read_pickle(folder / "meta", "CIFAR-100").get(b"fine_label_names", []))
    if len(names) != 100:
        raise UserError(f"{folder / 'meta'} should name 100 fine classes, found {len(names)}")
    _check_labels(np.concatenate([train_y, test_y]), 100, folder)
    rows = _holdout(len(train_x), CIFAR10_VALID, CIFAR10_SPLIT_SEED)
    return _in_memory((train_x, train_y), rows, (test_x, test_y), names)


# ---------------------------------------------------------------------------------------------
# MNIST and Fashion-MNIST: the same four idx files of 28x28 grey images in ten classes
# ---------------------------------------------------------------------------------------------

MNIST_FILES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
               "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}  # Fashion-MNIST's names too
MNIST_SPLIT_SEED = 0
MNIST_VALID = 5000
FASHION_MNIST_SPLIT_SEED = 0
FASHION_MNIST_VALID = 5000
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]  # the official names of labels 0..9
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # Debian's package dataset-fashion-mnist (.gz files)


@dataclass(frozen=True)
class IdxDataset:
    """What sets one dataset of the four idx files apart from another."""

    name: str  # its key in DATASET_SHAPES
    title: str  # how messages name it
    folder: str  # torchvision's: the files are in root/<folder>/raw
    class_names: tuple[str, ...]
    n_valid: int  # validation images carved from the training images, with seed ``seed``
    seed: int
    mirror: str  # where the files can be fetched by hand
    installed: Path | None = None  # a system folder that may hold the files (a distribution's package)
    package: str = ""  # the package that fills ``installed``


MNIST = IdxDataset("mnist", "MNIST", "MNIST", tuple(str(d) for d in range(10)), MNIST_VALID, MNIST_SPLIT_SEED,
                   "torchvision's mirror https://ossci-datasets.s3.amazonaws.com/mnist/")
FASHION_MNIST = IdxDataset("fashion_mnist", "Fashion-MNIST", "FashionMNIST", tuple(FASHION_MNIST_CLASSES),
                           FASHION_MNIST_VALID, FASHION_MNIST_SPLIT_SEED,
                           "https://github.com/zalandoresearch/fashion-mnist", FASHION_MNIST_DEBIAN,
                           "dataset-fashion-mnist")


def _read_idx(path: Path, ndim: int, what: str = "MNIST") -> np.ndarray:
    """An idx file of unsigned bytes (magic 0x0000 08 ``ndim``, then ``ndim`` big-endian int32 sizes), or .gz."""
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError, ValueError, zlib.error) as err:  # zlib.error: damaged compressed data
        raise UserError(f"cannot read {what} file {path}: {_reason(err)}") from None
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        raise UserError(f"{what} file {path} is not an idx file of bytes with {ndim} dimensions (bad magic number)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise UserError(f"{what} file {path} holds {len(raw) - header} bytes of data, its header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_paths(folder: Path) -> dict[str, Path] | None:
    """The four idx files in ``folder`` (each plain or .gz), or None when any is missing."""
    paths = {}
    for key, name in MNIST_FILES.items():
        found = [folder / n for n in (name, name + ".gz") if (folder / n).is_file()]
        if not found:
            return None
        paths[key] = found[0]
    return paths


def _idx_files(root: Path, spec: IdxDataset, notes: list[str]) -> dict[str, Path]:
    """The four idx files: in ``root/<folder>/raw``; else in the system folder a package fills (with a note);
    else downloaded there through torchvision. Offline with neither, one line names every way to get them."""
    folder = root / spec.folder / "raw"
    paths = _mnist_paths(folder)
    if paths is not None:
        return paths
    installed = _mnist_paths(spec.installed) if spec.installed is not None else None
    if installed is not None:
        notes.append(f"{spec.title}: read from {spec.installed} (the Debian package {spec.package}), as "
                     f"{folder} does not hold the four idx files")
        return installed
    import torchvision

    dataset = getattr(torchvision.datasets, spec.folder)  # torchvision's class is named like its folder
    by_hand = f"put {', '.join(MNIST_FILES.values())} (or their .gz, e.g. from {spec.mirror}) in {folder}"
    if spec.package:
        by_hand = f"install the Debian package {spec.package} (files in {spec.installed}), or {by_hand}"
    _download(spec.title, folder, lambda: dataset(str(root), train=True, download=True), by_hand)
    paths = _mnist_paths(folder)
    if paths is None:
        raise UserError(f"{spec.title} download did not leave the idx files in {folder}")
    return paths


def _load_idx_dataset(root: Path, spec: IdxDataset) -> Data:
    """An idx dataset (see ``_idx_files`` for where its files are found), its 28x28 images zero-padded to 32x32;
    ``spec.n_valid`` training images (seed ``spec.seed``) are the validation split, the official test images the
    test split."""
    notes: list[str] = []
    paths = _idx_files(root, spec, notes)
    parts = {}
    for split in ("train", "test"):
        x = _read_idx(paths[f"{split}_x"], 3, spec.title)
        y = _read_idx(paths[f"{split}_y"], 1, spec.title).astype(np.int64)
        if x.shape[1:] != (28, 28) or len(x) != len(y):
            raise UserError(f"{spec.title} {split} files {paths[f'{split}_x']} {tuple(x.shape)} and "
                            f"{paths[f'{split}_y']} {tuple(y.shape)} are not N 28x28 images with N labels")
        _check_labels(y, len(spec.class_names), paths[f"{split}_y"])
        pad = DATASET_SHAPES[spec.name].pad  # the black border the likelihood leaves out: 32x32 like the others
        parts[split] = (np.pad(x, ((0, 0), (pad, pad), (pad, pad)))[:, None], y)
    rows = _holdout(len(parts["train"][0]), spec.n_valid, spec.seed)
    data = _in_memory(parts["train"], rows, parts["test"], list(spec.class_names))
    data.notes.extend(notes)
    return data


def load_mnist(root: Path) -> Data:
    """MNIST from the raw idx files in ``root/MNIST/raw`` (torchvision's layout; downloaded when absent),
    zero-padded from 28x28 to 32x32: train 55,000 / validation 5,000 (seed 0) / the 10,000 test images."""
    return _load_idx_dataset(root, MNIST)


def load_fashion_mnist(root: Path) -> Data:
    """Fashion-MNIST (Xiao et al. 2017) from the raw idx files in ``root/FashionMNIST/raw`` (torchvision's layout),
    else from Debian's package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist), else downloaded by
    torchvision; zero-padded from 28x28 to 32x32 like MNIST. Train 55,000 / validation 5,000 (seed 0, carved from
    the 60,000 training images) / the 10,000 official test images; the ten official class names."""
    return _load_idx_dataset(root, FASHION_MNIST)


# ---------------------------------------------------------------------------------------------
# SVHN
# ---------------------------------------------------------------------------------------------

SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")
SVHN_SPLIT_SEED = 0
SVHN_VALID = 5000


def _read_svhn(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A cropped-digits .mat file: X (32, 32, 3, N) uint8 -> (N, 3, 32, 32), y (N, 1) 1..10 -> 0..9."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as err:  # noqa: BLE001 - scipy raises many kinds of error for a damaged file
        raise UserError(f"cannot read SVHN file {path}: {_reason(err)}") from None
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise UserError(f"SVHN file {path} should hold X (32, 32, 3, N) and y (N, 1)")
    labels = y.reshape(-1).astype(np.int64)
    if len(labels) and (labels.min() < 1 or labels.max() > 10):
        raise UserError(f"SVHN file {path} has labels outside 1..10")
    labels[labels == 10] = 0  # SVHN writes the digit 0 as class 10
    return np.ascontiguousarray(x.astype(np.uint8).transpose(3, 2, 0, 1)), labels


def load_svhn(root: Path) -> Data:
    """SVHN cropped digits from ``root/svhn`` (or ``root``): train 68,257 / validation 5,000 (seed 0) / test."""
    folder = root / "svhn"
    if _missing(folder, SVHN_FILES) and not _missing(root, SVHN_FILES):
        folder = root
    if _missing(folder, SVHN_FILES):
        import torchvision

        def fetch() -> None:
            for split in ("train", "test"):
                torchvision.datasets.SVHN(str(folder), split=split, download=True)

        _download("SVHN", folder, fetch, f"put {' and '.join(SVHN_FILES)} from http://ufldl.stanford.edu/housenumbers/ "
                                         f"in {folder}")
    train, test = (_read_svhn(folder / f) for f in SVHN_FILES)
    rows = _holdout(len(train[0]), SVHN_VALID, SVHN_SPLIT_SEED)
    return _in_memory(train, rows, test, [str(d) for d in range(10)])


# ---------------------------------------------------------------------------------------------
# CelebA 64x64
# ---------------------------------------------------------------------------------------------

CELEBA_FOLDER = "celeba"
CELEBA_IMAGES = "img_align_celeba"
CELEBA_LISTS = ("list_attr_celeba.txt", "list_eval_partition.txt")
CELEBA_CROP, CELEBA_SIZE = 148, 64
CELEBA_URL = "https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html"


def _ensure_celeba(root: Path) -> Path:
    folder = root / CELEBA_FOLDER
    archive = folder / f"{CELEBA_IMAGES}.zip"
    if not (folder / CELEBA_IMAGES).is_dir() and archive.is_file():  # downloaded by hand, not yet unzipped
        try:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(folder)
        except (OSError, zipfile.BadZipFile) as err:
            raise UserError(f"cannot unzip {archive}: {_reason(err)}") from None
    if (folder / CELEBA_IMAGES).is_dir() and not _missing(folder, CELEBA_LISTS):
        return folder
    import torchvision

    _download("CelebA", folder,
              lambda: torchvision.datasets.CelebA(str(root), split="all", target_type="attr", download=True),
              f"torchvision's Google Drive download often hits its quota: download img_align_celeba.zip, "
              f"{' and '.join(CELEBA_LISTS)} by hand from {CELEBA_URL} and put them in {folder}")
    return folder


def _celeba_lines(path: Path) -> list[list[str]]:
    try:
        return [line.split() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read CelebA file {path}: {_reason(err)}") from None


def _read_celeba_attrs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """Attribute names, file names and the +1/-1 attribute table (N, A) of ``list_attr_celeba.txt``."""
    lines = _celeba_lines(path)
    bad = f"CelebA file {path} should be: the image count, the attribute names, then 'file.jpg' and +1/-1 values"
    if len(lines) < 2 or len(lines[0]) != 1 or not lines[0][0].isdigit():
        raise UserError(bad)
    names, rows = lines[1], lines[2:]
    if len(rows) != int(lines[0][0]) or any(len(r) != len(names) + 1 for r in rows):
        raise UserError(f"{bad} ({len(rows)} rows for a count of {lines[0][0]} and {len(names)} names)")
    try:
        values = np.array([r[1:] for r in rows], dtype=np.int64).reshape(len(rows), len(names))
    except ValueError:
        raise UserError(bad) from None
    if not np.isin(values, (-1, 1)).all():
        raise UserError(f"CelebA file {path} has attribute values other than 1 and -1")
    return names, [r[0] for r in rows], values


def load_celeba64(root: Path) -> Data:
    """CelebA at 64x64 by the usual VAE protocol (centre crop 148x148, resize to 64x64), decoded lazily; the
    official train / valid / test partition; labels are the 40 attributes as float32 multi-hot."""
    folder = _ensure_celeba(root)
    names, files, values = _read_celeba_attrs(folder / "list_attr_celeba.txt")
    partition = {}
    for row in _celeba_lines(folder / "list_eval_partition.txt"):
        if len(row) != 2 or row[1] not in ("0", "1", "2"):
            raise UserError(f"CelebA file {folder / 'list_eval_partition.txt'} should have lines 'file.jpg 0|1|2'")
        partition[row[0]] = int(row[1])
    unlisted = [f for f in files if f not in partition]
    if unlisted:
        raise UserError(f"{unlisted[0]} is in list_attr_celeba.txt but not in list_eval_partition.txt ({folder})")
    present = set(os.listdir(folder / CELEBA_IMAGES))
    absent = [f for f in files if f not in present]
    if absent:
        raise UserError(f"{len(absent)} CelebA images are missing from {folder / CELEBA_IMAGES} (first: {absent[0]})")
    part = np.array([partition[f] for f in files])
    labels = (values > 0).astype(np.float32)

    def split(which: int) -> Split:
        rows = np.flatnonzero(part == which)
        paths = [folder / CELEBA_IMAGES / files[r] for r in rows]
        return Split(ImageFiles(paths, CELEBA_SIZE, 3, crop=CELEBA_CROP), torch.from_numpy(labels[rows]))

    return Data(train=split(0), valid=split(1), test=split(2), class_names=names, multi_label=True)


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet (32x32, 64x64)
# ---------------------------------------------------------------------------------------------

IMAGENET_TRAIN_FILES = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
IMAGENET_TEST_FILE = "val_data.npz"
IMAGENET_SPLIT_SEED = 42
IMAGENET_VALID = 5_000  # openai/vdvae holds out 5,000 training images (seed 42); test = the official val set
IMAGENET_CLASSES = 1000


def _read_npz(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path) as npz:
            return npz[key]
    except KeyError:
        raise UserError(f"ImageNet file {path} has no {key!r} array") from None
    except Exception as err:  # noqa: BLE001 - zipfile and numpy raise many kinds of error for a damaged file
        raise UserError(f"cannot read ImageNet file {path}: {_reason(err)}") from None


def _imagenet_cache(folder: Path, name: str, part: str, sources: list[Path], size: int) -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """The memory-mapped uint8 images (N, 3, S, S) and 0-based labels of ``sources``, converted once into
    ``{name}_{part}_images.npy`` / ``_labels.npy`` beside them (the npz files are compressed and too big for RAM)."""
    images_path, labels_path = folder / f"{name}_{part}_images.npy", folder / f"{name}_{part}_labels.npy"
    if not (images_path.is_file() and labels_path.is_file()):
        _convert_npz(sources, images_path, labels_path, size)
    try:
        images = np.load(images_path, mmap_mode="r")
        labels = np.load(labels_path).astype(np.int64)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the cache {images_path} or {labels_path} ({_reason(err)}); delete both to "
                        f"convert the npz files again") from None
    if images.dtype != np.uint8 or images.shape[1:] != (3, size, size) or len(images) != len(labels):
        raise UserError(f"the cache {images_path} does not match {labels_path} or {size}x{size} images; delete "
                        f"both to convert the npz files again")
    return images, labels


def _convert_npz(sources: list[Path], images_path: Path, labels_path: Path, size: int) -> None:
    """Write the images of ``sources`` into one .npy (file by file, so only one npz is in memory at a time)."""
    labels = [_read_npz(p, "labels").reshape(-1).astype(np.int64) for p in sources]
    for path, lab in zip(sources, labels):
        _check_labels(lab - 1, IMAGENET_CLASSES, path)  # 1-based in the files
    partial, labels_partial = images_path.with_suffix(".partial.npy"), labels_path.with_suffix(".partial.npy")
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8,
                                        shape=(sum(map(len, labels)), 3, size, size))
        start = 0
        for path, lab in zip(sources, labels):
            data = _read_npz(path, "data")
            if data.dtype != np.uint8 or data.shape != (len(lab), 3 * size * size):
                raise UserError(f"ImageNet file {path} holds data {data.dtype} {tuple(data.shape)}, expected uint8 "
                                f"({len(lab)}, {3 * size * size}) for {size}x{size} images")
            out[start:start + len(lab)] = data.reshape(-1, 3, size, size)  # rows are R, then G, then B planes
            start += len(lab)
        out.flush()
        del out
        os.replace(partial, images_path)
        np.save(labels_partial, np.concatenate(labels) - 1)
        os.replace(labels_partial, labels_path)
    except OSError as err:
        raise UserError(f"cannot write the ImageNet cache {images_path}: {_reason(err)}") from None
    finally:  # an interrupted conversion leaves nothing that looks like a cache
        partial.unlink(missing_ok=True)
        labels_partial.unlink(missing_ok=True)


def _imagenet_class_names(folder: Path) -> list[str]:
    """Names from the devkit's ``map_clsloc.txt`` ('n02119789 1 kit_fox') when present, else "0".."999"."""
    names = [str(i) for i in range(IMAGENET_CLASSES)]
    path = folder / "map_clsloc.txt"
    if path.is_file():
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read ImageNet class names {path}: {_reason(err)}") from None
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and 1 <= int(parts[1]) <= IMAGENET_CLASSES:
                names[int(parts[1]) - 1] = parts[2]
    return names


def load_imagenet(root: Path, size: int) -> Data:
    """Downsampled ImageNet (Chrabaszcz et al. 2017) at ``size`` 32 or 64, memory-mapped from .npy caches:
    train 1,276,167 / validation 5,000 (seed 42, as openai/vdvae) / test = the 50,000 official validation images."""
    name = f"imagenet{size}"

    def ready(folder: Path) -> bool:
        caches = [folder / f"{name}_{part}_{kind}.npy" for part in ("train", "test") for kind in ("images", "labels")]
        cached = all(c.is_file() for c in caches)
        return cached or not _missing(folder, IMAGENET_TRAIN_FILES + [IMAGENET_TEST_FILE])

    folder = next((f for f in (root / name, root) if ready(f)), None)
    if folder is None:
        absent = _missing(root / name, IMAGENET_TRAIN_FILES + [IMAGENET_TEST_FILE])
        raise UserError(f"{name} is not in {root / name} (nor {root}; {absent[0]} is missing): put "
                        f"train_data_batch_1.npz .. train_data_batch_10.npz and {IMAGENET_TEST_FILE} there (the npz "
                        f"archives Imagenet{size}_train* and Imagenet{size}_val of 'Downsampled ImageNet' at "
                        f"https://image-net.org/download-images, which needs an account)")
    train_x, train_y = _imagenet_cache(folder, name, "train", [folder / f for f in IMAGENET_TRAIN_FILES], size)
    test_x, test_y = _imagenet_cache(folder, name, "test", [folder / IMAGENET_TEST_FILE], size)
    tr, va = (np.sort(r) for r in _holdout(len(train_x), IMAGENET_VALID, IMAGENET_SPLIT_SEED))  # sorted: disk order
    t = torch.from_numpy
    return Data(train=Split(MappedImages(train_x, tr), t(train_y[tr])),
                valid=Split(MappedImages(train_x, va), t(train_y[va])),
                test=Split(MappedImages(test_x, np.arange(len(test_x))), t(test_y)),
                class_names=_imagenet_class_names(folder))


# ---------------------------------------------------------------------------------------------
# Image folders: FFHQ and any folder
# ---------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
FFHQ_VALID = {256: 7000, 1024: 5000}  # openai/vdvae's held-out images: our test split
FFHQ_TRAIN_VALID = 1000  # validation images carved from the training images
FFHQ256_SPLIT_SEED = 5
FOLDER_SPLIT_SEED = 0


def _image_files(folder: Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files under ``folder`` (recursively, hidden ones skipped), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in extensions and not p.name.startswith(".")
                  and p.is_file())


def _unlabelled(n: int) -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int64)


def load_ffhq(root: Path, native: int, size: int | None = None) -> Data:
    """FFHQ from its PNGs (``root/ffhq{native}`` or ``root``, recursively), resized to ``size`` (default
    ``native``) when they differ, unconditional. openai/vdvae's splits: FFHQ-256 holds out 7,000 at random
    (seed 5), FFHQ-1024 the last 5,000 files (65000..69999): the test split, as vdvae reports its figures on
    those; validation is a seeded 1,000 of the other images."""
    size = size or native
    folder = root / f"ffhq{native}" if (root / f"ffhq{native}").is_dir() else root
    if native == 256 and size == 256:
        for candidate in (root / "ffhq256", root):
            if (candidate / "ffhq-256.npy").is_file():
                return _ffhq256_npy(candidate / "ffhq-256.npy")
    files = sorted(_image_files(folder, (".png",)), key=lambda p: (p.name, p))  # 00000.png .. 69999.png
    if not files:
        raise UserError(f"no FFHQ PNG images in {folder}: put the 70,000 images (images1024x1024 from "
                        f"https://github.com/NVlabs/ffhq-dataset) in {root / f'ffhq{native}'}")
    notes: list[str] = []
    files, _ = readable_images(files, [0] * len(files), folder, notes)
    if len(files) < 2:
        raise UserError(f"need at least 2 FFHQ images in {folder}, found {len(files)}")
    if len(files) < 3:
        raise UserError(f"need at least 3 FFHQ images in {folder} (train, validation, test), found {len(files)}")
    n_test = min(FFHQ_VALID[native], max(1, len(files) // 10))
    if native == 256:
        tr, te = (np.sort(r) for r in _holdout(len(files), n_test, FFHQ256_SPLIT_SEED))
    else:
        tr, te = np.arange(len(files) - n_test), np.arange(len(files) - n_test, len(files))
    tr, va = _carve_validation(tr, FFHQ_TRAIN_VALID)

    def split(rows: np.ndarray) -> Split:
        return Split(ImageFiles([files[r] for r in rows], size, 3), _unlabelled(len(rows)))

    return Data(train=split(tr), valid=split(va), test=split(te), class_names=[], notes=notes)


def _ffhq256_npy(path: Path) -> Data:
    """openai/vdvae's ``ffhq-256.npy`` (N, 256, 256, 3), memory-mapped, with vdvae's seed-5 split."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {_reason(err)}") from None
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != (256, 256, 3):
        raise UserError(f"{path} should hold uint8 images (N, 256, 256, 3), found {array.dtype} {array.shape}")
    if len(array) < 3:
        raise UserError(f"need at least 3 images in {path} (train, validation, test), found {len(array)}")
    tr, te = (np.sort(r) for r in _holdout(len(array), FFHQ_VALID[256], FFHQ256_SPLIT_SEED))
    tr, va = _carve_validation(tr, FFHQ_TRAIN_VALID)

    def split(rows: np.ndarray) -> Split:
        return Split(MappedImages(array, rows, channels_last=True), _unlabelled(len(rows)))

    return Data(train=split(tr), valid=split(va), test=split(te), class_names=[])


def _labelled_files(folder: Path, class_names: list[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of an image folder: one class per sub-folder holding images (sorted names), else all the
    images unlabelled; with ``class_names`` given, sub-folders must be among them."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    classes = [(d.name, files) for d in subdirs if (files := _image_files(d))]
    if not classes:
        if class_names:
            raise UserError(f"{folder} should hold its images in class sub-folders like the training folder's "
                            f"({', '.join(class_names[:3])}...)")
        files = _image_files(folder)
        return files, [0] * len(files), []
    names = class_names if class_names is not None else [n for n, _ in classes]
    index = {n: i for i, n in enumerate(names)}
    unknown = [n for n, _ in classes if n not in index]
    if unknown:
        raise UserError(f"class folder {folder / unknown[0]} has no counterpart among the training classes")
    files = [f for _, fs in classes for f in fs]
    labels = [index[n] for n, fs in classes for _ in fs]
    return files, labels, names


def readable_images(files: list[Path], labels: list[int], where: Path, notes: list[str]
                    ) -> tuple[list[Path], list[int]]:
    """The files whose image header PIL can read (a cheap check: the pixels are decoded only when trained on), with
    their labels; a note names the others. None readable: a one-line error, before any training."""
    from PIL import Image

    def readable(path: Path) -> bool:
        try:
            with Image.open(path) as im:
                return im.size[0] > 0 and im.size[1] > 0
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return False

    t0 = time.perf_counter()
    flags = list(_pool().map(readable, files)) if len(files) > 1 else [readable(f) for f in files]
    bad = [f for f, ok in zip(files, flags) if not ok]
    if len(bad) == len(files):
        raise UserError(f"none of the {len(files)} image files in {where} can be read (first: "
                        f"{', '.join(str(b) for b in bad[:3])})")
    seconds = time.perf_counter() - t0
    if bad:
        notes.append(f"warning: skipped {len(bad)} of {len(files)} image files in {where} that cannot be read "
                     f"(checked every header in {seconds:.1f} s): {', '.join(str(b) for b in bad[:5])}"
                     f"{' ...' if len(bad) > 5 else ''}")
    else:
        notes.append(f"checked the headers of {len(files)} image files in {where} in {seconds:.1f} s: all readable")
    return [f for f, ok in zip(files, flags) if ok], [label for label, ok in zip(labels, flags) if ok]


def _first_image(path: Path) -> tuple[int, int]:
    """The shorter side of an image and its channels (1 for grey modes, else 3)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return min(im.size), 1 if im.mode in GREY_MODES else 3
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {path}: {_reason(err)}") from None


def load_folder(folder: Path, size: int | None = None) -> Data:
    """Any image folder: centre-cropped squares resized to ``size`` (default: the first image's shorter side),
    classes from sub-folders; a seeded 10% validation split doubling as test, or the folder's train/ and test/
    (and valid/ or val/) sub-folders."""
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist")
    no_images = f"(extensions: {' '.join(IMAGE_EXTENSIONS)})"
    notes: list[str] = []
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        train_files, train_labels, names = _labelled_files(folder / "train")
        parts = {"train": (train_files, train_labels)}
        for part in ("test", "valid", "val"):
            if (folder / part).is_dir():
                files, labels, _ = _labelled_files(folder / part, names)
                parts[part] = (files, labels)
        for part, (files, labels) in parts.items():
            if not files:
                raise UserError(f"no images in {folder / part} {no_images}")
            parts[part] = readable_images(files, labels, folder / part, notes)
        train_files, train_labels = parts["train"]
        train_files, train_labels = parts["train"]
        pick = lambda rows, fs, ls: ([fs[r] for r in rows], [ls[r] for r in rows])  # noqa: E731
        if "valid" in parts or "val" in parts:
            splits = [parts["train"], parts.get("valid", parts.get("val")), parts["test"]]
        else:  # no valid/ or val/: a tenth of train/ monitors training, test/ stays unseen
            tr, va = _carve_validation(np.arange(len(train_files)), len(train_files))
            splits = [pick(tr, train_files, train_labels), pick(va, train_files, train_labels), parts["test"]]
    else:
        files, labels, names = _labelled_files(folder)
        if not files:
            raise UserError(f"no images in {folder} {no_images}")
        files, labels = readable_images(files, labels, folder, notes)
        if len(files) < 3:
            raise UserError(f"need at least 3 images in {folder} (train, validation, test), found {len(files)}")
        rest, te = (np.sort(r) for r in _holdout(len(files), len(files), FOLDER_SPLIT_SEED))  # a tenth, at least 1
        tr, va = _carve_validation(rest, len(rest))
        pick = lambda rows: ([files[r] for r in rows], [labels[r] for r in rows])  # noqa: E731
        splits = [pick(tr), pick(va), pick(te)]
    side, channels = _first_image(splits[0][0][0])
    size = size or side
    train, valid, test = (Split(ImageFiles(s[0], size, channels, labels=s[1] if names else None),
                                torch.tensor(s[1], dtype=torch.int64)) for s in splits)
    return Data(train=train, valid=valid, test=test, class_names=names, notes=notes)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------

DIGITS_SPLIT_SEED = 0


def load_digits() -> Data:
    """The 1,797 8x8 digits, 17 grey levels stored as 0..255: a stratified 80/20 train/test split (seed 0), then
    a stratified tenth of the training images as validation (seed 1): 1,293 / 144 / 360."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    levels = bunch.images.astype(np.float64)  # 0..16
    images = np.round(levels * 255.0 / 16.0).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=0.2, stratify=labels,
                                           random_state=DIGITS_SPLIT_SEED)
    idx_train, idx_valid = train_test_split(idx_train, test_size=0.1, stratify=labels[idx_train],
                                            random_state=VALID_SPLIT_SEED)

    def split(rows: np.ndarray) -> Split:
        return Split(torch.from_numpy(images[rows]), torch.from_numpy(labels[rows]))

    return Data(train=split(idx_train), valid=split(idx_valid), test=split(idx_test),
                class_names=[str(d) for d in range(10)])


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
    # the epoch's order crosses to the data's device once, so that a batch's indices are a slice already there: a
    # blocking copy of each batch's indices to a GPU made the host wait for the stream at every step
    order = _to_device(torch.randperm(len(split), generator=gen), split.images.device)
    global_batch = batch_size * world * accum

    def indices(i: int) -> torch.Tensor:
        shards = order[i * global_batch:(i + 1) * global_batch].view(accum, world, batch_size)
        return shards[:, rank].reshape(-1)

    yield from _ahead(split, (indices(i) for i in range(start, len(split) // global_batch)))


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device``; to a GPU through pinned memory, so that the copy does not make the host
    wait for the work already queued on the stream."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def eval_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, ``batch_size`` images at a time (the last batch may be smaller)."""
    yield from _ahead(split, (slice(i, i + batch_size) for i in range(0, len(split), batch_size)))


def _batch(split: Split, key) -> tuple[torch.Tensor, torch.Tensor]:
    return split.images[key], split.labels[key]


def _ahead(split: Split, keys: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``split[key]`` for each key; for lazy images the next batch is decoded in a background thread while
    the caller works on this one (tensors are indexed in place: nothing to overlap)."""
    if not isinstance(split.images, LazyImages):
        yield from (_batch(split, key) for key in keys)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as ahead:
        pending = None
        for key in keys:
            submitted = ahead.submit(_batch, split, key)
            if pending is not None:
                yield pending.result()
            pending = submitted
        if pending is not None:
            yield pending.result()


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


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Mirror each image left to right with probability 1/2 (Efficient-VDVAE's random horizontal flip). With
    ``shard = (index, count)`` the coin flips are slice ``index`` of those drawn for ``count`` such batches (see
    epoch_batches)."""
    n = len(images)
    index, count = shard
    flip = torch.rand(n * count, generator=generator, device=images.device)[index * n:(index + 1) * n] < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def drop_labels(labels: torch.Tensor, p: float, n_classes: int, generator: torch.Generator | None = None,
                shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Label dropout (classifier-free guidance's training, Ho and Salimans 2022): class indices (B,) as one-hot
    class weights (B, n_classes), each row replaced by the null label (all zeros: no class embedding, no class
    input) with probability ``p``. With ``shard = (index, count)`` the draws are slice ``index`` of those for
    ``count`` such batches (see epoch_batches), so ranks and accumulation passes drop what one process would."""
    n = len(labels)
    index, count = shard
    keep = torch.rand(n * count, generator=generator, device=labels.device)[index * n:(index + 1) * n] >= p
    one_hot = (labels.reshape(-1, 1) == torch.arange(n_classes, device=labels.device)).float()
    return one_hot * keep[:, None]


# ---------------------------------------------------------------------------------------------
# What a model's settings ask of its data: the size and binarization (hps.DATASET_SHAPES: the padding)
# ---------------------------------------------------------------------------------------------

BINARIZE_SEED = 0  # held-out binarized images are drawn once, the same for every run and evaluation


def binarize(images: torch.Tensor, generator: torch.Generator | None = None,
             shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Stochastic binarization: each pixel is 255 with probability value/255, else 0 (uint8). With ``shard =
    (index, count)`` the uniforms are slice ``index`` of those drawn for ``count`` such batches (see
    epoch_batches), so ranks and accumulation passes together draw what one process would."""
    index, count = shard
    n = len(images)
    u = torch.rand((n * count, *images.shape[1:]), generator=generator, device=images.device)[index * n:(index + 1) * n]
    return ((u * 255.0 < images.float()).to(torch.uint8)) * 255


def binarized(split: Split, seed: int = BINARIZE_SEED) -> Split:
    """One fixed binarization of a held-out split (the dynamically binarized MNIST protocol)."""
    images = binarize(split.images[:len(split)], torch.Generator().manual_seed(seed))
    return Split(images, split.labels)


def load_data_for(H, data_root: str | None = None) -> Data:
    """The data a model's settings describe: ``H.dataset`` from ``data_root`` (default ``H.data_root``), resized
    to the size its decoder ends at where the dataset allows, and, for ``--likelihood bernoulli``, with held-out
    splits binarized once (training images are binarized afresh every step by the trainer)."""
    size = max(res for res, _ in parse_layer_string(H.dec_blocks))
    data = load_data(H.dataset, data_root or H.data_root, size)
    if H.likelihood == "bernoulli":
        data = dataclasses.replace(data, valid=binarized(data.valid), test=binarized(data.test))
    return data
