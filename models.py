"""The model registry: every model family by name, and the one place that builds a model from its
hyperparameters or from any weights file (our ``.pt`` checkpoints and run folders, exported ``.safetensors``,
openai/vdvae's ``.th``). Entry points (train.py, evaluate.py, sample.py, convert.py, the bench scripts) import
this module and never each other.

    model = build_model(H)                                 # H.model picks the family: vdvae, cvae, vlae, vqvae
    model, class_names = load_model("weights/digits", device)   # the checkpoint says which family it is

Every family derives from family.Family, the one contract they meet: ``forward`` (losses in bits/dim),
``log_importance_weights``, ``sample``, ``reconstruct``, ``prior_noise_of``, ``latent_shapes``, ``n_groups``,
``scored_dims``, ``set_noise_shard``, ``abilities`` (the optional sampling modes it supports), and ``stages``
with ``stage_parameters(stage)``: what each training stage optimises (one stage, "model", for all but the vqvae).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import torch
from torch import nn

from cvae import CVAE, VLAE
from family import Family
from hps import FAMILY_STAGES, MODELS, PRESETS, Hyperparams, hparams_from_preset, hparams_without_data
from checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from utils import DEFAULT_WEIGHTS, LOCAL_WEIGHTS, UserError
from vae import VAE
from vqvae import VQVAE

FAMILIES: dict[str, type[Family]] = {"vdvae": VAE, "cvae": CVAE, "vlae": VLAE, "vqvae": VQVAE}
assert tuple(FAMILIES) == MODELS, "hps.MODELS and the registry name the same families"
assert all(FAMILIES[f].stages == FAMILY_STAGES[f] for f in MODELS), "hps.FAMILY_STAGES and the families agree"
SAFETENSORS_FORMAT = "vdvae-weights-1"
ABILITY_NAMES = {"groups": "latent groups to explore", "prior_noise": "prior noise (interpolation and class swap)",
                 "per_group_temperature": "a temperature per latent group", "manifold": "a 2-D latent manifold"}


def build_model(H: Hyperparams) -> Family:
    """A fresh model of the family ``H.model`` names."""
    return FAMILIES[H.model](H)


def class_embedding_is_zero(model: nn.Module) -> bool:
    """The model has a class embedding and every entry of it is zero: its outputs do not depend on the class (an
    openai/vdvae model converted with --n_classes and not trained since)."""
    embeddings = [p for name, p in model.named_parameters() if "class_emb" in name]
    return bool(embeddings) and all(not p.detach().any() for p in embeddings)


def require_ability(model: Family, ability: str, what: str) -> None:
    """A one-line error when ``what`` (a sampling mode, an option) needs an ability the model's family lacks."""
    if ability not in model.abilities:
        raise UserError(f"{what} needs {ABILITY_NAMES[ability]}, which the {model.family} family does not have")


def require_2d_latent(model: Family, what: str, source: str) -> None:
    """A one-line error when ``what`` (sample.py manifold, train.py --track_latents) meets a model without a
    2-dimensional latent; ``source`` names the weights or the settings in the message."""
    if "manifold" in model.abilities:
        return
    shapes = model.latent_shapes()
    has = (f"its latent has {shapes[0][0]} dimensions" if len(shapes) == 1 and len(shapes[0]) == 1 else
           f"it has {len(shapes)} latent groups of shapes {', '.join('x'.join(map(str, t)) for t in shapes)}")
    raise UserError(f"{what} needs a 2-dimensional latent (a cvae or vlae with --zdim 2); {source} is a "
                    f"{model.family} model and {has}")


