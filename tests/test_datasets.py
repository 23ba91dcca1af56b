"""Every dataset loader, on small files written in the dataset's real on-disk format."""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import pickle
import struct
import zipfile

import numpy as np
import pytest
import scipy.io
import torch
import torchvision
from PIL import Image

import data as data_module
from data import (ImageFiles, LazyImages, MappedImages, Split, epoch_batches, eval_batches, load_celeba64,
                  load_cifar100, load_data, load_fashion_mnist, load_ffhq, load_folder, load_imagenet, load_mnist,
                  load_svhn)
from hps import DATASET_SHAPES
from utils import UserError


def no_network(*args, **kwargs):
    raise OSError("no network")


@contextlib.contextmanager
def one_line_error(match: str):
    """pytest.raises for a UserError whose message is one line matching ``match``."""
    with pytest.raises(UserError, match=match) as info:
        yield info
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# MNIST: idx files
# ---------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """An idx file of unsigned bytes: magic 0x00000800 + ndim, big-endian int32 sizes, then the bytes."""
    raw = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def write_idx_files(folder, n_train: int = 30, n_test: int = 12, seed: int = 0,
                    compress: tuple[bool, bool] = (True, False)) -> dict:
    """The four idx files of MNIST and Fashion-MNIST in ``folder``; ``compress``: train's and test's as .gz."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True)
    written = {}
    for prefix, n, gz in [("train", n_train, compress[0]), ("t10k", n_test, compress[1])]:
        images = rng.randint(1, 256, size=(n, 28, 28), dtype=np.uint8)  # never 0: the padding must stand out
        labels = rng.randint(0, 10, size=n).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        written[prefix] = (images, labels)
    return written


def write_mnist(root, n_train: int = 30, n_test: int = 12, seed: int = 0) -> dict:
    return write_idx_files(root / "MNIST" / "raw", n_train, n_test, seed)


def test_mnist_reads_idx_files_and_pads_to_32(tmp_path):
    written = write_mnist(tmp_path)
    data = load_data("mnist", str(tmp_path))
    assert data.class_names == [str(d) for d in range(10)] and not data.multi_label
    assert (len(data.train), len(data.valid), len(data.test)) == (27, 3, 12)  # a tenth held out of 30
    assert data.test.images.dtype == torch.uint8 and data.test.images.shape == (12, 1, 32, 32)
    test_images, test_labels = written["t10k"]
    assert torch.equal(data.test.images[:, 0, 2:30, 2:30], torch.from_numpy(test_images))
    border = data.test.images.clone()
    border[:, :, 2:30, 2:30] = 0
    assert border.sum() == 0  # two rows and columns of zeros on every side
    assert data.test.labels.tolist() == test_labels.tolist() and data.test.labels.dtype == torch.int64
    ours = torch.cat([data.train.images, data.valid.images])[:, 0, 2:30, 2:30].numpy()
    assert sorted(map(bytes, ours)) == sorted(map(bytes, written["train"][0]))
    assert (data.image_size, data.channels) == (32, 1)


def test_mnist_split_is_fixed(tmp_path):
    write_mnist(tmp_path)
    a, b = load_mnist(tmp_path), load_mnist(tmp_path)
    assert torch.equal(a.valid.images, b.valid.images) and torch.equal(a.train.labels, b.train.labels)


def test_mnist_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "MNIST", no_network)
    with one_line_error(r"MNIST is not in .*MNIST.raw and could not be downloaded \(no network\).*t10k"):
        load_mnist(tmp_path)


def test_mnist_bad_magic_number_is_a_clear_error(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])
    with one_line_error("t10k-images-idx3-ubyte is not an idx file"):
        load_mnist(tmp_path)


def test_mnist_truncated_file_is_a_clear_error(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with one_line_error("t10k-labels-idx1-ubyte holds 9 bytes of data"):
        load_mnist(tmp_path)


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST: MNIST's idx files, or Debian's package, or torchvision's download
# ---------------------------------------------------------------------------------------------

FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"]
REAL_FASHION = data_module.FASHION_MNIST_DEBIAN


def write_fashion_mnist(root, **kwargs) -> dict:
    return write_idx_files(root / "FashionMNIST" / "raw", **kwargs)


@pytest.fixture
def debian_folder(tmp_path, monkeypatch):
    """Where the loader looks for Debian's dataset-fashion-mnist files: an empty folder of the test's (the real
    package may be installed here)."""
    folder = tmp_path / "debian" / "fashion-mnist"
    folder.mkdir(parents=True)
    monkeypatch.setattr(data_module, "FASHION_MNIST",
                        dataclasses.replace(data_module.FASHION_MNIST, installed=folder))
    return folder


@pytest.mark.parametrize("name", ["fashion_mnist", "fashion-mnist", "fmnist"])
def test_fashion_mnist_reads_idx_files_plain_and_gz_and_pads_to_32(name, tmp_path, debian_folder):
    written = write_fashion_mnist(tmp_path)  # train .gz, test plain
    data = load_data(name, str(tmp_path))
    assert data.class_names == FASHION_NAMES and not data.multi_label and data.notes == []
    assert (len(data.train), len(data.valid), len(data.test)) == (27, 3, 12)  # a tenth held out of 30
    assert data.test.images.dtype == torch.uint8 and data.test.images.shape == (12, 1, 32, 32)
    test_images, test_labels = written["t10k"]
    assert torch.equal(data.test.images[:, 0, 2:30, 2:30], torch.from_numpy(test_images))
    assert data.test.labels.tolist() == test_labels.tolist() and data.test.labels.dtype == torch.int64
    ours = torch.cat([data.train.images, data.valid.images])[:, 0, 2:30, 2:30].numpy()
    assert sorted(map(bytes, ours)) == sorted(map(bytes, written["train"][0]))
    again = load_fashion_mnist(tmp_path)  # the split is fixed
    assert torch.equal(again.valid.images, data.valid.images) and torch.equal(again.train.labels, data.train.labels)


def test_fashion_mnist_falls_back_to_the_debian_package(tmp_path, debian_folder):
    written = write_idx_files(debian_folder / "files", compress=(True, True))  # Debian ships the four .gz
    for path in (debian_folder / "files").iterdir():
        path.rename(debian_folder / path.name)
    data = load_fashion_mnist(tmp_path / "data")
    assert (len(data.train) + len(data.valid), len(data.test)) == (30, 12)
    assert torch.equal(data.test.images[:, 0, 2:30, 2:30], torch.from_numpy(written["t10k"][0]))
    assert len(data.notes) == 1 and f"read from {debian_folder}" in data.notes[0] and \
        "dataset-fashion-mnist" in data.notes[0]
    assert not (tmp_path / "data").exists()  # nothing downloaded or written


def test_fashion_mnist_downloads_through_torchvision(tmp_path, monkeypatch, debian_folder):
    calls = []

    def fake_download(root, train=True, download=False):  # torchvision keeps the .gz in <root>/FashionMNIST/raw
        calls.append((root, download))
        write_fashion_mnist(tmp_path / "data", compress=(True, True))

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_download)
    data = load_data("fashion_mnist", str(tmp_path / "data"))
    assert calls == [(str(tmp_path / "data"), True)]
    assert (len(data.train), len(data.valid), len(data.test)) == (27, 3, 12) and data.notes == []


def test_fashion_mnist_offline_without_the_package_names_both_ways(tmp_path, monkeypatch, debian_folder):
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with one_line_error(r"^Fashion-MNIST is not in .*FashionMNIST.raw and could not be downloaded \(no network\); "
                        r"install the Debian package dataset-fashion-mnist .*, or put train-images-idx3-ubyte, "
                        r"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte .* in "
                        r".*FashionMNIST.raw$"):
        load_fashion_mnist(tmp_path)
    assert not (tmp_path / "FashionMNIST").exists()


@pytest.mark.parametrize("damage,message", [
    (lambda raw: raw[:len(raw) // 2], "Compressed file ended"),  # a download cut short
    (lambda raw: raw[:40] + bytes(b ^ 0x5A for b in raw[40:]), ""),  # garbled deflate data
    (lambda raw: b"not gzip" + raw, "Not a gzipped file"),
])
def test_fashion_mnist_damaged_file_is_a_clear_error(damage, message, tmp_path, debian_folder):
    write_fashion_mnist(tmp_path)
    path = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with one_line_error(f"^cannot read Fashion-MNIST file .*train-images-idx3-ubyte.gz: .*{message}"):
        load_fashion_mnist(tmp_path)


def test_fashion_mnist_wrong_image_size_is_a_clear_error(tmp_path, debian_folder):
    write_fashion_mnist(tmp_path)
    write_idx(tmp_path / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte", np.ones((12, 32, 32), np.uint8))
    with one_line_error("Fashion-MNIST test files .* are not N 28x28 images with N labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not all((REAL_FASHION / f"{n}.gz").is_file() for n in data_module.MNIST_FILES.values()),
                    reason=f"the real Fashion-MNIST files are not in {REAL_FASHION} (apt-get install "
                           f"dataset-fashion-mnist)")
def test_real_fashion_mnist_files_have_the_official_counts(tmp_path):
    """The Debian package's files, read through the fallback: 60,000 training images (6,000 per class) of which
    5,000 validate, and 10,000 test images (1,000 per class)."""
    data = load_fashion_mnist(tmp_path)
    assert (len(data.train), len(data.valid), len(data.test)) == (55_000, 5_000, 10_000)
    assert data.train.images.shape[1:] == data.test.images.shape[1:] == (1, 32, 32)
    train_labels = torch.cat([data.train.labels, data.valid.labels])
    assert torch.bincount(train_labels, minlength=10).tolist() == [6_000] * 10
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [1_000] * 10
    assert data.class_names == FASHION_NAMES and "read from" in data.notes[0]
    assert data.test.images[:, :, :2].sum() == 0 and data.test.images[:, :, :, 30:].sum() == 0  # the padding
    assert data.test.images.float().mean() > 50  # clothes, not blank pages (Fashion-MNIST's mean is about 73)


def test_class_names_match_without_case_or_underscores():
    """sample.py --classes sneaker,bag,"ankle boot": Fashion-MNIST's names as people type them."""
    from sampling import parse_classes

    assert parse_classes("sneaker,bag,ankle boot", FASHION_NAMES) == [7, 8, 9]
    assert parse_classes("t-shirt/top, ANKLE_BOOT,Trouser, 4", FASHION_NAMES) == [0, 9, 1, 4]
    assert parse_classes("ankle  Boot", FASHION_NAMES) == [9]
    assert parse_classes("a,A", ["a", "A"]) == [0, 1]  # an exact name wins; "A" matches two names otherwise
    with one_line_error(r"unknown class 'b'; valid: a, A, B_x"):
        parse_classes("b", ["a", "A", "B_x"])
    with one_line_error(r"unknown class 'boot'; valid: T-shirt/top, .*, Ankle boot \(or 0..9\)"):
        parse_classes("boot", FASHION_NAMES)


