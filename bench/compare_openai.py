"""Check this implementation against openai/vdvae's own code: same weights, same input, same noise, same ELBO.

    git clone https://github.com/openai/vdvae /path/to/vdvae
    python bench/compare_openai.py --vdvae /path/to/vdvae --hps cifar10
    python bench/compare_openai.py --vdvae /path/to/vdvae --hps cifar10 --weights cifar10-seed0-iter-900000-model-ema.th

Builds openai/vdvae's VAE from its vae.py (only vae.py and vae_helpers.py are imported: no MPI, no apex), takes
its weights (a published ``.th`` file, or its random initialisation with every weight nudged so that no path is
trivially zero), converts them with convert.py, and runs both models on the same random images with the same
seed. Both draw their posterior noise from the global generator in the same order, so the negative ELBOs (nats
per dim, their unit) agree to float tolerance when the architecture, likelihood and KL are the same. Prints
both and the difference, then one JSON line.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import convert_state_dict, openai_hparams, read_state_dict  # noqa: E402
from utils import UserError, run_cli  # noqa: E402
from vae import VAE  # noqa: E402

THEIR_DATASET_NAMES = {"ffhq256": "ffhq_256", "ffhq1024": "ffhq_1024"}


class AttrDict(dict):
    """openai/vdvae's Hyperparams: a dict read by attribute."""

    def __getattr__(self, name):
        if name.startswith("__"):  # copy and pickle ask for protocol methods: none here
            raise AttributeError(name)
        return self.get(name)


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def their_model(vdvae: Path, H):
    """openai/vdvae's VAE for our preset's settings, imported from their clone."""
    if not (vdvae / "vae.py").is_file() or not (vdvae / "vae_helpers.py").is_file():
        raise UserError(f"{vdvae} is not a clone of openai/vdvae (no vae.py and vae_helpers.py)")
    # their modules share our modules' names: load them under others, their vae.py seeing their vae_helpers
    ours = sys.modules["vae_helpers"]
    try:
        sys.modules["vae_helpers"] = load_module("vdvae_reference_helpers", vdvae / "vae_helpers.py")
        their_vae = load_module("vdvae_reference_vae", vdvae / "vae.py")
    finally:
        sys.modules["vae_helpers"] = ours
    settings = AttrDict(H.to_dict())
    settings.dataset = THEIR_DATASET_NAMES.get(H.hps, H.hps)
    return their_vae.VAE(settings)


class _ReferenceSampler:
    """Their EMA model behind our ``sample(n, labels)`` call: unconditional prior samples as uint8 NHWC (numpy)."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def sample(self, n: int, labels=None):
        return torch.from_numpy(self.model.forward_uncond_samples(n))


class ReferenceTrainer:
    """openai/vdvae's training step (their train.py ``training_step``) behind our Trainer's ``step``, for timing
    beside ours on the same images: fp32, NHWC float input, forward, backward, gradient clipping with a host read
    of the norm, NaN checks read on the host, an AdamW step and their EMA loop over the parameters. Their apex
    FusedAdam (the same AdamW update) is stood in for by torch's fused AdamW; like their code, it leaves cuDNN's
    benchmark mode off. Labels are ignored: their model is unconditional."""

    amp_dtype = None

    def __init__(self, vdvae: Path, H, device: torch.device):
        self.H, self.device = H, device
        self.model = their_model(Path(vdvae), H).to(device)
        ema = copy.deepcopy(self.model).requires_grad_(False)
        self.ema = _ReferenceSampler(ema)
        self.ema_model = ema
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=H.lr, weight_decay=H.wd,
                                           betas=(H.adam_beta1, H.adam_beta2), fused=True)
        self.ema_rate = torch.as_tensor(H.ema_rate, device=device)

    def settings(self) -> str:
        return "openai/vdvae's model and training step, fp32, fused AdamW for apex FusedAdam"

    def step(self, images: torch.Tensor, labels=None) -> tuple[torch.Tensor, torch.Tensor]:
        H = self.H
        x = images.permute(0, 2, 3, 1).float()  # their data pipeline: NHWC floats
        data_input, target = (x + H.data_shift) * H.data_scale, x / 127.5 - 1.0
        self.model.zero_grad()
        stats = self.model(data_input, target)
        stats["elbo"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), H.grad_clip).item()
        nans = torch.stack([torch.isnan(stats["distortion"]).sum(), torch.isnan(stats["rate"]).sum()]).tolist()
        threshold = H.skip_threshold_start if H.skip_threshold == "auto" else H.skip_threshold  # theirs is fixed
        skipped = not (nans == [0, 0] and (threshold == -1 or grad_norm < threshold))
        if not skipped:
            self.optimizer.step()
            with torch.no_grad():  # their update_ema, parameter by parameter
                for p1, p2 in zip(self.model.parameters(), self.ema_model.parameters()):
                    p2.data.mul_(self.ema_rate)
                    p2.data.add_(p1.data * (1 - self.ema_rate))
        elbo_bits = stats["elbo"].detach() / math.log(2.0)
        return torch.tensor(skipped), torch.stack([elbo_bits, stats["distortion"].detach() / math.log(2.0),
                                                   stats["rate"].detach() / math.log(2.0),
                                                   torch.tensor(grad_norm, device=self.device)])


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vdvae", required=True, help="a clone of github.com/openai/vdvae")
    p.add_argument("--hps", default="cifar10", help="cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024")
    p.add_argument("--weights", default=None, help="a published .th file (default: a nudged random init)")
    p.add_argument("--n", type=int, default=2, help="images")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    H = openai_hparams(args.hps, n_classes=0)
    ours = VAE(H).eval()
    theirs = their_model(Path(args.vdvae), H).eval()
    if args.weights:
        theirs.load_state_dict(read_state_dict(args.weights))
    else:
        torch.manual_seed(args.seed)
        with torch.no_grad():
            for param in theirs.parameters():
                param.add_(0.02 * torch.randn_like(param))
    ours.load_state_dict(convert_state_dict(theirs.state_dict(), H, "their model"))

    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randint(0, 256, (args.n, 3, H.image_size, H.image_size), dtype=torch.uint8, generator=gen)
    x = images.permute(0, 2, 3, 1).float()  # they work in NHWC
    their_input = (x + H.data_shift) * H.data_scale
    their_target = ((torch.floor(x / 8) * 8 if H.vdvae_5bit else x) - 127.5) / 127.5  # their 5-bit FFHQ-256
    with torch.no_grad():
        torch.manual_seed(args.seed)
        their = theirs(their_input, their_target)
        torch.manual_seed(args.seed)
        our = ours(images)
    their_elbo, our_elbo = their["elbo"].item(), our["loss_nats"].item()
    print(f"openai/vdvae negative ELBO {their_elbo:.6f} nats/dim (distortion {their['distortion'].item():.6f}, "
          f"rate {their['rate'].item():.6f})")
    print(f"this project               {our_elbo:.6f} nats/dim = {our['loss'].item():.6f} bits/dim")
    print(f"difference                 {abs(their_elbo - our_elbo):.2e} (relative "
          f"{abs(their_elbo - our_elbo) / abs(their_elbo):.2e})")
    print(json.dumps({"hps": args.hps, "weights": args.weights or "nudged random init", "theirs": their_elbo,
                      "ours": our_elbo, "abs_diff": abs(their_elbo - our_elbo)}))


if __name__ == "__main__":
    run_cli(main)
