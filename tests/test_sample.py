"""sample.py's modes (grid, recon, interp, explore, swap) through the real command line, and the latent maths they
rest on: prior noise that reproduces a posterior, class mixing, spherical interpolation, per-resolution
temperatures."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

import sample
import sampling
from conftest import run, tiny_hps
from data import load_digits
from hps import hparams_from_preset
from trainer import Trainer
from vae import VAE

CELL = 8 * 4 + 2  # an 8x8 digit is drawn 4x larger, with 2 pixels of padding

# mode -> (arguments, rows, columns of the PNG it writes); the tiny model has 5 latent groups
MODES = {
    "grid": (["--classes", "3,7", "--n", "3"], 2, 3),
    "recon": (["--n", "3", "--k", "0,2,5"], 3, 4),
    "interp": (["--n", "2", "--frames", "5"], 2, 5),
    "explore": (["--class", "4", "--n", "3"], 5, 3),
    "swap": (["--n", "2", "--classes", "1,2,3"], 2, 4),
}


def in_process(mode: str, run_dir, out, *extra: str) -> bytes:
    sample.main([mode, "--weights", str(run_dir), "--out", str(out), *MODES[mode][0], *extra])
    return out.read_bytes()


@pytest.mark.parametrize("mode", MODES)
def test_each_mode_runs_from_the_command_line_and_repeats_with_its_seed(mode, trained_run, tmp_path):
    run_dir, _ = trained_run
    out = tmp_path / f"{mode}.png"
    result = run("sample.py", mode, "--weights", str(run_dir), "--out", str(out), *MODES[mode][0])
    assert result.returncode == 0, result.stderr
    width, height = Image.open(out).size
    _, rows, cols = MODES[mode]
    assert rows * CELL <= height < rows * CELL + 40 and cols * CELL <= width < cols * CELL + 120
    first = out.read_bytes()
    assert in_process(mode, run_dir, tmp_path / "again.png") == first
    assert in_process(mode, run_dir, tmp_path / "other.png", "--seed", "5") != first


def test_no_mode_is_the_grid(trained_run, tmp_path):
    run_dir, _ = trained_run
    sample.main(["--weights", str(run_dir), "--out", str(tmp_path / "a.png"), "--classes", "3,7", "--n", "3"])
    sample.main(["grid", "--weights", str(run_dir), "--out", str(tmp_path / "b.png"), "--classes", "3,7", "--n", "3"])
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("how", [[], ["--seeds", "1,2", "--class", "5"], ["--classes", "3,8"], ["--images", "4,9"]])
def test_interp_writes_a_gif_with_the_asked_number_of_frames(how, trained_run, tmp_path):
    run_dir, _ = trained_run
    sample.main(["interp", "--weights", str(run_dir), "--out", str(tmp_path / "i.gif"), "--frames", "7", *how])
    gif = Image.open(tmp_path / "i.gif")
    assert gif.n_frames == 7
    assert Image.open(tmp_path / "i.png").size[0] >= 7 * CELL  # the strip beside it: a column per frame


def perturbed_tiny_model(**overrides) -> VAE:
    torch.manual_seed(0)
    model = VAE(tiny_hps(**overrides))
    with torch.no_grad():  # move the zero-initialised heads off zero, so the prior depends on the state
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_prior_noise_of_an_image_decodes_its_posterior_means_exactly():
    model = perturbed_tiny_model()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 5, 5, 9])
    enc_in, _ = model.preprocess(images)
    zeros = [torch.zeros(4, *s) for s in model.decoder.latent_shapes()]
    with torch.no_grad():
        px_posterior, stats_q = model.decoder(model.encoder(enc_in), labels, noises=zeros)
        eps = model.prior_noise_of(images, labels)
        px_prior, stats_p = model.decoder(None, labels, batch=4, noises=eps)
    for q, p in zip(stats_q, stats_p):
        torch.testing.assert_close(p["z"], q["z"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(px_prior, px_posterior, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(eps[0], zeros[0])  # a non-trivial code: the posterior mean is not the prior's


def test_one_hot_class_weights_equal_class_indices_and_a_class_changes_the_image():
    model = perturbed_tiny_model()
    noise = [torch.randn(3, *s, generator=torch.Generator().manual_seed(i))
             for i, s in enumerate(model.decoder.latent_shapes())]
    labels = torch.tensor([2, 3, 7])
    with torch.no_grad():
        by_index, _ = model.decoder(None, labels, batch=3, noises=noise)
        by_weights, _ = model.decoder(None, torch.nn.functional.one_hot(labels, 10).float(), batch=3, noises=noise)
        other, _ = model.decoder(None, torch.tensor([4, 3, 7]), batch=3, noises=noise)
    torch.testing.assert_close(by_weights, by_index)
    assert not torch.allclose(other[0], by_index[0]) and torch.equal(other[1:], by_index[1:])


def test_slerp_keeps_its_ends_and_the_norm_between_orthogonal_equal_vectors():
    a, b = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    a[:, 0, 0, 0], b[:, 1, 0, 0] = 2.0, 2.0
    torch.testing.assert_close(sampling.slerp(a, b, 0.0), a)
    torch.testing.assert_close(sampling.slerp(a, b, 1.0), b)
    mid = sampling.slerp(a, b, 0.5)
    torch.testing.assert_close(mid.flatten(1).norm(dim=1), torch.full((2,), 2.0))
    torch.testing.assert_close(sampling.slerp(a, a, 0.3), a)  # parallel ends: no division by zero


def test_temperature_per_resolution_expands_to_the_groups():
    model = VAE(tiny_hps())  # latent groups at resolutions 1, 4, 4, 8, 8
    assert sampling.parse_temperature("4:0.5,8:0.25", model) == [1.0, 0.5, 0.5, 0.25, 0.25]
    assert sampling.parse_temperature("0.7", model) == 0.7


def test_swap_and_explore_reuse_the_noise_they_hold_fixed(trained_run):
    run_dir, _ = trained_run
    args = sampling.build_parser().parse_args(["swap", "--weights", str(run_dir)])
    session = sampling.Session(args)
    noise = session.prior_noise(2, seed=3)
    same = [session.decode(noise, session.labels(c, 2)) for c in (4, 4)]
    assert torch.equal(same[0], same[1])  # decoding is repeatable: differences below come from the class
    assert not torch.equal(session.decode(noise, session.labels(5, 2)), same[0])


@pytest.fixture(scope="module")
def learned_model():
    """A narrow digits model trained until its posterior carries information (KL well above zero): about 400
    steps; before that a small VAE leaves its latents unused."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # convolutions this small run faster on one thread than on two
    torch.manual_seed(0)
    h = hparams_from_preset("digits", dict(width=32, zdim=8, lr=3e-3, warmup_iters=20, lr_decay="none", n_batch=32))
    h.image_size, h.image_channels = 8, 1
    trainer = Trainer(h, torch.device("cpu"))
    data = load_digits()
    order = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, len(data.train), (32,), generator=order)
        trainer.step(data.train.images[idx], data.train.labels[idx])
    torch.set_num_threads(threads)
    return trainer.model.eval(), data


