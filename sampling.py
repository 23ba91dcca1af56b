"""What sample.py and app.py draw: the model session, the modes grid, recon, interp, explore and swap (each writes
its picture), their argument parser and the helpers they share. sample.py is their command line; app.py calls the
same runners from a web page, so the two never differ and neither imports the other.
"""
from __future__ import annotations

import argparse
import copy
import math
import time
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from data import Split, load_data_for
from hps import PRECISIONS
from models import class_embedding_is_zero, load_model, require_2d_latent, require_ability
from images import check_empty_folder, crop_padding, folder_name, labelled_grid, save_gif, save_grid, save_image_folder
from utils import (CliParser, UserError, add_checkpoint_flags, autocast, available_memory, check_output_file,
                   check_output_folder, pick_device, raise_recompile_limit, resolve_precision)

MODES = ("grid", "recon", "interp", "explore", "swap", "manifold")


NULL_CLASS = -1  # "none" in --classes: the null label of a model trained with --label_dropout (no class)


def _name_key(name: str) -> str:
    """A class name as --classes matches it: case, underscores for spaces and repeated spaces aside."""
    return " ".join(name.replace("_", " ").split()).casefold()


def parse_classes(text: str, class_names: list[str], allow_none: bool = False) -> list[int]:
    """Comma-separated class names or indices -> indices (empty text: every class); with ``allow_none``, "none"
    is NULL_CLASS. A name matches exactly, else ignoring case and underscores-for-spaces where that names one class
    ("ankle boot", "ankle_boot" and "Ankle Boot" are Fashion-MNIST's "Ankle boot")."""
    if not text:
        return list(range(len(class_names)))
    keys = [_name_key(n) for n in class_names]
    indices = []
    for item in (t.strip() for t in text.split(",")):
        if allow_none and item == "none" and "none" not in class_names:
            indices.append(NULL_CLASS)
        elif item in class_names:
            indices.append(class_names.index(item))
        elif keys.count(_name_key(item)) == 1:
            indices.append(keys.index(_name_key(item)))
        elif item.lstrip("-").isdigit():
            idx = int(item)
            if not 0 <= idx < len(class_names):
                raise UserError(f"class index {idx} out of range 0..{len(class_names) - 1}")
            indices.append(idx)
        else:
            raise UserError(f"unknown class {item!r}; valid: {', '.join(class_names)} (or 0..{len(class_names) - 1})")
    return indices


def parse_ints(text: str, flag: str, low: int, high: int) -> list[int]:
    """Comma-separated integers, each in low..high."""
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    bad = [v for v in values if not low <= v <= high]
    if bad:
        raise UserError(f"{flag}: {bad[0]} is out of range {low}..{high}")
    return values


def parse_temperature(text: str, model: nn.Module) -> float | list[float]:
    """One temperature; one per latent group; or RES:T pairs, one temperature per resolution."""
    if ":" in text or "," in text:
        require_ability(model, "per_group_temperature", "--temperature with several values")
    bases = [block.base for block in model.decoder.dec_blocks] if "groups" in model.abilities else []
    try:
        if ":" in text:
            per_res = {int(r): float(t) for r, t in (item.split(":") for item in text.split(","))}
            values = [per_res.get(b, 1.0) for b in bases]
            unknown = sorted(set(per_res) - set(bases))
            if unknown:
                raise UserError(f"--temperature names resolution {unknown[0]}; this model's latent resolutions are "
                                f"{', '.join(map(str, sorted(set(bases))))}")
        else:
            values = [float(t) for t in text.split(",")]
    except ValueError:
        raise UserError(f"--temperature must be a number, a comma-separated list or RES:T pairs, got {text!r}") \
            from None
    if any(not (v > 0 and math.isfinite(v)) for v in values):  # nan, inf, 0 and negatives
        raise UserError(f"--temperature must be a finite number > 0, got {text}")
    if len(values) == 1:
        return values[0]
    if len(values) != len(bases):
        raise UserError(f"--temperature lists {len(values)} values; this model has {len(bases)} latent groups")
    return values


MAX_PICTURE_SIDE = 65_535  # pixels: what PNG viewers, browsers and PIL's decoders handle


