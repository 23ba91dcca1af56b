"""Datasets read from files in their real on-disk formats."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import data as data_module
from data import Split, epoch_batches, load_cifar10, load_digits, random_shift
from utils import UserError

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root, per_batch: int = 20, seed: int = 0) -> dict:
    """Write CIFAR-10's python pickle batches (the official layout) with random images; return them."""
    rng = np.random.RandomState(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.randint(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.randint(0, 10, size=per_batch).tolist()
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": images,
                         b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}, fh)
        written[name] = (images, labels)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": per_batch,
                     b"num_vis": 3072}, fh)
    return written


def test_cifar10_reads_the_official_pickle_batches(tmp_path):
    written = write_cifar10(tmp_path)
    data = load_cifar10(tmp_path)
    assert data.class_names == CIFAR_NAMES
    assert len(data.train) + len(data.valid) == 100 and len(data.valid) == 10 and len(data.test) == 20
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    # the test split is the official test batch, in order; rows are R, G, B planes of 32x32
    test_images, test_labels = written["test_batch"]
    assert torch.equal(data.test.images[0, 1, 2, 3], torch.tensor(test_images[0, 1024 + 2 * 32 + 3]))
    assert data.test.labels.tolist() == test_labels
    # train + valid together are exactly the five training batches
    all_train = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    ours = torch.cat([data.train.images, data.valid.images]).numpy()
    assert sorted(map(bytes, ours)) == sorted(map(bytes, all_train))


def test_cifar10_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(UserError, match="could not be downloaded.*cifar-10-batches-py"):
        load_cifar10(tmp_path)


def test_cifar10_corrupt_file_is_a_clear_error(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="data_batch_3"):
        load_cifar10(tmp_path)


def test_digits_split_and_levels():
    data = load_digits()
    assert (len(data.train), len(data.valid), len(data.test)) == (1293, 144, 360)
    assert data.train.images.shape[1:] == (1, 8, 8)
    assert set(torch.bincount(data.test.labels).tolist()) <= {35, 36, 37}  # stratified: ~36 per class
    assert set(torch.bincount(data.valid.labels).tolist()) <= {14, 15}  # stratified too
    everything = torch.cat([data.train.images, data.valid.images, data.test.images])
    assert len({bytes(x.numpy()) for x in everything}) == 1797  # the 1,797 distinct digits, each in one split
    levels = torch.round(everything.float() * 16 / 255)
    from sklearn.datasets import load_digits as sk

    assert sorted(levels.unique().tolist()) == list(range(17))
    assert np.isclose(levels.sum().item(), sk().images.sum())  # the 17 levels survive the 0..255 round trip


def test_epoch_batches_depend_only_on_seed_and_epoch_and_resume_midway():
    data = load_digits()
    full = list(epoch_batches(data.train, 100, seed=3, epoch=2))
    again = list(epoch_batches(data.train, 100, seed=3, epoch=2, start=5))
    assert len(full) == 12 and len(again) == 7  # 1,293 training digits: 12 full batches of 100
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[5:], again))
    other = next(epoch_batches(data.train, 100, seed=3, epoch=3))
    assert not torch.equal(full[0][0], other[0])


def test_ranks_and_accumulation_passes_split_each_global_batch_exactly():
    data = load_digits()
    whole = list(epoch_batches(data.train, 24, seed=3, epoch=0))
    shares = [list(epoch_batches(data.train, 4, seed=3, epoch=0, rank=r, world=2, accum=3)) for r in range(2)]
    assert len(shares[0]) == len(whole) == len(data.train) // 24
    for i, (images, _) in enumerate(whole):
        # pass k of rank r holds shard k * world + r of the global batch
        passes = [shares[r][i][0].view(3, 4, *images.shape[1:])[k] for k in range(3) for r in range(2)]
        assert torch.equal(torch.cat(passes), images)


class DeviceCopies(TorchDispatchMode):
    """Counts the copies of a tensor from the CPU to another device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            source = args[0] if func is torch.ops.aten._to_copy.default else args[1]
            target = kwargs.get("device") if func is torch.ops.aten._to_copy.default else args[0].device
            if source.device.type == "cpu" and target is not None and torch.device(target).type != "cpu":
                self.count += 1
        return func(*args, **kwargs)


def test_batch_indices_already_live_on_the_data_device():
    """The epoch's order crosses to the data's device once; each batch's indices are a slice already there (a
    blocking copy of every batch's indices to a GPU stalled the stream at every step)."""
    data = load_digits()
    split = Split(data.train.images.to("meta"), data.train.labels.to("meta"))  # "a device that is not the CPU"
    with DeviceCopies() as copies:
        batches = list(epoch_batches(split, 16, seed=3, epoch=0, rank=1, world=2, accum=2))
    assert len(batches) == len(split) // 64 and copies.count == 1
    assert all(images.device.type == "meta" and labels.device.type == "meta" for images, labels in batches)


def test_random_shift_moves_content_without_changing_it():
    images = torch.zeros(50, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 3:5, 3:5] = 200
    shifted = random_shift(images, 2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == images.shape
    assert torch.all(shifted.float().sum(dim=(1, 2, 3)) == 800)  # the blob stays whole within 2 pixels
    assert not torch.equal(shifted, images)


def test_unknown_dataset():
    with pytest.raises(UserError, match="valid"):
        data_module.load_data("imagenet7", ".")


def test_only_in_memory_splits_are_moved_to_the_device_whole(tmp_path):
    """A small tensor split goes to the accelerator once; a lazy one (an image folder) is never decoded whole."""
    from PIL import Image

    from data import ImageFiles, Split
    from train import on_device_if_small

    meta = torch.device("meta")  # stands in for a GPU: moving there allocates nothing
    small = Split(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    assert on_device_if_small(small, meta).images.device == meta
    big = on_device_if_small(small, meta, max_bytes=100)
    assert big is small
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    lazy = Split(ImageFiles(sorted(tmp_path.glob("*.png")), 8, 3), torch.zeros(3, dtype=torch.long))
    lazy.images._rows = lambda rows: (_ for _ in ()).throw(AssertionError("decoded the whole split"))
    assert on_device_if_small(lazy, meta) is lazy