def test_reconstruction_from_all_groups_is_closer_than_from_none(learned_model):
    model, data = learned_model
    images, labels = data.test.images[:200], data.test.labels[:200]
    torch.manual_seed(1)
    mse = {k: ((model.reconstruct(images, labels, n_posterior=k).float() - images.float()) / 255).pow(2).mean()
           for k in (0, model.decoder.n_groups)}
    assert mse[model.decoder.n_groups] < 0.85 * mse[0], mse


def test_under_bf16_autocast_the_distribution_heads_stay_fp32_and_noise_round_trips():
    """The output conv and the prior/posterior heads run in fp32 under autocast: the DMOL and the KL get fp32
    parameters, and the noise prior_noise_of hands to the prior is not rounded to bf16 on the way, so the prior
    reproduces the posterior means' latents to fp32 precision (bf16 rounding errs by about 1e-2)."""
    model = perturbed_tiny_model()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 5, 5, 9])
    enc_in, _ = model.preprocess(images)
    zeros = [torch.zeros(4, *s) for s in model.decoder.latent_shapes()]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        px_posterior, stats_q = model.decoder(model.encoder(enc_in), labels, noises=zeros)
        eps = model.prior_noise_of(images, labels)
        px_prior, stats_p = model.decoder(None, labels, batch=4, noises=eps)
        assert model.decoder.out_net(px_posterior).dtype == torch.float32
    for q, p in zip(stats_q, stats_p):
        assert q["z"].dtype == p["z"].dtype == q["kl"].dtype == torch.float32
    torch.testing.assert_close(stats_p[0]["z"], stats_q[0]["z"], rtol=1e-5, atol=1e-5)  # the top group: exact
    for q, p in zip(stats_q, stats_p):
        torch.testing.assert_close(p["z"], q["z"], rtol=0.05, atol=0.05)  # below: bf16 states, same latents
