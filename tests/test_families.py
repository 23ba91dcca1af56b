"""The cvae and vlae families (cvae.py): the MADE flow's maths, the ELBO and its importance-weighted bound,
learning, conditioning, every likelihood, prior noise, autocast and noise shards; and the contract methods that
vae.VAE shares with them."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from cvae import CVAE, MADE, VLAE, AutoregressiveFlow, label_vector
from data import load_digits
from hps import hparams_from_preset
from utils import UserError
from vae import VAE
from vae_helpers import gaussian_log_prob, levels_to_uint8, preprocess_images

FAMILIES = {"cvae": CVAE, "vlae": VLAE}
# a digits model of each family small enough for hundreds of steps in a second on a CPU
SMALL = {"conv_width": 8, "made_hidden": 32, "zdim": 4, "width": 16, "num_mixtures": 3}


def family_hps(model: str, **overrides):
    h = hparams_from_preset("digits", {"model": model, **SMALL, **overrides})
    h.image_size, h.image_channels = 8, 1
    return h


def randomise_flow(model: VLAE, scale: float = 0.3, seed: int = 1) -> None:
    """The MADE's output layer starts at zero (the identity flow): give it weights, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prior.made.layer3.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen))


def build(model: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    net = FAMILIES[model](family_hps(model, **overrides))
    if isinstance(net, VLAE):
        randomise_flow(net)
    return net.eval()


@pytest.fixture(scope="module")
def digits():
    """16 real digits of the test split (fixed under any change to the training/validation split)."""
    data = load_digits()
    return data.test.images[:16], data.test.labels[:16]


def decoder_inputs(model) -> tuple[list, object]:
    """Record the z that each decoder call receives."""
    seen: list[torch.Tensor] = []
    handle = model.decoder.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    return seen, handle


# ---- the MADE and the flow -----------------------------------------------------------------------


def random_made(dim: int, hidden: int, context: int, seed: int = 0) -> MADE:
    torch.manual_seed(seed)
    made = MADE(dim, hidden, context).double()
    with torch.no_grad():  # every weight random, the zero-initialised output layer included
        for p in made.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return made


def test_made_output_i_depends_only_on_inputs_before_i():
    dim, context = 6, 3
    made = random_made(dim, 20, context)
    z = torch.randn(1, dim, dtype=torch.float64)
    c = torch.randn(1, context, dtype=torch.float64)
    for part in (0, 1):  # mu, then log sigma
        jac = jacobian(lambda v: made(v[None], c)[part][0], z[0])  # (outputs, inputs)
        assert torch.all(jac.triu() == 0), f"output i reads an input >= i:\n{jac}"
        assert torch.all(jac.tril(-1)[1:, 0] != 0)  # and it does read the ones before it (masks not all zero)
    # the context reaches every output, output 0 (which reads no input) included
    jac_c = jacobian(lambda v: torch.cat(made(z, v[None]), dim=1)[0], c[0])
    assert torch.all(jac_c.abs().sum(dim=1) > 0)


def test_made_starts_as_the_identity_flow():
    flow = AutoregressiveFlow(5, 16, context=3)
    z, c = torch.randn(4, 5), torch.randn(4, 3)
    eps, log_det = flow(z, c)
    assert torch.equal(eps, z) and torch.equal(log_det, torch.zeros(4))


def test_flow_log_det_is_log_abs_det_of_the_autograd_jacobian():
    dim = 5
    flow = AutoregressiveFlow(dim, 24, context=3).double()
    flow.made = random_made(dim, 24, 3, seed=2)
    c = torch.randn(1, 3, dtype=torch.float64)
    for seed in range(3):
        z = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        jac = jacobian(lambda v: flow(v[None], c)[0][0], z)
        assert torch.all(jac.triu(1) == 0)  # eps_i reads z_<=i: a lower-triangular Jacobian
        sign, logabsdet = torch.linalg.slogdet(jac)
        _, log_det = flow(z[None], c)
        assert sign != 0 and torch.allclose(log_det[0], logabsdet, atol=1e-10)


def test_flow_inverse_then_forward_round_trips():
    flow = AutoregressiveFlow(5, 24, context=3).double()
    flow.made = random_made(5, 24, 3, seed=3)
    eps = torch.randn(64, 5, dtype=torch.float64)
    c = torch.randn(64, 3, dtype=torch.float64)
    z = flow.inverse(eps, c)
    assert torch.allclose(flow(z, c)[0], eps, atol=1e-10)
    assert torch.allclose(flow.inverse(flow(z, c)[0], c), z, atol=1e-10)


def test_vlae_sample_then_density_recovers_the_drawn_noise():
    """The eps that sample() drew (seeded), through the inverse flow to z, then the density's forward map: the
    same eps, and log p(z|y) is log N(eps) + sum log sigma."""
    model = build("vlae")
    labels = torch.arange(8) % 10
    seen, handle = decoder_inputs(model)
    torch.manual_seed(7)
    model.sample(8, labels)
    handle.remove()
    torch.manual_seed(7)
    eps = torch.randn(8, model.zdim)  # sample() draws its latent noise first
    y = label_vector(labels, 10)
    z = seen[0]
    assert not torch.allclose(z, eps, atol=1e-2)  # the flow is not the identity
    assert torch.allclose(model.noise_of_latent(z, y), eps, atol=1e-5)
    eps_back, log_det = model.prior(z, y)
    expected = gaussian_log_prob(eps_back, torch.zeros_like(z), torch.zeros_like(z)).sum(1) + log_det
    assert torch.allclose(model.prior_log_prob(z, y), expected, atol=1e-5)


def test_flow_prior_is_a_normalised_density():
    """Importance sampling from N(0, 4I): E[p(z)/r(z)] = 1 for a normalised p (here 2-D, conditional)."""
    torch.manual_seed(0)
    model = build("vlae", zdim=2)
    y = label_vector(torch.full((40000,), 3), 10)
    z = 2.0 * torch.randn(40000, 2)
    log_r = gaussian_log_prob(z, torch.zeros_like(z), torch.full_like(z, math.log(2.0))).sum(1)
    with torch.no_grad():
        w = torch.exp(model.prior_log_prob(z, y) - log_r)
    assert abs(w.mean().item() - 1.0) < 4 * w.std().item() / math.sqrt(len(w)) + 1e-3


# ---- the ELBO and the importance-weighted bound ----------------------------------------------------


def test_cvae_analytic_kl_equals_a_monte_carlo_estimate(digits):
    model = build("cvae")
    images, labels = digits
    with torch.no_grad():
        mu, logsigma, y, _ = model._posterior(images[:4], labels[:4])
        analytic = model.kl_nats(mu, logsigma, None, y)
        n = 20000
        z = mu + torch.exp(logsigma) * torch.randn(n, *mu.shape)  # (n, B, zdim)
        log_q = gaussian_log_prob(z, mu.expand_as(z), logsigma.expand_as(z)).sum(-1)
        log_p = gaussian_log_prob(z, torch.zeros_like(z), torch.zeros_like(z)).sum(-1)
        mc = log_q - log_p
    tolerance = 4 * mc.std(dim=0) / math.sqrt(n)
    assert torch.all((mc.mean(dim=0) - analytic).abs() < tolerance), (mc.mean(0), analytic)


@pytest.mark.parametrize("family", FAMILIES)
def test_importance_weight_with_one_sample_is_the_elbo_in_expectation(family, digits):
    model = build(family)
    images, labels = digits[0][:4], digits[1][:4]
    draws = 300
    rep_images, rep_labels = images.repeat(draws, 1, 1, 1), labels.repeat(draws)
    ndims = model.scored_dims(images.shape[1:])
    torch.manual_seed(1)
    with torch.no_grad():
        log_w = model.log_importance_weights(rep_images, rep_labels).reshape(draws, 4)
        neg_elbo = model(rep_images, rep_labels)["loss_per_image"].reshape(draws, 4) * math.log(2.0) * ndims
    tolerance = 4 * torch.sqrt((log_w.var(0) + neg_elbo.var(0)) / draws) + 1e-3
    assert torch.all((log_w.mean(0) + neg_elbo.mean(0)).abs() < tolerance), (log_w.mean(0), -neg_elbo.mean(0))
    # with the same posterior noise, the vlae's weight is exactly minus its loss (both use the same MC KL)
    if family == "vlae":
        noise = [torch.randn(4, model.zdim)]
        loss = model(images, labels, noises=noise)["loss_per_image"] * math.log(2.0) * ndims
        assert torch.allclose(model.log_importance_weights(images, labels, noises=noise), -loss, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_more_importance_samples_are_never_worse_on_average(family, digits):
    model = build(family)
    images, labels = digits
    k = 10
    torch.manual_seed(2)
    log_w = model.log_importance_weights(images.repeat(k, 1, 1, 1), labels.repeat(k)).reshape(k, len(images))
    iw_bound = torch.logsumexp(log_w, dim=0) - math.log(k)
    elbo = log_w.mean(dim=0)
    assert torch.all(iw_bound >= elbo - 1e-4)  # Jensen, for every image
    assert iw_bound.mean() > elbo.mean()


# ---- learning and conditioning ----------------------------------------------------------------------


_TRAINED: dict[str, tuple] = {}


def overfit(family: str, digits) -> tuple:
    """A small model of ``family`` trained 200 Adam steps on 8 real digits: (model, per-step losses), cached."""
    if family not in _TRAINED:
        torch.manual_seed(0)
        images, labels = digits[0][:8], digits[1][:8]
        model = FAMILIES[family](family_hps(family, conv_width=16, zdim=8))
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(200):
            out = model(images, labels)
            opt.zero_grad()
            out["loss_nats"].backward()
            opt.step()
            losses.append(out["loss"].item())
        _TRAINED[family] = (model.eval(), losses)
    return _TRAINED[family]


@pytest.mark.parametrize("family", FAMILIES)
def test_overfits_one_small_batch(family, digits):
    _, losses = overfit(family, digits)
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first - 1.0 and last < 2.0, (first, last)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_class_changes_samples_drawn_from_the_same_noise(family, digits):
    model, _ = overfit(family, digits)
    noise = [torch.randn(6, model.zdim)]

    def draw(label: int) -> torch.Tensor:
        torch.manual_seed(3)  # the same pixel noise too: only the class differs
        return model.sample(6, torch.full((6,), label), noises=noise)

    assert torch.equal(draw(2), draw(2))
    assert (draw(2).float() - draw(7).float()).abs().mean() > 10  # grey levels of 0..255, on average
    if family == "vlae":  # the prior itself depends on the class
        randomise_flow(model)  # (a few steps leave the flow close to the identity)
        eps = noise[0]
        z2 = model.latent_of_noise(eps, label_vector(torch.full((6,), 2), 10))
        z7 = model.latent_of_noise(eps, label_vector(torch.full((6,), 7), 10))
        assert not torch.allclose(z2, z7, atol=1e-3)


def test_a_fresh_vlae_is_the_cvae_with_a_monte_carlo_kl(digits):
    """The flow starts as the identity: built from the same seed, the vlae's prior is N(0, I) and, with the same
    posterior noise, its reconstruction term is the cvae's."""
    images, labels = digits[0][:4], digits[1][:4]
    torch.manual_seed(0)
    cvae_model = CVAE(family_hps("cvae"))
    torch.manual_seed(0)
    vlae_model = VLAE(family_hps("vlae"))
    noise = [torch.randn(4, 4)]
    a, b = cvae_model(images, labels, noises=noise), vlae_model(images, labels, noises=noise)
    assert torch.allclose(a["recon"], b["recon"], atol=1e-6)
    z = torch.randn(5, 4)
    assert torch.allclose(vlae_model.prior_log_prob(z, label_vector(labels[:1].repeat(5), 10)),
                          cvae_model.prior_log_prob(z, None), atol=1e-6)


# ---- every likelihood, unconditional and multi-label --------------------------------------------------

LIKELIHOOD_SETTINGS = {
    "dmol": {},
    "bernoulli": {"likelihood": "bernoulli", "pixel_levels": 2},
    "gaussian_learned_std": {"likelihood": "gaussian"},
    "gaussian_fixed_std": {"likelihood": "gaussian", "gaussian_std": 0.1},
    "unconditional": {"n_classes": 0},
}


def check_contract(model, images: torch.Tensor, labels: torch.Tensor | None) -> None:
    out = model(images, labels)
    assert set(out) == {"loss_nats", "loss", "recon", "kl", "loss_per_image", "kl_groups"}
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in out.values())
    assert out["loss_per_image"].shape == (len(images),) and out["kl_groups"].shape == (1,)
    assert torch.allclose(out["loss"], out["recon"] + out["kl"], atol=1e-5)
    assert torch.allclose(out["loss"], out["loss_per_image"].mean(), atol=1e-5)
    assert torch.allclose(out["loss_nats"], out["loss"] * math.log(2.0), atol=1e-5)
    assert torch.allclose(out["kl"], out["kl_groups"].sum(), atol=1e-6)
    assert model.log_importance_weights(images, labels).shape == (len(images),)
    n = len(images)
    for result in (model.sample(n, labels), model.reconstruct(images, labels),
                   model.reconstruct(images, labels, n_posterior=0, temperature=0.5)):
        assert result.shape == images.shape and result.dtype == torch.uint8
    assert model.prior_noise_of(images, labels)[0].shape == (n, model.zdim)


@pytest.mark.parametrize("setting", LIKELIHOOD_SETTINGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_sample_and_reconstruct_with_every_likelihood(family, setting, digits):
    overrides = LIKELIHOOD_SETTINGS[setting]
    model = build(family, **overrides)
    images, labels = digits[0][:5], digits[1][:5]
    if setting == "bernoulli":
        images = ((images > 127).to(torch.uint8) * 255)
    check_contract(model, images, None if setting == "unconditional" else labels)
    if setting == "bernoulli":  # binary levels map back to 0 and 255 only
        assert set(model.sample(5, labels).unique().tolist()) <= {0, 255}
    if setting == "unconditional":
        # no class inputs: the encoder's head reads the 4x4 map of 2 * conv_width channels, the decoder z alone
        assert model.encoder.fc.in_features == 2 * SMALL["conv_width"] * 16
        assert model.decoder.fc[0].in_features == model.zdim


@pytest.mark.parametrize("family", FAMILIES)
def test_multi_hot_attributes_condition_the_model(family, digits):
    model = build(family, n_classes=5)
    model.H.multi_label = True
    images = digits[0][:4]
    attributes = (torch.rand(4, 5) > 0.5).float()
    check_contract(model, images, attributes)
    # the attributes reach the pixel distribution (an untrained decoder's outputs are small: compare relatively)
    z = torch.zeros(4, model.zdim)
    with torch.no_grad():
        params = [model.decoder.out_net(model.decoder(z, a)) for a in (attributes, 1.0 - attributes)]
    assert (params[0] - params[1]).abs().max() > 1e-3 * params[0].abs().max()


def test_a_conditional_model_asks_for_labels(digits):
    model = build("cvae")
    with pytest.raises(ValueError, match="class-conditional"):
        model(digits[0][:2])


def test_mnist_and_cifar_sizes_build_and_score_the_unpadded_digit():
    for preset, size, channels, pad in [("mnist", 32, 1, 2), ("cifar10", 32, 3, 0)]:
        h = hparams_from_preset(preset, {"model": "vlae", **SMALL})
        h.image_size, h.image_channels, h.pad = size, channels, pad
        torch.manual_seed(0)
        model = VLAE(h)
        images = torch.randint(0, 256, (2, channels, size, size), dtype=torch.uint8)
        out = model(images, torch.arange(2))
        assert torch.isfinite(out["loss"])
        assert model.scored_dims(images.shape[1:]) == channels * (size - 2 * pad) ** 2
        assert model.sample(2, torch.arange(2)).shape == images.shape


def test_image_sizes_that_are_not_powers_of_two_are_refused():
    h = family_hps("cvae")
    h.image_size = 12
    with pytest.raises(ValueError, match="power of two"):
        CVAE(h)


# ---- prior noise, autocast, noise shards --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_prior_noise_of_decodes_the_posterior_mean(family, digits):
    model = build(family)
    images, labels = digits[0][:6], digits[1][:6]
    mu, _, y, _ = model._posterior(images, labels)
    eps = model.prior_noise_of(images, labels)
    assert len(eps) == 1 and eps[0].shape == (6, model.zdim)
    seen, handle = decoder_inputs(model)
    torch.manual_seed(4)
    sampled = model.sample(6, labels, noises=eps)
    handle.remove()
    assert torch.allclose(seen[0], mu, atol=1e-5)  # the latent decoded is the posterior mean
    if family == "cvae":  # and so are the images, given the same pixel noise
        torch.manual_seed(4)
        with torch.no_grad():
            expected = levels_to_uint8(model.H, model.decoder.out_net.sample(model.decoder(mu, y)))
        assert torch.equal(sampled, expected)
    # n_posterior 0: fresh prior noise
    assert model.prior_noise_of(images, labels, n_posterior=0)[0].shape == (6, model.zdim)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_autocast_keeps_losses_in_fp32(family, digits):
    model = build(family)
    images, labels = digits[0][:8], digits[1][:8]
    noise = [torch.randn(8, model.zdim)]
    reference = model(images, labels, noises=noise)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(images, labels, noises=noise)
        log_w = model.log_importance_weights(images, labels)
        samples = model.sample(4, labels[:4])
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    assert log_w.dtype == torch.float32 and samples.dtype == torch.uint8
    assert abs(out["loss"].item() - reference["loss"].item()) < 0.05 * reference["loss"].item()


@pytest.mark.parametrize("family", FAMILIES)
def test_noise_shards_slice_the_full_batch_draw(family, digits):
    model = build(family)
    images, labels = digits[0][:8], digits[1][:8]
    torch.manual_seed(5)
    full = model(images, labels)["loss_per_image"]
    halves = []
    for index in (0, torch.tensor(1)):  # a 0-dim tensor index, as the trainer passes it
        model.set_noise_shard(index, 2)
        torch.manual_seed(5)
        rows = slice(0, 4) if int(index) == 0 else slice(4, 8)
        halves.append(model(images[rows], labels[rows])["loss_per_image"])
    assert torch.allclose(torch.cat(halves), full, atol=1e-5)
    model.set_noise_shard(0, 1)
    torch.manual_seed(5)
    assert torch.allclose(model(images, labels)["loss_per_image"], full, atol=1e-6)


# ---- the contract's metadata on every family, the VDVAE included ---------------------------------------


def test_families_declare_their_layout_and_abilities():
    for family, cls in FAMILIES.items():
        model = build(family)
        assert cls.family == family and model.family == family
        assert model.n_groups == 1 and model.latent_shapes() == [(4,)]
        # the vlae's prior depends on the class and can be guided; the cvae's N(0, I) cannot
        guided = {"guidance"} if family == "vlae" else set()
        assert model.abilities == frozenset({"prior_noise", *guided})
        assert build(family, zdim=2).abilities == frozenset({"prior_noise", "manifold", *guided})
    assert VAE.family == "vdvae" and VAE.abilities == frozenset({"groups", "prior_noise", "per_group_temperature",
                                                                 "guidance"})


def test_vae_contract_methods_delegate(tiny):
    model = VAE(tiny())
    assert model.n_groups == model.decoder.n_groups
    assert model.latent_shapes() == model.decoder.latent_shapes()
    assert model.scored_dims((1, 8, 8)) == model.decoder.out_net.scored_dims((1, 8, 8)) == 64.0
    model.set_noise_shard(1, 4)
    assert all(block.noise_shard == (1, 4) for block in model.decoder.dec_blocks)


def test_shared_preprocessing_is_the_vdvaes(tiny):
    """The module-level scaling functions reproduce VAE's former methods, 5-bit FFHQ targets included."""
    images = torch.arange(256, dtype=torch.uint8).reshape(4, 1, 8, 8)
    for overrides in ({}, {"pixel_levels": 256}, {"pixel_levels": 2, "likelihood": "bernoulli"}):
        h = tiny(**overrides)
        x = images.float()
        levels = h.pixel_levels - 1
        enc_in, target = preprocess_images(h, images)
        assert torch.equal(enc_in, (x + h.data_shift) * h.data_scale)
        assert torch.equal(target, torch.round(x * (levels / 255.0)) * (2.0 / levels) - 1.0)
        model = VAE(h)
        assert all(torch.equal(a, b) for a, b in zip(model.preprocess(images), (enc_in, target)))
        k = torch.arange(h.pixel_levels)
        assert torch.equal(model.levels_to_uint8(k), torch.round(k.float() * (255.0 / levels)).to(torch.uint8))
    h = tiny(pixel_levels=32, vdvae_5bit=True)
    assert torch.equal(preprocess_images(h, images)[1], torch.floor(images.float() / 8.0) * (8.0 / 127.5) - 1.0)


def test_model_field_is_validated_and_each_class_builds_only_its_family(tiny):
    with pytest.raises(UserError, match="--model must be one of vdvae, cvae, vlae"):
        hparams_from_preset("digits", {"model": "vqvae2"})
    for name in ("conv_width", "made_hidden"):
        with pytest.raises(UserError, match=f"--{name} must be > 0"):
            hparams_from_preset("digits", {name: 0})
    defaults = hparams_from_preset("cifar10")
    assert (defaults.model, defaults.conv_width, defaults.made_hidden) == ("vdvae", 64, 512)
    assert hparams_from_preset("digits").conv_width == 16  # the digits preset's width for the cvae and vlae
    with pytest.raises(ValueError, match="vdvae family"):
        VAE(tiny(model="cvae"))
    with pytest.raises(ValueError, match="vlae family"):
        VLAE(family_hps("cvae"))
