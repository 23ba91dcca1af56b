"""Sharing a model: the committed digits weights sample with no training, sample.py --export DIR --card writes a
folder a model hub takes as is, and --weights hf:ORG/NAME loads it through huggingface_hub's cache, offline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run, tiny_cli_args
from models import load_model, load_safetensors
from test_reliability import assert_same_tensors


def run_env(script: str, *args: str, cwd, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **env}, timeout=600, check=False)


def test_the_committed_digits_model_samples_with_no_training(tmp_path):
    """`python sample.py` right after the install: the default weights are the shipped digits model."""
    state, hps, class_names, _, kind = load_safetensors(str(ROOT / "weights" / "digits.safetensors"))
    assert kind == "ema" and hps["hps"] == "digits" and hps["model"] == "vdvae" and class_names[7] == "7"
    out = tmp_path / "s.png"
    result = run("sample.py", "--out", str(out), "--classes", "3,7", "--n", "5")  # from the repository root
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_export_with_a_card_then_load_it_offline_from_the_hub_cache(tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", *tiny_cli_args(run_dir, max_steps=2, eval_every=0, lr=1e-3)).returncode == 0
    assert run("evaluate.py", "--weights", str(run_dir), "--no_classify").returncode == 0  # eval_test.json
    folder = tmp_path / "export"
    result = run("sample.py", "--weights", str(run_dir), "--export", str(folder), "--card", "--n", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                         "samples.png"]
    card = (folder / "README.md").read_text()
    report = json.loads((run_dir / "eval_test.json").read_text())
    assert card.startswith("---\nlicense: mit\n") and "![samples](samples.png)" in card
    assert f"| {report['bpd']:.4f} |" in card  # the evaluation figures of evaluate.py
    assert "python train.py --hps digits --width 16 " in card and "--lr 0.001" in card  # the command that trained it
    assert json.loads((folder / "config.json").read_text())["hps"]["width"] == 16
    exported, _ = load_model(str(folder / "model.safetensors"), torch.device("cpu"))
    trained, _ = load_model(str(run_dir), torch.device("cpu"))
    assert_same_tensors(exported.state_dict(), trained.state_dict())

    # the folder as huggingface_hub's cache holds a downloaded repository: refs/main -> snapshots/<commit>/
    pytest.importorskip("huggingface_hub")
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--tiny-digits"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    offline = dict(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    drawn = run_env("sample.py", "--weights", "hf:someone/tiny-digits", "--out", "s.png", cwd=tmp_path, **offline)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    scored = run_env("evaluate.py", "--weights", "hf:someone/tiny-digits", "--no_classify", cwd=tmp_path, **offline)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert json.loads((tmp_path / "eval_test.json").read_text())["bpd"] == pytest.approx(report["bpd"])
    assert not list((repo / "snapshots" / commit).glob("eval_*"))  # nothing written into the cache
    missing = run_env("sample.py", "--weights", "hf:someone/absent", "--out", "t.png", cwd=tmp_path, **offline)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot get hf:someone/absent from the hub")


@pytest.mark.parametrize("args, says", [
    (["--card"], "--card goes with --export DIR"),
    (["--export", "x.safetensors", "--card"], "--export with --card names a folder"),
])
def test_card_misuse_is_one_line(tmp_path, args, says):
    result = run("sample.py", "--weights", str(ROOT / "weights" / "digits.safetensors"), *args, cwd=tmp_path)
    assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1