def test_dataset_aliases_are_stored_as_the_canonical_name():
    from hps import dataset_shape, hparams_from_preset

    for alias in ("fashion_mnist", "fashion-mnist", "fmnist"):
        assert hparams_from_preset("mnist", {"dataset": alias}).dataset == "fashion_mnist"
        assert dataset_shape(alias) == DATASET_SHAPES["mnist"]


def test_mnist_preset_trains_on_fashion_mnist_and_samples_by_name(tmp_path, monkeypatch, debian_folder):
    """--hps mnist --dataset fmnist end to end: the 28x28 clothes padded like the digits, then sample.py --classes
    by their names."""
    import sample
    import train

    monkeypatch.chdir(tmp_path)
    write_fashion_mnist(tmp_path / "data")
    run_dir = tmp_path / "run"
    train.main(["--hps", "mnist", "--dataset", "fmnist", "--data_root", str(tmp_path / "data"), "--save_dir",
                str(run_dir), "--width", "8", "--zdim", "2", "--num_mixtures", "2", "--enc_blocks", "32x1,32d4,8d8,1x1",
                "--dec_blocks", "1x1,8m1,32m8", "--max_steps", "2", "--n_batch", "2", "--n_batch_eval", "8",
                "--eval_every", "0", "--grad_checkpoint", "none", "--global_batch", "0"])
    hps = torch.load(run_dir / "latest.pt", weights_only=True)["hps"]
    assert (hps["dataset"], hps["pad"], hps["n_classes"], hps["image_size"]) == ("fashion_mnist", 2, 10, 32)
    sample.main(["--weights", str(run_dir), "--classes", "sneaker,bag,ankle boot", "--n_per_class", "2",
                 "--out", str(tmp_path / "clothes.npz")])
    arrays = np.load(tmp_path / "clothes.npz")
    assert arrays["images"].shape == (6, 28, 28, 1) and arrays["labels"].tolist() == [7, 7, 8, 8, 9, 9]


