"""bench/judge.py, the Fashion-MNIST sample judge: the Frechet distance against closed forms, precision and recall
against a hand count and a brute-force loop, the classifier's cache, and the command end to end on miniature files;
and its user bench/families.py, which compares the families on Fashion-MNIST at equal wall-clock."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from conftest import run  # noqa: E402
from judge import JudgeNet, fit_judge, frechet_distance, precision_recall  # noqa: E402
from test_datasets import write_fashion_mnist  # noqa: E402
from test_presets import final_record, tiny_args  # noqa: E402

from data import load_data  # noqa: E402
from utils import UserError  # noqa: E402


def test_frechet_distance_of_diagonal_gaussians_equals_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal([0.0, 1.0, -2.0], [1.0, 2.0, 0.5], size=(4000, 3))
    b = rng.normal([0.5, 1.0, -1.0], [3.0, 1.0, 0.5], size=(4000, 3))
    # diagonal covariances commute: tr(S_a + S_b - 2 sqrt(S_a S_b)) = sum (sd_a - sd_b)^2 per dimension, up to
    # the sample's small off-diagonal terms
    sd_a, sd_b = a.std(0, ddof=1), b.std(0, ddof=1)
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + ((sd_a - sd_b) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_of_full_covariances_equals_scipys_matrix_square_root():
    from scipy import linalg

    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4)) + 1.0
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real  # the general square root of the FID's formula, well-conditioned here
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_with_dead_features_equals_the_distance_without_them():
    """ReLU units that never fire give singular covariances: the distance is that of the live features alone."""
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 3)), rng.normal(0.3, 1.5, size=(300, 3))
    dead = np.zeros((300, 2))
    assert frechet_distance(np.hstack([a, dead]), np.hstack([b, dead])) == pytest.approx(frechet_distance(a, b),
                                                                                          rel=1e-9)


def test_precision_and_recall_equal_a_hand_count():
    real = np.array([[0.0], [1.0], [2.0], [3.0]])
    fake = np.array([[0.5], [10.0]])
    # k=1: every real point's radius is 1 (its nearest neighbour); 0.5 lies within one, 10 within none
    # the fakes' radii are both 9.5 (each other): every real point lies within 9.5 of 0.5
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # a ball reaches its k-th neighbour inclusively: a fake at 4 lies exactly on the ball of 3 (radius 1); two
    # fakes at 4 are each other's nearest neighbour, so their balls have radius 0 and hold no real point
    assert precision_recall(real, np.array([[4.0], [4.0]]), k=1) == (1.0, 0.0)


def test_precision_and_recall_equal_a_brute_force_loop():
    rng = np.random.default_rng(2)
    real, fake, k = rng.normal(size=(40, 3)), rng.normal(0.5, 1.2, size=(30, 3)), 3

    def manifold_share(points, centres):
        radii = [sorted(np.linalg.norm(centres - c, axis=1))[k] for c in centres]  # [0] is the centre itself
        return np.mean([any(np.linalg.norm(p - c) <= r for c, r in zip(centres, radii)) for p in points])

    precision, recall = precision_recall(real, fake, k=k)
    assert precision == pytest.approx(manifold_share(fake, real))
    assert recall == pytest.approx(manifold_share(real, fake))
    assert 0 < precision < 1 and 0 < recall < 1  # the sets overlap partly: a case that tells the two apart


def test_the_judge_learns_separable_classes_and_is_reused_from_its_cache(tmp_path):
    write_fashion_mnist(tmp_path, n_train=400, n_test=50)
    data = load_data("fashion_mnist", str(tmp_path))
    for split in (data.train, data.valid, data.test):  # class c: a bright band at rows 2c..2c+4 of the 28x28
        split.images.zero_()
        for i, c in enumerate(split.labels.tolist()):
            split.images[i, 0, 2 + 2 * c:6 + 2 * c, 2:30] = 255
    cache = tmp_path / "judge.pt"
    net, accuracy = fit_judge(data, pad=2, epochs=10, cache=cache, log=lambda _: None)
    assert accuracy > 0.9 and cache.exists()
    lines = []
    again, same = fit_judge(data, pad=2, epochs=10, cache=cache, log=lines.append)
    assert lines == [] and same == accuracy  # loaded, not trained
    for p, q in zip(net.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)
    _, other = fit_judge(data, pad=2, epochs=1, cache=cache, log=lines.append)  # another recipe: trained anew
    assert len(lines) == 1
    assert net.features(data.test.images[:3, :, 2:30, 2:30]).shape == (3, 128)
    assert isinstance(net, JudgeNet)


@pytest.fixture(scope="module")
def tiny_fashion_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("judge")
    write_fashion_mnist(root / "data", n_train=60, n_test=20)
    run_dir = root / "run"
    result = run("train.py", *tiny_args("fashion_mnist_cpu", root / "data", run_dir, 32, label_dropout=0.5,
                                        num_mixtures=2))
    assert result.returncode == 0, result.stderr
    assert final_record(run_dir)["kind"] == "final"
    return root, run_dir


def test_judge_command_scores_temperatures_and_guidance(tiny_fashion_run):
    root, run_dir = tiny_fashion_run
    result = run("bench/judge.py", "--weights", str(run_dir), "--data_root", str(root / "data"), "--n_samples",
                 "20", "--epochs", "1", "--temperatures", "1.0,0.8", "--guidance", "1", "--cache",
                 str(root / "judge.pt"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["samples"]
    assert [(r["temperature"], r["guidance"]) for r in rows] == [(1.0, 0.0), (0.8, 0.0), (1.0, 1.0)]
    for r in rows + [report["floor"]]:
        assert 0.0 <= r["consistency"] <= 1.0 and 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
        assert r["frechet"] >= 0.0
    assert report["n_samples"] == 20 and "| t=0.8 |" in result.stdout


@pytest.mark.parametrize("flags, message", [
    (["--n_samples", "3"], "at least the 10 classes"),
    (["--temperatures", "hot"], "comma-separated numbers"),
])
def test_judge_bad_input_is_one_line_and_exit_2(tiny_fashion_run, flags, message):
    root, run_dir = tiny_fashion_run
    result = run("bench/judge.py", "--weights", str(run_dir), "--data_root", str(root / "data"), "--cache", "",
                 *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_judge_refuses_guidance_without_label_dropout_and_other_datasets(tmp_path, tiny_fashion_run, trained_run):
    root, _ = tiny_fashion_run
    plain = tmp_path / "plain"
    assert run("train.py", *tiny_args("fashion_mnist_cpu", root / "data", plain, 32, label_dropout=0.0,
                                      num_mixtures=2)).returncode == 0
    result = run("bench/judge.py", "--weights", str(plain), "--data_root", str(root / "data"), "--guidance", "1",
                 "--cache", "")
    assert result.returncode == 2 and "trained without" in result.stderr and "Traceback" not in result.stderr
    digits_run, _ = trained_run
    result = run("bench/judge.py", "--weights", str(digits_run), "--cache", "")
    assert result.returncode == 2 and "judges Fashion-MNIST models" in result.stderr


TINY_FAMILIES = ["--width", "8", "--zdim", "2", "--n_batch", "2", "--n_batch_eval", "8", "--warmup_iters", "1",
                 "--num_mixtures", "2", "--conv_width", "4", "--made_hidden", "8", "--codebook_size", "4",
                 "--code_dim", "4", "--prior_channels", "4", "--prior_layers", "1",
                 "--enc_blocks", "32x1,32d4,8d8,1x1", "--dec_blocks", "1x1,8m1,32m8"]


def test_families_on_fashion_mnist_fit_the_minutes_and_report_every_figure(tiny_fashion_run, tmp_path):
    root, _ = tiny_fashion_run
    out = tmp_path / "runs"
    result = run("bench/families.py", "--hps", "fashion_mnist_cpu", "--minutes", "0.05", "--families", "cvae,vqvae",
                 "--calibration_steps", "6", "--iw_images", "8", "--iw_samples", "2", "--judge_samples", "10",
                 "--judge_cache", "", "--pictures", "", "--data_root", str(root / "data"), "--out", str(out),
                 *TINY_FAMILIES)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("cvae", "vqvae"):
        r = report["families"][name]
        assert r["iw_images"] == 8 and r["test_bpd"] > 0 and r["test_bpd_iw"] > 0 and 0 <= r["class_consistency"] <= 1
        assert r["calibration_matched"]  # both runs trained with the same speed settings
        # because the timed run was given the calibration's: it neither probed nor fell back on the rule
        lines = [line for line in (out / name / "log.txt").read_text().splitlines() if "speed settings" in line]
        assert lines and all("speed settings: " in line for line in lines)
        # the steps fit the minutes at the speed measured: one step of every stage
        seconds_per_step = sum(1 / v for v in r["steps_per_s"].values())
        assert r["steps"] == max(1, int(0.05 * 60 / seconds_per_step))
        final = final_record(out / name)
        stages = len(r["steps_per_s"])
        assert final["step"] == stages * r["steps"]  # the vqvae's prior counts on from its autoencoder's steps
    assert set(report["families"]["vqvae"]["steps_per_s"]) == {"autoencoder", "prior"}


def test_families_on_fashion_mnist_need_minutes(tiny_fashion_run):
    root, _ = tiny_fashion_run
    result = run("bench/families.py", "--hps", "fashion_mnist_cpu", "--data_root", str(root / "data"))
    assert result.returncode == 2 and "give --minutes M" in result.stderr and "Traceback" not in result.stderr


def test_a_family_that_fails_on_fashion_mnist_is_a_row_and_the_others_run(monkeypatch):
    """measure_family_fashion: a failed run (its UserError) becomes {"failed": why}, with the family's own rate."""
    import argparse

    import families

    seen = {}

    def fails(name, args, passed, out, judge):
        seen[name] = passed
        raise UserError("train.py ... failed: error: stopped at step 200: 100 updates in a row were skipped")

    monkeypatch.setattr(families, "train_and_score_fashion", fails)
    args = argparse.Namespace(lr_of=families.parse_lr_of("cvae=2e-3"))
    row = families.measure_family_fashion("cvae", args, ["--width", "8"], Path("."), None)
    assert row == {"failed": "train.py ... failed: error: stopped at step 200: 100 updates in a row were skipped",
                   "lr": "2e-3"}
    assert seen["cvae"] == ["--width", "8", "--lr", "2e-3"]
    families.measure_family_fashion("vdvae", args, [], Path("."), None)
    assert seen["vdvae"] == []  # no rate of its own: the preset's


@pytest.mark.parametrize("text", ["cvae=0", "cvae=fast", "gan=1e-3"])
def test_lr_of_refuses_what_is_not_a_family_s_positive_rate(text):
    import families

    with pytest.raises(UserError):
        families.parse_lr_of(text)
