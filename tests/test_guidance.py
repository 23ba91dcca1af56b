"""Label dropout and classifier-free guidance: the guided Gaussian against a numeric product of densities, its
fallback, the null label's draws across ranks and passes, guidance that changes nothing where it must not (w = 0,
or a null label guided against itself), and the command line's refusals."""
from __future__ import annotations

import math

import pytest
import torch

import trainer as trainer_module
from conftest import run, tiny_cli_args, tiny_hps
from data import drop_labels
from models import build_model
from sampling import sample_batched
from trainer import Trainer
from utils import UserError
from vae_helpers import GUIDANCE_PRECISION_FLOOR, guided_gaussian


def numeric_guided_moments(mu_c, s_c, mu_u, s_u, w, n=400_001):
    """Mean and standard deviation of p_c^(1+w) / p_u^w, normalised numerically on a fine grid (float64)."""
    grid = torch.linspace(-40.0, 40.0, n, dtype=torch.float64)
    log_c = -0.5 * ((grid - mu_c) / s_c) ** 2 - math.log(s_c)
    log_u = -0.5 * ((grid - mu_u) / s_u) ** 2 - math.log(s_u)
    log_p = (1 + w) * log_c - w * log_u
    p = torch.exp(log_p - log_p.max())
    p = p / p.sum()
    mean = (p * grid).sum()
    return mean.item(), ((p * (grid - mean) ** 2).sum()).sqrt().item()


@pytest.mark.parametrize("mu_c,s_c,mu_u,s_u,w", [(0.5, 1.0, -0.3, 1.2, 1.0), (2.0, 0.5, 0.0, 1.0, 4.0),
                                                  (-1.0, 0.8, 1.0, 0.9, 0.5), (0.3, 0.3, 0.2, 2.0, 2.0)])
def test_the_guided_gaussian_is_the_normalised_product_of_densities(mu_c, s_c, mu_u, s_u, w):
    mean, logsigma, fell_back = guided_gaussian(*(torch.tensor([v]) for v in (mu_c, math.log(s_c), mu_u,
                                                                            math.log(s_u))), w)
    assert not fell_back.item()
    numeric_mean, numeric_sd = numeric_guided_moments(mu_c, s_c, mu_u, s_u, w)
    assert mean.item() == pytest.approx(numeric_mean, abs=1e-4)
    assert math.exp(logsigma.item()) == pytest.approx(numeric_sd, rel=1e-4)


def test_where_the_product_is_no_distribution_it_falls_back_to_mean_only_guidance():
    """s_u^2 <= s_c^2 w / (1+w): the product's precision is not positive; near it the mean would diverge. Those
    dimensions take (1+w) mu_c - w mu_u with the conditional's sigma; the rest the product."""
    w = 2.0
    s_c = torch.tensor([1.0, 1.0, 1.0, 1.0])
    # precision (1+w)/s_c^2 - w/s_u^2 at s_u^2 = 2/3 (exactly 0), below (negative), just above 0, and well above
    s_u = torch.tensor([math.sqrt(2 / 3), 0.5, math.sqrt(w / (1 + w - 0.1)), 3.0])
    mu_c, mu_u = torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.2, 0.2, 0.2, 0.2])
    mean, logsigma, fell_back = guided_gaussian(mu_c, s_c.log(), mu_u, s_u.log(), w)
    precision = (1 + w) / s_c**2 - w / s_u**2
    assert fell_back.tolist() == (precision < GUIDANCE_PRECISION_FLOOR / s_c**2).tolist() == [True, True, True, False]
    assert torch.isfinite(mean).all() and torch.isfinite(logsigma).all()
    torch.testing.assert_close(mean[:3], (1 + w) * mu_c[:3] - w * mu_u[:3])
    torch.testing.assert_close(logsigma[:3], s_c[:3].log())
    numeric_mean, numeric_sd = numeric_guided_moments(1.0, 1.0, 0.2, 3.0, w)
    assert mean[3].item() == pytest.approx(numeric_mean, abs=1e-4)
    assert math.exp(logsigma[3].item()) == pytest.approx(numeric_sd, rel=1e-4)


def test_the_guided_prior_is_never_wider_than_the_conditional():
    """Where the conditional is wider than the unconditional (s_c > s_u) the exact product is wider still, and
    falls back; elsewhere it is the product, never wider than s_c. The case that drew NaN samples: the Fashion-MNIST
    model's top group, Shirt against the null label at w = 1, whose product N(1.73, 1.71^2) is wider than both."""
    g = torch.Generator().manual_seed(0)
    mu_c, mu_u = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    logsigma_c, logsigma_u = torch.randn(10_000, generator=g), torch.randn(10_000, generator=g)
    for w in (0.5, 1.0, 4.0):
        mean, logsigma, fell_back = guided_gaussian(mu_c, logsigma_c, mu_u, logsigma_u, w)
        assert (logsigma <= logsigma_c + 1e-6).all()
        assert fell_back.tolist() == (logsigma_c > logsigma_u).tolist()
        assert torch.isfinite(mean).all()
    mean, logsigma, fell_back = guided_gaussian(*(torch.tensor([v]) for v in (0.481, math.log(1.24), 0.035,
                                                                            math.log(1.02))), 1.0)
    assert fell_back.item()
    assert mean.item() == pytest.approx(2 * 0.481 - 0.035) and math.exp(logsigma.item()) == pytest.approx(1.24)