# ---------------------------------------------------------------------------------------------
# CIFAR-100: python pickles
# ---------------------------------------------------------------------------------------------

CIFAR100_NAMES = [f"class_{i:02d}" for i in range(100)]


def write_cifar100(root, n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, n in [("train", n_train), ("test", n_test)]:
        images = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        fine, coarse = rng.randint(0, 100, size=n).tolist(), rng.randint(0, 20, size=n).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode(),
                         b"fine_labels": fine, b"coarse_labels": coarse, b"data": images}, fh)
        written[name] = (images, fine)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({b"fine_label_names": [n.encode() for n in CIFAR100_NAMES],
                     b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}, fh)
    return written


def test_cifar100_reads_the_official_pickles(tmp_path):
    written = write_cifar100(tmp_path)
    data = load_data("cifar100", str(tmp_path))
    assert data.class_names == CIFAR100_NAMES
    assert (len(data.train), len(data.valid), len(data.test)) == (45, 5, 20)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    test_images, fine = written["test"]
    assert data.test.labels.tolist() == fine  # the fine labels, not the coarse ones
    assert data.test.images[3, 2, 5, 7].item() == test_images[3, 2 * 1024 + 5 * 32 + 7]  # R, G, B planes
    ours = torch.cat([data.train.images, data.valid.images]).numpy()
    assert sorted(map(bytes, ours)) == sorted(map(bytes, written["train"][0].reshape(-1, 3, 32, 32)))


def test_cifar100_missing_and_damaged_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", no_network)
    with one_line_error("CIFAR-100 is not in .*cifar-100-python and could not be downloaded"):
        load_cifar100(tmp_path)
    write_cifar100(tmp_path)
    (tmp_path / "cifar-100-python" / "meta").write_bytes(b"\x80\x04garbage")
    with one_line_error("cannot read CIFAR-100 file .*meta"):
        load_cifar100(tmp_path)


