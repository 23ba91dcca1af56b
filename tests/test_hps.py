"""The hyperparameter object: strict, overridable, and every field is used."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys

import pytest

import hps as hps_module
from conftest import ROOT, tiny_cli_args
from hps import (PRESETS, SETTABLE, Hyperparams, fill_derived, hparams_from_preset, hparams_without_data, parse_args,
                 parse_layer_string, resolve_presets)
from utils import UserError

# the fields that fix the shapes of the weights or what the model computes: a checkpoint resumes only into them
MODEL_SHAPING = {"model", "conv_width", "made_hidden", "codebook_size", "code_dim", "vq_downsample", "prior_channels",
                 "prior_layers", "dataset", "image_size", "image_channels", "pixel_levels", "n_classes", "width",
                 "custom_width_str", "enc_blocks", "dec_blocks", "zdim", "bottleneck_multiple", "num_mixtures",
                 "no_bias_above", "likelihood", "gaussian_std", "data_shift", "data_scale", "vdvae_5bit", "pad",
                 "multi_label", "label_dropout", "custom_bottleneck_str", "input_kernel", "enc_skips", "latent_std",
                 "dmol_scale"}


def test_presets_and_overrides():
    h = hparams_from_preset("cifar10")
    assert (h.width, h.zdim, h.num_mixtures, h.lr, h.wd, h.grad_clip, h.skip_threshold, h.skip_threshold_start,
            h.ema_rate, h.n_batch, h.warmup_iters) == (384, 16, 10, 2e-4, 0.01, 200.0, "auto", 400.0, 0.9999, 16, 100)
    h, _ = parse_args(["--hps", "digits", "--width", "32", "--lr_decay", "none", "--max_steps", "0"], "x")
    assert h.width == 32 and h.dataset == "digits" and h.hps == "digits"


def test_unknown_keys_are_errors():
    h = hparams_from_preset("digits")
    with pytest.raises(AttributeError):
        h.widht = 3
    with pytest.raises(AttributeError):
        _ = h.widht
    with pytest.raises(UserError, match="valid presets"):
        hparams_from_preset("cifar11")
    with pytest.raises(UserError, match="unknown hyperparameter"):
        hparams_from_preset("digits", {"widht": 3})
    with pytest.raises(UserError, match="unknown hyperparameters"):
        Hyperparams.from_dict({"widht": 3})


def test_every_preset_names_only_real_fields():
    names = {f.name for f in SETTABLE}
    for name, values in PRESETS.items():
        assert set(values) - {"base"} <= names, name
        assert values.get("base", "cifar10") in PRESETS, name


def test_the_cifar10_preset_holds_the_defaults_that_help_shows():
    defaults = Hyperparams()
    for key, value in PRESETS["cifar10"].items():
        assert getattr(defaults, key) == value, key
    assert hparams_from_preset("cifar10") == defaults


def test_a_preset_starts_from_its_base_and_its_own_values_win():
    cifar10, cifar100 = hparams_from_preset("cifar10"), hparams_from_preset("cifar100")
    assert (cifar100.width, cifar100.enc_blocks, cifar100.lr) == (cifar10.width, cifar10.enc_blocks, cifar10.lr)
    assert (cifar100.dataset, cifar100.n_classes) == ("cifar100", 100)
    ffhq1024 = hparams_from_preset("ffhq1024")  # <- ffhq256 <- imagenet64 <- imagenet32 <- cifar10
    assert (ffhq1024.n_classes, ffhq1024.pixel_levels, ffhq1024.ema_rate, ffhq1024.n_batch) == (0, 256, 0.999, 1)
    table = {"a": dict(width=8, zdim=2), "b": dict(base="a", zdim=3, lr=1.0), "c": dict(base="b", lr=2.0)}
    assert resolve_presets(table) == {"a": dict(width=8, zdim=2), "b": dict(width=8, zdim=3, lr=1.0),
                                      "c": dict(width=8, zdim=3, lr=2.0)}
    assert table["c"] == dict(base="b", lr=2.0)  # the plain data stays as written


def test_a_bad_preset_table_is_an_error_when_hps_is_imported(tmp_path):
    with pytest.raises(ValueError, match="preset 'b' names an unknown base 'nope'; valid: a, b"):
        resolve_presets({"a": {}, "b": dict(base="nope")})
    with pytest.raises(ValueError, match="presets a -> b -> a form a cycle of bases"):
        resolve_presets({"a": dict(base="b"), "b": dict(base="a")})
    with pytest.raises(ValueError, match="preset 'a' sets unknown or derived fields image_size, widht"):
        resolve_presets({"a": dict(widht=3, image_size=8)})
    source = (ROOT / "hps.py").read_text()
    assert source.count('base="cifar10", dataset="cifar100"') == 1
    (tmp_path / "hps.py").write_text(source.replace('base="cifar10", dataset="cifar100"',
                                                    'base="cifar1000", dataset="cifar100"'))
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.path[1:1] = [{str(ROOT)!r}]; import hps"],
                            cwd=tmp_path, capture_output=True, text=True, check=False)
    assert result.returncode == 1 and "preset 'cifar100' names an unknown base 'cifar1000'" in result.stderr


def test_model_fields_are_flagged_where_declared():
    declared = [f.name for f in dataclasses.fields(Hyperparams)]
    assert set(hps_module.MODEL_FIELDS) == MODEL_SHAPING
    assert hps_module.MODEL_FIELDS == [name for name in declared if name in MODEL_SHAPING]


def test_hps_imports_no_project_module_but_utils():
    """Every other module may import hps: it imports nothing of theirs back, not even for type hints."""
    tree = ast.parse((ROOT / "hps.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported & {p.stem for p in ROOT.glob("*.py")} == {"utils"}


def test_parse_layer_string():
    assert parse_layer_string("32x2,32d2,16m8,4") == [(32, None), (32, None), (32, 2), (16, 8), (4, None)]
    with pytest.raises(ValueError):
        parse_layer_string("32y2")


def test_fill_derived_fills_the_fields_the_data_decides_and_checks_them():
    h = hparams_from_preset("folder")  # --n_classes -1: the data's count
    fill_derived(h, 64, 3, False, class_count=5)
    assert (h.image_size, h.image_channels, h.pad, h.multi_label, h.n_classes) == (64, 3, 0, False, 5)
    h = hparams_from_preset("mnist")
    fill_derived(h, 32, 1, False, class_count=10)
    assert (h.pad, h.n_classes) == (2, 10)
    h = hparams_from_preset("celeba64")
    fill_derived(h, 64, 3, True, class_count=40)
    assert h.multi_label
    fill_derived(hparams_from_preset("mnist", {"n_classes": 0}), 32, 1, False, class_count=10)  # unconditional
    with pytest.raises(UserError, match=r"^--n_classes must be 0 \(unconditional\) or 10 for mnist, got 7$"):
        fill_derived(hparams_from_preset("mnist", {"n_classes": 7}), 32, 1, False, class_count=10)
    with pytest.raises(UserError, match="^--hps folder needs the class count of its data: give --n_classes$"):
        fill_derived(hparams_from_preset("folder"), 64, 3, False)
    # with data every family's decoder spec must end at the image size: the data were loaded at the size it ends at
    cvae = hparams_from_preset("digits", {"model": "cvae", "dec_blocks": "1x1,4m1,4x2"})
    with pytest.raises(UserError, match="^--dec_blocks must end at the image size 8, ends at 4$"):
        fill_derived(cvae, 8, 1, False, class_count=10)


def test_hparams_without_data_fills_a_copy_from_the_dataset_shapes():
    h = hparams_from_preset("mnist")
    filled = hparams_without_data(h)
    assert (filled.image_size, filled.image_channels, filled.pad, filled.multi_label) == (32, 1, 2, False)
    assert h == hparams_from_preset("mnist")  # the original is left as it was
    celeba = hparams_without_data(hparams_from_preset("celeba64"))
    assert (celeba.image_size, celeba.multi_label, celeba.n_classes) == (64, True, 40)
    with pytest.raises(UserError,
                       match="^--summary of --hps folder needs the class count of its data: give --n_classes$"):
        hparams_without_data(hparams_from_preset("folder"))
    with pytest.raises(UserError, match="^speed.py of --hps folder needs the class count"):
        hparams_without_data(hparams_from_preset("folder"), "speed.py")
    assert hparams_without_data(hparams_from_preset("folder", {"n_classes": 3})).n_classes == 3
    # without data only a vdvae's decoder must end at the image size: no other family's model reads the spec
    cvae = hparams_without_data(hparams_from_preset("digits", {"model": "cvae", "dec_blocks": "1x1,4m1,4x2"}))
    assert (cvae.image_size, cvae.image_channels) == (8, 1)
    with pytest.raises(UserError, match="^--dec_blocks must end at the image size 8, ends at 4$"):
        hparams_without_data(hparams_from_preset("digits", {"dec_blocks": "1x1,4m1,4x2"}))
    with pytest.raises(UserError, match="^unknown dataset 'nope'; valid: cifar10, "):
        hparams_without_data(hparams_from_preset("digits", {"dataset": "nope"}))


def test_every_hyperparameter_is_read(tmp_path, monkeypatch):
    """Run training and sampling in-process and record which fields the code reads outside validation
    and serialisation: a field nothing reads is a dead flag."""
    read: set[str] = set()
    original = Hyperparams.__getattribute__
    ignored_callers = {"validate", "_asdict_inner", "asdict", "to_dict", "restore_run", "__repr__", "__eq__"}

    def tracking(self, name):
        callers = {sys._getframe(depth).f_code.co_name for depth in (1, 2)}  # depth 2: inside a comprehension
        if name in hps_module._FIELD_NAMES and not callers & ignored_callers:
            read.add(name)
        return original(self, name)

    monkeypatch.setattr(Hyperparams, "__getattribute__", tracking)
    monkeypatch.chdir(tmp_path)
    import train

    args = tiny_cli_args(tmp_path / "run", augment_shift=1, keep_every=3)
    train.main(args)
    # restore reads the restore field; the run folder default reads hps
    train.main(tiny_cli_args(tmp_path / "run", max_steps=7, restore=tmp_path / "run"))
    train.main(tiny_cli_args(None, max_steps=1))  # the default run folder reads the preset name
    train.main(tiny_cli_args(tmp_path / "auto", max_steps=1, skip_threshold="auto"))  # the outlier rule's start
    # the schedule past warm-up and the KL warm-up's start (read only once they apply)
    train.main(tiny_cli_args(tmp_path / "efficient", max_steps=3, warmup_iters=1, kl_warmup_steps=2,
                             kl_balance_steps=1, optimizer="adamax"))
    # the families' own fields: read by the vlae (the cvae's encoder and decoder, and the flow prior's MADE)
    train.main(tiny_cli_args(tmp_path / "vlae", max_steps=1, model="vlae", conv_width=8, made_hidden=16))
    # and the vqvae's: its codebook, its prior and its second stage's budget
    train.main(tiny_cli_args(tmp_path / "vqvae", max_steps=1, model="vqvae", conv_width=8, codebook_size=8, code_dim=4,
                             prior_channels=8, prior_layers=2, prior_steps=1, prior_lr=1e-3, vq_downsample=1))
    unread = {f.name for f in SETTABLE} - read
    assert not unread, f"fields never read: {sorted(unread)}"


def test_bernoulli_implies_binary_pixels_unless_told_otherwise():
    from hps import hparams_from_preset

    assert hparams_from_preset("mnist", {"likelihood": "bernoulli"}).pixel_levels == 2
    assert hparams_from_preset("digits", {"likelihood": "bernoulli"}).pixel_levels == 2
    with pytest.raises(UserError, match="needs --pixel_levels 2"):
        hparams_from_preset("digits", {"likelihood": "bernoulli", "pixel_levels": 17})


@pytest.mark.parametrize("preset,world,given,expected", [
    ("cifar10", 1, {}, (16, 2, "--global_batch 32: 2 accumulated passes of 16")),  # the paper's 2 GPUs x 16
    ("cifar10", 2, {}, (16, 1, "--global_batch 32: one pass of 16 on each of 2 processes")),
    ("cifar10", 4, {}, (8, 1, "--global_batch 32: one pass of 8 on each of 4 processes")),
    ("cifar10", 1, {"n_batch": 32}, (32, 1, "--global_batch 32: one pass of 32")),  # a larger batch on one card
    ("imagenet32", 1, {}, (8, 32, "--global_batch 256: 32 accumulated passes of 8")),  # openai's 32 GPUs x 8
    ("imagenet64", 32, {}, (4, 1, "--global_batch 128: one pass of 4 on each of 32 processes")),
    ("ffhq256", 8, {}, (1, 4, "--global_batch 32: 4 accumulated passes of 1 on each of 8 processes")),
    ("cifar10", 1, {"global_batch": 0, "grad_accum": 3}, (16, 3, "")),
    ("cifar10", 1, {"grad_accum": 2}, (16, 2, "--global_batch 32: 2 accumulated passes of 16")),
])
def test_a_presets_global_batch_is_reached_by_accumulation_or_split(preset, world, given, expected):
    from hps import resolve_global_batch

    H = hparams_from_preset(preset, given)
    note = resolve_global_batch(H, world, frozenset(given))
    assert (H.n_batch, H.grad_accum, note) == expected
    assert H.global_batch in (0, H.n_batch * world * H.grad_accum)


@pytest.mark.parametrize("preset,world,given,message", [
    ("cifar10", 3, {}, "--global_batch 32 does not split evenly over 3 processes"),
    ("cifar10", 1, {"n_batch": 12}, "which passes of --n_batch 12 cannot make"),
    ("cifar10", 1, {"n_batch": 64}, "which passes of --n_batch 64 cannot make"),
    ("cifar10", 1, {"grad_accum": 4}, "is not --global_batch 32: leave --grad_accum out"),
])
def test_a_global_batch_that_cannot_be_reached_is_one_line(preset, world, given, message):
    from hps import resolve_global_batch

    with pytest.raises(UserError, match=message):
        resolve_global_batch(hparams_from_preset(preset, given), world, frozenset(given))


def test_the_run_log_says_how_the_global_batch_is_reached(tmp_path):
    import train
    from conftest import tiny_cli_args

    import torch

    train.main(tiny_cli_args(tmp_path / "run", max_steps=1, eval_every=0, global_batch=32))
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "global batch 32 (n_batch 16 x 1 processes x grad_accum 2) | --global_batch 32: 2 accumulated passes " \
           "of 16" in log
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["global_batch"] == 32