def test_the_two_rules_meet_where_the_priors_are_equally_wide():
    """At s_c = s_u the product and the mean-only rule give the same Gaussian, so the guided prior does not jump
    as s_u crosses s_c."""
    mu_c, mu_u, w = torch.tensor([0.7, 0.7]), torch.tensor([-0.4, -0.4]), 2.0
    logsigma_c = torch.tensor([math.log(0.8)] * 2)
    logsigma_u = torch.tensor([math.log(0.8) - 1e-5, math.log(0.8) + 1e-5])  # just narrower, just wider
    mean, logsigma, fell_back = guided_gaussian(mu_c, logsigma_c, mu_u, logsigma_u, w)
    assert fell_back.tolist() == [True, False]
    torch.testing.assert_close(mean[0], mean[1], atol=1e-3, rtol=0)
    torch.testing.assert_close(logsigma[0], logsigma[1], atol=1e-4, rtol=0)


def test_dropped_labels_of_shards_are_the_global_batch_s():
    """Each rank and pass draws the global batch's dropout and takes its slice: together, one process's draw."""
    labels = torch.arange(12) % 10
    torch.manual_seed(3)
    whole = drop_labels(labels, 0.5, 10)
    parts = []
    for index in range(3):
        torch.manual_seed(3)
        parts.append(drop_labels(labels[4 * index:4 * index + 4], 0.5, 10, shard=(index, 3)))
    assert torch.equal(torch.cat(parts), whole)
    kept = whole.sum(dim=1)
    assert set(kept.tolist()) <= {0.0, 1.0} and 0 < kept.sum() < 12  # whole one-hot rows or the null label
    assert torch.equal(whole[kept == 1].argmax(dim=1), labels[kept == 1])


def test_label_dropout_0_never_draws(monkeypatch):
    """--label_dropout 0 takes no random number and builds no parameter: the label path is today's."""
    monkeypatch.setattr(trainer_module, "drop_labels", lambda *a, **k: pytest.fail("drew label dropout"))
    trainer = Trainer(tiny_hps(), torch.device("cpu"))
    images, labels = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 10
    trainer.step(images, labels)
    assert sum(p.numel() for p in trainer.model.parameters()) == sum(
        p.numel() for p in build_model(tiny_hps(label_dropout=0.1)).parameters())


