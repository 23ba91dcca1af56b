"""Hyperparameters: one strict object, presets as plain data, and the command line that overrides them.

    python train.py --hps cifar10 --n_batch 8 --lr 1e-4

``--hps NAME`` picks a preset; every field can then be overridden by ``--field value``. A mistyped
preset or field is an error that lists the valid ones, never a silent None. A preset may name a ``base``
preset whose values it starts from.

Also here, because they are the syntax and the meaning of hyperparameters: the block-spec parser
(``parse_layer_string``), the likelihood names, which fields shape the model (``MODEL_FIELDS``), each dataset's
image shape (``DATASET_SHAPES``), and the filling of the fields the data decides (``fill_derived``).
This module imports no other module of the project but utils, so everything else may import it.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field, fields
from typing import Any

from utils import DIST_TIMEOUT_S, SOLO_WAIT_S, CliParser, UserError

# ---------------------------------------------------------------------------------------------
# Block specs and likelihoods: the syntax of --enc_blocks/--dec_blocks and the values of --likelihood
# ---------------------------------------------------------------------------------------------

_SPEC_ITEM = re.compile(r"^(\d+)(?:([xmds])(\d+))?$")
LIKELIHOODS = ("dmol", "bernoulli", "gaussian")  # vae_helpers computes each


def parse_layer_string(spec: str) -> list[tuple[int, int | None]]:
    """Parse a block spec such as ``32x11,32d2,16x6`` or ``1x1,4m1,4x2`` into (resolution, arg) pairs.

    ``RxN`` is N blocks at resolution R; ``RdK`` is one block at R followed by average pooling by K;
    ``RmS`` is one decoder block at R whose input is the state at resolution S upsampled (mixin);
    ``RsN`` is N more decoder blocks at R that read the encoder skip of the block before them (``--enc_skips
    every``, see ``skip_slots``).
    Plain ``R`` is a single block. The arg is the down rate or mixin resolution, else None.
    """
    layers: list[tuple[int, int | None]] = []
    for item in spec.split(","):
        match = _SPEC_ITEM.match(item.strip())
        if not match:
            raise ValueError(f"bad block spec item {item!r} in {spec!r}: expected R, RxN, RdK or RmS")
        res, op, num = int(match.group(1)), match.group(2), match.group(3)
        if op in ("x", "s"):
            layers += [(res, None)] * int(num)
        elif op in ("m", "d"):
            layers.append((res, int(num)))
        else:
            layers.append((res, None))
    return layers


def skip_slots(spec: str) -> list[int]:
    """For each block of a decoder spec, the number of the encoder skip it reads among its resolution's, counted
    from the first decoder block at that resolution: each block reads a skip of its own but those of an ``RsN``
    item, which read the skip of the block before them (Efficient-VDVAE's down_n_blocks_per_res: extra blocks of a
    level). Under ``--enc_skips every``, slot k at resolution R reads the k-th encoder block at R from the last.
    An ``RsN`` with no block before it at R is a ValueError."""
    slots: list[int] = []
    count: dict[int, int] = {}
    for item in spec.split(","):
        match = _SPEC_ITEM.match(item.strip())
        res, op, num = int(match.group(1)), match.group(2), match.group(3)
        if op == "s":
            if res not in count:
                raise ValueError(f"{item!r} in {spec!r}: RsN repeats the skip of a block before it at {res}x{res}, "
                                 "and there is none")
            slots += [count[res] - 1] * int(num)
            continue
        for _ in range(int(num) if op == "x" else 1):
            slots.append(count.get(res, 0))
            count[res] = count.get(res, 0) + 1
    return slots


def parse_resolution_map(text: str, kind: type = int) -> dict[int, Any]:
    """``'32:256,16:384'`` -> {32: 256, 16: 384} (``kind`` the type of the values); a malformed item is a
    ValueError."""
    mapping: dict[int, Any] = {}
    for item in text.split(",") if text else []:
        try:
            res, value = item.split(":")
            mapping[int(res)] = kind(value)
        except ValueError:
            raise ValueError(f"bad item {item!r} in {text!r}: expected RESOLUTION:VALUE") from None
    return mapping


# ---------------------------------------------------------------------------------------------
# The fields
# ---------------------------------------------------------------------------------------------


def _f(default: Any, help: str, derived: bool = False, model: bool = False) -> Any:  # noqa: A002 - argparse's name
    """A field with its ``--help`` text. ``derived``: filled from the data at start-up, not settable. ``model``: it
    fixes the shapes of the weights or what the model computes from them (its input normalisation, likelihood and
    targets), so a checkpoint resumes only into the same value (``MODEL_FIELDS``)."""
    return field(default=default, metadata={"help": help, "derived": derived, "model": model})


@dataclass
class Hyperparams:
    """Every setting of a run. Unknown attributes cannot be set or read."""

    # data
    dataset: str = _f("cifar10", "dataset to train on (see data.DATASETS; each preset names its own)", model=True)
    data_root: str = _f("./data", "folder holding (or receiving) the dataset files")
    pixel_levels: int = _f(256, "number of pixel levels the likelihood models (256 for 8-bit, 17 for digits)",
                           model=True)
    data_shift: float = _f(-120.63838, "encoder input is (x + data_shift) * data_scale, x in 0..255", model=True)
    data_scale: float = _f(1.0 / 64.16736, "encoder input is (x + data_shift) * data_scale, x in 0..255", model=True)
    n_classes: int = _f(10, "classes (or attributes) to condition on: the dataset's count, 0 for an unconditional "
                        "model, or -1: whatever count the data has (the folder preset)", model=True)
    likelihood: str = _f("dmol", "pixel likelihood: dmol (discretized mixture of logistics), bernoulli (binarized "
                         "data: the training images are binarized afresh each step, held-out ones once with a "
                         "fixed seed) or gaussian (discretized, over the pixel levels)", model=True)
    vdvae_5bit: bool = _f(False, "openai/vdvae's 5-bit FFHQ-256 targets, floor(x/8)*8 scaled by 127.5, so its "
                          "published checkpoint evaluates to its published number (set by the converter; needs "
                          "--pixel_levels 32; not a normalised distribution, so not for new runs)", model=True)
    gaussian_std: float = _f(0.0, "gaussian likelihood: fixed standard deviation on the [-1, 1] scale (0: learned "
                             "per pixel)", model=True)
    # model
    model: str = _f("vdvae", "which model family: vdvae (the hierarchical VAE), cvae (one Gaussian latent vector, "
                    "conv encoder and decoder), vlae (the cvae with an autoregressive-flow prior) or vqvae (a VQ-VAE "
                    "with a class-conditional gated PixelCNN prior over its codes, trained in two stages)", model=True)
    width: int = _f(384, "channels of the residual stream (cvae/vlae/vqvae: of the decoder's last features)",
                    model=True)
    custom_width_str: str = _f("", "per-resolution widths, e.g. '32:256,16:384' (empty: width everywhere)", model=True)
    enc_blocks: str = _f("32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3", "encoder block spec (RxN, RdK)", model=True)
    dec_blocks: str = _f("1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21", "decoder block spec (RxN, RmS)", model=True)
    zdim: int = _f(16, "latent channels per decoder block", model=True)
    bottleneck_multiple: float = _f(0.25, "bottleneck width of a block as a fraction of its width", model=True)
    custom_bottleneck_str: str = _f("", "per-resolution bottleneck multiples, e.g. '32:1.0,16:0.5' (empty: "
                                    "--bottleneck_multiple everywhere)", model=True)
    input_kernel: int = _f(3, "kernel size of the vdvae's input convolution (openai/vdvae 3, Efficient-VDVAE 1)",
                           model=True)
    enc_skips: str = _f("last", "which encoder activation each vdvae decoder block reads: last (openai/vdvae: the "
                        "last block's at its resolution) or every (Efficient-VDVAE: a skip from every encoder block, "
                        "the decoder's blocks at a resolution taking the encoder's in reverse order; a decoder item "
                        "RsN is N blocks that read one skip; see docs/efficient_vdvae.md)", model=True)
    latent_std: str = _f("exp", "the vdvae's latent standard deviations from their network outputs: exp (openai/vdvae, "
                         "the outputs are log sigma) or softplus (Efficient-VDVAE's gradient smoothing: sigma = "
                         "softplus(ln2 x) / ln2, 1 at x = 0 as exp, but linear rather than exponential in large x)",
                         model=True)
    dmol_scale: str = _f("exp", "the DMOL's logistic scales from their network outputs: exp or softplus (as "
                         "--latent_std)", model=True)
    num_mixtures: int = _f(10, "logistic components of the output distribution", model=True)
    no_bias_above: int = _f(64, "learned initial decoder states only for resolutions up to this", model=True)
    conv_width: int = _f(64, "cvae/vlae/vqvae: channels of the conv encoder's first stage (doubling at each "
                         "stride-2 stage, mirrored by the decoder)", model=True)
    made_hidden: int = _f(512, "vlae: units in each of the two hidden layers of the prior's MADE", model=True)
    codebook_size: int = _f(128, "vqvae: K, the codebook's entries", model=True)
    code_dim: int = _f(256, "vqvae: D, the dimension of each code vector", model=True)
    commitment_beta: float = _f(0.25, "vqvae: weight of the commitment loss that pulls the encoder to its codes")
    vq_downsample: int = _f(0, "vqvae: stride-2 stages from the image to the code grid (0: 1 for images of 8 "
                            "pixels or fewer, else 2: 32x32 -> an 8x8 grid)", model=True)
    prior_channels: int = _f(64, "vqvae: channels of the gated PixelCNN prior (and of its code embedding)", model=True)
    prior_layers: int = _f(12, "vqvae: gated residual blocks of the PixelCNN prior", model=True)
    prior_dropout: float = _f(0.0, "vqvae: dropout on the residual branch of each gated block of the prior")
    # optimisation
    optimizer: str = _f("adamw", "adamw (openai/vdvae) or adamax (Efficient-VDVAE; its weight decay decoupled as "
                        "AdamW's); both skip an update on the device")
    lr: float = _f(2e-4, "peak learning rate")
    wd: float = _f(0.01, "weight decay, decoupled from the gradient as in AdamW")
    adam_beta1: float = _f(0.9, "beta1 of AdamW or Adamax")
    adam_beta2: float = _f(0.9, "beta2 of AdamW or Adamax")
    warmup_iters: int = _f(100, "steps of linear learning-rate warm-up")
    lr_decay: str = _f("none", "learning-rate decay after warm-up: none or cosine (from --lr_decay_start over "
                       "--lr_decay_steps, down to --lr_min)")
    lr_decay_start: int = _f(0, "with --lr_decay cosine: the step the decay starts at (0: the end of warm-up)")
    lr_decay_steps: int = _f(0, "with --lr_decay cosine: the steps it lasts (0: until the stage's last step)")
    lr_min: float = _f(0.0, "with --lr_decay cosine: the learning rate it ends at")
    kl_warmup_steps: int = _f(0, "KL warm-up (Efficient-VDVAE's, after NVAE): the KL term of the training loss is "
                              "weighted by beta = clip((step - start) / (start + steps), 1e-4, 1), with steps this "
                              "and start --kl_warmup_start (their formula: beta reaches 1 at step 2 start + steps); "
                              "reported losses stay the ELBO (0: no warm-up)")
    kl_warmup_start: int = _f(0, "with --kl_warmup_steps: the step the KL warm-up starts at")
    kl_balance_steps: int = _f(0, "for the first this many steps weight each latent group's KL in the training loss "
                               "by NVAE's balancing coefficient, the number of groups times its share of the KL per "
                               "latent dimension (no gradient through it), so that no group collapses early; "
                               "reported losses stay the ELBO (0: never)")
    grad_clip: float = _f(200.0, "clip the gradient norm (of the loss in nats/dim) to this")
    skip_threshold: float | str = _f("auto", "skip updates whose gradient norm reaches this: a number, -1 (never "
                                     "skip) or auto (skip an outlier against the recent norms: above their running "
                                     "log-mean plus 5 running log-standard deviations, and over twice their typical "
                                     "size; the statistic follows every finite norm, so a lasting rise is absorbed "
                                     "within a few hundred steps while a lone spike is skipped; "
                                     "--skip_threshold_start until 100 norms have been seen)")
    skip_threshold_start: float = _f(400.0, "with --skip_threshold auto: the fixed threshold of the first 100 "
                                     "updates, the preset's former fixed threshold (-1: none)")
    ema_rate: float = _f(0.9999, "exponential moving average rate of the weights used to evaluate and "
                                  "sample; its decay warms up as min(rate, (1 + t) / (10 + t)) over the updates t")
    n_batch: int = _f(16, "training images per forward pass (per device)")
    grad_accum: int = _f(1, "forward/backward passes whose gradients are summed into one update (gradients are "
                         "synced across devices only on the last): global batch = n_batch x devices x grad_accum")
    global_batch: int = _f(32, "images per update, the paper's for its presets: grad_accum follows from it, "
                           "--n_batch and the process count (and --n_batch shrinks where the processes split it "
                           "finer); 0: n_batch x processes x grad_accum as given")
    dist_timeout: int = _f(DIST_TIMEOUT_S, "under torchrun: seconds a process waits for the others in a collective of "
                           f"the training loop before the job fails (the waits for rank 0's speed probe and a node's "
                           f"download: {SOLO_WAIT_S // 3600} hours)")
    augment_shift: int = _f(0, "random translation by up to this many pixels as augmentation (0: none)")
    augment_flip: bool = _f(False, "mirror each training image left to right with probability 1/2")
    label_dropout: float = _f(0.0, "train on the null label (no class: an all-zero class vector) in place of each "
                              "image's class with this probability, so that one model is conditional and "
                              "unconditional: sample.py --classes none and --guidance W need it (0: never)",
                              model=True)
    # speed and memory (``auto`` picks what measured fastest on the device; see docs/speed.md)
    precision: str = _f("auto", "autocast precision: auto (measured: the fastest of fp32 and the low precision the "
                        "hardware has, bf16 on GPUs with native bf16 and CPUs with AVX512-BF16 or AMX, fp16 with a "
                        "gradient scaler on older GPUs, kept only when a fixed batch's loss is within 1%% of fp32's; "
                        "see speed.py), fp32, bf16 or fp16; likelihood and KL always run in fp32")
    channels_last: str = _f("auto", "channels-last memory format: auto (measured, see speed.py), on or off")
    compile: str = _f("auto", "torch.compile the training step: auto (measured: on a GPU the fastest eager "
                      "settings are timed compiled too when the run is long enough to repay the compile; off on a "
                      "CPU unless the run is as long), on or off; the VDVAE's blocks compile once per distinct "
                      "shape, on a GPU with CUDA graphs; checkpoints keep the plain weights")
    grad_checkpoint: str = _f("auto", "activation checkpointing: auto (recompute only when memory asks for it: none "
                              "when the run fits in --memory_budget or the free memory, else gelu, else blocks; "
                              "when two fit, the faster measured); none; gelu (recompute the GELUs in the backward "
                              "pass, about half the activation memory); blocks (recompute every block: least "
                              "memory, about 1.3x the step time)")
    memory_budget: float = _f(0.0, "GB of memory the run may use, for --grad_checkpoint auto (0: the free GPU memory, "
                              "or the free RAM on the CPU)")
    # run length and bookkeeping
    max_steps: int = _f(1_000_000, "stop after this many optimizer steps, then evaluate, sample and save (0: no "
                        "limit; each preset sets its paper's budget); of a family trained in stages, the first "
                        "stage's steps")
    stage: str = _f("all", "a family trained in stages (vqvae: autoencoder, then prior): all (each in turn), or one "
                    "stage's name, e.g. --stage prior --restore RUN trains the prior of a run whose autoencoder is "
                    "trained")
    prior_steps: int = _f(0, "steps of a family's second stage (the vqvae's prior), counted on from the first "
                          "stage's (0: --max_steps)")
    prior_lr: float = _f(0.0, "peak learning rate of a family's second stage (0: --lr)")
    prior_wd: float = _f(-1.0, "AdamW weight decay of a family's second stage (-1: --wd)")
    num_epochs: int = _f(10000, "stop after this many passes over the training set")
    seed: int = _f(0, "random seed of initialisation, data order and sampling")
    device: str = _f("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    save_dir: str = _f("", "run folder for checkpoints and logs (default: weights/<hps>)")
    restore: str = _f("", "resume from a checkpoint file, a run folder (its newest complete checkpoint), or 'latest': "
                      "the newest complete checkpoint in --save_dir, or a fresh run there when it holds none")
    eval_every: int = _f(5000, "evaluate the EMA weights on held-out data every this many steps (0: only at the end)")
    n_batch_eval: int = _f(64, "images per evaluation batch")
    save_every: int = _f(5000, "write latest.pt every this many steps (and at the end); the one it replaces "
                         "stays as previous.pt")
    keep_every: int = _f(0, "also keep a checkpoint as step-N.pt every this many steps, saving at those steps whatever "
                         "--save_every is (0: never)")
    keep_last: int = _f(0, "how many step-N.pt checkpoints to keep, newest first (0: all)")
    skip_limit: int = _f(100, "stop the run, saving the last good weights, after this many updates in a row are "
                         "skipped (0: never stop)")
    log_every: int = _f(100, "write metrics every this many steps")
    curves: bool = _f(True, "redraw RUN/curves.png (matplotlib, about 0.2 s) at every evaluation")
    tensorboard: bool = _f(False, "also log the scalars, and a sample grid at each evaluation, to TensorBoard in "
                           "RUN/tensorboard (needs the tensorboard package)")
    track_latents: int = _f(0, "at every evaluation record the posterior means of this many fixed test images "
                            "(a cvae or vlae with --zdim 2) in metrics.jsonl and draw them as RUN/latents.gif, a "
                            "scatter per evaluation coloured by class (0: off)")
    temperature: float = _f(1.0, "prior temperature of the sample grid drawn at the end of training")
    # derived at start-up from the data (not settable)
    hps: str = _f("cifar10", "preset these settings started from", derived=True)
    image_size: int = _f(32, "image height and width", derived=True, model=True)
    image_channels: int = _f(3, "image channels", derived=True, model=True)
    pad: int = _f(0, "zero padding around each image that the likelihood leaves out (MNIST: 28x28 in 32x32)",
                  derived=True, model=True)
    multi_label: bool = _f(False, "labels are multi-hot attributes (CelebA) rather than one class", derived=True,
                           model=True)

    def __setattr__(self, name: str, value: Any) -> None:
        """Set a field; any other name is a typo, an error."""
        if name not in _FIELD_NAMES:
            raise AttributeError(f"unknown hyperparameter {name!r}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """Every field by name (what checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Hyperparams":
        """The settings ``to_dict`` gave (fields it lacks take their defaults); an unknown name is an error."""
        unknown = sorted(set(values) - _FIELD_NAMES)
        if unknown:
            raise UserError(f"unknown hyperparameters {', '.join(unknown)}")
        return cls(**values)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRAD_CHECKPOINTS = ("auto", "none", "gelu", "blocks")
OPTIMIZERS = ("adamw", "adamax")  # optimizers.make_optimizer builds each
STD_PARAMS = ("exp", "softplus")  # vae_helpers.log_std_of computes each
MODELS = ("vdvae", "cvae", "vlae", "vqvae")  # the model families (the registry builds each)
# what each family trains in turn, each stage with its own optimiser (the registry checks the families agree)
FAMILY_STAGES = {"vdvae": ("model",), "cvae": ("model",), "vlae": ("model",), "vqvae": ("autoencoder", "prior")}
_FIELD_NAMES = frozenset(f.name for f in fields(Hyperparams))
SETTABLE = [f for f in fields(Hyperparams) if not f.metadata["derived"]]
# a checkpoint resumes only into settings with the same values of these (declaration order)
MODEL_FIELDS = [f.name for f in fields(Hyperparams) if f.metadata["model"]]


# ---------------------------------------------------------------------------------------------
# Dataset shapes: what each dataset's images look like to the model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetShape:
    """A dataset's images as its preset trains them. The loaders (data.py) produce them so; code that builds a
    model without reading data (``--summary``, the openai/vdvae converter, benchmarks) takes them from here."""

    image_size: int  # height and width (folder and FFHQ images are resized to the decoder's top resolution)
    channels: int
    pad: int = 0  # zero pixels around each image that the likelihood leaves out
    multi_label: bool = False  # labels are multi-hot attribute vectors rather than one class


DATASET_SHAPES: dict[str, DatasetShape] = {  # every dataset data.py loads (data.DATASETS), in its order
    "cifar10": DatasetShape(32, 3), "cifar100": DatasetShape(32, 3),
    "mnist": DatasetShape(32, 1, pad=2),  # 28x28 digits zero-padded to 32x32, the size of the others
    "fashion_mnist": DatasetShape(32, 1, pad=2),  # 28x28 clothes, padded like MNIST
    "svhn": DatasetShape(32, 3),
    "celeba64": DatasetShape(64, 3, multi_label=True),  # its 40 binary attributes
    "imagenet32": DatasetShape(32, 3), "imagenet64": DatasetShape(64, 3),
    "ffhq256": DatasetShape(256, 3), "ffhq1024": DatasetShape(1024, 3),
    "folder": DatasetShape(64, 3),  # the folder preset's size: the decoder's top resolution decides
    "digits": DatasetShape(8, 1),
}


# other spellings of dataset names, accepted wherever a name is read and stored as the name they stand for
DATASET_ALIASES: dict[str, str] = {"fashion-mnist": "fashion_mnist", "fmnist": "fashion_mnist"}


def canonical_dataset(name: str) -> str:
    """The dataset name ``name`` stands for: itself, or the name an alias (``DATASET_ALIASES``) spells otherwise."""
    return DATASET_ALIASES.get(name, name)


def dataset_shape(name: str) -> DatasetShape:
    """The shape of dataset ``name`` (or an alias); an unknown name is an error that lists the known ones."""
    name = canonical_dataset(name)
    if name not in DATASET_SHAPES:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_SHAPES)}")
    return DATASET_SHAPES[name]


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------

