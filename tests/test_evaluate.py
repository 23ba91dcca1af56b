"""Held-out evaluation: the ELBO, the importance-weighted bound, generative classification, the CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run, tiny_cli_args, tiny_hps, write_damaged_weights
from data import Split
from scoring import class_conditional_bpd, evaluate_elbo, importance_weighted_bpd
from vae import VAE


def model_with_informative_posterior(seed: int = 0) -> VAE:
    """A fresh tiny model whose priors and posteriors differ (as after training), so the bounds differ."""
    torch.manual_seed(seed)
    model = VAE(tiny_hps()).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for block in model.decoder.dec_blocks:
            for conv in (block.prior.c4, block.enc.c4):
                conv.weight.copy_(0.3 * torch.randn(conv.weight.shape, generator=gen))
    return model


def random_split(n: int, seed: int = 0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 8, 8), generator=gen, dtype=torch.uint8),
                 torch.randint(0, 10, (n,), generator=gen))


def test_single_draw_importance_weight_is_an_unbiased_elbo():
    """E_q[log p(x,z) - log q(z|x)] (Monte Carlo KL) equals the ELBO with the analytic KL."""
    model = model_with_informative_posterior()
    images, labels = random_split(1).images.expand(4000, -1, -1, -1), torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(0)
    log_w = model.log_importance_weights(images, labels).double()
    torch.manual_seed(1)
    with torch.no_grad():
        out = model(images, labels)
    ndims = 64 * math.log(2.0)
    elbo_bpd = out["loss_per_image"].double()
    iw1_bpd = -log_w / ndims
    stderr = math.sqrt(iw1_bpd.var() / len(iw1_bpd) + elbo_bpd.var() / len(elbo_bpd))
    assert abs(iw1_bpd.mean() - elbo_bpd.mean()) < 4 * stderr


def test_iw_bound_with_k1_is_the_elbo_estimate_and_more_draws_are_never_worse():
    model = model_with_informative_posterior()
    split = random_split(24)
    k1 = importance_weighted_bpd(model, split, 1, 64, torch.device("cpu"), seed=0)
    k1_again = importance_weighted_bpd(model, split, 1, 64, torch.device("cpu"), seed=0)
    k20 = importance_weighted_bpd(model, split, 20, 64, torch.device("cpu"), seed=0)
    assert torch.equal(k1, k1_again)  # a fixed seed makes the bound repeatable
    assert k20.mean() < k1.mean()  # the bound tightens (bits/dim fall) with K
    assert (k20 <= k1 + 0.05).float().mean() > 0.9  # and is rarely worse per image, up to noise


def test_generative_classification_on_a_known_toy_case():
    """Class 0 is always black, class 1 always white: after brief training the ELBO tells them apart."""
    torch.manual_seed(0)
    model = VAE(tiny_hps(n_classes=2))
    images = torch.cat([torch.zeros(16, 1, 8, 8), torch.full((16, 1, 8, 8), 255.0)]).to(torch.uint8)
    labels = torch.cat([torch.zeros(16), torch.ones(16)]).long()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        loss = model(images, labels)["loss_nats"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    scores = class_conditional_bpd(model, Split(images, labels), 64, torch.device("cpu"))
    assert scores.shape == (32, 2)
    assert torch.equal(scores.argmin(dim=1), labels)


def test_evaluate_elbo_leaves_the_callers_rng_alone():
    model = model_with_informative_posterior()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = evaluate_elbo(model, random_split(8), 4, torch.device("cpu"), seed=1)
    assert torch.equal(torch.rand(3), expected)
    second = evaluate_elbo(model, random_split(8), 4, torch.device("cpu"), seed=1)
    assert first["loss"] == second["loss"]
    assert first["loss"] == pytest.approx(first["recon"] + first["kl"], abs=1e-5)


def test_evaluate_cli_writes_every_field(tmp_path):
    run_dir = tmp_path / "run"
    train = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_cli_args(run_dir)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", str(run_dir),
                             "--iw_samples", "3", "--n_batch", "120"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "generative classification accuracy" in result.stdout
    report = json.loads((run_dir / "eval_test.json").read_text())
    for key in ["bpd", "recon_bpd", "kl_bpd", "kl_per_resolution", "bpd_iw", "iw_samples", "per_class_bpd",
                "gen_class_acc", "confusion", "n_images", "class_names", "checkpoint"]:
        assert key in report, key
    assert report["n_images"] == 360 and sum(map(sum, report["confusion"])) == 360
    assert set(report["kl_per_resolution"]) == {"1", "4", "8"}
    assert report["bpd"] == pytest.approx(report["recon_bpd"] + report["kl_bpd"], abs=1e-4)
    assert len(report["per_class_bpd"]) == 10

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((run_dir / "latest.pt").read_bytes()[:1000])
    for weights, message in [(truncated, "cannot read checkpoint"), (tmp_path / "missing.pt", "does not exist")]:
        bad = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--weights", str(weights)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=600)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1


def test_random_subset_draws_distinct_rows_in_order_and_repeats_with_its_seed():
    from scoring import random_subset

    split = random_split(50)
    part = random_subset(split, 12, seed=3)
    rows = [next(i for i in range(50) if torch.equal(split.images[i], img)) for img in part.images]
    assert len(set(rows)) == 12 and rows == sorted(rows)
    assert torch.equal(part.labels, split.labels[rows])
    assert torch.equal(random_subset(split, 12, seed=3).images, part.images)
    assert not torch.equal(random_subset(split, 12, seed=4).images, part.images)
    assert random_subset(split, 0, seed=3) is split and random_subset(split, 50, seed=3) is split


def test_evaluate_cli_scores_a_random_subset(trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / "eval.json"
    result = run("evaluate.py", "--weights", str(run_dir), "--n_images", "40", "--no_classify", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["n_images"] == 40 and "(40 images" in result.stdout


def test_figures_do_not_depend_on_the_batch_size_or_the_order_of_batches():
    """Each image's posterior noise comes from (seed, its index): the same --seed gives the same ELBO, IW bound and
    class scores at any --n_batch (the README figure came from one batch of 360, the default batch is 64)."""
    model = model_with_informative_posterior()
    split = random_split(37)
    whole = evaluate_elbo(model, split, 37, torch.device("cpu"), seed=3)
    for batch in (1, 5, 16):
        part = evaluate_elbo(model, split, batch, torch.device("cpu"), seed=3)
        torch.testing.assert_close(part["per_image"], whole["per_image"], rtol=1e-5, atol=1e-5)
        assert abs(part["loss"] - whole["loss"]) < 1e-5
    other_seed = evaluate_elbo(model, split, 37, torch.device("cpu"), seed=4)
    assert not torch.allclose(other_seed["per_image"], whole["per_image"])  # the noise does matter
    iw = [importance_weighted_bpd(model, split, 4, b, torch.device("cpu"), seed=3) for b in (8, 64)]
    torch.testing.assert_close(iw[0], iw[1], rtol=1e-5, atol=1e-5)
    scores = [class_conditional_bpd(model, split, b, torch.device("cpu"), seed=3) for b in (5, 37)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit status 2, nothing written (as tests/test_cli.py's BAD_INPUTS)
# ---------------------------------------------------------------------------------------------


def watched(*folders) -> dict:
    """Every path under ``folders``: files with size, modification time and inode (a rewritten or replaced file
    shows; large files are not read), folders as None (a new one shows)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            out[p] = (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) if p.is_file() else None
    return out