def test_label_dropout_over_two_passes_equals_one_pass():
    """--grad_accum 2 with label dropout: the same gradient as one pass over the global batch."""
    grads = []
    for n_batch, accum in ((16, 1), (8, 2)):
        torch.manual_seed(0)
        trainer = Trainer(tiny_hps(label_dropout=0.5, n_batch=n_batch, grad_accum=accum, precision="fp32",
                                   channels_last="off", grad_checkpoint="none"), torch.device("cpu"))
        images, labels = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 10
        torch.manual_seed(1)
        trainer.step(images, labels)
        grads.append([p.grad.clone() for p in trainer.trained])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def with_random_weights(model, seed: int = 0, scale: float = 0.05):
    """Zero-initialised layers (the prior heads' last convolutions, the class embedding) given weights, so that
    conditional and null-label priors differ as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("family", ["vdvae", "vlae", "vqvae"])
def test_guiding_the_null_label_against_itself_changes_nothing(family):
    """(1+w) log p(z|null) - w log p(z|null) = log p(z|null): guided samples of the null label equal its plain
    samples from the same random stream, for every guidable family (up to float rounding)."""
    h = tiny_hps(model=family, label_dropout=0.1, conv_width=8, made_hidden=32, prior_channels=8, prior_layers=2)
    # the vqvae's codes are drawn by inverse CDF: a PixelCNN whose logits barely depend on the class draws the same
    # codes for every class, so its weights get a larger push
    model = with_random_weights(build_model(h), scale=0.5 if family == "vqvae" else 0.05)
    null = torch.zeros(6, 10)
    torch.manual_seed(5)
    plain = model.sample(6, null)
    torch.manual_seed(5)
    guided = model.sample(6, null, guidance=3.0)
    assert (plain.int() - guided.int()).abs().max() <= 1  # one pixel level of rounding at most
    torch.manual_seed(5)
    other = model.sample(6, torch.arange(6) % 10, guidance=3.0)
    assert not torch.equal(other, guided)  # a class, guided, does change the samples


def test_guidance_0_is_the_plain_prior_bit_for_bit():
    model = with_random_weights(build_model(tiny_hps(label_dropout=0.1)))
    labels = torch.arange(8) % 10
    torch.manual_seed(2)
    plain = sample_batched(model, 8, labels, 1.0, 4, None)
    torch.manual_seed(2)
    zero = sample_batched(model, 8, labels, 1.0, 4, None, guidance=0.0)
    assert torch.equal(plain, zero)


def test_the_vdvae_draws_the_top_group_from_the_guided_prior():
    """The top group's z under guidance equals the guided Gaussian of the prior network's two halves, computed
    here by hand from the decoder's own stem states, with the noise fixed."""
    model = with_random_weights(build_model(tiny_hps(label_dropout=0.1)))
    labels = torch.tensor([3, 7])
    weights = torch.nn.functional.one_hot(labels, 10).float()
    both = torch.cat([weights, torch.zeros_like(weights)])
    noises = [torch.randn(2, *shape) for shape in model.latent_shapes()]
    w = 1.5
    with torch.no_grad():
        _, stats = model.decoder(None, both, batch=4, noises=noises, guidance=w)
        block = model.decoder.dec_blocks[0]
        states = model.decoder._initial_states(both, 4)
        x = states.get(block.base)
        if x is None:
            x = torch.zeros(4, model.decoder.widths[block.base], block.base, block.base)
        feats = block.prior(x)
        pm, plogs = feats[:, :block.zdim], feats[:, block.zdim:2 * block.zdim]
        mean, logsigma, _ = guided_gaussian(pm[:2], plogs[:2], pm[2:], plogs[2:], w)
    torch.testing.assert_close(stats[0]["z"], torch.cat([mean + logsigma.exp() * noises[0]] * 2))
    assert all(0.0 <= s["guidance_fallback"].item() <= 1.0 for s in stats)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny digits runs: a vdvae with label dropout, one without, and a cvae with it."""
    root = tmp_path_factory.mktemp("guidance")
    made = {}
    for name, extra in (("dropout", {"label_dropout": "0.3"}), ("plain", {}),
                        ("cvae", {"label_dropout": "0.3", "model": "cvae", "conv_width": "8"})):
        result = run("train.py", *tiny_cli_args(root / name, eval_every=0, **extra))
        assert result.returncode == 0, result.stderr[-2000:]
        made[name] = root / name
    return made


def test_guided_and_unconditional_grids_from_the_command_line(runs, tmp_path):
    out = tmp_path / "guided.png"
    result = run("sample.py", "grid", "--weights", str(runs["dropout"]), "--classes", "3,none", "--n", "4",
                 "--guidance", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = run("evaluate.py", "--weights", str(runs["dropout"]), "--no_classify", "--out", str(tmp_path / "e.json"))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "unconditional (null label):" in report.stdout


@pytest.mark.parametrize("which,flags,expected", [
    ("plain", ["--guidance", "1"], "trained without label dropout"),
    ("plain", ["--classes", "none"], "trained without label dropout"),
    ("cvae", ["--guidance", "1"], "whose prior ignores the class"),
    ("dropout", ["--guidance", "-1"], "--guidance must be >= 0"),
])
def test_guidance_refusals_are_one_line_and_exit_2(runs, tmp_path, which, flags, expected):
    result = run("sample.py", "grid", "--weights", str(runs[which]), "--out", str(tmp_path / "x.png"), *flags)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_label_dropout_needs_single_class_labels():
    from hps import fill_derived

    for n_classes, multi in ((0, False), (10, True)):
        h = tiny_hps(label_dropout=0.1, n_classes=n_classes)
        with pytest.raises(UserError, match="--label_dropout needs a class-conditional model"):
            fill_derived(h, 8, 1, multi, 10)


@pytest.mark.parametrize("guidance, advice", [(0.0, "lower --temperature"), (1.0, "lower --guidance")])
def test_a_sample_the_decoder_cannot_draw_in_finite_numbers_stops_with_one_line(guidance, advice, capsys):
    """A decoder driven out of range (on the Fashion-MNIST model, guidance 1 at the top group did it): NaN pixel
    logits stop sampling with a FloatingPointError naming the cause, which the command line turns into one line
    and exit 2, not the multinomial's traceback deep in the sampler."""
    from utils import run_cli

    model = build_model(tiny_hps(label_dropout=0.1)).eval()
    with torch.no_grad():
        model.decoder.bias_xs[0].fill_(float("nan"))  # the top state: every feature below it is NaN
    with pytest.raises(FloatingPointError, match=advice):
        model.sample(4, torch.arange(4), 1.0, guidance=guidance)

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda argv: model.sample(4, torch.arange(4), 1.0, guidance=guidance), [])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and advice in err and len(err.strip().splitlines()) == 1
