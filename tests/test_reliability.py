"""Nothing lost on a crash: exact resume, signals, SIGKILL at random moments, damaged checkpoints, runs of
skipped updates, and weights loaded without running code. Through the real CLI where a user would be."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run, tiny_cli_args
from utils import CHECKPOINT_FORMAT, UserError, load_newest_checkpoint, resume_candidates


def start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(ROOT / script), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def load(path):
    return torch.load(path, weights_only=True)


def assert_same_tensors(a, b, where=""):
    """Bit-identical nested dicts/lists of tensors and plain values."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_resume_is_bit_identical(tmp_path):
    """2N steps in one go == N steps, stop, then --restore latest for N more: weights, EMA, optimiser, RNG."""
    common = dict(lr_decay="none", augment_shift=1, eval_every=2, save_every=3, log_every=1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run("train.py", *tiny_cli_args(straight, max_steps=8, **common)).returncode == 0
    first = run("train.py", *tiny_cli_args(split, max_steps=4, **common))
    assert first.returncode == 0, first.stderr[-2000:]
    second = run("train.py", *tiny_cli_args(split, max_steps=8, restore="latest", **common))
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from" in second.stdout
    a, b = load(straight / "latest.pt"), load(split / "latest.pt")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "epoch", "batch_in_epoch"):
        assert_same_tensors(a[key], b[key], key)


def test_restore_latest_starts_fresh_in_an_empty_folder(tmp_path):
    result = run("train.py", *tiny_cli_args(tmp_path / "new", max_steps=2, restore="latest"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "starting a fresh run" in result.stdout and load(tmp_path / "new" / "latest.pt")["step"] == 2


def _train_records(run_dir) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"kind": "train"') if metrics.exists() else 0


def _wait_for_training(run_dir, proc, already: int = 0, timeout: float = 120):
    """Until the run logs a training record beyond the ``already`` there (so its loop is running)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if _train_records(run_dir) > already:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise AssertionError("training did not start")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_and_exits_cleanly(tmp_path, signum):
    run_dir = tmp_path / "run"
    proc = start("train.py", *tiny_cli_args(run_dir, max_steps=100000, save_every=100000, eval_every=0))
    _wait_for_training(run_dir, proc)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert "Traceback" not in stderr
    step = load(run_dir / "latest.pt")["step"]
    assert step > 0 and signal.Signals(signum).name in (run_dir / "log.txt").read_text()
    resumed = run("train.py", *tiny_cli_args(run_dir, max_steps=step + 2, restore="latest", eval_every=0))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load(run_dir / "latest.pt")["step"] == step + 2


def test_sigkill_at_random_moments_always_leaves_a_resumable_run(tmp_path):
    """Kill a run that saves every step at a random moment of its training (often inside a checkpoint write);
    after each kill the newest complete checkpoint loads, and --restore latest finishes the run."""
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, max_steps=200, save_every=1, eval_every=0, log_every=1, restore="latest",
                         keep_every=5, keep_last=2)
    rng = random.Random(0)
    kills, steps_at_kills = 0, []
    for _ in range(6):
        proc = start("train.py", *args)
        _wait_for_training(run_dir, proc, already=_train_records(run_dir))
        time.sleep(rng.uniform(0.0, 1.0))  # somewhere in a step or a checkpoint write
        if proc.poll() is not None:
            break
        proc.kill()
        proc.wait()
        kills += 1
        found = load_newest_checkpoint(run_dir, warn=lambda message: None)
        if found is not None:
            assert found[1]["format"] == CHECKPOINT_FORMAT
        steps_at_kills.append(found[1]["step"] if found else None)
    print(f"SIGKILLs survived: {kills}; newest complete checkpoint after each: {steps_at_kills}")
    assert kills >= 3 and all(steps_at_kills)
    assert len(list(run_dir.glob("step-*.pt"))) <= 2  # retention keeps the newest two
    final = run("train.py", *args)
    assert final.returncode == 0, final.stderr[-2000:]
    assert load(run_dir / "latest.pt")["step"] == 200


def test_a_damaged_latest_falls_back_to_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", *tiny_cli_args(run_dir, max_steps=6, save_every=3, eval_every=0)).returncode == 0
    assert load(run_dir / "previous.pt")["step"] == 3
    latest = run_dir / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a full disk
    explicit = run("train.py", *tiny_cli_args(run_dir, max_steps=8, restore=latest))
    assert explicit.returncode == 2
    assert explicit.stderr.strip().count("\n") == 0 and str(latest) in explicit.stderr
    resumed = run("train.py", *tiny_cli_args(run_dir, max_steps=5, restore="latest", eval_every=0))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "warning: cannot read checkpoint" in resumed.stdout and "previous.pt" in resumed.stdout
    assert load(run_dir / "latest.pt")["step"] == 5


def test_only_damaged_checkpoints_is_an_error(tmp_path):
    (tmp_path / "latest.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="all 1 are damaged"):
        load_newest_checkpoint(tmp_path, warn=lambda message: None)
    assert resume_candidates(tmp_path / "missing") == []


def test_a_run_of_skipped_updates_stops_with_the_last_good_weights(tmp_path, monkeypatch):
    """NaNs injected into the batches from step 5 on: each update is skipped and counted; after skip_limit in
    a row the run stops with one clear error and a checkpoint of the weights before the NaNs."""
    import train
    from vae import VAE

    calls = {"n": 0}
    original = VAE.preprocess

    def poisoned(self, images):
        enc_in, target = original(self, images)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] >= 5:
                enc_in = enc_in * float("nan")
        return enc_in, target

    monkeypatch.setattr(VAE, "preprocess", poisoned)
    run_dir = tmp_path / "run"
    with pytest.raises(UserError, match="3 updates in a row were skipped"):
        train.main(tiny_cli_args(run_dir, max_steps=50, skip_limit=3, log_every=1, eval_every=0, save_every=4))
    last_good = load(run_dir / "previous.pt")  # written at step 4, before any NaN
    stopped = load(run_dir / "latest.pt")
    assert last_good["step"] == 4 and stopped["step"] == 7 and stopped["skipped_updates"] == 3
    assert_same_tensors(stopped["model"], last_good["model"])
    assert all(torch.isfinite(v).all() for v in stopped["model"].values())


class _Payload:
    """Unpickling this object would create a file: the proof that loading ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "model": _Payload(marker)}, evil)
    for script, args in [("sample.py", ["--weights", str(evil)]),
                         ("train.py", tiny_cli_args(tmp_path / "r", restore=evil)),
                         ("evaluate.py", ["--weights", str(evil)])]:
        result = run(script, *args, cwd=tmp_path)
        assert result.returncode == 2 and "cannot read checkpoint" in result.stderr, result.stderr
        assert not marker.exists()