# Presets are plain data: the fields a preset sets, over those of the preset its "base" names (resolved
# recursively, its own values winning), or over Hyperparams' defaults when it names none. The defaults hold cifar10's
# values too, so that --help shows them.
PRESETS: dict[str, dict[str, Any]] = {
    # openai/vdvae's CIFAR-10 model (Child 2020): 39M parameters, 2.87 bits/dim after ~1M steps. Its hps.py, with
    # the normalisation of its data.py (CIFAR-10's pixel mean and standard deviation on the 0..255 scale).
    "cifar10": dict(
        dataset="cifar10", pixel_levels=256, data_shift=-120.63838, data_scale=1.0 / 64.16736, n_classes=10,
        likelihood="dmol", width=384, custom_width_str="", enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
        dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x10,32m16,32x21", zdim=16, bottleneck_multiple=0.25,
        num_mixtures=10, no_bias_above=64,
        lr=2e-4, wd=0.01, adam_beta1=0.9, adam_beta2=0.9, warmup_iters=100, lr_decay="none",  # then constant
        grad_clip=200.0, skip_threshold="auto", skip_threshold_start=400.0, ema_rate=0.9999, n_batch=16,
        global_batch=32,  # the paper's: 16 per GPU on 2 GPUs (one GPU accumulates 2 passes of 16)
        max_steps=1_000_000,  # the paper's budget: 2.87 bits/dim after about a million steps of 32
    ),
    # scikit-learn's bundled 8x8 digits, modelled at their native 17 grey levels: under 10 CPU minutes.
    # The input shift and scale are the digits' mean and standard deviation on the 0..255 scale.
    "digits": dict(
        dataset="digits", pixel_levels=17, data_shift=-78.0, data_scale=1.0 / 96.0, n_classes=10,
        width=64, enc_blocks="8x2,8d2,4x3,4d4,1x1", dec_blocks="1x1,4m1,4x5,8m4,8x1", zdim=16,
        num_mixtures=5, lr=2e-3, wd=0.05, warmup_iters=100, lr_decay="cosine", grad_clip=200.0,
        skip_threshold=-1.0, ema_rate=0.998, n_batch=64, global_batch=0, max_steps=2500, eval_every=500, save_every=500,
        log_every=50, n_batch_eval=360, temperature=1.0,
        grad_checkpoint="none",  # 8x8 activations are tiny; recomputing GELUs costs ~30% of a step here
        # --model cvae/vlae: 16 channels (74k parameters for the cvae); 64 overfits these 1,293 images
        # (the cvae's and vlae's held-out figures at 64: bench/RESULTS.md#model-families)
        conv_width=16,
        # --model vqvae: 16 codes of 16 dimensions on a 4x4 grid; then a PixelCNN prior of 32 channels and 6 blocks
        # for 2,500 steps, with dropout 0.3 and weight decay 1.0: these 1,293 digits' codes overfit it otherwise
        # (at weight decay 0.05 and no dropout its held-out bound was far worse after 2,500 steps than after 1,000:
        # the prior's table in bench/RESULTS.md#model-families)
        codebook_size=16, code_dim=16, prior_channels=32, prior_layers=6, prior_steps=2500, prior_dropout=0.3,
        prior_wd=1.0,
    ),
    # MNIST padded to 32x32 (the likelihood scores only the 28x28 digit). 8-bit with the DMOL by default;
    # `--likelihood bernoulli --pixel_levels 2` is the dynamically binarized benchmark, reported in nats too.
    # Shift and scale: MNIST's published mean and standard deviation (0.1307, 0.3081), padding ignored.
    "mnist": dict(
        dataset="mnist", n_classes=10, data_shift=-33.33, data_scale=1.0 / 78.57,
        width=128, zdim=16, num_mixtures=5, enc_blocks="32x3,32d2,16x3,16d2,8x3,8d2,4x3,4d4,1x2",
        dec_blocks="1x1,4m1,4x2,8m4,8x3,16m8,16x3,32m16,32x3", lr=5e-4, n_batch=32, ema_rate=0.999,
        global_batch=0,  # no paper's batch: --n_batch x processes x --grad_accum
        eval_every=2000, save_every=2000,
        max_steps=300_000,  # no published budget: 300k steps of 32 are about 160 passes over the 60,000 digits
    ),
    # Fashion-MNIST (Xiao et al. 2017) for a GPU: cifar10's blocks and optimiser at width 256 on the 28x28 clothes,
    # padded to 32x32 (the likelihood scores the 784 real pixels), 8-bit, the paper's global batch of 32. Shift and
    # scale: the mean and standard deviation of its 60,000 training images on the 0..255 scale. Label dropout 0.1
    # trains the null label beside the ten classes: guided sampling (--guidance) and the unconditional bound
    # -log p(x) come with the model, at no measured cost to the bound (bench/RESULTS.md#classifier-free-guidance).
    "fashion_mnist": dict(
        base="cifar10", dataset="fashion_mnist", n_classes=10, data_shift=-72.94, data_scale=1.0 / 90.02,
        width=256, label_dropout=0.1, ema_rate=0.9999, n_batch=32, global_batch=32,
        eval_every=5000, save_every=5000,
        max_steps=300_000,  # no published budget: 300k steps of 32 are 160 passes over the 60,000 images
    ),
    # Fashion-MNIST sized for two CPU cores and about an hour (bench/RESULTS.md#fashion-mnist-the-cpu-preset has
    # the runs that chose it): width 64, one block a side at 32x32 where most of the work was, a cosine schedule
    # over the budget and an EMA that follows it.
    "fashion_mnist_cpu": dict(
        base="fashion_mnist", width=64, num_mixtures=5,
        enc_blocks="32x1,32d2,16x3,16d2,8x3,8d2,4x3,4d4,1x2", dec_blocks="1x1,4m1,4x2,8m4,8x3,16m8,16x3,32m16,32x1",
        lr=8e-3, warmup_iters=100, lr_decay="cosine", ema_rate=0.999, global_batch=0,
        grad_checkpoint="none",  # the activations of 32 images at this width fit any machine's memory
        eval_every=2000, save_every=500, n_batch_eval=500,
        max_steps=8000,
    ),
    # The VQ-VAE paper's CIFAR-10 model (van den Oord et al. 2017): K=128 codes of D=256 on an 8x8 grid (two stride-2
    # stages of 128 and 256 channels), Adam at lr 1e-3 (beta2 0.999, no weight decay), batch 128, 250k steps; then
    # the class-conditional gated PixelCNN prior (64 channels, 12 blocks). Decoder features of 128 channels feed the
    # 10-logistic DMOL (the paper's decoder gave a Gaussian of fixed variance, so no bits/dim to compare).
    "cifar10_vqvae": dict(
        base="cifar10", model="vqvae", width=128, conv_width=64, codebook_size=128, code_dim=256, prior_channels=64,
        prior_layers=12,
        lr=1e-3, adam_beta2=0.999, wd=0.0, n_batch=128, global_batch=128, skip_threshold=-1.0, ema_rate=0.999,
        max_steps=250000,
        prior_steps=250000, n_batch_eval=256,
    ),
    # CIFAR-10's architecture and optimiser on CIFAR-100's 100 classes. Shift and scale from CIFAR-100's
    # published per-channel statistics (means 0.507, 0.487, 0.441; std about 0.267), pooled over channels.
    # No published budget for it, nor for svhn: cifar10's million steps, as for the same model on as many images.
    "cifar100": dict(base="cifar10", dataset="cifar100", n_classes=100, data_shift=-121.94, data_scale=1.0 / 68.39),
    # SVHN (train split only, without "extra"), CIFAR-10's architecture; published statistics (0.438, 0.444,
    # 0.473; std about 0.198).
    "svhn": dict(base="cifar10", dataset="svhn", n_classes=10, data_shift=-115.48, data_scale=1.0 / 50.56),
    # CelebA 64x64 conditioned on its 40 binary attributes (a multi-hot vector embedded linearly); a
    # 64x64 stack in the style of imagenet64, narrower. `--n_classes 0` trains it unconditionally.
    "celeba64": dict(
        dataset="celeba64", n_classes=40, data_shift=-112.3, data_scale=1.0 / 77.0, width=256,
        enc_blocks="64x3,64d2,32x6,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
        dec_blocks="1x1,4m1,4x2,8m4,8x5,16m8,16x8,32m16,32x12,64m32,64x4", n_batch=16, ema_rate=0.999,
        global_batch=0,  # no paper's batch: --n_batch x processes x --grad_accum
        max_steps=1_000_000,  # no published budget: cifar10's, for 162,770 images at 64x64 in batches of 16
    ),
    # openai/vdvae's ImageNet-32 model (3.80 bits/dim), class-conditional over the 1,000 classes. As in its hps.py,
    # each of its presets starts from the one before.
    "imagenet32": dict(
        base="cifar10", dataset="imagenet32", n_classes=1000, data_shift=-116.2373, data_scale=1.0 / 69.37404,
        width=512,
        enc_blocks="32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6", dec_blocks="1x2,4m1,4x4,8m4,8x9,16m8,16x19,32m16,32x40",
        n_batch=8, lr=1.5e-4, ema_rate=0.999, grad_clip=200.0, skip_threshold="auto",
        skip_threshold_start=300.0,
        global_batch=256,  # openai/vdvae's: 8 per GPU on 32 GPUs
        max_steps=1_700_000,  # openai/vdvae's budget for it
    ),
    # openai/vdvae's ImageNet-64 model (3.52 bits/dim): imagenet32's classes, scale, width and optimiser.
    "imagenet64": dict(
        base="imagenet32", dataset="imagenet64", data_shift=-115.92961967,
        enc_blocks="64x11,64d2,32x20,32d2,16x9,16d2,8x8,8d2,4x7,4d4,1x5",
        dec_blocks="1x2,4m1,4x3,8m4,8x7,16m8,16x15,32m16,32x31,64m32,64x12",
        n_batch=4, grad_clip=220.0, skip_threshold="auto", skip_threshold_start=380.0,
        global_batch=128,  # openai/vdvae's: 4 per GPU on 32 GPUs
        n_batch_eval=32, max_steps=1_600_000,  # openai/vdvae's budget for it
    ),
    # openai/vdvae's FFHQ-256 model (0.61 bits/dim), unconditional, at 5 bits per channel (32 levels); imagenet64's
    # width and optimiser.
    "ffhq256": dict(
        base="imagenet64", dataset="ffhq256", n_classes=0, pixel_levels=32, data_shift=-112.8666757481,
        data_scale=1.0 / 69.84780273,
        enc_blocks="256x3,256d2,128x8,128d2,64x12,64d2,32x17,32d2,16x7,16d2,8x5,8d2,4x5,4d4,1x4",
        dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x21,64m32,64x13,128m64,128x7,256m128",
        n_batch=1, grad_clip=130.0, skip_threshold="auto", skip_threshold_start=180.0,
        global_batch=32,  # openai/vdvae's: 1 per GPU on 32 GPUs (ffhq1024 too)
        n_batch_eval=8,  # evaluation holds no gradients, but 64 images at 256x256 would need some 17 GB
        max_steps=1_700_000,  # openai/vdvae's budget for it, and (inherited) for ffhq1024
    ),
    # openai/vdvae's FFHQ-1024 model (2.42 bits/dim), unconditional, 8-bit; narrow at the top resolutions; ffhq256's
    # batch of one and EMA. Its normalisation (x/255 - 0.4387) / 0.2743 written on the 0..255 scale.
    "ffhq1024": dict(
        base="ffhq256", dataset="ffhq1024", pixel_levels=256, data_shift=-111.8685, data_scale=1.0 / 69.9465,
        width=16,
        custom_width_str="512:32,256:64,128:512,64:512,32:512,16:512,8:512,4:512,1:512", num_mixtures=2,
        enc_blocks="1024x1,1024d2,512x3,512d2,256x5,256d2,128x7,128d2,64x10,64d2,32x14,32d2,16x7,16d2,8x5,8d2,"
                   "4x5,4d4,1x4",
        dec_blocks="1x2,4m1,4x3,8m4,8x4,16m8,16x9,32m16,32x20,64m32,64x14,128m64,128x7,256m128,256x2,512m256,"
                   "1024m512",
        lr=7e-5, grad_clip=360.0, skip_threshold="auto", skip_threshold_start=500.0,
        n_batch_eval=1,
    ),
    # Efficient-VDVAE's CIFAR-10 recipe (Hazami, Mama and Thurairatnam 2022; github Rayhane-mamah/Efficient-VDVAE,
    # egs/cifar10_baseline.cfg, their "C2"), on this project's blocks: their paper reports 2.87 bits/dim, not yet
    # reproduced here. Where this differs from their code: docs/efficient_vdvae.md.
    "cifar10_efficient": dict(
        base="cifar10",
        # [data] random_horizontal_flip = True; pixels scaled to [-1, 1], (x - 127.5) / 127.5 (their data loaders)
        augment_flip=True, data_shift=-127.5, data_scale=1.0 / 127.5,
        # [model] input_kernel_size = (1, 1); up_filters = down_filters = [384] * 33; mid_filters_ratio 0.25
        input_kernel=1, width=384, bottleneck_multiple=0.25,
        # up_strides = [1] * 11 + [2] + [1] * 6 + [2] + [1] * 6 + [2] + [1] * 3 + [4] + [1] * 3
        enc_blocks="32x11,32d2,16x6,16d2,8x6,8d2,4x3,4d4,1x3",
        # down_strides (mirrored) with down_n_blocks_per_res: 4 extra blocks on the second 16x16 level and 10 on
        # the second 32x32 one, which read that level's skip (RsN); up_n_blocks_per_res = [0] * 33: a skip from
        # every bottom-up block
        dec_blocks="1x3,4m1,4x3,8m4,8x6,16m8,16,16s4,16x5,32m16,32,32s10,32x10", enc_skips="every",
        zdim=32,  # down_latent_variates = [32] * 33
        # distribution_base = 'std', gradient_smoothing_beta = 0.6931472 (latents); output_distribution_base = 'std'
        latent_std="softplus", dmol_scale="softplus", num_mixtures=10,  # num_output_mixtures = 10
        # [optimizer] type = 'Adamax', learning_rate = 1e-3, beta1 = 0.9, beta2 = 0.999; warmup_steps = 100;
        # learning_rate_scheme = 'cosine', decay_start = 50000, decay_steps = 750000, min_learning_rate = 2e-4
        optimizer="adamax", lr=1e-3, adam_beta1=0.9, adam_beta2=0.999, warmup_iters=100, lr_decay="cosine",
        lr_decay_start=50_000, lr_decay_steps=750_000, lr_min=2e-4,
        # [loss] use_weight_decay = True, l2_weight = 1e-2: their JAX code's decoupled decay scaled by the rate (their
        # PyTorch code applies none); theirs spares biases and projections, this decays every parameter as AdamW does
        wd=1e-2,
        # clip_gradient_norm = False; gradient_skip = True, gradient_skip_threshold = 800.
        grad_clip=0.0, skip_threshold=800.0,
        # variation_schedule = 'Linear', vae_beta_anneal_start = 21, vae_beta_anneal_steps = 5000; use_gamma_schedule =
        # True, gamma_max_steps = 10000 (NVAE's KL balancing)
        kl_warmup_start=21, kl_warmup_steps=5000, kl_balance_steps=10_000,
        ema_rate=0.9999,  # ema_decay = 0.9999
        # [train] batch_size = 32, global over num_gpus = 2: 32 on one device (with torchrun over 2, --n_batch 16)
        n_batch=32, global_batch=32, max_steps=800_000,  # total_train_steps = 800000
    ),
    # egs/cifar10_C1.cfg ("incfilters"): narrow high resolutions with wide bottlenecks, on one GPU.
    "cifar10_efficient_c1": dict(
        base="cifar10_efficient",
        # up_filters = [48] * 11 + [96] * 7 + [192] * 7 + [384] * 8 (widths change at each pooling block);
        # input_conv_filters = 48
        width=48, custom_width_str="16:96,8:192,4:384,1:384",
        # up_mid_filters_ratio = [1.] * 12 + [0.5] * 7 + [0.25] * 14
        bottleneck_multiple=0.25, custom_bottleneck_str="32:1.0,16:0.5",
        zdim=16,  # down_latent_variates = [16] * 33
        n_batch=32,  # batch_size = 32, num_gpus = 1
    ),
    # egs/imagenet32_baseline.cfg, class-conditional over ImageNet's 1,000 classes as the imagenet32 preset; their
    # paper reports 3.58 bits/dim, not yet reproduced here.
    "imagenet32_efficient": dict(
        base="cifar10_efficient", dataset="imagenet32", n_classes=1000,
        width=512,  # up_filters = down_filters = [512] * 48
        # up_strides = [1] * 15 + [2] + [1] * 9 + [2] + [1] * 8 + [2] + [1] * 6 + [4] + [1] * 6
        enc_blocks="32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
        # down_n_blocks_per_res: 10 extra blocks on the first 8x8 level, 15 on the first 16x16 one
        dec_blocks="1x6,4m1,4x6,8m4,8s10,8x8,16m8,16s15,16x9,32m16,32x15",
        zdim=32,  # down_latent_variates = [32] * 48
        wd=0.0,  # use_weight_decay = False
        n_batch=64, global_batch=64,  # batch_size = 64, global over num_gpus = 2
    ),
    # egs/imagenet32_C1.cfg
    "imagenet32_efficient_c1": dict(
        base="imagenet32_efficient",
        # up_filters = [64] * 15 + [128] * 10 + [256] * 9 + [512] * 7 + [512] * 7; input_conv_filters = 64
        width=64, custom_width_str="16:128,8:256,4:512,1:512",
        custom_bottleneck_str="32:1.0,16:0.5",  # up_mid_filters_ratio = [1.] * 16 + [0.5] * 10 + [0.25] * 22
        zdim=48,  # down_latent_variates = [48] * 48
        dmol_scale="exp",  # output_distribution_base = 'logstd' (latents stay 'std')
    ),
    # egs/imagenet64_baseline.cfg; their paper reports 3.30 bits/dim, not yet reproduced here.
    "imagenet64_efficient": dict(
        base="imagenet32_efficient", dataset="imagenet64",
        # up_strides = [1] * 4 + [2] + [1] * 15 + [2] + [1] * 9 + [2] + [1] * 8 + [2] + [1] * 6 + [4] + [1] * 6
        enc_blocks="64x4,64d2,32x15,32d2,16x9,16d2,8x8,8d2,4x6,4d4,1x6",
        # down_n_blocks_per_res: 10 extra blocks on the first 8x8 level, 15 on the first 16x16, 6 on the first 64x64
        dec_blocks="1x6,4m1,4x6,8m4,8s10,8x8,16m8,16s15,16x9,32m16,32x15,64m32,64s6,64x4",
        n_batch=32, global_batch=32, n_batch_eval=32,  # batch_size = 32, global over num_gpus = 4
    ),
    # egs/imagenet64_C1.cfg
    "imagenet64_efficient_c1": dict(
        base="imagenet64_efficient",
        # up_filters = [64] * 4 + [64] * 16 + [256] * 10 + [256] * 9 + [512] * 14; input_conv_filters = 64
        width=64, custom_width_str="32:64,16:256,8:256,4:512,1:512",
        custom_bottleneck_str="64:1.0,32:0.5",  # up_mid_filters_ratio = [1.] * 5 + [0.5] * 16 + [0.25] * 32
        zdim=64,  # down_latent_variates = [64] * 53
        dmol_scale="exp",  # output_distribution_base = 'logstd'
    ),
    # Any image folder (--data_root): classes from its sub-folders (or none), images centre-cropped and resized
    # to the size the decoder ends at (64 here: change --enc_blocks/--dec_blocks for another size).
    "folder": dict(
        dataset="folder", n_classes=-1, data_shift=-127.5, data_scale=1.0 / 64.0, width=256,
        enc_blocks="64x3,64d2,32x4,32d2,16x4,16d2,8x4,8d2,4x3,4d4,1x2",
        dec_blocks="1x1,4m1,4x2,8m4,8x3,16m8,16x4,32m16,32x6,64m32,64x3", n_batch=16, ema_rate=0.999,
        global_batch=0,  # no paper's batch: --n_batch x processes x --grad_accum
        max_steps=500_000,  # no published budget: half of cifar10's, for a smaller model; set it for the folder's size
    ),
}