def assert_refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2 and exactly one stderr line, ``error: ...`` containing ``message``, without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


EVALUATE_BAD_INPUTS = [
    # weights: missing, damaged, foreign, not fitting what they describe
    ([], "weights file weights/digits.safetensors does not exist"),  # the default, in a folder without it
    (["--weights", "/nonexistent/x.safetensors"], "weights file /nonexistent/x.safetensors does not exist"),
    (["--weights", "{CORRUPT}"], "cannot read checkpoint"),
    (["--weights", "{FOREIGN}"], "is not a checkpoint of this project"),
    (["--weights", "{EMPTYDIR}"], "holds no checkpoint"),
    (["--weights", "{BADSAFETENSORS}"], "cannot read"),
    (["--weights", "{MISFIT}"], "do not fit the model they describe"),
    # openai/vdvae .th files: the preset must be named and known, the file readable, its keys theirs
    (["--weights", "{RESHAPED_TH}"], "is an openai/vdvae checkpoint: name its preset with --hps"),
    (["--weights", "{RESHAPED_TH}", "--hps", "digits"], "--hps 'digits' has no openai/vdvae checkpoint"),
    (["--weights", "/nonexistent/x.th", "--hps", "cifar10"], "weights file /nonexistent/x.th does not exist; weights "
     "come from"),
    (["--weights", "{CORRUPT_TH}", "--hps", "cifar10"], "cannot read openai/vdvae checkpoint"),
    (["--weights", "{FOREIGN_TH}", "--hps", "cifar10"], "is not a state dict of tensors"),
    (["--weights", "{RESHAPED_TH}", "--hps", "cifar10"],
     "1 shape mismatch(es): decoder.gain (1, 256, 1, 1) there, (1, 384, 1, 1) here"),
    # settings
    (["--weights", "{RUN}", "--split", "train2"], "invalid choice: 'train2'"),
    (["--weights", "{RUN}", "--iw_samples", "0"], "--iw_samples and --n_batch must be >= 1"),
    (["--weights", "{RUN}", "--n_batch", "0"], "--iw_samples and --n_batch must be >= 1"),
    (["--weights", "{RUN}", "--n_batch", "x"], "argument --n_batch: invalid int value: 'x'"),
    (["--weights", "{RUN}", "--n_images", "-1"], "--n_images must be >= 0"),
    (["--weights", "{RUN}", "--device", "tpu"], "unknown device 'tpu'"),
    (["--weights", "{RUN}", "--no_clasify"], "unrecognized arguments: --no_clasify"),
    # where the report goes: refused before the evaluation runs
    (["--weights", "{RUN}", "--out", "/proc/no/such/x.json"], "cannot write /proc/no/such/x.json"),
    (["--weights", "{RUN}", "--out", "{OUTDIR}/eval.json"], "cannot write"),  # no such folder: not created
    (["--weights", "{RUN}", "--out", "."], "cannot write ."),  # a folder
]


