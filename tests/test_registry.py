"""The model registry (models.py) and the families through the real entry points: every family trains under the
same Trainer, saves, resumes bit-exactly, evaluates and samples with no family flag; a mode a family lacks ends
with one line; entry points never import each other."""
from __future__ import annotations

import ast
import json

import pytest
import torch

import evaluate
import sample
from conftest import ROOT, run, tiny_cli_args
from cvae import CVAE, VLAE
from models import FAMILIES, build_model, load_model
from test_reliability import assert_same_tensors, load
from vae import VAE
from vqvae import VQVAE

FAMILY = dict(conv_width=8, made_hidden=16)  # tiny cvae/vlae: a step in milliseconds


def family_args(run_dir, model: str, **overrides) -> list[str]:
    return tiny_cli_args(run_dir, model=model, **FAMILY, **overrides)


def test_the_registry_builds_the_family_the_settings_name():
    from conftest import tiny_hps

    for name, cls in [("vdvae", VAE), ("cvae", CVAE), ("vlae", VLAE), ("vqvae", VQVAE)]:
        model = build_model(tiny_hps(model=name, **FAMILY))
        assert type(model) is cls and model.family == name == cls.family
        trained = [p for stage in model.stages for p in model.stage_parameters(stage)]  # each parameter, once
        assert sorted(map(id, trained)) == sorted(map(id, model.parameters())), name
    assert set(FAMILIES) == {"vdvae", "cvae", "vlae", "vqvae"}


@pytest.mark.parametrize("model", ["cvae", "vlae"])
def test_a_family_trains_resumes_bit_exactly_evaluates_and_samples_through_the_cli(tmp_path, model):
    """grad_accum 2 too: the posterior noise of each pass is its slice of the global batch's draw."""
    common = dict(lr_decay="none", augment_shift=1, eval_every=2, save_every=3, log_every=1, grad_accum=2, n_batch=8)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("train.py", *family_args(straight, model, max_steps=6, **common)).returncode == 0
    assert run("train.py", *family_args(split, model, max_steps=3, **common)).returncode == 0
    second = run("train.py", *family_args(split, model, max_steps=6, restore="latest", **common))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    a, b = load(straight / "latest.pt"), load(split / "latest.pt")
    assert a["hps"]["model"] == model and a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "scheduler", "rng"):
        assert_same_tensors(a[key], b[key], key)

    loaded, names = load_model(str(split), torch.device("cpu"))  # the checkpoint says which family: no flag
    assert loaded.family == model and names[3] == "3"
    # evaluation and sampling through the same command lines, in this process (each a subprocess cost 2.5 s more)
    evaluate.main(["--weights", str(split), "--iw_samples", "3", "--out", str(tmp_path / "e.json")])
    report = json.loads((tmp_path / "e.json").read_text())
    assert list(report["kl_per_resolution"]) == ["z"]  # one latent vector: no resolutions to split the KL over
    assert 0 < report["bpd_iw"] <= report["bpd"] + 0.05, report
    for mode, extra in [("grid", ["--classes", "3,7", "--n", "4"]), ("recon", ["--n", "4"]), ("interp", []),
                        ("swap", ["--n", "2"])]:
        out = tmp_path / f"{mode}.png"
        sample.main([mode, "--weights", str(split), "--out", str(out), *extra])
        assert out.read_bytes()[:4] == b"\x89PNG"
    exported = tmp_path / "w.safetensors"
    sample.main(["--weights", str(split), "--export", str(exported)])
    again, _ = load_model(str(exported), torch.device("cpu"))
    assert again.family == model
    assert_same_tensors(again.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("mode, extra, says", [
    ("explore", [], "sample.py explore needs latent groups to explore, which the cvae family does not have"),
    ("grid", ["--temperature", "1:0.5"], "--temperature with several values needs a temperature per latent group"),
])
def test_a_mode_the_family_lacks_ends_with_one_line(tmp_path, mode, extra, says):
    assert run("train.py", *family_args(tmp_path / "run", "cvae", max_steps=1, eval_every=0)).returncode == 0
    result = run("sample.py", mode, "--weights", str(tmp_path / "run"), "--out", str(tmp_path / "x.png"), *extra)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [f"error: {says}" + result.stderr.split(says, 1)[1].strip()]
    assert not (tmp_path / "x.png").exists()


def test_resuming_into_another_family_is_refused_before_anything_is_written(tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", *family_args(run_dir, "cvae", max_steps=2, eval_every=0)).returncode == 0
    before = sorted(p.name for p in run_dir.iterdir())
    result = run("train.py", *family_args(run_dir, "vlae", max_steps=4, restore="latest"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--model ('cvae' there, 'vlae' here)" in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == before


ENTRY_POINTS = ["train", "evaluate", "sample", "convert", "plot", "app", "toy2d"]


def test_entry_points_never_import_each_other():
    """Building and loading models lives in models.py, below them all (the project's layout rule)."""
    for name in ENTRY_POINTS:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                    for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module}
        assert not imported & (set(ENTRY_POINTS) - {name}), (name, imported & set(ENTRY_POINTS))
