"""Every preset trains on its dataset's real file format (written in miniature) in a tiny variant, through
train.main; the paper presets build at full size with openai/vdvae's parameter counts; an attribute model
samples by attribute."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run
from hps import PRESETS, hparams_from_preset
from test_data import write_cifar10
from test_datasets import (write_celeba, write_cifar100, write_classes, write_fashion_mnist, write_imagenet,
                           write_mnist, write_pngs, write_svhn)
from vae import VAE, count_parameters

TINY_AT = {  # block specs of a tiny model ending at each size
    16: dict(enc_blocks="16x1,16d4,4d4,1x1", dec_blocks="1x1,4m1,16m4"),
    32: dict(enc_blocks="32x1,32d4,8d8,1x1", dec_blocks="1x1,8m1,32m8"),
    64: dict(enc_blocks="64x1,64d8,8d8,1x1", dec_blocks="1x1,8m1,64m8"),
}

# preset -> (writes its files under a root, tiny size, extra overrides)
DATASETS = {
    "cifar10": (lambda root: write_cifar10(root, per_batch=8), 32, {}),
    # at the paper's sizes (K=128, D=256): one step of each stage
    "cifar10_vqvae": (lambda root: write_cifar10(root, per_batch=8), 32, {"max_steps": 1, "prior_steps": 1}),
    "cifar100": (write_cifar100, 32, {}),
    "svhn": (write_svhn, 32, {}),
    "mnist": (write_mnist, 32, {}),
    "fashion_mnist": (write_fashion_mnist, 32, {}),
    "fashion_mnist_cpu": (write_fashion_mnist, 32, {}),
    "celeba64": (write_celeba, 64, {}),
    "imagenet32": (lambda root: write_imagenet(root / "imagenet32", 32), 32, {}),
    "imagenet64": (lambda root: write_imagenet(root / "imagenet64", 64), 64, {}),
    "ffhq256": (lambda root: write_pngs(root / "ffhq256", 20, 24), 16, {}),
    "ffhq1024": (lambda root: write_pngs(root / "ffhq1024", 20, 24), 16, {"custom_width_str": ""}),
    "folder": (write_classes, 16, {}),
}
# the Efficient-VDVAE presets read a skip from every encoder block: tiny decoders with one skip per encoder block
EVERY_SKIP_AT = {32: {"dec_blocks": "1x1,8m1,8s1,32m8,32"}, 64: {"dec_blocks": "1x1,8m1,64m8,64s1,64"}}
for _name, (_write, _size) in {"cifar10_efficient": (DATASETS["cifar10"][0], 32),
                               "cifar10_efficient_c1": (DATASETS["cifar10"][0], 32),
                               "imagenet32_efficient": (DATASETS["imagenet32"][0], 32),
                               "imagenet32_efficient_c1": (DATASETS["imagenet32"][0], 32),
                               "imagenet64_efficient": (DATASETS["imagenet64"][0], 64),
                               "imagenet64_efficient_c1": (DATASETS["imagenet64"][0], 64)}.items():
    DATASETS[_name] = (_write, _size, {**TINY_AT[_size], **EVERY_SKIP_AT[_size], "n_batch": 2})


def tiny_args(preset: str, root, run_dir, size: int, **overrides) -> list[str]:
    values = {"data_root": root, "save_dir": run_dir, "width": 8, "zdim": 2, "max_steps": 2, "n_batch": 2,
              "n_batch_eval": 8, "eval_every": 0, "log_every": 1, "warmup_iters": 1, "num_mixtures": 2,
              "grad_checkpoint": "none", "global_batch": 0, **TINY_AT[size], **overrides}
    return ["--hps", preset, *[a for k, v in values.items() for a in (f"--{k}", str(v))]]


def final_record(run_dir) -> dict:
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def test_every_preset_is_tested_here():
    assert set(PRESETS) - {"digits"} == set(DATASETS)


@pytest.mark.parametrize("preset", DATASETS)
def test_preset_trains_a_tiny_variant_on_its_file_format(preset, tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    write, size, extra = DATASETS[preset]
    write(tmp_path / "data")
    run_dir = tmp_path / "run"
    train.main(tiny_args(preset, tmp_path / "data", run_dir, size, **extra))
    final = final_record(run_dir)
    assert final["kind"] == "final" and final["step"] == 2 and final["test_bpd"] > 0
    ckpt = torch.load(run_dir / "latest.pt", weights_only=True)
    hps = ckpt["hps"]
    assert hps["hps"] == preset and hps["image_size"] == size
    expected_classes = {"celeba64": 40, "ffhq256": 0, "ffhq1024": 0, "folder": 2,
                        "cifar100": 100}.get(preset, 1000 if preset.startswith("imagenet") else 10)
    assert hps["n_classes"] == expected_classes and len(ckpt["class_names"]) == expected_classes
    assert hps["multi_label"] == (preset == "celeba64") and hps["pad"] == (2 if "mnist" in preset else 0)


def test_binarized_mnist_trains_with_a_bernoulli_likelihood_and_reports_nats(tmp_path, monkeypatch):
    import train

    monkeypatch.chdir(tmp_path)
    write_mnist(tmp_path / "data")
    run_dir = tmp_path / "run"
    train.main(tiny_args("mnist", tmp_path / "data", run_dir, 32, likelihood="bernoulli", pixel_levels=2))
    log = (run_dir / "log.txt").read_text()
    assert "nats per image" in log
    ckpt = torch.load(run_dir / "latest.pt", weights_only=True)
    assert ckpt["hps"]["likelihood"] == "bernoulli"
    # an untrained Bernoulli model is near 1 bit per pixel of the 28x28 digit, about 784 * ln 2 = 543 nats
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    test_eval = [r for r in evals if r["kind"] == "eval"][-1]
    assert 0.3 < test_eval["loss"] < 3.0
    assert abs(test_eval["nats_per_image"] - test_eval["loss"] * 784 * 0.6931471805599453) < 1e-3
    # pictures and arrays show the 28x28 digit the likelihood scores, not the 2-pixel padding to 32x32
    import sample

    sample.main(["--weights", str(run_dir), "--n", "2", "--out", str(tmp_path / "s.npz"), "--device", "cpu"])
    assert np.load(tmp_path / "s.npz")["images"].shape == (20, 28, 28, 1)


def test_attribute_model_samples_by_attribute(tmp_path):
    write_celeba(tmp_path / "data")
    run_dir = tmp_path / "run"
    result = run("train.py", *tiny_args("celeba64", tmp_path / "data", run_dir, 64), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(torch.load(run_dir / "latest.pt", weights_only=True)["attribute_means"]) == 40
    out = tmp_path / "faces.npz"
    result = run("sample.py", "--weights", str(run_dir), "--attributes", "Smiling,Male=0;Eyeglasses", "--n", "3",
                 "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arrays = np.load(out)
    assert arrays["images"].shape == (6, 64, 64, 3)
    bad = run("sample.py", "--weights", str(run_dir), "--attributes", "Smiling=2", cwd=tmp_path)
    assert bad.returncode == 2 and "takes =0 or =1" in bad.stderr
    bad = run("sample.py", "swap", "--weights", str(run_dir), cwd=tmp_path)
    assert bad.returncode == 2 and "conditions on attributes" in bad.stderr


@pytest.mark.parametrize("preset,size,expected", [("imagenet32", 32, 119_280_868), ("imagenet64", 64, 125_005_860),
                                                  ("ffhq256", 256, 114_874_852), ("ffhq1024", 1024, 109_366_904)])
def test_paper_presets_build_at_full_size(preset, size, expected):
    """openai/vdvae's architectures as its hps.py gives them: 119M, 125M and 115M parameters in its README (the
    FFHQ-1024 line there repeats FFHQ-256's)."""
    h = hparams_from_preset(preset, {"n_classes": 0})
    h.image_size, h.image_channels = size, 3
    assert count_parameters(VAE(h)) == expected


def test_every_preset_evaluates_in_batches_of_bounded_size():
    """Evaluation runs without gradients but at n_batch_eval images a batch: ffhq256 at the default 64 would need
    some 17 GB in fp32. No preset's evaluation batch holds more pixels than 8 images of 256x256 (or one image)."""
    from hps import DATASET_SHAPES

    for name, preset in PRESETS.items():
        h = hparams_from_preset(name)
        size = DATASET_SHAPES[h.dataset].image_size
        assert h.n_batch_eval <= max(1, 8 * 256 * 256 // (size * size)), name
