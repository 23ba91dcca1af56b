"""Seeing a run: curves.png after every evaluation, plot.py overlaying runs, and TensorBoard scalars and sample grids
read back with tensorboard's own EventAccumulator (skipped where tensorboard is not installed; CI installs it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run, tiny_cli_args


def picture(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("L"), dtype=float)


def test_a_run_draws_its_curves_and_plot_overlays_runs(trained_run, tmp_path):
    run_dir, _ = trained_run
    curves = picture(run_dir / "curves.png")
    assert curves.shape == (720, 1080) and curves.std() > 10  # four panels drawn, not a blank page
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in records if r["kind"] == "eval" and r["split"] == "valid"]
    assert valid and all(set(r["kl_per_resolution"]) == {"1", "4", "8"} for r in valid)  # what the KL panel shows

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(run_dir / "metrics.jsonl", other / "metrics.jsonl")
    with open(other / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 9, "lo')  # a line half-written by a killed run is left out
    for x in ("step", "time"):
        out = tmp_path / f"cmp-{x}.png"
        result = run("plot.py", str(run_dir), str(other), "--x", x, "--out", str(out))
        assert result.returncode == 0, result.stderr[-2000:]
        assert picture(out).std() > 10
    for args, says in [([str(tmp_path / "none")], "holds no metrics.jsonl"),
                       ([str(run_dir), str(other)], "several runs need --out"),
                       ([str(run_dir), "--out", str(tmp_path / "x.jpg")], "--out must end in .png")]:
        bad = run("plot.py", *args)
        assert bad.returncode == 2 and says in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_tensorboard_holds_the_scalars_and_grids_at_their_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    result = run("train.py", *tiny_cli_args(run_dir, tensorboard="true", max_steps=6, eval_every=3, log_every=2))
    assert result.returncode == 0, result.stderr[-2000:]
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["kind"] == "train"}
    scalars = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(scalars) == sorted(train) == [2, 4, 6]
    assert all(scalars[s] == pytest.approx(train[s]["loss"], rel=1e-6) for s in scalars)
    assert [e.step for e in events.Scalars("valid/loss")] == [3]
    assert [e.step for e in events.Scalars("test/loss")] == [6]
    assert [e.step for e in events.Scalars("valid/kl_per_resolution/4")] == [3]
    assert [e.step for e in events.Images("samples")] == [3, 6]


def test_tensorboard_without_the_package_is_one_line(tmp_path):
    blocker = tmp_path / "blocked" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no tensorboard here')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "blocked")}
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *tiny_cli_args(run_dir, tensorboard="true")],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --tensorboard needs the tensorboard package: pip install tensorboard "
        "(or pip install -r requirements-app.txt)"]
    assert not run_dir.exists()