# ---------------------------------------------------------------------------------------------
# SVHN: MATLAB v5 files
# ---------------------------------------------------------------------------------------------


def write_svhn(folder, n_train: int = 40, n_test: int = 15, seed: int = 0) -> dict:
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in [("train", n_train), ("test", n_test)]:
        x = rng.randint(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # (rows, columns, RGB, image)
        y = rng.randint(1, 11, size=(n, 1)).astype(np.uint8)  # 1..10, 10 = digit 0
        y[0, 0] = 10
        scipy.io.savemat(str(folder / f"{name}_32x32.mat"), {"X": x, "y": y})
        written[name] = (x, y)
    return written


def test_svhn_reads_mat_files_and_maps_10_to_0(tmp_path):
    written = write_svhn(tmp_path / "svhn")
    data = load_data("svhn", str(tmp_path))
    assert data.class_names == [str(d) for d in range(10)]
    assert (len(data.train), len(data.valid), len(data.test)) == (36, 4, 15)
    assert data.test.images.dtype == torch.uint8 and data.test.images.shape == (15, 3, 32, 32)
    x, y = written["test"]
    assert data.test.images[4, 1, 6, 20].item() == x[6, 20, 1, 4]  # row 6, column 20, green, image 4
    assert torch.equal(data.test.images, torch.from_numpy(x.transpose(3, 2, 0, 1).copy()))
    assert data.test.labels[0].item() == 0 and data.test.labels.tolist() == [v % 10 for v in y[:, 0].tolist()]
    assert data.train.labels.max().item() <= 9


def test_svhn_files_may_sit_in_data_root(tmp_path):
    write_svhn(tmp_path)
    assert len(load_svhn(tmp_path).test) == 15


def test_svhn_missing_and_damaged_are_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "SVHN", no_network)
    with one_line_error(r"SVHN is not in .*svhn and could not be downloaded.*train_32x32.mat and test_32x32.mat"):
        load_svhn(tmp_path)
    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 20)
    with one_line_error("cannot read SVHN file .*test_32x32.mat"):
        load_svhn(tmp_path)


# ---------------------------------------------------------------------------------------------
# CelebA: aligned JPEGs and the two list files
# ---------------------------------------------------------------------------------------------

CELEBA_ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
                "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
                "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
                "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
                "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
                "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
                "Wearing_Necktie", "Young"]


def celeba_image(colour: tuple[int, int, int]) -> Image.Image:
    """A 178x218 aligned-CelebA-sized picture: ``colour`` in the centre 148x148, white around it."""
    im = Image.new("RGB", (178, 218), (255, 255, 255))
    im.paste(Image.new("RGB", (148, 148), colour), ((178 - 148) // 2, (218 - 148) // 2))
    return im


def write_celeba(root, parts=(0,) * 8 + (1,) * 3 + (2,) * 4, seed: int = 0, zipped: bool = False) -> dict:
    """CelebA's layout: img_align_celeba/000001.jpg.., list_attr_celeba.txt, list_eval_partition.txt."""
    rng = np.random.RandomState(seed)
    folder = root / "celeba"
    images = folder / "img_align_celeba"
    images.mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(parts))]
    attrs = rng.choice([-1, 1], size=(len(parts), 40))
    colours = [tuple(int(c) for c in rng.randint(0, 200, size=3)) for _ in parts]
    for name, colour in zip(names, colours):
        celeba_image(colour).save(images / name, quality=95, subsampling=0)
    rows = [f"{n} " + " ".join(f"{v:2d}" for v in row) for n, row in zip(names, attrs)]
    (folder / "list_attr_celeba.txt").write_text(f"{len(names)}\n" + " ".join(CELEBA_ATTRS) + " \n"
                                                 + "\n".join(rows) + "\n")
    (folder / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, parts)))
    if zipped:  # as downloaded by hand: the archive holds the img_align_celeba folder
        with zipfile.ZipFile(folder / "img_align_celeba.zip", "w") as zf:
            for name in names:
                zf.write(images / name, f"img_align_celeba/{name}")
        for name in names:
            (images / name).unlink()
        images.rmdir()
    return {"names": names, "attrs": attrs, "colours": colours, "parts": list(parts)}


def test_celeba64_crops_resizes_and_reads_attributes(tmp_path):
    written = write_celeba(tmp_path)
    data = load_data("celeba64", str(tmp_path))
    assert data.multi_label and data.class_names == CELEBA_ATTRS
    assert (len(data.train), len(data.valid), len(data.test)) == (8, 3, 4)  # the official partition
    assert isinstance(data.train.images, ImageFiles)
    assert data.train.images.shape == (8, 3, 64, 64) and (data.image_size, data.channels) == (64, 3)
    assert data.train.labels.dtype == torch.float32 and data.train.labels.shape == (8, 40)
    expected = torch.from_numpy((written["attrs"] > 0).astype(np.float32))
    assert torch.equal(torch.cat([data.train.labels, data.valid.labels, data.test.labels]), expected)
    images = data.test.images[torch.arange(4)]
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 64, 64)
    # the centre 148x148 crop drops the white frame: every pixel is the centre colour, up to JPEG ringing at
    # the edges (a frame of white in the crop would put ~100 levels there)
    error = (images.float() - torch.tensor(written["colours"][11:], dtype=torch.float32)[:, :, None, None]).abs()
    assert error.max() <= 24 and error.mean() <= 2 and error[:, :, 2:-2, 2:-2].max() <= 6