@pytest.fixture(scope="module")
def evaluate_bad_files(trained_run, tmp_path_factory):
    """Damaged, foreign and misfitting weights (ours and openai/vdvae's .th) beside the shared trained run."""
    folder = tmp_path_factory.mktemp("bad_evaluate")
    run_dir, _ = trained_run
    damaged = write_damaged_weights(folder, run_dir)
    misfit = torch.load(run_dir / "latest.pt", weights_only=True)
    misfit["hps"]["width"] = 32  # describes a wider model than its weights are
    torch.save(misfit, folder / "misfit.pt")
    (folder / "corrupt.th").write_bytes(b"PK\x03\x04 not a zip archive")
    torch.save({"step": 5, "weights": torch.zeros(2)}, folder / "foreign.th")
    torch.save({"module.decoder.gain": torch.zeros(1, 256, 1, 1)}, folder / "reshaped.th")
    return {**damaged, "MISFIT": folder / "misfit.pt",
            "CORRUPT_TH": folder / "corrupt.th", "FOREIGN_TH": folder / "foreign.th",
            "RESHAPED_TH": folder / "reshaped.th", "folder": folder}


@pytest.mark.parametrize("args,message", EVALUATE_BAD_INPUTS, ids=[" ".join(a) or "defaults" for a, _ in
                                                                   EVALUATE_BAD_INPUTS])
def test_evaluate_bad_input_is_one_line_and_exit_2(trained_run, evaluate_bad_files, tmp_path, args, message):
    """Each bad invocation: exit status 2, one line on stderr naming the problem, no traceback, no evaluation
    run first, the run and the weights left as they were, and nothing written where it ran (run from an empty
    folder: no report, no output folder that did not exist before)."""
    run_dir, _ = trained_run
    outdir = tmp_path / "out"
    names = {**evaluate_bad_files, "RUN": run_dir, "OUTDIR": outdir}
    before = watched(run_dir, evaluate_bad_files["folder"])
    result = run("evaluate.py", *[a.format(**names) for a in args], cwd=tmp_path)
    assert_refused(result, message)
    assert "negative ELBO" not in result.stdout  # refused before evaluating, not after
    assert watched(run_dir, evaluate_bad_files["folder"]) == before
    assert not outdir.exists() and not list(tmp_path.iterdir())


class DeviceWithoutFloat64(torch.Tensor):
    """A tensor on a device that has no float64, as MPS: asking it for float64 fails; .cpu() leaves the device."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cpu:
            return super().__torch_function__(func, types, args, kwargs).as_subclass(torch.Tensor)
        if func is torch.Tensor.double or any(a is torch.float64 for a in [*args[1:], *kwargs.values()]):
            raise AssertionError(f"float64 asked of a device tensor by {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs)


class ModelOnDeviceWithoutFloat64(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner, self.H, self.decoder = model, model.H, model.decoder
        self.n_groups, self.abilities = model.n_groups, model.abilities
        self.latent_shapes, self.scored_dims = model.latent_shapes, model.scored_dims

    def forward(self, *args, **kwargs):
        return {k: v.as_subclass(DeviceWithoutFloat64) for k, v in self.inner(*args, **kwargs).items()}

    def log_importance_weights(self, *args, **kwargs):
        return self.inner.log_importance_weights(*args, **kwargs).as_subclass(DeviceWithoutFloat64)


def test_evaluation_keeps_float64_off_the_device():
    """MPS has no float64: evaluation accumulates on the CPU. Every figure is computed from device outputs that
    refuse float64, and equals the plain computation."""
    model = model_with_informative_posterior()
    guarded = ModelOnDeviceWithoutFloat64(model)
    split, cpu = random_split(12), torch.device("cpu")
    assert evaluate_elbo(guarded, split, 5, cpu)["loss"] == pytest.approx(evaluate_elbo(model, split, 5, cpu)["loss"])
    torch.testing.assert_close(importance_weighted_bpd(guarded, split, 3, 6, cpu),
                               importance_weighted_bpd(model, split, 3, 6, cpu))
    torch.testing.assert_close(class_conditional_bpd(guarded, split, 5, cpu), class_conditional_bpd(model, split, 5, cpu))
    with pytest.raises(AssertionError, match="float64 asked"):  # the guard itself works
        torch.ones(2).as_subclass(DeviceWithoutFloat64).double()
