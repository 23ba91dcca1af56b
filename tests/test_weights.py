"""Weights that explain themselves: a file is recognised by its content whatever its name, a missing one says where
weights come from, and a model whose class embedding is all zeros says it is unconditional when asked for a class."""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import tiny_hps
from models import MISSING_WEIGHTS_ADVICE, class_embedding_is_zero, load_model, weights_format
from utils import UserError, run_cli
from vae import VAE


def refused(main, argv, capsys) -> str:
    """The one error line ``main`` ends with (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def renamed(trained_run, tmp_path_factory):
    """The trained run's checkpoint and its safetensors export, each under another file's name, and an
    openai/vdvae-style state dict (DistributedDataParallel's names) saved as .pt."""
    import sample

    run_dir, _ = trained_run
    folder = tmp_path_factory.mktemp("renamed")
    shutil.copyfile(run_dir / "latest.pt", folder / "model.bin")
    run_cli(sample.main, ["--weights", str(run_dir), "--export", str(folder / "export.safetensors")])
    shutil.copyfile(folder / "export.safetensors", folder / "weights.pt")
    state = VAE(tiny_hps(n_classes=0)).state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, folder / "theirs.pt")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.th")
    return folder


def test_a_weights_file_is_recognised_by_its_content(trained_run, renamed):
    run_dir, _ = trained_run
    assert weights_format(run_dir) == "project" and weights_format(run_dir / "latest.pt") == "project"
    assert weights_format(renamed / "model.bin") == "project"
    assert weights_format(renamed / "weights.pt") == "safetensors"
    assert weights_format(renamed / "export.safetensors") == "safetensors"
    assert weights_format(renamed / "theirs.pt") == "openai"
    with pytest.raises(UserError, match="is not a checkpoint of this project"):
        weights_format(renamed / "foreign.pt")
    assert weights_format(renamed / "foreign.th") == "openai"  # named as theirs: their reader says what it is not
    with pytest.raises(UserError, match="does not fit the cifar10 model: .*unexpected 1 key"):
        load_model(str(renamed / "foreign.th"), torch.device("cpu"), hps="cifar10")


def test_renamed_weights_load_as_what_they_are(trained_run, renamed):
    run_dir, _ = trained_run
    reference, _ = load_model(str(run_dir), torch.device("cpu"))
    for name in ("model.bin", "weights.pt"):
        model, classes = load_model(str(renamed / name), torch.device("cpu"))
        assert classes == [str(d) for d in range(10)]
        for (key, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), (name, key)


def test_an_openai_state_dict_under_any_name_asks_for_its_preset(renamed, capsys):
    import sample

    line = refused(sample.main, ["--weights", str(renamed / "theirs.pt")], capsys)
    assert "is an openai/vdvae checkpoint: name its preset with --hps" in line


def test_missing_weights_say_where_weights_come_from(tmp_path, capsys):
    import evaluate
    import sample

    for main in (sample.main, evaluate.main):
        line = refused(main, ["--weights", str(tmp_path / "weights.pt")], capsys)
        assert line == f"error: weights file {tmp_path / 'weights.pt'} does not exist; {MISSING_WEIGHTS_ADVICE}"
    assert "convert.py" in MISSING_WEIGHTS_ADVICE and "hf:ORG/NAME" in MISSING_WEIGHTS_ADVICE
    assert "weights/digits.safetensors" in MISSING_WEIGHTS_ADVICE


@pytest.fixture(scope="module")
def zero_embedding_run(trained_run, tmp_path_factory):
    """The trained conditional run with its class embedding zeroed, as a converted openai/vdvae model has it."""
    run_dir, _ = trained_run
    folder = tmp_path_factory.mktemp("zero-embedding")
    ckpt = torch.load(run_dir / "latest.pt", weights_only=True)
    for weights in (ckpt["model"], ckpt["ema"]):
        weights["decoder.class_emb.weight"].zero_()
    torch.save(ckpt, folder / "latest.pt")
    return folder


def test_class_embedding_is_zero_only_when_every_entry_is(trained_run, zero_embedding_run):
    run_dir, _ = trained_run
    assert not class_embedding_is_zero(load_model(str(run_dir), torch.device("cpu"))[0])
    assert class_embedding_is_zero(load_model(str(zero_embedding_run), torch.device("cpu"))[0])
    assert not class_embedding_is_zero(VAE(tiny_hps(n_classes=0)))  # no embedding at all: nothing to say


@pytest.mark.parametrize("argv", [["--classes", "3"], ["explore", "--class", "3"], ["swap"],
                                  ["interp", "--classes", "1,7"]])