def test_celeba64_unzips_a_hand_downloaded_archive(tmp_path):
    write_celeba(tmp_path, zipped=True)
    data = load_celeba64(tmp_path)
    assert len(data.train) == 8 and data.train.images[0].shape == (3, 64, 64)


def test_celeba64_missing_offline_explains_the_manual_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CelebA", no_network)
    with one_line_error("CelebA is not in .*celeba and could not be downloaded.*img_align_celeba.zip.*by hand from"):
        load_celeba64(tmp_path)


def test_celeba64_damaged_files_are_clear_errors(tmp_path):
    write_celeba(tmp_path)
    attrs = tmp_path / "celeba" / "list_attr_celeba.txt"
    attrs.write_text(attrs.read_text().replace(" 1", " 2", 1))
    with one_line_error("list_attr_celeba.txt has attribute values other than 1 and -1"):
        load_celeba64(tmp_path)
    attrs.write_text("15\n" + " ".join(CELEBA_ATTRS) + "\n000001.jpg 1 -1\n")
    with one_line_error("list_attr_celeba.txt should be"):
        load_celeba64(tmp_path)


def test_celeba64_missing_or_broken_image_is_a_clear_error(tmp_path):
    write_celeba(tmp_path, seed=1)
    image = tmp_path / "celeba" / "img_align_celeba" / "000009.jpg"  # the first validation image
    image.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    data = load_celeba64(tmp_path)
    # a damaged file does not end a run when its batch comes up: the next image stands in, and it is listed
    assert torch.equal(data.valid.images[0:2], data.valid.images[torch.tensor([1, 1])])
    assert data.valid.images.skipped == [image]
    image.unlink()
    with one_line_error("1 CelebA images are missing from .*img_align_celeba .first: 000009.jpg"):
        load_celeba64(tmp_path)


# ---------------------------------------------------------------------------------------------
# Downsampled ImageNet: npz batches
# ---------------------------------------------------------------------------------------------