def load_model(weights: str, device: torch.device, use_ema: bool = True,
               hps: str | None = None) -> tuple[Family, list[str]]:
    """Build the model a checkpoint describes (ours ``.pt``, an exported ``.safetensors``, or openai/vdvae's
    ``.th`` with its preset named by ``hps``) and load its (EMA) weights; returns it with the class names."""
    weights = local_weights(weights)  # hf:ORG/NAME: the file in huggingface_hub's cache
    if weights_format(weights) == "safetensors":
        state, hps_dict, class_names, attribute_means, kind = load_safetensors(weights)
        if not use_ema and kind != "model":  # an export holds one set of weights: say so rather than ignore the flag
            raise UserError(f"{weights} holds the EMA weights only (exported without --raw_weights): use it without "
                            f"--raw_weights, or export the raw weights with sample.py --raw_weights --export")
    else:
        ckpt = load_any_checkpoint(weights, hps)
        state, hps_dict, class_names = ckpt["ema" if use_ema else "model"], ckpt["hps"], ckpt["class_names"]
        attribute_means = ckpt.get("attribute_means")
    model = build_model(Hyperparams.from_dict(hps_dict))  # the checkpoint names its family (vdvae if older)
    model.attribute_means = attribute_means  # attribute models: the default setting of each attribute
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"weights in {weights} do not fit the model they describe: "
                        f"{str(err).splitlines()[0]}") from None
    return model.to(device).eval(), list(class_names)


MISSING_WEIGHTS_ADVICE = (f"weights come from the digits model shipped in {DEFAULT_WEIGHTS} (the default when "
                          f"the current folder has no {LOCAL_WEIGHTS}), a run "
                          f"of train.py (its folder, or a .pt file in it), one of openai/vdvae's published "
                          f"checkpoints (name its preset with --hps, or convert it with convert.py: "
                          f"docs/openai_vdvae.md), or hf:ORG/NAME on the Hugging Face hub")


def weights_format(weights: str | Path) -> str:
    """What a weights file is, told by its content whatever its name: "safetensors" (exported by this project),
    "project" (a checkpoint of this project, or a run folder holding one) or "openai" (openai/vdvae's state dict of
    tensors, or any other file named .th as theirs are, whose reader then says what is wrong with it). A missing file
    says where weights come from; anything else is one line saying what it is not."""
    path = Path(weights)
    if path.is_dir():
        return "project"  # a run folder: its latest.pt, checked when it is read
    if not path.is_file():
        raise UserError(f"weights file {path} does not exist; {MISSING_WEIGHTS_ADVICE}")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    try:
        content = peek_torch_file(path)
    except UserError:
        if path.suffix == ".th":  # named as openai/vdvae names its files: their reader says what is wrong
            return "openai"
        raise
    if isinstance(content, dict) and content.get("format") == CHECKPOINT_FORMAT:
        return "project"
    if is_vdvae_state_dict(content) or path.suffix == ".th":
        return "openai"
    raise UserError(f"{path} is not a checkpoint of this project (no '{CHECKPOINT_FORMAT}' format tag), nor an "
                    f"exported .safetensors file, nor openai/vdvae's state dict")


