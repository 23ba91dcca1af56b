"""toy2d.py: the 2-D mixture data against their analytic moments and density, and the vector cvae's ELBO, bound
and samples."""
from __future__ import annotations

import json

import pytest
import torch

import toy2d
from utils import UserError


def analytic_moments(cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a Gaussian mixture: sum w mu, and sum w (Sigma + mu mu^T) - mean mean^T."""
    weights, means, covs = toy2d.mixture_parameters(cls)
    mean = (weights[:, None] * means).sum(0)
    second = (weights[:, None, None] * (covs + means[:, :, None] * means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def test_points_follow_each_class_mixture_with_full_covariances():
    points, labels = toy2d.make_toy2d(200_000, seed=3)
    for cls in range(2):
        x = points[labels == cls].double()
        mean, cov = analytic_moments(cls)
        assert torch.allclose(x.mean(0), mean, atol=0.02)
        assert torch.allclose(torch.cov(x.T), cov, atol=0.03)
        _, _, covs = toy2d.mixture_parameters(cls)
        assert (covs[:, 0, 1].abs() > 0.05).all()  # every component tilted: a full covariance, not a diagonal
    assert abs(float((labels == 0).double().mean()) - 0.5) < 0.01
    again, _ = toy2d.make_toy2d(1000, seed=3)
    assert torch.equal(again, toy2d.make_toy2d(1000, seed=3)[0])  # the seed fixes the data
    assert not torch.equal(again, toy2d.make_toy2d(1000, seed=4)[0])


def test_the_true_density_integrates_to_one():
    step = 0.04
    axis = torch.arange(-9.0, 9.0, step, dtype=torch.float64) + step / 2
    grid = torch.cartesian_prod(axis, axis)
    for cls in range(2):
        density = toy2d.true_log_density(grid, torch.full((len(grid),), cls)).exp()
        assert float(density.sum() * step * step) == pytest.approx(1.0, abs=1e-3)


@pytest.fixture(scope="module")
def trained():
    """The vector cvae after 600 steps (about 5 s), with its held-out negative ELBO before and after."""
    torch.manual_seed(0)
    x, y = toy2d.make_toy2d(8000, seed=0)
    x_test, y_test = toy2d.make_toy2d(2000, seed=1)
    model = toy2d.VectorCVAE(hidden=128)
    before = toy2d.negative_elbo(model, x_test, y_test)
    losses = toy2d.train(model, x, y, steps=600, n_batch=256, lr=3e-3, seed=0)
    return model.eval(), (x_test, y_test), before, toy2d.negative_elbo(model, x_test, y_test), losses


def test_the_elbo_improves_within_a_few_hundred_steps(trained):
    model, (x, y), before, after, losses = trained
    assert after["loss"] < before["loss"] - 1.0, (before, after)  # nats per point
    assert after["loss"] == pytest.approx(after["recon"] + after["kl"], rel=1e-5)
    assert sum(losses[-50:]) / 50 < sum(losses[:50]) / 50
    torch.manual_seed(0)
    # more draws give a tighter bound, and no bound beats the data's own density by more than sampling noise
    iw = float(model.iw_bound(x, y, 64).mean())
    assert iw < after["loss"]
    assert iw > float(-toy2d.true_log_density(x, y).mean()) - 0.05


def test_samples_without_decoder_noise_lie_closer_to_the_data(trained):
    model, (_, y), *_ = trained
    torch.manual_seed(0)
    noisy, clean = model.sample(y, decoder_noise=True), model.sample(y, decoder_noise=False)
    # the data's support is where the true mixture's density is high
    assert toy2d.true_log_density(clean, y).mean() > toy2d.true_log_density(noisy, y).mean()


def test_the_script_reports_nats_per_point_and_refuses_bad_input(tmp_path, capsys):
    toy2d.main(["--steps", "20", "--n_train", "2000", "--iw_samples", "4", "--out", str(tmp_path / "t.png"),
                "--json", str(tmp_path / "t.json")])
    figures = json.loads((tmp_path / "t.json").read_text())
    assert figures["test_nelbo"] < figures["test_nelbo_at_start"]
    assert (tmp_path / "t.png").stat().st_size > 10_000 and "nats/point" in capsys.readouterr().out
    for bad in (["--steps", "0"], ["--lr", "nan"], ["--out", "t.jpg"]):
        with pytest.raises(UserError):
            toy2d.main(bad)