def write_imagenet(folder, size: int = 32, per_batch: int = 6, n_val: int = 7, seed: int = 0) -> dict:
    """train_data_batch_1..10.npz and val_data.npz: data (N, 3*S*S) channel-major uint8, labels 1..1000."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in [(f"train_data_batch_{i}", per_batch) for i in range(1, 11)] + [("val_data", n_val)]:
        images = rng.randint(0, 256, size=(n, 3 * size * size), dtype=np.uint8)
        labels = rng.randint(1, 1001, size=n).tolist()
        labels[0] = 1000
        extra = {"mean": images.mean(axis=0)} if name.startswith("train") else {}
        np.savez(folder / f"{name}.npz", data=images, labels=labels, **extra)
        written[name] = (images, labels)
    return written


def test_imagenet32_npz_is_cached_memory_mapped_and_channel_major(tmp_path):
    written = write_imagenet(tmp_path / "imagenet32")
    data = load_data("imagenet32", str(tmp_path))
    assert data.class_names == [str(i) for i in range(1000)]
    assert (len(data.train), len(data.valid), len(data.test)) == (54, 6, 7)  # a tenth of 60 held out
    assert isinstance(data.test.images, MappedImages) and isinstance(data.test.images.array, np.memmap)
    assert data.test.images.shape == (7, 3, 32, 32) and (data.image_size, data.channels) == (32, 3)
    val_images, val_labels = written["val_data"]
    test = data.test.images[:]
    assert test.dtype == torch.uint8 and test.shape == (7, 3, 32, 32)
    assert test[2, 0, 3, 4].item() == val_images[2, 3 * 32 + 4]  # red plane first
    assert test[2, 1, 3, 4].item() == val_images[2, 1024 + 3 * 32 + 4]  # then green
    assert test[2, 2, 31, 0].item() == val_images[2, 2048 + 31 * 32]  # then blue
    assert data.test.labels.tolist() == [v - 1 for v in val_labels] and data.test.labels[0].item() == 999
    train = np.concatenate([written[f"train_data_batch_{i}"][0] for i in range(1, 11)]).reshape(-1, 3, 32, 32)
    ours = torch.cat([data.train.images[:], data.valid.images[:]]).numpy()
    assert sorted(map(bytes, ours)) == sorted(map(bytes, train))
    # the caches replace the npz files once written
    assert (tmp_path / "imagenet32" / "imagenet32_train_images.npy").is_file()
    for path in (tmp_path / "imagenet32").glob("*.npz"):
        path.unlink()
    again = load_imagenet(tmp_path, 32)
    assert torch.equal(again.valid.images[:], data.valid.images[:])
    assert torch.equal(again.train.labels, data.train.labels)


def test_imagenet64_files_may_sit_in_data_root_and_class_names_file(tmp_path):
    write_imagenet(tmp_path, size=64, per_batch=2, n_val=3)
    (tmp_path / "map_clsloc.txt").write_text("n02119789 1 kit_fox\nn02100735 2 English_setter\n")
    data = load_data("imagenet64", str(tmp_path))
    assert data.test.images[:].shape == (3, 3, 64, 64) and (len(data.train), len(data.valid)) == (18, 2)
    assert data.class_names[:3] == ["kit_fox", "English_setter", "2"] and len(data.class_names) == 1000


def test_imagenet_wrong_size_missing_and_damaged_are_clear_errors(tmp_path):
    write_imagenet(tmp_path / "imagenet64", size=32)  # 32x32 files where 64x64 ones belong
    with one_line_error(r"holds data uint8 \(6, 3072\), expected uint8 \(6, 12288\)"):
        load_imagenet(tmp_path, 64)
    assert not list((tmp_path / "imagenet64").glob("*.npy"))  # no half-written cache left behind
    with one_line_error("imagenet32 is not in .*imagenet32 .nor .*train_data_batch_1.npz is missing.: put "
                        "train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz there"):
        load_imagenet(tmp_path, 32)
    write_imagenet(tmp_path / "imagenet32")
    (tmp_path / "imagenet32" / "train_data_batch_7.npz").write_bytes(b"PK\x03\x04 broken")
    with one_line_error("cannot read ImageNet file .*train_data_batch_7.npz"):
        load_imagenet(tmp_path, 32)


# ---------------------------------------------------------------------------------------------
# FFHQ: PNG folders
# ---------------------------------------------------------------------------------------------


def write_pngs(folder, n: int, size: int, per_folder: int = 8) -> list[tuple[int, int, int]]:
    """``n`` PNGs named 00000.png.. in sub-folders of ``per_folder`` (like FFHQ's 00000/, 01000/), each one colour."""
    colours = []
    for i in range(n):
        sub = folder / f"{i // per_folder * per_folder:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        colour = (i * 7 % 256, i * 13 % 256, 255 - i)
        Image.new("RGB", (size, size), colour).save(sub / f"{i:05d}.png")
        colours.append(colour)
    return colours


def test_ffhq1024_holds_out_the_last_files_and_resizes(tmp_path):
    colours = write_pngs(tmp_path / "ffhq1024", 20, 24)
    data = load_data("ffhq1024", str(tmp_path), size=16)
    assert data.class_names == [] and not data.multi_label
    # test: vdvae's held-out files, the last ones (65000..69999); validation: a tenth of the rest
    assert (len(data.train), len(data.valid), len(data.test)) == (17, 1, 2)
    assert [p.name for p in data.test.images.paths] == ["00018.png", "00019.png"]
    assert not set(data.valid.images.paths) & (set(data.train.images.paths) | set(data.test.images.paths))
    images = data.test.images[:]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images[1, :, 7, 9], torch.tensor(colours[19], dtype=torch.uint8))
    assert data.train.labels.dtype == torch.int64 and data.train.labels.eq(0).all()


def test_ffhq256_seeded_holdout_and_native_size(tmp_path):
    write_pngs(tmp_path, 30, 256)  # straight in data_root
    data = load_ffhq(tmp_path, 256)
    assert data.train.images.shape == (25, 3, 256, 256) and (len(data.valid), len(data.test)) == (2, 3)
    test = sorted(p.name for p in data.test.images.paths)
    order = np.random.RandomState(5).permutation(30)  # vdvae's seed-5 permutation, last ones held out: the test
    assert test == sorted(f"{i:05d}.png" for i in order[-3:])
    assert not set(data.valid.images.paths) & (set(data.train.images.paths) | set(data.test.images.paths))
    assert data.valid.images[0].shape == (3, 256, 256)


def test_ffhq256_accepts_vdvaes_npy(tmp_path):
    array = np.random.RandomState(0).randint(0, 256, size=(20, 256, 256, 3), dtype=np.uint8)
    (tmp_path / "ffhq256").mkdir()
    np.save(tmp_path / "ffhq256" / "ffhq-256.npy", array)
    data = load_data("ffhq256", str(tmp_path))
    assert isinstance(data.train.images, MappedImages) and (len(data.train), len(data.valid), len(data.test)) == (
        17, 1, 2)
    rows = data.test.images.rows
    assert torch.equal(data.test.images[:], torch.from_numpy(array[rows].transpose(0, 3, 1, 2).copy()))
    assert len(set(data.train.images.rows) | set(data.valid.images.rows) | set(rows)) == 20


def test_ffhq_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "ffhq256").mkdir()
    with one_line_error("no FFHQ PNG images in .*ffhq256"):
        load_ffhq(tmp_path, 256)