def test_safetensors_export_loads_everywhere_and_samples_the_same(tmp_path):
    run_dir = tmp_path / "run"
    assert run("train.py", *tiny_cli_args(run_dir)).returncode == 0
    exported = tmp_path / "model.safetensors"
    result = run("sample.py", "--weights", str(run_dir), "--export", str(exported))
    assert result.returncode == 0 and exported.is_file(), result.stderr
    outs = []
    for weights in (run_dir, exported):
        out = tmp_path / f"{weights.name}.npz"
        assert run("sample.py", "--weights", str(weights), "--out", str(out), "--seed", "4").returncode == 0
        outs.append(np.load(out)["images"])
    assert np.array_equal(outs[0], outs[1])
    result = run("evaluate.py", "--weights", str(exported), "--no_classify", "--out", str(tmp_path / "e.json"))
    assert result.returncode == 0, result.stderr[-2000:]


def test_latest_is_present_at_every_instant_of_a_save(tmp_path, monkeypatch):
    """A reader (sample.py, evaluate.py) may open latest.pt at any moment: every rename of a save happens while
    latest.pt exists, and previous.pt ends up as the file latest.pt was."""
    from utils import atomic_torch_save

    latest = tmp_path / "latest.pt"
    atomic_torch_save({"step": 1}, latest, keep_previous=True)
    real_replace, seen = os.replace, []

    def watching_replace(src, dst):
        seen.append(latest.is_file())
        real_replace(src, dst)
        seen.append(latest.is_file())
    monkeypatch.setattr(os, "replace", watching_replace)
    atomic_torch_save({"step": 2}, latest, keep_previous=True)
    assert len(seen) >= 4 and all(seen)
    assert load(latest)["step"] == 2 and load(tmp_path / "previous.pt")["step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_half_written_checkpoints_of_killed_processes_are_removed_at_start(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = run_dir / f".latest.pt.tmp-{dead.pid}"
    stale.write_bytes(b"half a checkpoint")
    alive = run_dir / f".latest.pt.tmp-{os.getppid()}"  # a live process's save in progress: left alone
    alive.write_bytes(b"being written")
    result = run("train.py", *tiny_cli_args(run_dir, max_steps=1, eval_every=0, save_every=1))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not stale.exists() and alive.exists()
    assert f"removed {stale.name}" in (run_dir / "log.txt").read_text()
