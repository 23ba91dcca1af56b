"""The contract every model family meets: the base class.

Every family (vae.VAE, cvae.CVAE, cvae.VLAE, vqvae.VQVAE) derives from ``Family``, and the entry points (training,
evaluation, sampling, the app) call only what ``Family`` declares, so they never branch on the family. What every
family does the same way (its settings check, data scaling, stages, noise shards, the latent layout's group count)
is written here once; each family supplies its own architecture and the methods marked as its own below.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn as nn

from hps import Hyperparams
from vae_helpers import levels_to_uint8, preprocess_images


def check_family_settings(H: Hyperparams, cls: type[Family]) -> None:
    """A model class builds only its own family (``cls.family``), from settings whose class count is known."""
    if H.n_classes < 0:
        raise ValueError("n_classes -1 stands for the dataset's count: derive it from the data first")
    if H.model != cls.family:
        raise ValueError(f"{cls.__name__} builds the {cls.family} family, not --model {H.model}: "
                         "build models through the registry")


class Family(nn.Module):
    """The base of every model family: the one interface the entry points use.

    Each family provides:

    - ``forward(images_uint8, labels, noises=None) -> dict``: ``loss_nats`` (what the optimiser minimises, nats per
      scored dimension), ``loss``, ``recon`` and ``kl`` (bits/dim, batch means), ``loss_per_image`` (bits/dim),
      and optional extras (``kl_groups``, codebook statistics) that loggers print when present;
    - ``log_importance_weights(images, labels) -> (B,)`` nats: one draw of log p(x|z,y) + log p(z|y) - log q(z|x,y);
    - ``sample``, ``reconstruct`` and ``prior_noise_of`` (uint8 images; the prior noise ``sample`` decodes);
    - ``latent_shapes()``: the shape of each latent group, top first;
    - a ``decoder`` whose ``out_net`` is the pixel likelihood head (vae.OutputNet), which sets the scored dimensions.

    and it declares, as class attributes: ``family`` (its registry name), ``abilities`` (the optional sampling
    modes it supports, "guidance" where its prior depends on the class, which may grow per instance with the
    settings), ``stages`` (what it trains, in order) and ``bound_terms`` (what evaluation calls the bound and its
    two terms).

    The base holds the rest: the settings check, ``H``, data scaling (``preprocess``, ``levels_to_uint8``),
    ``n_groups``, ``scored_dims``, the training stage (``stage``, ``stage_parameters``) and the posterior's noise
    shard (``set_noise_shard``).
    """

    family: ClassVar[str]
    abilities: frozenset[str] = frozenset()
    # a family that trains all its parameters at once has one stage; the vqvae trains its autoencoder, then its prior
    stages: ClassVar[tuple[str, ...]] = ("model",)
    bound_terms: ClassVar[tuple[str, str, str]] = ("negative ELBO", "reconstruction", "KL")

    def __init__(self, H: Hyperparams):
        super().__init__()
        check_family_settings(H, type(self))
        self.H = H
        self._stage = self.stages[0]
        self.noise_shard: tuple[int | torch.Tensor, int] = (0, 1)

    # ---- the family's own methods ---------------------------------------------------------------
    def log_importance_weights(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                               noises: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One posterior draw per image: log p(x|z,y) + log p(z|y) - log q(z|x,y) in nats, shape (B,). The mean
        over draws is the ELBO; log-mean-exp over K draws the importance-weighted bound."""
        raise NotImplementedError

    def sample(self, n: int, labels: torch.Tensor | None = None, temperature: float | Sequence[float] = 1.0,
               noises: Sequence[torch.Tensor | None] | None = None, shared_pixel_noise: bool = False,
               guidance: float = 0.0) -> torch.Tensor:
        """``n`` uint8 images (n, C, H, W) from the prior; ``noises`` fixes the latent of chosen groups;
        ``guidance`` w > 0 (families with the "guidance" ability, trained with --label_dropout) draws from
        p(z|y)^(1+w) / p(z|null)^w, the temperature applied after combining; 0 is the plain prior."""
        raise NotImplementedError

    def prior_noise_of(self, images: torch.Tensor, labels: torch.Tensor | None = None,
                       n_posterior: int | None = None) -> list[torch.Tensor]:
        """The latent of ``images`` in the form ``sample(noises=...)`` takes, one tensor per group."""
        raise NotImplementedError

    def reconstruct(self, images: torch.Tensor, labels: torch.Tensor | None = None, n_posterior: int | None = None,
                    temperature: float | Sequence[float] = 1.0) -> torch.Tensor:
        """uint8 images decoded from the top ``n_posterior`` groups of the posterior, the rest from the prior."""
        raise NotImplementedError

    def latent_shapes(self) -> list[tuple[int, ...]]:
        """The shape of each latent group (without the batch), top (coarsest) first."""
        raise NotImplementedError

    # ---- the latent layout ------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        """Number of latent groups."""
        return len(self.latent_shapes())

    def scored_dims(self, image_shape: Sequence[int]) -> float:
        """Dimensions the likelihood scores per image of shape (C, H, W) (bits/dim divides by these)."""
        return self.decoder.out_net.scored_dims(image_shape)

    def set_noise_shard(self, index: int | torch.Tensor, count: int) -> None:
        """From now on the posterior's standard-normal noise is slice ``index`` of a draw for ``count`` batches
        (see vae_helpers.draw_gaussian_diag_samples), so ranks and accumulation passes together draw what one
        process with the global batch would. ``index`` may be a 0-dim tensor updated in place. A family with a
        deterministic posterior draws no noise and ignores it."""
        self.noise_shard = (index, count)

    def compile_regions(self, **options) -> bool:
        """Compile this model's repeated regions in place with torch.compile (``options``: its own) and return True,
        or return False: the caller then compiles the whole forward pass as one graph. A deep model whose blocks
        repeat compiles each distinct block shape once instead of tracing every block; the families with a few
        layers compile whole."""
        return False

    def _group_temperatures(self, temperature: float | Sequence[float]) -> list[float]:
        """One temperature per latent group: a number applies to every group, a sequence gives each its own."""
        if isinstance(temperature, (int, float)):
            return [float(temperature)] * self.n_groups
        temps = [float(t) for t in temperature]
        if len(temps) != self.n_groups:
            wanted = "1 temperature (one latent group)" if self.n_groups == 1 else \
                f"{self.n_groups} temperatures (one per latent group)"
            raise ValueError(f"expected {wanted}, got {len(temps)}")
        return temps

    # ---- data scaling: every family sees the same inputs and scores the same levels ---------------
    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (B, C, H, W) in 0..255 -> (encoder input, likelihood target in [-1, 1])."""
        return preprocess_images(self.H, images)

    def levels_to_uint8(self, levels: torch.Tensor) -> torch.Tensor:
        """Integer pixel levels 0..L-1 -> uint8 0..255 for display and saving."""
        return levels_to_uint8(self.H, levels)

    # ---- training stages ----------------------------------------------------------------------------
    @property
    def stage(self) -> str:
        """The stage whose loss ``forward``'s ``loss_nats`` is: one of ``stages``."""
        return self._stage

    @stage.setter
    def stage(self, value: str) -> None:
        self._stage = self._checked_stage(value)

    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        """The parameters stage ``stage`` (default: the current one) trains."""
        return self._parameters_of_stage(self.stage if stage is None else self._checked_stage(stage))

    def _parameters_of_stage(self, stage: str) -> list[nn.Parameter]:
        """What a valid ``stage`` trains: every parameter, for a family with one stage."""
        return list(self.parameters())

    def _checked_stage(self, stage: str) -> str:
        if stage not in self.stages:
            raise ValueError(f"the {self.family} family's stage must be one of {', '.join(self.stages)}, "
                             f"got {stage!r}")
        return stage