# ---------------------------------------------------------------------------------------------
# Any image folder
# ---------------------------------------------------------------------------------------------


def write_classes(root) -> None:
    """Two classes of wide images: the centre square is the class colour, the sides are green."""
    for name, colour, fmt in [("cat", (200, 0, 0), "PNG"), ("dog", (0, 0, 200), "JPEG")]:
        (root / name).mkdir(parents=True)
        for i in range(10):
            im = Image.new("RGB", (60, 40), (0, 255, 0))
            im.paste(Image.new("RGB", (40, 40), colour), (10, 0))
            extra = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
            im.save(root / name / f"{i}.{'png' if fmt == 'PNG' else 'jpg'}", fmt, **extra)


def test_folder_classes_from_sub_folders_cropped_and_resized(tmp_path):
    write_classes(tmp_path)
    data = load_data("folder", str(tmp_path), size=8)
    assert data.class_names == ["cat", "dog"]
    assert (len(data.train), len(data.valid), len(data.test)) == (17, 1, 2)  # test: a tenth; valid: a tenth of the rest
    assert data.train.images.shape == (17, 3, 8, 8) and (data.image_size, data.channels) == (8, 3)
    images = data.train.images[torch.arange(17)]
    for image, label in zip(images, data.train.labels.tolist()):
        colour = torch.tensor([[200, 0, 0], [0, 0, 200]][label], dtype=torch.float32)[:, None, None]
        assert (image.float() - colour).abs().max() <= 16  # no green (255 off), only JPEG ringing at the edges
    assert sorted(torch.cat([data.train.labels, data.valid.labels, data.test.labels]).tolist()) == [0] * 10 + [1] * 10


def test_folder_unconditional_grey_default_size(tmp_path):
    for i in range(5):
        Image.fromarray(np.full((12, 20), 10 * i, dtype=np.uint8), "L").save(tmp_path / f"{i}.bmp")
    data = load_folder(tmp_path)
    assert data.class_names == [] and data.train.images.shape == (3, 1, 12, 12)
    assert (len(data.valid), len(data.test)) == (1, 1)  # a tenth, at least one, each
    everything = torch.cat([data.train.images[:], data.valid.images[:], data.test.images[:]])
    assert sorted(everything[:, 0, 0, 0].tolist()) == [0, 10, 20, 30, 40]


def test_folder_with_train_and_test_sub_folders(tmp_path):
    write_classes(tmp_path / "train")
    (tmp_path / "test" / "dog").mkdir(parents=True)
    Image.new("RGB", (16, 16), (0, 0, 200)).save(tmp_path / "test" / "dog" / "a.webp", lossless=True)
    data = load_folder(tmp_path, size=4)
    assert data.class_names == ["cat", "dog"] and (len(data.train), len(data.valid)) == (18, 2)
    assert len(data.test) == 1 and data.test.labels.tolist() == [1]
    # no valid/ sub-folder: a tenth of train/ validates, the test images stay unseen
    assert not set(data.valid.images.paths) & (set(data.train.images.paths) | set(data.test.images.paths))
    assert torch.equal(data.test.images[0], torch.tensor([0, 0, 200], dtype=torch.uint8)[:, None, None].expand(3, 4, 4))
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 0, 0)).save(tmp_path / "val" / "cat" / "c.png")
    with_val = load_folder(tmp_path, size=4)
    assert with_val.valid.labels.tolist() == [0] and with_val.test.labels.tolist() == [1]
    (tmp_path / "test" / "bird").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "test" / "bird" / "b.png")
    with one_line_error("class folder .*bird has no counterpart among the training classes"):
        load_folder(tmp_path, size=4)
    (tmp_path / "test" / "bird" / "b.png").rename(tmp_path / "val" / "b.png")  # loose, where classes belong
    (tmp_path / "test" / "bird").rmdir()
    (tmp_path / "val" / "cat" / "c.png").unlink()
    (tmp_path / "val" / "cat").rmdir()
    with one_line_error("val should hold its images in class sub-folders like the training folder's .cat, dog"):
        load_folder(tmp_path, size=4)


def test_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no pictures here")
    with one_line_error(f"no images in {tmp_path}"):
        load_data("folder", str(tmp_path))
    with one_line_error("does not exist"):
        load_folder(tmp_path / "nowhere")


