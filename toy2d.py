"""A conditional VAE on 2-D points: the classic toy that shows what a VAE's decoder noise does.

    python toy2d.py                                # 4,000 steps on the CPU in about half a minute
    python toy2d.py --steps 500 --out toy2d.png --json toy2d.json

The data, ``toy2d``, are points of two classes, each a mixture of three Gaussians with full covariances (tilted,
elongated ellipses), drawn from a seed: nothing is downloaded. The model is the cvae family's setting for
vectors: an MLP encoder q(z | x, y) and an MLP decoder p(x | z, y) = N(mu(z, y), diag sigma(z, y)^2) that learns
a diagonal covariance, with a 2-D latent z, the prior N(0, I), and the family's maths (cvae.label_vector for the
class, vae_helpers' reparameterised draw, analytic Gaussian KL and Gaussian log-density). The image families'
conv stacks, pixel likelihoods and bits per dimension have no meaning for points, so this lives in one script
that reuses those pieces rather than adding branches to the image pipeline.

It reports the negative ELBO on held-out points in **nats per point**, the importance-weighted bound with
``--iw_samples`` draws, and the data's own negative log-density under the true mixture (the best any model can
reach). The picture shows the held-out data, samples with the decoder's noise (x ~ N(mu, diag sigma^2): the
model's density) and without it (x = mu(z, y): the decoder's mean curve), coloured by class. A Gaussian decoder
with diagonal covariance cannot tilt its noise along an ellipse, so the tilt must come from the latent; samples
without noise show how much of the shape the latent carries.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn

from cvae import LOG_SIGMA_BOUND, label_vector
from utils import CliParser, UserError, check_output_file, run_cli
from vae_helpers import draw_gaussian_diag_samples, gaussian_analytical_kl, gaussian_log_prob

CLASS_NAMES = ["a", "b"]
# Each class: three components as (weight, mean, standard deviations along the ellipse's axes, angle in degrees).
MIXTURES = [
    [(0.40, (-2.0, 2.0), (1.00, 0.20), 35.0), (0.35, (-2.5, -1.0), (0.80, 0.25), -60.0),
     (0.25, (0.0, -2.5), (0.90, 0.20), 10.0)],
    [(0.30, (2.0, 2.0), (0.90, 0.25), -40.0), (0.30, (2.5, -1.0), (0.70, 0.30), 75.0),
     (0.40, (0.5, 0.5), (0.80, 0.20), 120.0)],
]


def mixture_parameters(cls: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Class ``cls``'s mixture as (weights (K,), means (K, 2), covariances (K, 2, 2)), float64. A covariance is
    R diag(s1^2, s2^2) R^T with R the rotation by the component's angle: full, not diagonal."""
    weights, means, covs = [], [], []
    for weight, mean, (s1, s2), degrees in MIXTURES[cls]:
        a = math.radians(degrees)
        rotation = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
        covs.append(rotation @ torch.diag(torch.tensor([s1 ** 2, s2 ** 2], dtype=torch.float64)) @ rotation.T)
        weights.append(weight)
        means.append(mean)
    return torch.tensor(weights, dtype=torch.float64), torch.tensor(means, dtype=torch.float64), torch.stack(covs)


def make_toy2d(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points (n, 2) float32 and their classes (n,): a class uniformly, a component by its weight, then the
    component's Gaussian through the Cholesky factor of its covariance."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(MIXTURES), (n,), generator=gen)
    points = torch.empty((n, 2), dtype=torch.float64)
    for cls in range(len(MIXTURES)):
        rows = (labels == cls).nonzero().flatten()
        weights, means, covs = mixture_parameters(cls)
        comp = torch.multinomial(weights, len(rows), replacement=True, generator=gen)
        eps = torch.randn((len(rows), 2, 1), generator=gen, dtype=torch.float64)
        points[rows] = means[comp] + (torch.linalg.cholesky(covs[comp]) @ eps)[..., 0]
    return points.float(), labels


def true_log_density(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(x | y) in nats under the generating mixture, (n,) float64: the data's own density."""
    out = torch.empty(len(points), dtype=torch.float64)
    for cls in range(len(MIXTURES)):
        rows = labels == cls
        if not rows.any():
            continue
        weights, means, covs = mixture_parameters(cls)
        comps = torch.distributions.MultivariateNormal(means, covariance_matrix=covs)
        log_p = comps.log_prob(points[rows].double()[:, None, :])  # (n_cls, K)
        out[rows] = torch.logsumexp(log_p + weights.log(), dim=1)
    return out


class MLP(nn.Sequential):
    """Linear layers with GELU between them: ``sizes[0]`` inputs to ``sizes[-1]`` outputs."""

    def __init__(self, *sizes: int):
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.GELU()] if i < len(sizes) - 2 else [])
        super().__init__(*layers)