PRESET_BASE = "base"  # the key of a preset that names the preset it starts from


def resolve_presets(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each preset's own values over those of its base, recursively (without the base key). An unknown base or
    field, or a cycle of bases, is a ValueError: a mistake in the table, caught when this module is imported."""
    resolved: dict[str, dict[str, Any]] = {}

    def resolve(name: str, chain: tuple[str, ...]) -> dict[str, Any]:
        if name in chain:
            raise ValueError(f"presets {' -> '.join(chain + (name,))} form a cycle of bases")
        if name not in resolved:
            own = dict(presets[name])
            base = own.pop(PRESET_BASE, None)
            if base is not None and base not in presets:
                raise ValueError(f"preset {name!r} names an unknown base {base!r}; valid: {', '.join(presets)}")
            unknown = sorted(set(own) - {f.name for f in SETTABLE})
            if unknown:
                raise ValueError(f"preset {name!r} sets unknown or derived fields {', '.join(unknown)}")
            resolved[name] = {**(resolve(base, chain + (name,)) if base is not None else {}), **own}
        return resolved[name]

    for name in presets:
        resolve(name, ())
    return resolved


_RESOLVED_PRESETS = resolve_presets(PRESETS)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    """A boolean flag's value: 1/true/yes/on or 0/false/no/off, in any case."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _unknown_field_message(args: list[str]) -> str:
    """The error for unrecognised arguments: the first, the closest valid field, and every valid field."""
    names = [a.split("=")[0].lstrip("-") for a in args if a.startswith("--")]
    bad = names[0] if names else args[0]
    valid = ["hps"] + [f.name for f in SETTABLE]
    close = difflib.get_close_matches(bad, valid, n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"unknown option {args[0]!r}{hint}; valid fields: {', '.join('--' + v for v in valid)}"


def build_parser(description: str, extra: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """A parser with ``--hps`` and one ``--field`` per settable hyperparameter (plus ``extra`` flags)."""
    parser = CliParser(description=description, argument_default=argparse.SUPPRESS,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     epilog="Every field defaults to the preset's value; the cifar10 value is shown.")
    parser.add_argument("--hps", help=f"preset to start from: {', '.join(PRESETS)} (default: cifar10)")
    for f in SETTABLE:
        kind = _parse_bool if f.type in (bool, "bool") else {"int": int, "float": float, "str": str}.get(
            f.type if isinstance(f.type, str) else f.type.__name__, str)
        flag = dict(nargs="?", const=True) if kind is _parse_bool else {}  # a bare --tensorboard means true
        if f.name == "compile":  # a bare --compile means on
            flag = dict(nargs="?", const="on")
        parser.add_argument(f"--{f.name}", type=kind, help=f"{f.metadata['help']} [{f.default!r}]",
                            metavar=kind.__name__.lstrip("_").upper(), **flag)
    for name, kwargs in (extra or {}).items():
        parser.add_argument(f"--{name}", **kwargs)
    return parser


def hparams_from_preset(name: str, overrides: dict[str, Any] | None = None) -> Hyperparams:
    """The preset ``name`` with ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    values = dict(_RESOLVED_PRESETS[name], hps=name)
    overrides = dict(overrides or {})
    if overrides.get("likelihood") == "bernoulli" and "pixel_levels" not in overrides:
        overrides["pixel_levels"] = 2  # the only value that fits binary pixels
    for key, value in overrides.items():
        if key not in _FIELD_NAMES or key == "hps":
            raise UserError(f"unknown hyperparameter {key!r}; valid: {', '.join(f.name for f in SETTABLE)}")
        values[key] = value
    # one spelling per dataset, so that a checkpoint's --dataset matches whichever alias a resume gives
    values["dataset"] = canonical_dataset(values["dataset"])
    hps = Hyperparams(**values)
    validate(hps)
    return hps


def parse_args(argv: list[str] | None, description: str) -> tuple[Hyperparams, argparse.Namespace]:
    """Parse ``--hps`` and field overrides; returns the hyperparameters and the namespace (for extras)."""
    parser = build_parser(description, extra={
        "debug": dict(action="store_true", help="show full tracebacks on errors"),
        "summary": dict(action="store_true", help="print the model's modules with their output shapes, resolutions "
                        "and parameters, its latent groups and totals, then exit (no data, optimiser or run folder)")})
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(_unknown_field_message(unknown))
    values = vars(args)
    overrides = {k: v for k, v in values.items() if k in _FIELD_NAMES and k != "hps"}
    return hparams_from_preset(values.get("hps", "cifar10"), overrides), args


# ---------------------------------------------------------------------------------------------
# The fields the data decides
# ---------------------------------------------------------------------------------------------


def fill_derived(H: Hyperparams, image_size: int, channels: int, multi_label: bool,
                 class_count: int | None = None) -> None:
    """Fill the fields the data decides (image_size, image_channels, pad, multi_label, and n_classes when -1) and
    check the ones it constrains. ``class_count``: the number of classes (or attributes) the data has, or None when
    no data was read, which --n_classes -1 cannot take. (``hps``, the preset's name, is set by hparams_from_preset.)

    The decoder must end at the image size: a vdvae's decoder builds images of that size, and every family's data
    is loaded at the size its decoder ends at (data.load_data_for), so with data the check binds every family."""
    H.image_size = image_size
    H.image_channels = channels
    H.pad = dataset_shape(H.dataset).pad
    H.multi_label = multi_label
    if class_count is None:
        if H.n_classes == -1:
            raise UserError(f"--hps {H.hps} needs the class count of its data: give --n_classes")
    else:
        if H.n_classes == -1:
            H.n_classes = class_count
        if H.n_classes not in (0, class_count):
            raise UserError(f"--n_classes must be 0 (unconditional) or {class_count} for {H.dataset}, "
                            f"got {H.n_classes}")
    if H.label_dropout > 0 and (H.n_classes == 0 or multi_label):
        raise UserError("--label_dropout needs a class-conditional model of single-class labels (the null label is "
                        f"the all-zero class vector), not {'attributes' if multi_label else '--n_classes 0'}")
    top_res = max(r for r, _ in parse_layer_string(H.dec_blocks))
    if (class_count is not None or H.model == "vdvae") and top_res != H.image_size:
        raise UserError(f"--dec_blocks must end at the image size {H.image_size}, ends at {top_res}")


def resolve_global_batch(H: Hyperparams, world: int, given: frozenset[str] = frozenset()) -> str:
    """Fit --grad_accum (and --n_batch, when the processes split the global batch finer than it) to --global_batch
    over ``world`` processes, in place; ``given``: the fields the command line set, which are never changed. Returns
    how the global batch is reached, for the log ("" when --global_batch is 0)."""
    G = H.global_batch
    if G <= 0:
        return ""
    if G % world:
        raise UserError(f"--global_batch {G} does not split evenly over {world} processes: give a multiple of {world}, "
                        f"or --global_batch 0 for n_batch x processes x grad_accum")
    share = G // world
    if "grad_accum" in given:
        if H.n_batch * H.grad_accum != share:
            raise UserError(f"--n_batch {H.n_batch} x {world} processes x --grad_accum {H.grad_accum} is not "
                            f"--global_batch {G}: leave --grad_accum out to fit it, or give --global_batch 0")
    elif share < H.n_batch and "n_batch" not in given:
        H.n_batch, H.grad_accum = share, 1
    elif share % H.n_batch:
        raise UserError(f"--global_batch {G} gives each of {world} processes {share} images, which passes of "
                        f"--n_batch {H.n_batch} cannot make: give an --n_batch that divides {share}, or "
                        f"--global_batch 0")
    else:
        H.grad_accum = share // H.n_batch
    how = (f"{H.grad_accum} accumulated passes of {H.n_batch}" if H.grad_accum > 1 else f"one pass of {H.n_batch}")
    return f"--global_batch {G}: {how} on each of {world} processes" if world > 1 else f"--global_batch {G}: {how}"


def hparams_without_data(H: Hyperparams, purpose: str = "--summary") -> Hyperparams:
    """A copy of ``H`` with the fields the data decides filled from DATASET_SHAPES, for code that builds a model
    without reading data; ``purpose`` names that code in the error when the class count is the data's."""
    h = copy.deepcopy(H)
    shape = dataset_shape(h.dataset)
    if h.n_classes == -1:
        raise UserError(f"{purpose} of --hps {h.hps} needs the class count of its data: give --n_classes")
    fill_derived(h, shape.image_size, shape.channels, shape.multi_label)
    return h


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def skip_threshold_value(value: float | str) -> float | str:
    """--skip_threshold as the Trainer reads it: "auto", or a number (from the command line's text, a preset's
    number or the float an older checkpoint stored)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"--skip_threshold must be auto, -1 (never skip) or a number, got {value!r}") from None


def compile_value(value: bool | str) -> str:
    """--compile as the Trainer reads it: auto, on or off (also from true/false, and the bool older checkpoints
    stored)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    text = str(value).strip().lower()
    if text in ("auto", "on", "off"):
        return text
    if text in ("1", "true", "yes"):
        return "on"
    if text in ("0", "false", "no"):
        return "off"
    raise UserError(f"--compile must be auto, on or off, got {value!r}")


def validate(h: Hyperparams) -> None:
    """Range checks that turn nonsense into a one-line error before any work starts."""
    if h.model not in MODELS:
        raise UserError(f"--model must be one of {', '.join(MODELS)}, got {h.model!r}")
    positive = ["width", "zdim", "conv_width", "made_hidden", "code_dim", "prior_channels", "prior_layers",
                "num_mixtures", "n_batch", "grad_accum", "n_batch_eval", "dist_timeout",
                "num_epochs", "log_every", "save_every", "lr", "temperature", "bottleneck_multiple"]
    for name in positive:
        if not getattr(h, name) > 0:
            raise UserError(f"--{name} must be > 0, got {getattr(h, name)}")
    if h.global_batch < 0:
        raise UserError(f"--global_batch must be >= 0 (0: n_batch x processes x grad_accum), got {h.global_batch}")
    if h.n_classes < -1:
        raise UserError(f"--n_classes must be -1 (the dataset's), 0 (unconditional) or the dataset's count, got "
                        f"{h.n_classes}")
    if h.likelihood not in LIKELIHOODS:
        raise UserError(f"--likelihood must be one of {', '.join(LIKELIHOODS)}, got {h.likelihood!r}")
    if h.likelihood == "bernoulli" and h.pixel_levels != 2:
        raise UserError(f"--likelihood bernoulli models binary pixels: it needs --pixel_levels 2, got {h.pixel_levels}")
    if h.lr_decay_start and h.lr_decay_start < h.warmup_iters:
        raise UserError(f"--lr_decay_start {h.lr_decay_start} falls inside the warm-up (--warmup_iters "
                        f"{h.warmup_iters}): start the decay at or after step {h.warmup_iters}, or give 0 (the "
                        f"warm-up's end)")
    if h.vdvae_5bit and (h.pixel_levels != 32 or h.likelihood != "dmol"):
        raise UserError("--vdvae_5bit reproduces openai/vdvae's FFHQ-256 likelihood: it needs --pixel_levels 32 "
                        "and --likelihood dmol")
    if h.gaussian_std < 0:
        raise UserError(f"--gaussian_std must be >= 0 (0: learned), got {h.gaussian_std}")
    if h.codebook_size < 2:
        raise UserError(f"--codebook_size must be >= 2, got {h.codebook_size}")
    if h.stage != "all" and h.stage not in FAMILY_STAGES[h.model]:
        raise UserError(f"--stage must be all or one of the {h.model} family's stages "
                        f"({', '.join(FAMILY_STAGES[h.model])}), got {h.stage!r}")
    if h.prior_wd < 0 and h.prior_wd != -1:
        raise UserError(f"--prior_wd must be >= 0, or -1 for --wd's value, got {h.prior_wd}")
    if not 0.0 <= h.prior_dropout < 1.0:
        raise UserError(f"--prior_dropout must be in [0, 1), got {h.prior_dropout}")
    h.skip_threshold = skip_threshold_value(h.skip_threshold)
    h.compile = compile_value(h.compile)
    if h.skip_threshold_start <= 0 and h.skip_threshold_start != -1:
        raise UserError(f"--skip_threshold_start must be > 0, or -1 for none, got {h.skip_threshold_start}")
    for name in ["max_steps", "prior_steps", "prior_lr", "commitment_beta", "vq_downsample", "eval_every",
                 "warmup_iters", "wd", "augment_shift", "grad_clip", "memory_budget", "lr_decay_start",
                 "lr_decay_steps", "lr_min", "kl_warmup_steps", "kl_warmup_start", "kl_balance_steps",
                 "keep_every", "keep_last", "skip_limit", "track_latents"]:
        if getattr(h, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(h, name)}")
    if not 0.0 <= h.label_dropout < 1.0:
        raise UserError(f"--label_dropout must be in [0, 1), got {h.label_dropout}")
    if not 0.0 <= h.ema_rate < 1.0:
        raise UserError(f"--ema_rate must be in [0, 1), got {h.ema_rate}")
    for name in ["adam_beta1", "adam_beta2"]:
        if not 0.0 <= getattr(h, name) < 1.0:
            raise UserError(f"--{name} must be in [0, 1), got {getattr(h, name)}")
    if h.pixel_levels < 2 or h.pixel_levels > 256:
        raise UserError(f"--pixel_levels must be in 2..256, got {h.pixel_levels}")
    for name, choices in [("precision", PRECISIONS), ("channels_last", ("auto", "on", "off")),
                          ("grad_checkpoint", GRAD_CHECKPOINTS)]:
        if getattr(h, name) not in choices:
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got {getattr(h, name)!r}")
    for name, choices in [("optimizer", OPTIMIZERS), ("enc_skips", ("last", "every")),
                          ("latent_std", STD_PARAMS), ("dmol_scale", STD_PARAMS)]:
        if getattr(h, name) not in choices:
            raise UserError(f"--{name} must be one of {', '.join(choices)}, got {getattr(h, name)!r}")
    if h.input_kernel not in (1, 3):
        raise UserError(f"--input_kernel must be 1 or 3, got {h.input_kernel}")
    vdvae_only = [f"--{name}" for name in ("custom_bottleneck_str", "input_kernel", "enc_skips", "latent_std")
                  if getattr(h, name) != getattr(Hyperparams, name)]
    if vdvae_only and h.model != "vdvae":
        raise UserError(f"{', '.join(vdvae_only)} shape the vdvae's blocks and latents, not the {h.model}'s")
    if (h.kl_warmup_steps or h.kl_balance_steps) and h.model == "vqvae":
        raise UserError("--kl_warmup_steps and --kl_balance_steps weight a KL term: the vqvae has none")
    if h.lr_decay not in ("none", "cosine"):
        raise UserError(f"--lr_decay must be none or cosine, got {h.lr_decay!r}")
    if h.lr_decay == "cosine" and h.max_steps == 0 and h.lr_decay_steps == 0:
        raise UserError("--lr_decay cosine needs --max_steps > 0 or --lr_decay_steps (it decays until max_steps)")
    if h.data_scale == 0:
        raise UserError("--data_scale must be non-zero")
    for name in ["enc_blocks", "dec_blocks"]:
        try:
            parse_layer_string(getattr(h, name))
        except ValueError as err:
            raise UserError(f"--{name}: {err}") from None
    if re.search(r"\ds\d", h.enc_blocks):
        raise UserError("--enc_blocks: RsN (blocks that share a skip) is a decoder item")
    for name, kind in [("custom_width_str", int), ("custom_bottleneck_str", float)]:
        try:
            values = parse_resolution_map(getattr(h, name), kind)
        except ValueError as err:
            raise UserError(f"--{name}: {err}") from None
        if any(v <= 0 for v in values.values()):
            raise UserError(f"--{name}: every value must be > 0, got {getattr(h, name)!r}")
    try:
        skip_slots(h.dec_blocks)
    except ValueError as err:
        raise UserError(f"--dec_blocks: {err}") from None
    if h.model == "vdvae":
        check_decoder_resolutions(h.enc_blocks, h.dec_blocks)
    if h.enc_skips == "every":
        check_every_skip_layout(h.enc_blocks, h.dec_blocks)


def check_decoder_resolutions(enc_blocks: str, dec_blocks: str) -> None:
    """Each decoder block reads the encoder's activations at its resolution: a resolution the encoder never
    reaches is a one-line error naming it and the encoder's."""
    enc = {res for res, _ in parse_layer_string(enc_blocks)}
    missing = sorted({res for res, _ in parse_layer_string(dec_blocks)} - enc)
    if missing:
        raise UserError(f"--dec_blocks has blocks at {', '.join(f'{r}x{r}' for r in missing)}, a resolution "
                        f"--enc_blocks never reaches (the decoder reads the encoder's activations at each of its "
                        f"resolutions); the encoder's are {', '.join(f'{r}x{r}' for r in sorted(enc, reverse=True))}")


def check_every_skip_layout(enc_blocks: str, dec_blocks: str) -> None:
    """--enc_skips every: at each resolution the decoder reads as many skips (skip_slots) as the encoder has
    blocks there, one each, else a one-line error that gives both counts."""
    enc_count: dict[int, int] = {}
    for res, _ in parse_layer_string(enc_blocks):
        enc_count[res] = enc_count.get(res, 0) + 1
    dec_slots: dict[int, int] = {}
    for (res, _), slot in zip(parse_layer_string(dec_blocks), skip_slots(dec_blocks)):
        dec_slots[res] = max(dec_slots.get(res, 0), slot + 1)
    differ = [f"{r}x{r}: {dec_slots[r]} decoder skips, {enc_count.get(r, 0)} encoder blocks"
              for r in sorted(dec_slots) if dec_slots[r] != enc_count.get(r, 0)]
    if differ:
        raise UserError("--enc_skips every needs one encoder block per decoder skip at each resolution (an RsN "
                        f"item's blocks reuse the skip before them): {'; '.join(differ)}")