def peek_torch_file(path: Path):
    """A torch.save file's object without reading its tensors' data where the format allows (memory-mapped), and
    without running pickled code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # the legacy (pre-zip) format cannot be mapped: read it whole
            raise UserError(f"cannot read checkpoint {path}: {str(err).strip().splitlines()[0]}") from None
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same thing to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read checkpoint {path}: {first}") from None


def is_vdvae_state_dict(content) -> bool:
    """openai/vdvae's files hold their VAE's state dict: tensors only, named encoder.* and decoder.* (with
    DistributedDataParallel's module. prefix when saved from a multi-GPU run)."""
    return (isinstance(content, dict) and bool(content) and all(isinstance(v, torch.Tensor) for v in content.values())
            and all(str(k).removeprefix("module.").split(".")[0] in ("encoder", "decoder") for k in content))


def load_any_checkpoint(weights: str, hps: str | None = None) -> dict:
    """Our checkpoint, or openai/vdvae's state dict converted to one (it needs its preset)."""
    if weights_format(weights) == "openai":
        if not hps:
            raise UserError(f"{weights} is an openai/vdvae checkpoint: name its preset with --hps "
                            f"(cifar10, imagenet32, imagenet64, ffhq256 or ffhq1024)")
        return checkpoint_from_openai(weights, hps)
    return load_checkpoint(weights)


def export_safetensors(weights: str, out: Path, use_ema: bool = True, hps: str | None = None) -> None:
    """Write one set of weights (EMA by default) with the hyperparameters and class names as metadata."""
    write_safetensors(load_any_checkpoint(weights, hps), out, use_ema)


def write_safetensors(ckpt: dict, out: Path, use_ema: bool = True) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in ckpt["ema" if use_ema else "model"].items()}
    metadata = {"format": SAFETENSORS_FORMAT, "hps": json.dumps(ckpt["hps"]),
                "class_names": json.dumps(ckpt["class_names"]), "step": str(ckpt["step"]),
                "attribute_means": json.dumps(ckpt.get("attribute_means")),
                "weights": "ema" if use_ema else "model"}
    try:
        save_file(state, str(out), metadata=metadata)
    except OSError as err:
        raise UserError(f"cannot write {out}: {err.strerror}") from None
    except SafetensorError as err:  # safetensors' own error for a path it cannot create
        raise UserError(f"cannot write {out}: {str(err).strip().splitlines()[0]}") from None


def load_safetensors(path: str) -> tuple[dict, dict, list[str], list[float] | None, str]:
    """Weights, hyperparameters, class names, attribute frequencies and which weights they are ("ema" or "model")
    of an exported file (no code can run: no pickle)."""
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise UserError(f"weights file {path} does not exist")
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {str(err).strip().splitlines()[0]}") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise UserError(f"{path} was not exported by this project (no '{SAFETENSORS_FORMAT}' metadata)")
    return (state, json.loads(metadata["hps"]), json.loads(metadata["class_names"]),
            json.loads(metadata.get("attribute_means", "null")), metadata.get("weights", "ema"))


# ---------------------------------------------------------------------------------------------
# openai/vdvae's .th checkpoints (convert.py is their command line)
# ---------------------------------------------------------------------------------------------


# the presets openai/vdvae published checkpoints for, and the class names their hps do not carry
OPENAI_PRESETS = ("cifar10", "imagenet32", "imagenet64", "ffhq256", "ffhq1024")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def is_openai_checkpoint(path: str | Path) -> bool:
    """An openai/vdvae state dict, by its content (their files end in .th, renamed copies in anything)."""
    return Path(path).is_file() and weights_format(path) == "openai"


def openai_hparams(preset: str, n_classes: int = 0) -> Hyperparams:
    """The preset's hyperparameters for one of openai/vdvae's models, with the image fields filled in."""
    if preset not in OPENAI_PRESETS:
        raise UserError(f"--hps {preset!r} has no openai/vdvae checkpoint; they exist for "
                        f"{', '.join(OPENAI_PRESETS)}")
    h = hparams_from_preset(preset, {"n_classes": n_classes, "vdvae_5bit": preset == "ffhq256"})
    return hparams_without_data(h)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.th`` file as a plain name -> tensor dict."""
    if not Path(path).is_file():
        raise UserError(f"openai/vdvae checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file means the same thing to the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot read openai/vdvae checkpoint {path}: {first}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors (openai/vdvae's *-model.th / *-model-ema.th)")
    return state


def convert_state_dict(state: dict[str, torch.Tensor], H: Hyperparams, source: str = "the checkpoint") -> dict:
    """openai/vdvae names -> our state dict for the model ``H`` describes, every name and shape checked; a
    conditional ``H`` gets a zero class embedding (no effect on the outputs until it trains)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # as DistributedDataParallel saved it
    expected = VAE(H).state_dict()
    ours_only = {k for k in expected if k.startswith("decoder.class_emb.")}
    missing = sorted(set(expected) - set(state) - ours_only)
    unexpected = sorted(set(state) - set(expected))
    reshaped = [f"{k} {tuple(state[k].shape)} there, {tuple(expected[k].shape)} here"
                for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}"
                        f"{' ...' if len(unexpected) > 5 else ''}")
    if reshaped:
        problems.append(f"{len(reshaped)} shape mismatch(es): {'; '.join(reshaped[:3])}")
    if problems:
        raise UserError(f"{source} does not fit the {H.hps} model: {' | '.join(problems)}")
    converted = {k: state[k].float() for k in expected if k not in ours_only}
    converted.update({k: torch.zeros_like(expected[k]) for k in ours_only})
    return converted