def check_output_size(n: int, nrow: int, image_shape: tuple[int, ...], suffix: str) -> None:
    """Refuse, before any sampling, a request whose images cannot fit in this machine's free memory or in one
    picture."""
    channels, height, width = image_shape
    need = n * channels * height * width  # bytes of the uint8 images, held on the CPU until they are written
    free = available_memory()
    if free is not None and need > free // 2:
        raise UserError(f"{n:,} samples of {channels}x{height}x{width} take {need / 2**30:.1f} GiB; this machine has "
                        f"{free / 2**30:.1f} GiB free and samples may use half of it: ask for fewer with --n")
    if suffix == ".png":
        scale = max(1, 32 // height)  # labelled_grid upscales small images
        cols, rows = nrow, -(-n // nrow)
        side = max(cols * (width * scale + 2), rows * (height * scale + 2))
        if side > MAX_PICTURE_SIDE:
            raise UserError(f"{n:,} samples in rows of {nrow:,} make a picture {side:,} pixels across, more than "
                            f"{MAX_PICTURE_SIDE:,}: ask for fewer with --n, or write arrays with --out x.npz")


COMPILE_CHOICES = ("auto", "on", "off")  # sample.py grid --compile


def sample_batched(model: nn.Module, n: int, labels: torch.Tensor | None, temperature, n_batch: int,
                   amp_dtype, guidance: float = 0.0, compile: str = "off") -> torch.Tensor:
    """``n`` samples drawn ``n_batch`` at a time (uint8, on the CPU), guided by ``guidance`` when > 0.

    ``compile`` (sample.py grid --compile): "off" draws eager; "on" draws every batch with the model's regions
    compiled at one fixed batch (CompiledSampler); "auto" draws the first batch eager and compiles for the rest
    only where that pays (compile_pays: on CUDA, for a long request). The same seed gives the same images in
    every case, up to float rounding."""
    device = next(model.parameters()).device
    batch = min(n_batch, n)  # one request, one batch size: a short request is drawn in one pass, unpadded
    compiled = CompiledSampler(model, batch, temperature, guidance, device) if compile == "on" else None
    extra = {"guidance": guidance} if guidance > 0 else {}  # 0: the plain prior, exactly as without the flag
    chunks = []
    with autocast(device, amp_dtype):
        for start in range(0, n, batch):
            count = min(batch, n - start)
            chunk_labels = labels[start:start + count] if labels is not None else None
            t0 = time.perf_counter()
            if compiled is not None:
                chunks.append(compiled(count, chunk_labels))
            else:  # .cpu() waits for the device: t0 to now is the batch's time
                chunks.append(model.sample(count, chunk_labels, temperature, **extra).cpu())
            if compile == "auto" and start == 0 and compile_pays(model, device, time.perf_counter() - t0,
                                                                 -(-n // batch) - 1):
                compiled = CompiledSampler(model, batch, temperature, guidance, device)
    return torch.cat(chunks)


def compile_pays(model: nn.Module, device: torch.device, batch_s: float, batches_left: int) -> bool:
    """--compile auto, after the first batch (drawn eager in ``batch_s`` seconds): whether to compile for the
    ``batches_left`` still to draw. Only on CUDA, for a family whose regions compile, and only when the rest would
    take longer eager than a cold compile of the training step is expected to cost (speed.COMPILE_COST_S;
    sampling compiles the forward pass alone). Most requests are shorter, so the default never waits for a compile
    that a few batches cannot repay. Never on the CPU or MPS, where a cold compile costs more than a few grids
    save (--compile on asks for one)."""
    if device.type != "cuda" or batches_left <= 0 or "prior_noise" not in model.abilities:
        return False
    from speed import COMPILE_COST_S  # here: speed.py imports the trainer, which sampling needs nowhere else

    # the first batch also pays CUDA's lazy start-up, so this overestimates the rest: compile errs towards on
    return batch_s * batches_left > COMPILE_COST_S["cuda"] and compiled_for_sampling(model, device) is not None


# each model's compiled copy (None: a family without regions), so that a model compiles once per process
_COMPILED_FOR_SAMPLING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_for_sampling(model: nn.Module, device: torch.device) -> nn.Module | None:
    """A copy of ``model`` with its repeated regions compiled, made once, as the Trainer compiles them for
    training (Family.compile_regions): on CUDA as CUDA graphs (reduce-overhead: a replay per region instead of a
    launch per kernel), elsewhere with inductor's default. None for a family without such regions: it samples
    eager. A copy, so that ``model`` itself stays eager for what else draws from it (app.py's other tabs: other
    batch sizes, the blocks' own noise)."""
    if model not in _COMPILED_FOR_SAMPLING:
        # each distinct block shape is one compiled entry of the block's code; past dynamo's default limit of 8
        # the rest would silently run eager (as in Trainer._compile)
        raise_recompile_limit(64)
        mode = "reduce-overhead" if device.type == "cuda" else None
        twin = copy.deepcopy(model)
        _COMPILED_FOR_SAMPLING[model] = twin if twin.compile_regions(mode=mode, dynamic=False) else None
    return _COMPILED_FOR_SAMPLING[model]


def required_compiled_copy(model: nn.Module, device: torch.device) -> nn.Module:
    """compiled_for_sampling's copy of ``model`` for --compile on, or one line saying why there is none."""
    # the noise drawn outside the graphs is the family's standard-normal prior noise (sample's noises=)
    twin = compiled_for_sampling(model, device) if "prior_noise" in model.abilities else None
    if twin is None:
        raise UserError(f"--compile on: the {model.family} family has no repeated regions that compile for "
                        f"sampling (the vdvae's decoder blocks do); it samples eager: use --compile auto or off")
    return twin


def padded_rows(t: torch.Tensor, rows: int, fill: str) -> torch.Tensor:
    """``t`` with rows appended up to ``rows``: zeros (``fill`` "zeros") or copies of its first row ("first")."""
    extra = rows - len(t)
    if extra <= 0:
        return t
    pad = t.new_zeros((extra, *t.shape[1:])) if fill == "zeros" else t[:1].expand(extra, *t.shape[1:])
    return torch.cat([t, pad])


class CompiledSampler:
    """Prior samples drawn with the model's repeated regions compiled (compiled_for_sampling) at one fixed batch:
    every call decodes ``batch`` rows, a short last batch padded and its padding dropped, so one graph per region
    serves the whole request and nothing recompiles.

    The same seed gives the images eager sampling gives (tests/test_compiled_sampling.py): the latent noise is
    drawn outside the graphs, group by group and for the real rows only, exactly as the eager blocks draw it, and
    pixels are drawn for the real rows only (OutputNet.draw_rows). The temperature scales that noise (z = mu +
    (t sigma) eps) and the guidance scale enters as a tensor, so neither is a constant of the graphs: a new value
    of either compiles nothing."""

    def __init__(self, model: nn.Module, batch: int, temperature: float | list[float], guidance: float,
                 device: torch.device):
        self.model, self.batch, self.device = required_compiled_copy(model, device), batch, device
        self.temperatures = model._group_temperatures(temperature)
        self.guidance = torch.tensor(float(guidance), device=device) if guidance > 0 else 0.0
        self.cuda_graphs = device.type == "cuda"

    def noise(self, count: int) -> list[torch.Tensor]:
        """Every latent group's standard-normal noise for ``count`` images, drawn in the order, shape and dtype
        (float32, as the prior's fp32 heads draw) of eager sampling, scaled by the group's temperature, then zero
        rows up to the fixed batch."""
        noises = []
        for shape, t in zip(self.model.latent_shapes(), self.temperatures):
            eps = torch.randn((count, *shape), device=self.device)
            noises.append(padded_rows(eps if t == 1.0 else eps * t, self.batch, "zeros"))
        return noises

    def __call__(self, count: int, labels: torch.Tensor | None) -> torch.Tensor:
        """``count`` <= batch uint8 images (on the CPU) for ``labels``."""
        noises = self.noise(count)
        labels = padded_rows(labels, self.batch, "first") if labels is not None else None
        if self.cuda_graphs:  # each batch replays the CUDA graphs anew
            torch.compiler.cudagraph_mark_step_begin()
        out_net = self.model.decoder.out_net
        out_net.draw_rows = count
        try:
            images = self.model.sample(self.batch, labels, 1.0, noises=noises, guidance=self.guidance)
        finally:
            out_net.draw_rows = None
        # the images come from eager code after the last graph, not from the CUDA graphs' memory pool that the next
        # batch's replay overwrites; .cpu() copies them out of the device in any case
        return images.cpu()


def class_rows(classes: list[int], n_classes: int, device) -> torch.Tensor:
    """Class indices as class weights (one-hot; NULL_CLASS: all zeros, the null label)."""
    rows = torch.zeros((len(classes), n_classes), device=device)
    for i, c in enumerate(classes):
        if c != NULL_CLASS:
            rows[i, c] = 1.0
    return rows


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation per image (White 2016): intermediate Gaussian noise keeps a typical norm,
    where a straight line would pass through improbably short vectors."""
    fa, fb = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()  # on the CPU: MPS has no float64
    cos = (fa * fb).sum(1) / (fa.norm(dim=1) * fb.norm(dim=1)).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))[:, None]
    sin = torch.sin(omega)
    straight = sin.abs() < 1e-6  # (anti)parallel: fall back to the straight line
    wa = torch.where(straight, 1.0 - t, torch.sin((1.0 - t) * omega) / torch.where(straight, 1.0, sin))
    wb = torch.where(straight, t, torch.sin(t * omega) / torch.where(straight, 1.0, sin))
    return (wa * fa + wb * fb).to(a.device, a.dtype).view_as(a)


# ---------------------------------------------------------------------------------------------
# What the modes share: the model, held-out images, drawing and writing pictures
# ---------------------------------------------------------------------------------------------


# what --out may end in, per mode (interp writes both a PNG strip and a GIF; manifold may write OUT_CLASS.png files)
OUT_SUFFIXES = {"grid": (".png", ".npz"), "interp": (".png", ".gif")}


def check_out_suffix(mode: str, out: str) -> Path:
    suffixes = OUT_SUFFIXES.get(mode, (".png",))
    path = Path(out)
    if path.suffix not in suffixes:
        both = " (both are written)" if mode == "interp" else ""
        raise UserError(f"--out must end in {' or '.join(suffixes)}{both} for {mode}, got {out!r}")
    return path


def check_outputs(args: argparse.Namespace) -> None:
    """Every path this invocation will write, checked before the weights are loaded (or downloaded) and before any
    sampling: suffixes, and places that cannot be written. Creates nothing."""
    if args.mode == "grid" and (args.summary or args.export):
        if args.export and args.card:
            check_output_folder(args.export, "--export")
        elif args.export:
            check_output_file(args.export)
        return
    if getattr(args, "outdir", None):
        check_output_folder(args.outdir, "--outdir", empty=True)
        return
    out = check_out_suffix(args.mode, args.out)
    check_output_file(out)
    if args.mode == "interp":
        check_output_file(out.with_suffix(".gif" if out.suffix == ".png" else ".png"))


class Session:
    """One invocation: the model on its device, its class names, precision and the parsed shared flags."""

    def __init__(self, args: argparse.Namespace):
        if args.n is not None and args.n <= 0:
            raise UserError(f"--n must be > 0, got {args.n}")
        if args.n_batch <= 0:
            raise UserError(f"--n_batch must be > 0, got {args.n_batch}")
        self.args = args
        self.device = pick_device(args.device)
        self.model, self.class_names = load_model(args.weights, self.device, use_ema=not args.raw_weights,
                                                  hps=args.hps)
        self.H = self.model.H
        self.conditional = self.H.n_classes > 0
        self.multi_label = self.conditional and self.H.multi_label
        self.amp_dtype = resolve_precision(args.precision, self.device)
        self.temperature = parse_temperature(args.temperature, self.model)
        self.guidance = self.checked_guidance(getattr(args, "guidance", 0.0))
        self.n_groups = self.model.n_groups

    def with_args(self, args: argparse.Namespace) -> "Session":
        """This session, its model already loaded, for another invocation's flags (app.py's buttons)."""
        other = copy.copy(self)
        other.args = args
        other.amp_dtype = resolve_precision(args.precision, self.device)
        other.temperature = parse_temperature(args.temperature, self.model)
        other.guidance = other.checked_guidance(getattr(args, "guidance", 0.0))
        return other

    def checked_guidance(self, w: float) -> float:
        """--guidance W: 0 (none), or W > 0 for a class-conditional model trained with label dropout whose prior
        depends on the class; anything else is one line naming why."""
        if w < 0 or w != w:
            raise UserError(f"--guidance must be >= 0, got {w}")
        if w > 0:
            self.require_null_label("--guidance")
            if "guidance" not in self.model.abilities:
                raise UserError(f"{self.args.weights} is a {self.H.model}, whose prior ignores the class: --guidance "
                                f"has nothing to push on (the vdvae, vlae and vqvae can be guided)")
        return w

    def require_null_label(self, flag: str) -> None:
        """The null label means something only to a class model trained with --label_dropout."""
        if not self.conditional or self.multi_label:
            kind = "an unconditional model" if not self.conditional else "an attribute model"
            raise UserError(f"{self.args.weights} is {kind}: {flag} needs a class-conditional model trained with "
                            f"--label_dropout")
        if self.H.label_dropout <= 0:
            raise UserError(f"{self.args.weights} was trained without label dropout (--label_dropout 0), so it has "
                            f"no unconditional prior: {flag} needs a model trained with --label_dropout P "
                            f"(0.1 is usual)")

    def n(self, default: int) -> int:
        return self.args.n if self.args.n is not None else default

    def refuse_class_if_ignored(self, flag: str) -> None:
        """A class asked for (``flag``) of a model whose class embedding is all zeros would change nothing: one
        line saying the model is unconditional (without the flag, it still samples)."""
        if self.conditional and class_embedding_is_zero(self.model):
            raise UserError(f"{self.args.weights} is an unconditional model: its class embedding is all zeros (an "
                            f"openai/vdvae model converted with --n_classes and not trained since), so {flag} "
                            f"would change nothing; leave {flag} out to sample it")

    def require_classes(self, mode: str) -> None:
        if not self.conditional:
            raise UserError(f"{self.args.weights} is an unconditional model: {mode} needs classes")
        if self.multi_label:
            raise UserError(f"{self.args.weights} conditions on attributes, not classes: {mode} needs a class "
                            f"model (set attributes with --attributes in grid, explore or interp)")

    def one_class(self, text: str | None) -> int | torch.Tensor | None:
        """``--class`` as an index (default: the first class); for an attribute model the ``--attributes``
        vector (default: each attribute at its training frequency); None for an unconditional model."""
        if not self.conditional:
            if text:
                raise UserError(f"{self.args.weights} is an unconditional model: it takes no --class")
            return None
        if self.multi_label:
            if text:
                raise UserError(f"{self.args.weights} conditions on attributes: use --attributes, not --class")
            return self.attribute_rows()[0][0]
        if text:
            self.refuse_class_if_ignored("--class")
        return parse_classes(text, self.class_names)[0] if text else 0

    def attribute_rows(self) -> tuple[torch.Tensor, list[str]]:
        """``--attributes`` rows ("Smiling,Male=0;Eyeglasses"): named attributes set to 1 (or the value given),
        the others at their training frequency; one row of frequencies when none is given."""
        means = getattr(self.model, "attribute_means", None) or [0.5] * len(self.class_names)
        spec = getattr(self.args, "attributes", None) or ""
        rows, names = [], []
        for row in spec.split(";") if spec else [""]:
            values = list(means)
            for item in (t.strip() for t in row.split(",") if t.strip()):
                name, _, value = item.partition("=")
                if name not in self.class_names:
                    raise UserError(f"unknown attribute {name!r}; valid: {', '.join(self.class_names)}")
                if value not in ("", "0", "1"):
                    raise UserError(f"attribute {name} takes =0 or =1, got {item!r}")
                values[self.class_names.index(name)] = float(value or 1)
            rows.append(values)
            names.append(row.strip() or "mean attributes")
        return torch.tensor(rows, device=self.device), names

    def labels(self, classes: list[int] | int | torch.Tensor | None, n: int) -> torch.Tensor | None:
        """``n`` labels from one class index or attribute vector (or a list of class indices)."""
        if classes is None:
            return None
        if isinstance(classes, torch.Tensor):
            return classes.to(self.device).expand(n, -1)
        if isinstance(classes, int):
            classes = [classes] * n
        return torch.tensor(classes, device=self.device)

    def label_name(self, label) -> str:
        return "attributes" if self.multi_label else self.name(int(label))

    def held_out(self) -> Split:
        """The split ``--split`` of the model's dataset (from ``--data_root``, else the checkpoint's)."""
        root = self.args.data_root or self.H.data_root
        print(f"reading the {self.args.split} split of {self.H.dataset} from {root} (downloading the dataset "
              f"there first when it is absent and can be downloaded)", flush=True)
        data = load_data_for(self.H, self.args.data_root)
        return {"test": data.test, "valid": data.valid}[self.args.split]

    def pick(self, split: Split, indices: list[int] | None, n: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """Images (on the device), labels and indices: ``indices`` of the split, or ``n`` drawn with the seed."""
        if indices is None:
            n = min(n, len(split))
            indices = torch.randperm(len(split), generator=torch.Generator().manual_seed(self.args.seed))[:n].tolist()
        bad = [i for i in indices if not 0 <= i < len(split)]
        if bad:
            raise UserError(f"--images: index {bad[0]} is out of range 0..{len(split) - 1} of the "
                            f"{self.args.split} split")
        idx = torch.tensor(indices)
        return split.images[idx].to(self.device), split.labels[idx].to(self.device), indices

    def name(self, label: int) -> str:
        return "none" if label == NULL_CLASS else self.class_names[label]

    def decode(self, noises: list[torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        """Images from fixed latent noise, every pixel drawn with the same uniforms (seeded here, so the same
        noise decodes to the same picture in every call): differences come from the latents and classes alone."""
        torch.manual_seed(self.args.seed)
        with autocast(self.device, self.amp_dtype):
            return self.model.sample(len(noises[0]), labels, self.temperature, noises=noises,
                                     shared_pixel_noise=True).cpu()

    def prior_noise(self, n: int, seed: int) -> list[torch.Tensor]:
        """Standard-normal noise for every latent group, ``n`` images, from ``seed``."""
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn((n, *shape), generator=gen).to(self.device) for shape in self.model.latent_shapes()]

    def prior_noise_of(self, images: torch.Tensor, labels: torch.Tensor | None, k: int | None = None):
        torch.manual_seed(self.args.seed)  # draws for the groups below k
        with autocast(self.device, self.amp_dtype):
            return self.model.prior_noise_of(images, labels, n_posterior=k)

    def visible(self, images: torch.Tensor) -> torch.Tensor:
        """The part of each image the likelihood scores: MNIST's 28x28 without the 2-pixel padding to 32x32."""
        return crop_padding(images, self.H.pad)

    def write(self, images: torch.Tensor, nrow: int, row_labels=None, col_labels=None) -> Path:
        out = check_out_suffix(self.args.mode, self.args.out)
        try:
            save_grid(self.visible(images), out, nrow=nrow, row_labels=row_labels, col_labels=col_labels)
        except OSError as err:
            raise UserError(f"cannot write {out}: {err.strerror}") from None
        return out


# ---------------------------------------------------------------------------------------------
# The modes
# ---------------------------------------------------------------------------------------------


def run_grid(s: Session) -> str:
    args = s.args
    out = Path(args.out) if args.outdir else check_out_suffix("grid", args.out)
    if s.multi_label:
        if args.classes:
            raise UserError(f"{args.weights} conditions on attributes: use --attributes, not --classes")
        rows, row_labels = s.attribute_rows()
        per_class = args.n_per_class or s.n(10)
        nrow, n = per_class, len(rows) * per_class
    elif s.conditional:
        if args.classes:
            s.refuse_class_if_ignored("--classes")
        classes = parse_classes(args.classes, s.class_names, allow_none=True)
        if NULL_CLASS in classes:
            s.require_null_label("--classes none")
        per_class = args.n_per_class or s.n(10)
        nrow, n = per_class, len(classes) * per_class
        row_labels = [s.name(c) for c in classes]
    else:
        if args.classes:
            raise UserError(f"{args.weights} is an unconditional model: it takes no --classes")
        n = args.n_per_class or s.n(100)
        nrow, row_labels = int(np.ceil(np.sqrt(n))), None
    if args.compile == "on":  # refused before any folder is made (compiling itself waits for the first batch)
        required_compiled_copy(s.model, s.device)
    side = s.H.image_size - 2 * s.H.pad  # what is written: MNIST's 28x28 without the padding
    check_output_size(n, nrow, (s.H.image_channels, side, side), "" if args.outdir else out.suffix)  # no picture
    if args.outdir:  # every flag checked: the folder is made now, before the sampling
        check_empty_folder(args.outdir, "--outdir")
    labels = None  # built after the size check: --n 100000000 must not allocate a billion labels first
    if s.multi_label:
        labels = rows.repeat_interleave(per_class, dim=0)
    elif s.conditional and NULL_CLASS in classes:  # class weights: the null label is a row of zeros
        labels = class_rows(classes, s.H.n_classes, s.device).repeat_interleave(per_class, dim=0)
    elif s.conditional:
        labels = s.labels(classes, 0).repeat_interleave(per_class)
    torch.manual_seed(args.seed)
    images = sample_batched(s.model, n, labels, s.temperature, args.n_batch, s.amp_dtype, s.guidance,
                            compile=args.compile)
    if args.outdir:  # one PNG per sample, in a folder per class, for FID tools and other pipelines
        names = [row_labels[i // nrow] if s.conditional else "" for i in range(n)]  # rows are classes
        folders = [folder_name(name) if name else "all" for name in names]
        records = [{"class": name, "label": classes[i // nrow] if s.conditional and not s.multi_label else "",
                    "index": i, "seed": args.seed, "temperature": args.temperature} for i, name in enumerate(names)]
        manifest = save_image_folder(s.visible(images), folders, args.outdir, records)
        return f"wrote {n} samples as PNG files under {args.outdir} ({len(set(folders))} folder(s)), listed in " \
               f"{manifest}"
    if out.suffix == ".npz":
        label_array = labels.cpu().numpy() if labels is not None else np.full(n, -1)
        if s.conditional and not s.multi_label:  # class indices, -1 for the null label
            label_array = np.repeat(np.array(classes), per_class)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            label_array = label_array.astype(np.float32 if s.multi_label else np.int64)  # attribute vectors: (N, A)
            np.savez(out, images=s.visible(images).permute(0, 2, 3, 1).numpy(), labels=label_array)
        except OSError as err:
            raise UserError(f"cannot write {out}: {err.strerror}") from None
    else:
        s.write(images, nrow, row_labels=row_labels)
    return f"wrote {n} samples to {out}"


def default_ks(n_groups: int) -> list[int]:
    """0, 1, 2, 4, ... and every group: the first groups carry the most, so they are spaced densest."""
    ks = {0, n_groups}
    k = 1
    while k < n_groups:
        ks.add(k)
        k *= 2
    return sorted(ks)


def run_recon(s: Session) -> str:
    args = s.args
    # --outdir writes one reconstruction per image: by default from every group (the full posterior)
    ks = parse_ints(args.k, "--k", 0, s.n_groups) if args.k else [s.n_groups] if args.outdir else \
        default_ks(s.n_groups)
    if args.outdir and len(ks) != 1:
        raise UserError(f"recon --outdir writes one reconstruction per image: give one --k, got {args.k!r}")
    indices = parse_ints(args.images, "--images", 0, 10**9) if args.images else None
    images, labels, indices = s.pick(s.held_out(), indices, s.n(8))
    if args.outdir:
        return recon_to_folder(s, images, labels, indices, ks[0])
    cond = labels if s.conditional else None
    columns = [images.cpu()]
    torch.manual_seed(args.seed)
    with autocast(s.device, s.amp_dtype):
        for k in ks:
            columns.append(s.model.reconstruct(images, cond, n_posterior=k, temperature=s.temperature).cpu())
    grid = torch.stack(columns, dim=1).flatten(0, 1)  # a row per input: the input, then each k
    rows = [f"#{i}: {s.label_name(c)}" if s.conditional else f"#{i}" for i, c in zip(indices, labels.tolist())]
    out = s.write(grid, len(columns), row_labels=rows, col_labels=["input"] + [f"k={k}" for k in ks])
    return f"wrote reconstructions of {len(images)} {args.split} images from the top k of {s.n_groups} groups " \
           f"(k = {', '.join(map(str, ks))}) to {out}"


def recon_to_folder(s: Session, images: torch.Tensor, labels: torch.Tensor, indices: list[int], k: int) -> str:
    """recon --outdir: each held-out image's reconstruction from the top k groups as its own PNG in a folder per
    class, with a manifest naming the source image, k and the seed."""
    args = s.args
    check_empty_folder(args.outdir, "--outdir")  # every flag checked: the folder is made now
    torch.manual_seed(args.seed)
    with autocast(s.device, s.amp_dtype):
        recon = s.model.reconstruct(images, labels if s.conditional else None, n_posterior=k,
                                    temperature=s.temperature).cpu()
    names = [s.label_name(c) if s.conditional else "" for c in labels.tolist()]
    records = [{"class": name, "label": int(c) if s.conditional and not s.multi_label else "", "split": args.split,
                "image": i, "k": k, "seed": args.seed} for name, c, i in zip(names, labels.tolist(), indices)]
    manifest = save_image_folder(s.visible(recon), [folder_name(n) if n else "all" for n in names], args.outdir,
                                 records)
    return f"wrote reconstructions of {len(images)} {args.split} images (top {k} of {s.n_groups} groups) as PNG " \
           f"files under {args.outdir}, listed in {manifest}"


def manifold_noise(n: int) -> torch.Tensor:
    """(n * n, 2) standard-normal noise on an n x n grid at evenly spaced quantiles of the prior: each coordinate
    takes the values Phi^-1((i + 1/2) / n), i = 0..n-1 (Phi the normal CDF), so every cell stands for an equal
    share of the prior's mass and the corners are its extreme quantiles 1/(2n) and 1 - 1/(2n), not a fixed
    range. Rows run from the top of the picture down with the second coordinate decreasing, columns left to right
    with the first increasing, as on a plot's axes."""
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    values = torch.special.ndtri(q)
    first = values.repeat(n)  # varies along a row
    second = values.flip(0).repeat_interleave(n)  # constant along a row, decreasing down the picture
    return torch.stack([first, second], dim=1).float()


def mean_decoding(s: Session, noise: list[torch.Tensor], labels: torch.Tensor | None, draws: int) -> torch.Tensor:
    """uint8 images: the mean of ``draws`` pixel draws from the decoder's distribution for each latent, an estimate
    (unbiased up to the rounding to uint8) of its expected image, which is what the classic manifold pictures show
    (the Bernoulli means), for every likelihood alike. Each draw uses one set of pixel uniforms for every image
    (seeded from --seed), so what noise is left varies smoothly across the grid."""
    total = torch.zeros(())
    for i in range(draws):
        torch.manual_seed(s.args.seed + i)
        with autocast(s.device, s.amp_dtype):
            total = total + s.model.sample(len(noise[0]), labels, s.temperature, noises=noise,
                                           shared_pixel_noise=True).cpu().float()
    return (total / draws).round().to(torch.uint8)


def run_manifold(s: Session) -> str:
    """The learned 2-D manifold (Kingma and Welling 2014, Sohn et al. 2015): decodings of an n x n grid of latents at
    the prior's quantiles, one picture per class (or the one ``--class``), each cell the decoder's mean image. For
    the vlae the grid is laid in the flow's standard-normal noise and mapped through it, so it covers the quantiles
    of its base distribution. ``--temperature`` t scales the grid to the quantiles of N(0, t^2)."""
    args = s.args
    require_2d_latent(s.model, "sample.py manifold", args.weights)
    out = check_out_suffix("manifold", args.out)
    n = s.n(20)
    side = s.H.image_size - 2 * s.H.pad
    check_output_size(n * n, n, (s.H.image_channels, side, side), ".png")
    given = args.__dict__.get("class")
    if s.conditional and not s.multi_label and not given:  # one picture per class
        targets = [(c, out.with_name(f"{out.stem}_{folder_name(s.name(c))}{out.suffix}"))
                   for c in range(s.H.n_classes)]
    else:
        targets = [(s.one_class(given), out)]
    if args.draws <= 0:
        raise UserError(f"--draws must be > 0, got {args.draws}")
    noise = [manifold_noise(n).to(s.device)]
    values = [f"{v:.1f}" for v in noise[0][:n, 0].tolist()]
    written = []
    for cls, path in targets:
        images = mean_decoding(s, noise, s.labels(cls, n * n), args.draws)
        s.args.out = str(path)
        written.append(s.write(images, n, row_labels=values[::-1], col_labels=values))
    s.args.out = str(out)
    what = f"{len(written)} pictures, one per class" if len(written) > 1 else "1 picture"
    return f"wrote the {n}x{n} latent manifold ({what}): {', '.join(map(str, written))}"


def run_interp(s: Session) -> str:
    args = s.args
    require_ability(s.model, "prior_noise", "sample.py interp")
    if args.frames < 2 or args.fps <= 0:
        raise UserError(f"--frames must be >= 2 and --fps > 0, got {args.frames} and {args.fps}")
    if sum(x is not None for x in (args.images, args.seeds, args.classes)) > 1:
        raise UserError("give at most one of --images, --seeds and --classes")
    out = check_out_suffix("interp", args.out)
    ts = torch.linspace(0.0, 1.0, args.frames).tolist()
    if args.classes is not None:  # a fixed latent, the class embedding moving from one class to the other
        s.require_classes("interp --classes")
        s.refuse_class_if_ignored("--classes")
        pair = parse_classes(args.classes, s.class_names)
        if len(pair) != 2:
            raise UserError(f"--classes needs two classes, got {args.classes!r}")
        n = s.n(4)
        noise = s.prior_noise(n, args.seed)
        a, b = (torch.nn.functional.one_hot(torch.tensor(c), s.H.n_classes).float().to(s.device) for c in pair)
        frames = [s.decode(noise, ((1 - t) * a + t * b).expand(n, -1)) for t in ts]
        rows = [f"{s.name(pair[0])}->{s.name(pair[1])}"] * n
    else:
        if args.seeds is not None:  # two draws from the prior
            seeds = parse_ints(args.seeds, "--seeds", -2**63, 2**63 - 1)
            if len(seeds) != 2:
                raise UserError(f"--seeds needs two seeds, got {args.seeds!r}")
            cls = s.one_class(args.__dict__.get("class"))
            ends = [s.prior_noise(1, seed) for seed in seeds]
            labels = s.labels(cls, 1)
            rows = [f"seed {seeds[0]}->{seeds[1]}"]
        else:  # two held-out images each, encoded to their prior noise under one class
            split = s.held_out()
            if args.images is not None:
                pair = parse_ints(args.images, "--images", 0, 10**9)
                if len(pair) != 2:
                    raise UserError(f"--images needs two indices, got {args.images!r}")
                firsts, seconds = [pair[0]], [pair[1]]
            else:
                order = torch.randperm(len(split), generator=torch.Generator().manual_seed(args.seed)).tolist()
                n = min(s.n(4), len(split) // 2)
                firsts, seconds = order[:n], order[n:2 * n]
            xa, ya, _ = s.pick(split, firsts, 0)
            xb, _, _ = s.pick(split, seconds, 0)
            given = args.__dict__.get("class")
            labels = (s.labels(s.one_class(given), len(firsts)) if given else ya) if s.conditional else None
            ends = [s.prior_noise_of(xa, labels), s.prior_noise_of(xb, labels)]
            rows = [f"#{i}->#{j}" + (f", {s.label_name(c)}" if s.conditional else "")
                    for i, j, c in zip(firsts, seconds, (labels if labels is not None else ya).tolist())]
        frames = [s.decode([slerp(p, q, t) for p, q in zip(*ends)], labels) for t in ts]
    strip = torch.stack(frames, dim=1).flatten(0, 1)  # a row per pair, a column per frame
    png, gif = out.with_suffix(".png"), out.with_suffix(".gif")
    s.args.out = str(png)
    s.write(strip, len(frames), row_labels=rows)
    pictures = [with_progress_bar(labelled_grid(s.visible(f), nrow=1), i / (len(frames) - 1))
                for i, f in enumerate(frames)]
    try:
        save_gif(pictures, gif, args.fps)
    except OSError as err:
        raise UserError(f"cannot write {gif}: {err.strerror}") from None
    return f"wrote {len(frames)} frames for {len(rows)} interpolations to {png} and {gif}"


def with_progress_bar(picture, fraction: float):
    """The picture with a 3-pixel bar below it, filled to ``fraction``: where a GIF frame stands between the
    ends (and no two frames are identical, which GIF writers would merge)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (picture.width, picture.height + 3), "white")
    canvas.paste(picture, (0, 0))
    ImageDraw.Draw(canvas).rectangle([0, picture.height, round(fraction * (picture.width - 1)), picture.height + 2],
                                     fill=(40, 90, 200))
    return canvas


def run_explore(s: Session) -> str:
    args = s.args
    require_ability(s.model, "groups", "sample.py explore")
    groups = parse_ints(args.groups, "--groups", 0, s.n_groups - 1) if args.groups else list(range(s.n_groups))
    cls = s.one_class(args.__dict__.get("class"))
    n = s.n(8)
    base = s.prior_noise(1, args.seed)
    fresh = s.prior_noise(n, args.seed + 1)
    labels = s.labels(cls, n)
    rows = []
    for g in groups:  # group g takes n new draws; every other group keeps the base draw
        noise = [fresh[i] if i == g else base[i].expand(n, *base[i].shape[1:]) for i in range(s.n_groups)]
        rows.append(s.decode(noise, labels))
    bases = [block.base for block in s.model.decoder.dec_blocks]
    out = s.write(torch.cat(rows), n, row_labels=[f"group {g} ({bases[g]}x{bases[g]})" for g in groups])
    what = f" of class {s.name(cls)}" if isinstance(cls, int) else ""
    return f"wrote {n} variations of each of {len(groups)} latent groups{what} to {out}"


def run_swap(s: Session) -> str:
    args = s.args
    require_ability(s.model, "prior_noise", "sample.py swap")
    s.require_classes("swap")
    s.refuse_class_if_ignored("swap")
    k = parse_ints(args.k, "--k", 0, s.n_groups)[0] if args.k else s.n_groups
    targets = parse_classes(args.classes or "", s.class_names)
    indices = parse_ints(args.images, "--images", 0, 10**9) if args.images else None
    images, labels, indices = s.pick(s.held_out(), indices, s.n(6))
    noise = s.prior_noise_of(images, labels, k)  # the image's code under its own class
    columns = [images.cpu()] + [s.decode(noise, s.labels(c, len(images))) for c in targets]
    grid = torch.stack(columns, dim=1).flatten(0, 1)
    rows = [f"#{i}: {s.name(int(c))}" for i, c in zip(indices, labels.tolist())]
    out = s.write(grid, len(columns), row_labels=rows, col_labels=["input"] + [s.name(c) for c in targets])
    return f"wrote {len(images)} images decoded under {len(targets)} classes (top {k} of {s.n_groups} groups " \
           f"from the image) to {out}"


RUNNERS = {"grid": run_grid, "recon": run_recon, "interp": run_interp, "explore": run_explore, "swap": run_swap,
           "manifold": run_manifold}


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def build_parser(description: str | None = None) -> CliParser:
    """sample.py's command line (app.py builds the same arguments for the same runners)."""
    p = CliParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", metavar="MODE")
    default_out = {"grid": "samples.png", "recon": "recon.png", "interp": "interp.png", "explore": "explore.png",
                   "swap": "swap.png", "manifold": "manifold.png"}
    helps = {"grid": "samples from the prior, a row per class", "recon": "reconstructions from the top k groups",
             "interp": "interpolations as a PNG strip and a GIF", "explore": "vary one latent group at a time",
             "swap": "decode held-out images under every class",
             "manifold": "decode a grid of a 2-D latent at the prior's quantiles"}
    modes = {}
    for mode in MODES:
        m = add_checkpoint_flags(sub.add_parser(mode, help=helps[mode], description=helps[mode]))
        m.add_argument("--out", default=default_out[mode], help="output file")
        m.add_argument("--n", type=int, default=None, help="how many (samples per class, images, rows, "
                       "variations or the manifold's grid side; see the mode)")
        m.add_argument("--temperature", default="1.0", help="prior temperature: one value, one per latent group, "
                       "or RES:T pairs")
        m.add_argument("--n_batch", type=int, default=256, help="samples drawn per forward pass (grid)")
        m.add_argument("--precision", default="auto", choices=PRECISIONS,
                       help="autocast precision (auto: bf16 on GPUs that have it, fp32 on CPU)")
        if mode in ("recon", "interp", "swap"):
            m.add_argument("--split", default="test", choices=["test", "valid"], help="held-out split")
            m.add_argument("--data_root", default=None, help="dataset folder (default: the checkpoint's)")
            m.add_argument("--images", default=None, help="comma-separated indices into the split (default: "
                           "drawn with --seed)")
        if mode in ("grid", "recon"):
            m.add_argument("--outdir", default=None, help="instead of one picture, write every image as its own PNG "
                           "(OUTDIR/CLASS/00001.png, native size) with OUTDIR/manifest.csv of class and seed; the "
                           "folder must be new or empty")
        modes[mode] = m
    g = modes["grid"]
    g.add_argument("--classes", default="", help="comma-separated class names or indices (default: all)")
    g.add_argument("--n_per_class", type=int, default=None, help="samples per class (same as --n)")
    g.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale W >= 0: each latent "
                   "drawn from p(z|class)^(1+W) / p(z|none)^W, the temperature applied after (a model trained with "
                   "--label_dropout; 0: none). With --classes, 'none' names the null label: unconditional samples")
    for m in (g, modes["explore"], modes["interp"]):
        m.add_argument("--attributes", default=None, help="attribute models (celeba64): rows of attributes to set, "
                       "'Smiling,Male=0;Eyeglasses' (others at their training frequency)")
    g.add_argument("--compile", default="auto", choices=COMPILE_CHOICES, help="compile the model's repeated "
                   "regions (the vdvae's decoder blocks; CUDA graphs on a GPU) and draw every pass at one fixed "
                   "batch, the last padded: auto compiles on CUDA when the request is long enough that eager "
                   "sampling would outlast a cold compile; on; off. The same seed gives the same images")
    g.add_argument("--summary", action="store_true", help="print the model's modules with their output shapes, "
                   "resolutions and parameters, its latent groups and totals, and exit")
    g.add_argument("--export", default="", help="instead of sampling, write the weights (EMA unless "
                   "--raw_weights) and settings to this .safetensors file (with --card: this folder)")
    g.add_argument("--card", action="store_true", help="with --export DIR: a folder a model hub takes as is: "
                   "model.safetensors, config.json, samples.png and a model card README.md")
    modes["recon"].add_argument("--k", default=None, help="comma-separated numbers of top latent groups taken "
                                "from the posterior (default: 0, 1, 2, 4, ... and all)")
    i = modes["interp"]
    i.add_argument("--seeds", default=None, help="two seeds: interpolate between two prior draws")
    i.add_argument("--classes", default=None, help="two classes: interpolate the class at a fixed latent")
    i.add_argument("--class", default=None, help="the class held fixed (default: the first image's, or the first)")
    i.add_argument("--frames", type=int, default=16, help="interpolation steps, ends included")
    i.add_argument("--fps", type=float, default=8.0, help="GIF frames per second")
    e = modes["explore"]
    e.add_argument("--class", default=None, help="class to explore (default: the first)")
    e.add_argument("--groups", default=None, help="comma-separated latent groups, 0 at the top (default: all)")
    f = modes["manifold"]
    f.add_argument("--class", default=None, help="one class (default: a picture per class, named OUT_CLASS.png)")
    f.add_argument("--draws", type=int, default=16, help="pixel draws averaged per cell: the decoder's mean image "
                   "(1: a single draw)")
    w = modes["swap"]
    w.add_argument("--classes", default=None, help="target classes (default: all)")
    w.add_argument("--k", default=None, help="top latent groups taken from the image (default: all); the rest are "
                   "drawn from the prior")
    return p