def test_asking_a_zero_embedding_model_for_a_class_says_it_is_unconditional(zero_embedding_run, tmp_path, capsys,
                                                                            argv):
    import sample

    out = tmp_path / "x.png"
    line = refused(sample.main, [*argv, "--weights", str(zero_embedding_run), "--out", str(out)], capsys)
    assert "is an unconditional model: its class embedding is all zeros" in line
    assert not out.exists()


def test_a_zero_embedding_model_still_samples_and_evaluate_says_so(zero_embedding_run, tmp_path, capsys):
    import evaluate
    import sample

    run_cli(sample.main, ["--weights", str(zero_embedding_run), "--n", "2", "--out", str(tmp_path / "s.png")])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    run_cli(evaluate.main, ["--weights", str(zero_embedding_run), "--no_classify", "--out", str(tmp_path / "e.json")])
    assert "the class embedding is all zeros: the model is unconditional" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# No --weights: ./weights.pt when the current folder has one (the original conditional-VDVAE repository's workflow:
# put the downloaded weights.pt in the folder, run python sample.py), else the shipped digits model
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def seed_folder(trained_run, tmp_path, monkeypatch):
    """A working folder where the shipped model resolves as it does in the repository (weights/ linked there) and
    that holds the trained tiny run's checkpoint as weights.pt; the current folder during the test."""
    from conftest import ROOT

    run_dir, _ = trained_run
    here = tmp_path / "here"
    here.mkdir()
    (here / "weights").symlink_to(ROOT / "weights", target_is_directory=True)
    shutil.copyfile(run_dir / "latest.pt", here / "weights.pt")
    monkeypatch.chdir(here)
    return here


def sampled(main, argv, capsys):
    """The images and labels ``sample.py ARGV --out x.npz`` draws, and what it printed."""
    import numpy as np

    capsys.readouterr()
    main([*argv, "--out", "x.npz"])
    printed = capsys.readouterr().out
    with np.load("x.npz") as arrays:
        return arrays["images"], arrays["labels"], printed


def test_with_no_weights_flag_a_weights_pt_here_is_loaded_else_the_shipped_model(trained_run, seed_folder, capsys):
    import numpy as np
    import sample

    run_dir, _ = trained_run
    images, labels, printed = sampled(sample.main, [], capsys)
    assert printed.splitlines()[0] == "weights: ./weights.pt (no --weights given)"
    assert images.shape == (100, 8, 8, 1) and np.array_equal(labels, np.repeat(np.arange(10), 10))  # 10 a class
    named, _, _ = sampled(sample.main, ["--weights", str(run_dir)], capsys)
    shipped, _, _ = sampled(sample.main, ["--weights", "weights/digits.safetensors"], capsys)
    assert np.array_equal(images, named) and not np.array_equal(images, shipped)

    (seed_folder / "weights.pt").unlink()
    images, _, printed = sampled(sample.main, [], capsys)
    assert printed.splitlines()[0] == ("weights: weights/digits.safetensors (the shipped digits model: no --weights "
                                       "given and no ./weights.pt here)")
    assert np.array_equal(images, shipped)


def test_evaluate_and_app_take_the_same_default(trained_run, seed_folder, capsys, monkeypatch):
    import importlib.util
    import json

    import app
    import evaluate
    from conftest import free_port

    run_dir, _ = trained_run
    capsys.readouterr()
    run_cli(evaluate.main, ["--no_classify"])
    assert capsys.readouterr().out.splitlines()[0] == "weights: ./weights.pt (no --weights given)"
    report = json.loads((seed_folder / "eval_test.json").read_text())  # beside the weights: the current folder
    run_cli(evaluate.main, ["--weights", str(run_dir), "--no_classify", "--out", "named.json"])
    assert report["bpd"] == json.loads((seed_folder / "named.json").read_text())["bpd"]

    loaded = []

    class Loaded(Exception):
        pass

    def app_stub(weights, *rest):  # what app.py would serve, without gradio or a server
        loaded.append(weights)
        raise Loaded

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gradio" else
                        real_find_spec(name, *a))
    monkeypatch.setattr(app, "App", app_stub)
    for present in (True, False):
        if not present:
            (seed_folder / "weights.pt").unlink()
        with pytest.raises(Loaded):
            app.main(["--port", str(free_port())])
    assert loaded == ["./weights.pt", "weights/digits.safetensors"]


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "foreign"])
def test_an_unloadable_weights_pt_here_is_one_line_and_exit_2(seed_folder, capsys, content):
    import evaluate
    import sample

    if content == "foreign":
        torch.save({"weights": torch.zeros(3)}, seed_folder / "weights.pt")
    else:
        (seed_folder / "weights.pt").write_bytes(content)
    for main in (sample.main, evaluate.main):
        line = refused(main, [], capsys)
        assert line.startswith("error: ") and "weights.pt" in line, line
    assert not (seed_folder / "samples.png").exists() and not (seed_folder / "eval_test.json").exists()