def step_of(path: str | Path) -> int:
    """The iteration in openai/vdvae's file names (``...-iter-900000-...``), else 0."""
    found = re.search(r"iter-(\d+)", Path(path).name)
    return int(found.group(1)) if found else 0


def checkpoint_from_openai(path: str | Path, preset: str, n_classes: int = 0) -> dict:
    """One of our checkpoint dicts holding an openai/vdvae file's weights as both model and EMA."""
    H = openai_hparams(preset, n_classes)
    weights = convert_state_dict(read_state_dict(path), H, str(path))
    class_names = CIFAR10_CLASSES if preset == "cifar10" else [str(c) for c in range(1000)]
    return {"format": CHECKPOINT_FORMAT, "model": weights, "ema": {k: v.clone() for k, v in weights.items()},
            "hps": H.to_dict(), "class_names": class_names[:n_classes] if n_classes else [],
            "step": step_of(path), "source": str(path)}


# ---------------------------------------------------------------------------------------------
# Sharing: a folder a model hub takes as is (sample.py --export DIR --card), and hf:ORG/NAME weights
# ---------------------------------------------------------------------------------------------

HUB_PREFIX = "hf:"
HUB_WEIGHTS = "model.safetensors"
# fields that describe where and how fast a run ran, not the model or its training: left out of the command
NOT_IN_COMMAND = {"save_dir", "restore", "device", "precision", "channels_last", "grad_checkpoint", "compile",
                  "memory_budget", "hps", "image_size", "image_channels", "pad", "multi_label", "data_root"}
FAMILY_TITLES = {"vdvae": "Very Deep VAE", "cvae": "conditional VAE", "vlae": "VLAE (VAE with a flow prior)",
                 "vqvae": "VQ-VAE with a gated PixelCNN prior"}


def local_weights(weights: str) -> str:
    """``weights`` itself, or for ``hf:ORG/NAME[@REVISION]`` the model.safetensors of that hub repository from
    huggingface_hub's cache (downloaded when online; with HF_HUB_OFFLINE=1 the cache alone)."""
    if not str(weights).startswith(HUB_PREFIX):
        return weights
    repo, _, revision = str(weights)[len(HUB_PREFIX):].partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise UserError(f"--weights {weights} needs huggingface_hub: pip install huggingface_hub "
                        f"(or pip install -r requirements-app.txt)") from None
    try:
        folder = Path(snapshot_download(repo_id=repo, revision=revision or None,
                                        allow_patterns=[HUB_WEIGHTS, "config.json", "README.md", "*.png"]))
    except Exception as err:  # noqa: BLE001 - offline and not cached, no such repository, a bad name: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot get {weights} from the hub: {first}") from None
    if not (folder / HUB_WEIGHTS).is_file():
        raise UserError(f"{weights} holds no {HUB_WEIGHTS} (write one with sample.py --export DIR --card)")
    return str(folder / HUB_WEIGHTS)


def training_command(hps: dict) -> str:
    """The train.py command line that gives these settings: the preset, then every field that differs from it."""
    preset = hps.get("hps", "cifar10")
    base = hparams_from_preset(preset).to_dict() if preset in PRESETS else {}
    flags = [f"--{k} {shlex.quote(str(v))}" for k, v in hps.items()
             if k not in NOT_IN_COMMAND and k in base and base[k] != v]
    return " ".join(["python train.py --hps", preset, *flags])


