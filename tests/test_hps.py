"""The hyperparameter object: strict, overridable, and every field is used."""
from __future__ import annotations

import sys

import pytest

import hps as hps_module
from conftest import tiny_cli_args
from hps import PRESETS, SETTABLE, Hyperparams, hparams_from_preset, parse_args
from utils import UserError


def test_presets_and_overrides():
    h = hparams_from_preset("cifar10")
    assert (h.width, h.zdim, h.num_mixtures, h.lr, h.wd, h.grad_clip, h.skip_threshold, h.ema_rate,
            h.n_batch, h.warmup_iters) == (384, 16, 10, 2e-4, 0.01, 200.0, 400.0, 0.9999, 16, 100)
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
        assert set(values) <= names, name


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