def test_folder_damaged_image_is_a_clear_error(tmp_path):
    write_classes(tmp_path)
    (tmp_path / "dog" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (tmp_path / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # the first image, which sets the size
    data = load_folder(tmp_path, size=8)  # the header check leaves both out, and says so
    assert len(data.train) + len(data.valid) + len(data.test) == 18
    assert any("skipped 2 of 20 image files" in n and "3.jpg" in n and "0.png" in n for n in data.notes), data.notes
    everything = [p.name for s in (data.train, data.valid, data.test) for p in s.images.paths]
    assert "3.jpg" not in everything and "0.png" not in everything


# ---------------------------------------------------------------------------------------------
# Lazy images with the batching code
# ---------------------------------------------------------------------------------------------


def lazy_and_loaded(tmp_path) -> tuple[Split, Split]:
    write_classes(tmp_path)
    lazy = load_folder(tmp_path, size=8).train
    return lazy, Split(lazy.images[:], lazy.labels)


def test_lazy_images_index_like_a_tensor(tmp_path):
    lazy, loaded = lazy_and_loaded(tmp_path)
    images, tensor = lazy.images, loaded.images
    assert isinstance(images, LazyImages) and len(images) == 17 and images.shape == tensor.shape
    assert images.numel() == tensor.numel() and images.device == torch.device("cpu")
    idx = torch.tensor([5, 0, 16, 5])
    assert torch.equal(images[idx], tensor[idx])
    assert torch.equal(images[3:9], tensor[3:9]) and torch.equal(images[15:99], tensor[15:])
    assert torch.equal(images[-1], tensor[-1]) and torch.equal(images[2, 1, 3], tensor[2, 1, 3])
    assert torch.equal(images[[1, 2]], tensor[[1, 2]]) and images[torch.tensor([], dtype=torch.long)].shape == (
        0, 3, 8, 8)
    assert torch.equal(images.to("cpu"), tensor)
    with pytest.raises(IndexError):
        images[torch.tensor([18])]


def test_lazy_splits_batch_exactly_like_tensors(tmp_path):
    lazy, loaded = lazy_and_loaded(tmp_path)
    for kwargs in [{}, {"start": 2}, {"rank": 1, "world": 2, "accum": 2}]:
        ours = list(epoch_batches(lazy, 2, seed=4, epoch=1, **kwargs))
        theirs = list(epoch_batches(loaded, 2, seed=4, epoch=1, **kwargs))
        assert len(ours) == len(theirs) > 0
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs))
    ours, theirs = list(eval_batches(lazy, 5)), list(eval_batches(loaded, 5))
    assert [len(b[1]) for b in ours] == [5, 5, 5, 2]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ours, theirs))
    next(epoch_batches(lazy, 4, seed=0, epoch=0))  # leaving a generator early does not hang


def test_memory_mapped_split_batches(tmp_path):
    write_imagenet(tmp_path / "imagenet32", per_batch=4)
    split = load_imagenet(tmp_path, 32).train
    loaded = Split(split.images[:], split.labels)
    batches = list(epoch_batches(split, 3, seed=1, epoch=0))
    assert len(batches) == len(split) // 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, epoch_batches(loaded, 3, seed=1, epoch=0)))
    assert torch.equal(torch.cat([b[0] for b in eval_batches(split, 7)]), loaded.images)


def test_load_data_names_every_dataset():
    assert set(data_module.DATASETS) == {"cifar10", "cifar100", "mnist", "fashion_mnist", "svhn", "celeba64",
                                         "imagenet32", "imagenet64", "ffhq256", "ffhq1024", "folder", "digits"}
    assert tuple(DATASET_SHAPES) == data_module.DATASETS  # code without data knows every dataset's shape


@pytest.mark.parametrize("name,write", [("mnist", write_mnist), ("fashion_mnist", write_fashion_mnist),
                                        ("cifar100", write_cifar100),
                                        ("celeba64", write_celeba),
                                        ("imagenet32", lambda root: write_imagenet(root / "imagenet32", 32))])
def test_loaders_give_the_shapes_the_table_promises(name, write, tmp_path):
    """--summary and the converter build models from DATASET_SHAPES without reading data: the loaders agree."""
    write(tmp_path)
    data = load_data(name, str(tmp_path))
    shape = DATASET_SHAPES[name]
    assert (data.image_size, data.channels, data.multi_label) == (shape.image_size, shape.channels, shape.multi_label)
    pad = shape.pad
    if pad:  # the border the likelihood leaves out is black
        border = data.test.images.clone()
        border[:, :, pad:-pad, pad:-pad] = 0
        assert border.sum() == 0 and data.test.images[:, :, pad:-pad, pad:-pad].min() > 0


def test_dataset_pickles_admit_only_arrays_and_plain_values(tmp_path):
    """A crafted batch file in --data_root cannot run code; the real formats (protocol 2 as the official files,
    and numpy 2's protocol 5) still load."""
    import os as os_module

    from data import _read_pickle

    batch = {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], b"batch_label": b"x"}
    for protocol in (2, 5):
        path = tmp_path / f"batch{protocol}"
        path.write_bytes(pickle.dumps(batch, protocol=protocol))
        loaded = _read_pickle(path)
        assert loaded[b"labels"] == [1, 2] and np.array_equal(loaded[b"data"], batch[b"data"])

    class Exploit:
        def __reduce__(self):
            return os_module.system, ("touch " + str(tmp_path / "pwned"),)

    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": Exploit()}, protocol=2))
    with one_line_error("refusing to load (posix|os).system"):
        _read_pickle(evil)
    assert not (tmp_path / "pwned").exists()