def export_folder(weights: str, out: Path, use_ema: bool = True, hps: str | None = None) -> dict:
    """A folder for a model hub: ``model.safetensors`` and ``config.json`` (settings, class names, step); returns
    the checkpoint it came from (write_model_card adds the card)."""
    ckpt = load_any_checkpoint(weights, hps) if weights_format(weights) != "safetensors" else None
    if ckpt is None:
        state, hps_dict, class_names, attribute_means, kind = load_safetensors(weights)
        ckpt = {"ema" if kind == "ema" else "model": state, "hps": hps_dict, "class_names": class_names,
                "attribute_means": attribute_means, "step": 0}
        use_ema = kind == "ema"
    if out.exists() and not out.is_dir():
        raise UserError(f"--export {out} with --card is a folder, and a file of that name exists")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create {out}: {err.strerror}") from None
    write_safetensors(ckpt, out / HUB_WEIGHTS, use_ema)
    config = {"format": SAFETENSORS_FORMAT, "family": ckpt["hps"].get("model", "vdvae"), "step": ckpt["step"],
              "weights": "ema" if use_ema else "model", "class_names": list(ckpt["class_names"]),
              "hps": ckpt["hps"]}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return ckpt


def write_model_card(out: Path, ckpt: dict, evaluations: dict[str, dict], n_params: int, samples: str | None,
                     use_ema: bool = True) -> Path:
    """README.md of an exported folder: what the model is, how to use it, its evaluation figures (evaluate.py's
    eval_*.json), its samples, how it was trained, every hyperparameter, and the license."""
    h = ckpt["hps"]
    family = h.get("model", "vdvae")
    names = ckpt["class_names"]
    kind = f"class-conditional ({len(names)} classes)" if names else "unconditional"
    lines = ["---", "license: mit", "library_name: pytorch",
             f"tags: [{', '.join(['vae', 'image-generation', family, h.get('dataset', '')])}]", "---", "",
             f"# {FAMILY_TITLES.get(family, family)} on {h.get('dataset')}", "",
             f"A {kind} {FAMILY_TITLES.get(family, family)} ({n_params:,} parameters, {h.get('image_size')}x"
             f"{h.get('image_size')} images with {h.get('pixel_levels')} levels per channel), trained for "
             f"{ckpt['step']:,} steps; these are its {'EMA' if use_ema else 'raw'} weights. Likelihoods are in bits "
             f"per dimension of the data's {h.get('pixel_levels')}-level space.", "",
             "## Use", "", "```bash", "pip install -r requirements.txt   # in a clone of the code that exported it",
             "python sample.py --weights hf:ORG/NAME --n 8 --out samples.png",
             "python evaluate.py --weights hf:ORG/NAME", "```", ""]
    if names:
        lines += [f"Classes: {', '.join(map(str, names[:40]))}{' ...' if len(names) > 40 else ''}.", ""]
    lines += ["## Evaluation", ""]
    if evaluations:
        lines += ["| split | bits/dim | reconstruction | KL (or prior) | IW bound | generative classification |",
                  "|---|---|---|---|---|---|"]
        for split, r in sorted(evaluations.items()):
            iw = f"{r['bpd_iw']:.4f} (K={r['iw_samples']})" if r.get("iw_samples", 1) > 1 else ""
            acc = f"{r['gen_class_acc']:.3f}" if "gen_class_acc" in r else ""
            lines.append(f"| {split} ({r.get('n_images')} images) | {r['bpd']:.4f} | {r['recon_bpd']:.4f} | "
                         f"{r['kl_bpd']:.4f} | {iw} | {acc} |")
        lines += ["", "From `evaluate.py` (the eval_*.json files beside the checkpoint)."]
    else:
        lines.append("Not evaluated when exported: `python evaluate.py --weights hf:ORG/NAME` measures it.")
    lines += [""]
    if samples:
        lines += ["## Samples", "", f"![samples]({samples})", "", "A row per class, temperature 1.", ""]
    lines += ["## Training", "", "```bash", training_command(h), "```", "",
              "## Hyperparameters", "", "| field | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in h.items()]
    lines += ["", "## License", "",
              "MIT, as the code that trained it. The training data keeps its own terms (scikit-learn's digits: "
              "the UCI dataset, CC BY 4.0; CIFAR-10 and the others: their authors' terms).", ""]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


# ---------------------------------------------------------------------------------------------
# A model summary (train.py --summary, sample.py --summary)
# ---------------------------------------------------------------------------------------------


def summary_rows(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules a summary lists, in definition order: each child of the model's parts (encoder, decoder, ...),
    with the items of a ModuleList or Sequential listed one by one (a VDVAE's blocks, each at its resolution)."""
    rows = []
    for part_name, part in model.named_children():
        children = list(part.named_children()) or [("", part)]
        for child_name, child in children:
            name = f"{part_name}.{child_name}" if child_name else part_name
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                rows += [(f"{name}.{i}", item) for i, item in child.named_children()]
            else:
                rows.append((name, child))
    return rows


def _first_shape(output) -> tuple[int, ...] | None:
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else []
    for item in items:
        shape = _first_shape(item)
        if shape is not None:
            return shape
    return None


def model_summary(H: Hyperparams) -> str:
    """A table of the model ``H`` describes: each listed module's output shape (of one training forward pass of one
    image, on the meta device: no memory and no arithmetic, whatever the model's size), its resolution and its
    parameters; the latent groups; the totals. Builds no optimiser and writes nothing."""
    from vae import count_parameters

    with torch.device("meta"):
        model = build_model(H).train()
    rows = summary_rows(model)
    shapes: dict[str, tuple[int, ...] | None] = {}

    def recorder(name: str):
        def hook(module, inputs, output) -> None:  # returns None: the output goes on unchanged
            shapes.setdefault(name, _first_shape(output))
        return hook
    hooks = [module.register_forward_hook(recorder(name)) for name, module in rows]
    meta = torch.device("meta")
    images = torch.zeros((1, H.image_channels, H.image_size, H.image_size), dtype=torch.uint8, device=meta)
    labels = None
    if H.n_classes > 0:
        labels = (torch.zeros(1, H.n_classes, device=meta) if H.multi_label else
                  torch.zeros(1, dtype=torch.long, device=meta))
    try:
        model(images, labels)
    finally:
        for hook in hooks:
            hook.remove()
    total = count_parameters(model)
    own = "(held by the parts themselves)"
    width = max(len(own), *(len(name) for name, _ in rows)) + 2
    lines = [f"{H.model} model of --hps {H.hps} ({H.image_channels}x{H.image_size}x{H.image_size} images, "
             f"{H.n_classes} classes)", "",
             f"{'module':<{width}}{'output shape (one image)':<28}{'res':>5}{'parameters':>14}"]
    listed = 0
    for name, module in rows:
        shape = shapes.get(name)
        n = sum(p.numel() for p in module.parameters())
        listed += n
        res = str(shape[-1]) if shape is not None and len(shape) == 4 and shape[-1] == shape[-2] else ""
        lines.append(f"{name:<{width}}{str(shape) if shape is not None else '(not run)':<28}{res:>5}{n:>14,}")
    if total != listed:  # parameters held directly by a part (a VDVAE decoder's initial states, its class embedding)
        lines.append(f"{own:<{width}}{'':<28}{'':>5}{total - listed:>14,}")
    groups: list[tuple[tuple[int, ...], int]] = []
    for shape in model.latent_shapes():
        if groups and groups[-1][0] == tuple(shape):
            groups[-1] = (tuple(shape), groups[-1][1] + 1)
        else:
            groups.append((tuple(shape), 1))
    lines += ["", f"latent groups: {model.n_groups} ("
              + ", ".join(f"{count} x {shape}" for shape, count in groups) + "), top first",
              f"total parameters: {total:,}"]
    return "\n".join(lines)
