"""The VAE as a whole: the paper's architecture, conditioning, the ELBO, and learning."""
from __future__ import annotations

import torch

from conftest import tiny_hps
from data import load_digits
from hps import hparams_from_preset
from vae import VAE, count_parameters


def cifar_hps(n_classes: int):
    h = hparams_from_preset("cifar10", {"n_classes": n_classes})
    h.image_size, h.image_channels = 32, 3
    return h


def test_cifar10_parameter_count_is_the_papers():
    """Unconditional: exactly openai/vdvae's 39,145,700; conditional adds only the class embedding."""
    assert count_parameters(VAE(cifar_hps(0))) == 39_145_700
    conditional = count_parameters(VAE(cifar_hps(10)))
    assert conditional == 39_145_700 + 10 * 384
    assert abs(conditional / 39_145_700 - 1) < 0.03


def test_unconditional_model_has_no_class_embedding_and_runs():
    torch.manual_seed(0)
    model = VAE(tiny_hps(n_classes=0))
    assert not any("class_emb" in k for k in model.state_dict())
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    out = model(images)
    assert torch.isfinite(out["loss"]) and out["kl_groups"].shape == (model.decoder.n_groups,)
    samples = model.sample(3)
    assert samples.shape == (3, 1, 8, 8) and samples.dtype == torch.uint8


def test_loss_is_recon_plus_kl_in_bits_per_dim():
    torch.manual_seed(0)
    model = VAE(tiny_hps())
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    out = model(images, torch.arange(5))
    assert torch.allclose(out["loss"], out["recon"] + out["kl"], atol=1e-5)
    assert torch.allclose(out["kl"], out["kl_groups"].sum(), atol=1e-5)
    assert torch.allclose(out["loss"] * torch.log(torch.tensor(2.0)), out["loss_nats"], atol=1e-5)
    assert torch.all(out["kl_groups"] >= 0)


def test_untrained_model_is_near_uniform():
    """A fresh model spreads mass widely: about log2(17) = 4.09 bits/dim on 17 levels, give or take."""
    torch.manual_seed(0)
    model = VAE(tiny_hps())
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    loss = model(images, torch.zeros(32, dtype=torch.long))["loss"].item()
    assert 3.0 < loss < 6.0


def _perturb_priors(model: VAE) -> None:
    """Give the zero-initialised prior heads weights, as training would."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for block in model.decoder.dec_blocks:
            block.prior.c4.weight.copy_(0.1 * torch.randn(block.prior.c4.weight.shape, generator=gen))


def test_class_label_reaches_every_latent_group_and_the_output():
    torch.manual_seed(0)
    model = VAE(tiny_hps()).eval()
    _perturb_priors(model)
    captured = []
    hooks = [b.prior.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
             for b in model.decoder.dec_blocks]
    noises = [torch.zeros(2, model.H.zdim, b.base, b.base) for b in model.decoder.dec_blocks]
    outputs = []
    for label in (0, 1):
        captured.clear()
        px_z, _ = model.decoder(None, torch.full((2,), label), batch=2, noises=noises)
        outputs.append((px_z, list(captured)))
    (out0, priors0), (out1, priors1) = outputs
    zdim = model.H.zdim
    for p0, p1 in zip(priors0, priors1):
        assert not torch.allclose(p0[:, :2 * zdim], p1[:, :2 * zdim]), "a latent group's prior ignores the class"
    assert not torch.allclose(out0, out1)
    again, _ = model.decoder(None, torch.full((2,), 0), batch=2, noises=noises)
    assert torch.allclose(again, out0)
    for h in hooks:
        h.remove()


def test_changing_only_the_label_changes_samples_and_likelihood():
    torch.manual_seed(0)
    model = VAE(tiny_hps()).eval()
    images = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    torch.manual_seed(5)
    a = model(images, torch.zeros(4, dtype=torch.long))["loss_per_image"]
    torch.manual_seed(5)
    b = model(images, torch.full((4,), 3))["loss_per_image"]
    assert not torch.allclose(a, b)


def test_temperature_scales_prior_spread():
    torch.manual_seed(0)
    model = VAE(tiny_hps()).eval()
    _perturb_priors(model)
    labels = torch.zeros(64, dtype=torch.long)
    spreads = []
    for t in (0.1, 1.0):
        torch.manual_seed(3)
        _, stats = model.decoder(None, labels, batch=64, temperature=t)
        spreads.append(torch.stack([s["z"].std() for s in stats]))
    assert torch.all(spreads[0] < spreads[1])


def test_overfits_a_tiny_batch():
    """16 real digits, 300 steps: the negative ELBO falls far below the histogram baseline (2.19 bits/dim). The
    digits are the first 16 of the test split, which no change to the training/validation split moves."""
    torch.manual_seed(0)
    data = load_digits()
    images, labels = data.test.images[:16], data.test.labels[:16]
    model = VAE(tiny_hps(width=32, zdim=8))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        out = model(images, labels)
        opt.zero_grad()
        out["loss_nats"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-10:]) / 10
    assert last < first - 1.5
    assert last < 1.5