class VectorCVAE(nn.Module):
    """The cvae for vectors: q(z | x, y) and p(x | z, y) diagonal Gaussians from MLPs over [input, one-hot y],
    p(z) = N(0, I). Losses in nats per point (not bits per dimension: the data are continuous)."""

    def __init__(self, data_dim: int = 2, zdim: int = 2, hidden: int = 128, n_classes: int = 2):
        super().__init__()
        self.zdim, self.n_classes = zdim, n_classes
        self.encoder = MLP(data_dim + n_classes, hidden, hidden, 2 * zdim)
        self.decoder = MLP(zdim + n_classes, hidden, hidden, 2 * data_dim)

    def _cat(self, v: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.cat([v, label_vector(labels, self.n_classes)], dim=1)

    def posterior(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logsigma = self.encoder(self._cat(x, labels)).chunk(2, dim=1)
        return mu, logsigma

    def likelihood(self, z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decoder's mean and log-sigma (soft-clamped to +-LOG_SIGMA_BOUND, as the cvae's flow does, so a
        collapsing variance cannot send the density to infinity)."""
        mean, s = self.decoder(self._cat(z, labels)).chunk(2, dim=1)
        return mean, LOG_SIGMA_BOUND * torch.tanh(s / LOG_SIGMA_BOUND)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Negative ELBO per point in nats, split into reconstruction and KL (batch means)."""
        mu, logsigma = self.posterior(x, labels)
        z = draw_gaussian_diag_samples(mu, logsigma)
        mean, log_scale = self.likelihood(z, labels)
        recon = -gaussian_log_prob(x, mean, log_scale).sum(dim=1)
        zero = torch.zeros_like(mu)
        kl = gaussian_analytical_kl(mu, zero, logsigma, zero).sum(dim=1)
        return {"loss": (recon + kl).mean(), "recon": recon.mean(), "kl": kl.mean()}

    @torch.no_grad()
    def iw_bound(self, x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
        """The importance-weighted bound (Burda et al. 2016) per point in nats, (n,): -log mean_k of
        p(x|z_k,y) p(z_k) / q(z_k|x,y) over ``k`` posterior draws; it tightens towards -log p(x|y) as k grows."""
        mu, logsigma = self.posterior(x, labels)
        zero = torch.zeros_like(mu)
        log_w = []
        for _ in range(k):
            z = draw_gaussian_diag_samples(mu, logsigma)
            mean, log_scale = self.likelihood(z, labels)
            log_w.append(gaussian_log_prob(x, mean, log_scale).sum(1) + gaussian_log_prob(z, zero, zero).sum(1)
                         - gaussian_log_prob(z, mu, logsigma).sum(1))
        return -(torch.logsumexp(torch.stack(log_w), dim=0) - math.log(k))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, decoder_noise: bool = True) -> torch.Tensor:
        """Points for ``labels`` from the prior: z ~ N(0, I), then x ~ N(mu, diag sigma^2) with the decoder's noise,
        or x = mu(z, y) without it."""
        z = torch.randn((len(labels), self.zdim))
        mean, log_scale = self.likelihood(z, labels)
        return mean + torch.exp(log_scale) * torch.randn_like(mean) if decoder_noise else mean


@torch.no_grad()
def negative_elbo(model: VectorCVAE, x: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Held-out negative ELBO (one posterior draw per point, seeded) in nats per point, with its two terms."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return {k: float(v) for k, v in model(x, labels).items()}


def train(model: VectorCVAE, x: torch.Tensor, labels: torch.Tensor, steps: int, n_batch: int, lr: float,
          seed: int) -> list[float]:
    """Adam on the negative ELBO with minibatches drawn with ``seed``; returns the training loss of each step."""
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (n_batch,), generator=gen)
        loss = model(x[idx], labels[idx])["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def draw(path: Path, data: tuple[torch.Tensor, torch.Tensor], noisy: torch.Tensor, clean: torch.Tensor,
         labels: torch.Tensor, figures: dict) -> None:
    """Three panels on shared axes: the held-out data, samples with and without the decoder's noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6), sharex=True, sharey=True)
    panels = [(data[0], data[1], "held-out toy2d data"),
              (noisy, labels, f"samples with decoder noise\n(test: {figures['test_nelbo']:.3f} nats/point)"),
              (clean, labels, "samples without decoder noise\n(the decoder's mean mu(z, y))")]
    for ax, (points, classes, title) in zip(axes, panels):
        for cls, name in enumerate(CLASS_NAMES):
            p = points[classes == cls]
            ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5, color=f"C{cls}", label=f"class {name}")
        ax.set_title(title, fontsize=10)
        ax.set_aspect("equal")
    axes[0].set_xlim(-5.5, 5.5)
    axes[0].set_ylim(-5.5, 5.0)
    axes[0].legend(loc="lower left", markerscale=5, fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")  # the two-line titles kept whole
    plt.close(fig)


def main(argv: list[str]) -> None:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4000, help="training steps")
    p.add_argument("--n_batch", type=int, default=256, help="points per step")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam's peak learning rate (cosine decay to 0)")
    p.add_argument("--zdim", type=int, default=2, help="latent dimensions")
    p.add_argument("--hidden", type=int, default=128, help="units of each of the two hidden layers of each MLP")
    p.add_argument("--n_train", type=int, default=20000, help="training points (held-out: 5,000 more)")
    p.add_argument("--iw_samples", type=int, default=256, help="draws of the importance-weighted bound")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, the model and the minibatches")
    p.add_argument("--out", default="toy2d.png", help="the picture (PNG)")
    p.add_argument("--json", default="", help="also write the figures to this JSON file")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    for name in ("steps", "n_batch", "zdim", "hidden", "n_train", "iw_samples"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise UserError(f"--lr must be a finite number > 0, got {args.lr}")
    if not args.out.endswith(".png"):
        raise UserError(f"--out must end in .png, got {args.out!r}")
    for path in (args.out, args.json):  # before the training
        if path:
            check_output_file(path)

    torch.manual_seed(args.seed)
    x_train, y_train = make_toy2d(args.n_train, seed=args.seed)
    x_test, y_test = make_toy2d(5000, seed=args.seed + 1)  # a different draw: held-out points
    model = VectorCVAE(zdim=args.zdim, hidden=args.hidden)
    before = negative_elbo(model, x_test, y_test)
    train(model, x_train, y_train, args.steps, args.n_batch, args.lr, args.seed)
    model.eval()
    after = negative_elbo(model, x_test, y_test)
    iw = float(model.iw_bound(x_test, y_test, args.iw_samples).mean())
    figures = {"steps": args.steps, "test_nelbo": after["loss"], "test_recon": after["recon"], "test_kl": after["kl"],
               "test_nelbo_at_start": before["loss"], f"test_iw_bound_k{args.iw_samples}": iw,
               "data_negative_log_density": float(-true_log_density(x_test, y_test).mean())}
    print(f"toy2d, {args.steps} steps: held-out negative ELBO {after['loss']:.3f} nats/point (recon "
          f"{after['recon']:.3f} + KL {after['kl']:.3f}; {before['loss']:.3f} before training), importance-weighted "
          f"bound (k={args.iw_samples}) {iw:.3f}; the true mixture's own negative log-density "
          f"{figures['data_negative_log_density']:.3f}")
    noisy, clean = model.sample(y_test, decoder_noise=True), model.sample(y_test, decoder_noise=False)
    try:
        draw(Path(args.out), (x_test, y_test), noisy, clean, y_test, figures)
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    except OSError as err:
        raise UserError(f"cannot write {args.out} or {args.json}: {err.strerror or err}") from None
    print(f"wrote {args.out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    run_cli(main)
