"""The vqvae family (vqvae.py): the gated PixelCNN's causality (no blind spot) and normalisation, nearest-code
quantisation and where each of its losses sends gradient, the reported bound, both training stages on real
digits, and both stages through the real command line: one command, bit-exact resumes wherever the run is cut,
evaluation, sampling, and one-line errors for a stage out of order or a mode the family lacks."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import evaluate
import sample
from conftest import run, tiny_cli_args
from data import load_digits
from hps import hparams_from_preset
from test_reliability import assert_same_tensors, load
from utils import UserError
from vqvae import STAGES, GatedPixelCNN, VectorQuantizer, VQVAE

# small enough for a hundred training steps in a few seconds on a CPU
SMALL = dict(codebook_size=16, code_dim=8, prior_channels=16, prior_layers=3)


def vq_hps(**overrides):
    h = hparams_from_preset("digits", {"model": "vqvae", "conv_width": 8, "width": 16, "num_mixtures": 3, **SMALL,
                                       **overrides})
    h.image_size, h.image_channels = 8, 1
    return h


def build(seed: int = 0, **overrides) -> VQVAE:
    torch.manual_seed(seed)
    return VQVAE(vq_hps(**overrides))


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    return data.train.images[:32], data.train.labels[:32]


# ---- the PixelCNN ------------------------------------------------------------------------------


def dependence(net: GatedPixelCNN, labels, size: int) -> torch.Tensor:
    """dep[p, q]: the largest |d logits at p / d embedded input at q| over channels and a few random code grids
    (one grid may switch off every ReLU of the head at some position), positions in raster order."""
    codes = torch.randint(0, net.K, (4, size, size))
    if labels is not None:
        labels = labels.expand(4)
    x = net.embed(codes).detach().requires_grad_(True)
    logits = net.logits_of_embedding(x, labels)
    n = size * size
    dep = torch.zeros(n, n, dtype=torch.float64)
    for p in range(n):
        (grad,) = torch.autograd.grad(logits[:, :, p // size, p % size].sum(), x, retain_graph=True)
        dep[p] = grad.abs().amax(dim=(0, 1)).reshape(-1)  # the grids are independent: a sum reads each alone
    return dep


@pytest.mark.parametrize("n_classes", [10, 0])
def test_pixelcnn_is_causal_without_blind_spot(n_classes):
    torch.manual_seed(0)
    net = GatedPixelCNN(K=5, n_classes=n_classes, channels=8, n_layers=3, hidden=16).double()
    size = 5
    labels = torch.tensor([3]) if n_classes else None
    dep = dependence(net, labels, size)
    n = size * size
    later = torch.triu(torch.ones(n, n, dtype=torch.bool))  # q >= p: the position itself and what follows it
    assert torch.all(dep[later] == 0), "a logit reads the code at its own position or a later one"
    # every earlier position is read, the up-right ones (the blind spot of a plain masked stack) included
    assert torch.all(dep[~later] > 0), [(divmod(p, size), divmod(q, size)) for p, q in (dep == 0).nonzero().tolist()
                                         if q < p][:5]
    up_right = [(p, q) for p in range(n) for q in range(p) if q // size < p // size and q % size > p % size]
    assert up_right and all(dep[p, q] > 0 for p, q in up_right)


def test_pixelcnn_class_conditions_every_position():
    torch.manual_seed(0)
    net = GatedPixelCNN(K=4, n_classes=3, channels=8, n_layers=2, hidden=16)
    codes = torch.randint(0, 4, (2, 3, 3))
    a, b = net(codes, torch.tensor([0, 0])), net(codes, torch.tensor([1, 1]))
    assert (a - b).abs().amax(dim=1).min() > 0  # the first position too, which reads no code
    onehot = torch.eye(3)[[0, 0]]
    assert torch.allclose(net(codes, onehot), a)  # float class vectors as the other families take them


@pytest.mark.parametrize("shape", [(2, 2), (1, 3)])
def test_pixelcnn_log_prob_sums_to_one(shape):
    torch.manual_seed(1)
    K = 3
    net = GatedPixelCNN(K=K, n_classes=2, channels=8, n_layers=2, hidden=16).double()
    n = shape[0] * shape[1]
    grids = torch.tensor(list(itertools.product(range(K), repeat=n))).reshape(-1, *shape)
    for label in (0, 1):
        logp = net.log_prob(grids, torch.full((len(grids),), label))
        assert logp.shape == (K ** n,) and torch.all(logp < 0)
        assert torch.logsumexp(logp, dim=0).abs() < 1e-9


def test_pixelcnn_samples_valid_codes():
    torch.manual_seed(2)
    net = GatedPixelCNN(K=6, n_classes=10, channels=8, n_layers=2, hidden=16)
    labels = torch.arange(4)
    for t in (1.0, 0.5, 0.0):
        codes = net.sample(4, labels, (3, 4), temperature=t)
        assert codes.shape == (4, 3, 4) and codes.dtype == torch.long
        assert codes.min() >= 0 and codes.max() < 6
    # temperature 0 takes the most likely code at each step: the sample is a fixed point of the argmax
    codes = net.sample(4, labels, (3, 4), temperature=0.0)
    assert torch.equal(net(codes, labels).argmax(dim=1), codes)


# ---- quantisation --------------------------------------------------------------------------------


def test_quantizer_init_and_nearest_code():
    torch.manual_seed(0)
    vq = VectorQuantizer(K=32, D=6)
    w = vq.codebook.weight.detach()
    assert w.abs().max() <= 1 / 32
    with torch.no_grad():
        vq.codebook.weight.normal_()
    z_e = torch.randn(3, 6, 4, 5)
    out = vq(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, 6)
    dist = ((flat[:, None, :] - vq.codebook.weight.detach()[None]) ** 2).sum(-1)
    brute = dist.argmin(dim=1)
    assert out.codes.shape == (3, 4, 5) and out.codes.dtype == torch.long
    chosen = dist.gather(1, out.codes.reshape(-1, 1))[:, 0]
    assert torch.allclose(chosen, dist.min(dim=1).values, atol=1e-5)
    assert (out.codes.reshape(-1) == brute).float().mean() > 0.98  # only float ties may differ
    # the forward value is the code's vector
    assert torch.allclose(out.z_q, vq.embed(out.codes), atol=1e-6)
    used = torch.unique(out.codes).numel()
    assert out.dead_codes.item() == 32 - used
    assert 1.0 <= out.perplexity.item() <= used + 1e-4


def test_quantizer_gradients():
    torch.manual_seed(0)
    vq = VectorQuantizer(K=8, D=4)
    z_e = torch.randn(2, 4, 3, 3, requires_grad=True)

    # straight-through: d z_q / d z_e is the identity, and the codebook gets nothing from z_q
    out = vq(z_e)
    weights = torch.randn_like(z_e)
    (out.z_q * weights).sum().backward()
    assert torch.allclose(z_e.grad, weights)
    assert vq.codebook.weight.grad is None

    # the codebook loss moves the codebook (the used entries), not the encoder
    z_e.grad = None
    vq(z_e).codebook_loss.backward()
    assert z_e.grad is None
    g = vq.codebook.weight.grad
    used = torch.unique(vq(z_e).codes)
    assert g[used].abs().sum(dim=1).min() > 0
    unused = torch.ones(8, dtype=torch.bool)
    unused[used] = False
    assert torch.all(g[unused] == 0)

    # the commitment loss moves the encoder, not the codebook
    vq.codebook.weight.grad = None
    vq(z_e).commitment_loss.backward()
    assert vq.codebook.weight.grad is None
    assert z_e.grad.abs().min() > 0


# ---- the model -----------------------------------------------------------------------------------


def test_vqvae_layout_and_contract(digits):
    model = build().eval()
    images, labels = digits
    assert model.family == "vqvae" and model.abilities == frozenset({"guidance"})  # its PixelCNN sees the class
    assert model.n_groups == 1 and model.latent_shapes() == [(4, 4)]
    assert model.scored_dims((1, 8, 8)) == 64.0
    model.set_noise_shard(1, 4)  # a no-op: no posterior noise
    enc_in, _ = model.preprocess(images)
    assert enc_in.min() >= -1.0 and enc_in.max() <= 1.0
    assert model.encode(images).codes.shape == (32, 4, 4)
    samples = model.sample(5, labels[:5])
    assert samples.shape == (5, 1, 8, 8) and samples.dtype == torch.uint8
    recon = model.reconstruct(images[:5], labels[:5])
    assert recon.shape == (5, 1, 8, 8) and recon.dtype == torch.uint8
    # prior_noise_of gives the code grid, which sample() decodes in place of prior draws
    codes = model.prior_noise_of(images[:5], labels[:5])[0]
    assert torch.equal(codes, model.codes_of(images[:5]))
    assert model.sample(5, labels[:5], noises=[codes]).shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="no prior noise"):
        model.sample(5, labels[:5], noises=[torch.randn(5, 4)])
    with pytest.raises(ValueError, match="stage"):
        model.stage = "both"
    ae = {id(p) for p in model.stage_parameters("autoencoder")}
    pr = {id(p) for p in model.stage_parameters("prior")}
    assert not ae & pr and ae | pr == {id(p) for p in model.parameters()}
    assert set(STAGES) == {"autoencoder", "prior"}


def test_vqvae_sizes_at_32():
    h = vq_hps()
    h.image_size = 32
    model = VQVAE(h)
    assert model.latent_shapes() == [(8, 8)]
    images = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    out = model(images, torch.tensor([1, 2]))
    assert out["loss_per_image"].shape == (2,)


def test_vqvae_bound_is_its_two_terms(digits):
    model = build().eval()
    images, labels = digits
    for stage in STAGES:
        model.stage = stage
        out = model(images, labels)
        assert torch.allclose(out["loss"], out["recon"] + out["kl"], atol=1e-5)
        assert torch.allclose(out["loss_per_image"].mean(), out["loss"], atol=1e-5)
        # the prior term of an untrained PixelCNN: near log K nats per code
        n_codes = 16
        kl_nats = out["kl"] * 64 * math.log(2)
        assert abs(kl_nats.item() / n_codes - math.log(16)) < 1.0
        assert out["perplexity"] >= 1 and 0 <= out["dead_codes"] <= 16
        # log_importance_weights is the bound in nats, per image (every draw the same)
        liw = model.log_importance_weights(images, labels)
        assert torch.allclose(-liw / (64 * math.log(2)), out["loss_per_image"], atol=1e-4)
        assert torch.equal(liw, model.log_importance_weights(images, labels))
    model.stage = "autoencoder"
    out = model(images, labels)
    expected = out["recon"] * math.log(2) + out["codebook_loss"] + 0.25 * out["commitment_loss"]
    assert torch.allclose(out["loss_nats"], expected, atol=1e-5)
    model.stage = "prior"
    out = model(images, labels)
    assert torch.allclose(out["loss_nats"], out["kl"] * math.log(2), atol=1e-6)


def test_straight_through_reaches_the_encoder(digits):
    model = build()
    images, labels = digits
    model(images, labels)["recon"].backward()
    enc = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in enc) and sum(g.abs().sum() for g in enc) > 0
    assert all(p.grad is None for p in model.prior.parameters())


def train(model: VQVAE, images, labels, steps: int, lr: float) -> list[float]:
    opt = torch.optim.Adam(model.stage_parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        out = model(images, labels)
        opt.zero_grad(set_to_none=True)
        out["loss_nats"].backward()
        opt.step()
        losses.append(out["loss_nats"].item())
    return losses


def test_two_stages_learn_digits(digits):
    model = build(seed=3)
    images, labels = digits

    model.stage = "autoencoder"
    losses = train(model, images, labels, 200, 1e-2)
    assert min(losses[-10:]) < 0.6 * losses[0], (losses[0], losses[-10:])
    with torch.no_grad():
        model.eval()
        codes = model.codes_of(images)
    assert torch.unique(codes).numel() > 1  # the codebook is used

    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not name.startswith("prior.")}
    model.stage = "prior"
    model.zero_grad(set_to_none=True)  # stage 1's last gradients
    model.train()
    before = model(images, labels)
    losses = train(model, images, labels, 100, 3e-3)
    after = model(images, labels)
    assert after["kl"] < 0.6 * before["kl"], (before["kl"].item(), after["kl"].item())
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
            assert p.grad is None, name
    # the codes it learnt did not move: the reconstruction term is the same
    assert torch.allclose(after["recon"], before["recon"])
    model.eval()
    samples = model.sample(10, torch.arange(10))
    assert samples.shape == (10, 1, 8, 8)


# ---- both stages through the real command line ------------------------------------------------------

VQ_CLI = dict(model="vqvae", conv_width=8, codebook_size=16, code_dim=8, prior_channels=16, prior_layers=3)


def vq_args(run_dir, **overrides) -> list[str]:
    return tiny_cli_args(run_dir, **{**VQ_CLI, "max_steps": 4, "prior_steps": 4, "eval_every": 0, "log_every": 1,
                                     **overrides})


def test_one_command_trains_both_stages_logs_codebook_usage_evaluates_and_samples(tmp_path):
    run_dir = tmp_path / "run"
    result = run("train.py", *vq_args(run_dir, save_every=3))
    assert result.returncode == 0, result.stderr[-2000:]
    ae, latest = load(run_dir / "autoencoder.pt"), load(run_dir / "latest.pt")
    assert (ae["stage"], ae["step"], ae["stage_end"]) == ("autoencoder", 4, 4)
    assert (latest["stage"], latest["step"], latest["stage_start"], latest["stage_end"]) == ("prior", 8, 4, 8)
    # stage 2 started from stage 1's EMA weights (raw and EMA alike) and trained only the prior
    for name, value in latest["model"].items():
        same = torch.equal(value, ae["ema"][name])
        assert same != name.startswith("prior."), name
    assert len(latest["optimizer"]["state"]) == len([k for k in latest["model"] if k.startswith("prior.")])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["stage"] for r in train_records] == ["autoencoder"] * 4 + ["prior"] * 4
    assert all(1.0 <= r["perplexity"] <= 16.0 and 0 <= r["dead_codes"] < 16 for r in train_records)
    assert (run_dir / "samples.png").read_bytes()[:4] == b"\x89PNG"

    # evaluation and sampling through the same command lines, in this process (a subprocess each cost 2.5 s more)
    evaluate.main(["--weights", str(run_dir), "--out", str(tmp_path / "e.json")])
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["bpd"] == pytest.approx(report["recon_bpd"] + report["kl_bpd"])
    assert report["bpd_iw"] == report["bpd"] and 0.0 <= report["gen_class_acc"] <= 1.0
    for mode, extra in [("grid", ["--classes", "3,7", "--n", "4"]), ("recon", ["--n", "4"])]:
        out = tmp_path / f"{mode}.png"
        sample.main([mode, "--weights", str(run_dir), "--out", str(out), *extra])
        assert out.read_bytes()[:4] == b"\x89PNG"
    for mode in ("interp", "swap", "explore"):  # one line each (run_cli turns a UserError into it, exit status 2)
        with pytest.raises(UserError, match=f"sample.py {mode} needs .*, which the vqvae family does not have"):
            sample.main([mode, "--weights", str(run_dir), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_both_stages_resume_bit_exactly_however_the_run_is_cut(tmp_path):
    """One run of both stages == (stage 1 alone, then --stage prior) == (stage 1 alone, then --stage all) == a
    resume from a step-N.pt in the middle of stage 2: weights, EMA, optimiser, schedule, RNG and counters."""
    common = dict(lr_decay="cosine", warmup_iters=2, augment_shift=1, keep_every=2)
    straight = tmp_path / "straight"
    assert run("train.py", *vq_args(straight, **common)).returncode == 0
    cuts = {
        "prior_after_autoencoder": [dict(stage="autoencoder"), dict(stage="prior", restore="latest")],
        "all_after_autoencoder": [dict(stage="autoencoder"), dict(restore="latest")],
        "mid_prior": [dict(restore=straight / "step-00000006.pt")],
    }
    for name, commands in cuts.items():
        for overrides in commands:
            result = run("train.py", *vq_args(tmp_path / name, **common, **overrides))
            assert result.returncode == 0, (name, result.stderr[-2000:])
        a, b = load(straight / "latest.pt"), load(tmp_path / name / "latest.pt")
        for key in ("model", "ema", "optimizer", "scheduler", "rng", "step", "epoch", "batch_in_epoch", "stage",
                    "stage_start"):
            assert_same_tensors(a[key], b[key], f"{name}: {key}")


def test_a_stage_out_of_order_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", *vq_args(run_dir, stage="autoencoder", keep_every=2)).returncode == 0
    cases = [
        (vq_args(tmp_path / "fresh", stage="prior"), "--stage prior trains on top of a finished autoencoder stage"),
        (vq_args(tmp_path / "x", stage="prior", restore=run_dir / "step-00000002.pt"),
         "the autoencoder stage of"),
        (tiny_cli_args(tmp_path / "v", stage="prior"), "--stage must be all or one of the vdvae family's stages"),
    ]
    for args, says in cases:
        result = run("train.py", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, says
        assert len(result.stderr.strip().splitlines()) == 1 and says in result.stderr, result.stderr
    assert "is unfinished (step 2 of 4)" in run("train.py", *cases[1][0]).stderr
