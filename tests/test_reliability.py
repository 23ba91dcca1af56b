"""Nothing lost on a crash: exact resume, signals, SIGKILL at random moments, damaged checkpoints, runs of
skipped updates, and weights loaded without running code. Through the real CLI where a user would be."""
from __future__ import annotations

import json
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
from checkpoint import CHECKPOINT_FORMAT, load_newest_checkpoint, resume_candidates
from utils import UserError


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
        if self.training and torch.is_grad_enabled() and images.device.type != "meta":  # training steps only
            calls["n"] += 1  # (speed.py's memory measurement runs a forward pass on the meta device)
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


def test_safetensors_export_samples_the_same_and_evaluates(trained_run, tmp_path):
    """The shared tiny run, exported; the command lines in this process (sample.main, evaluate.main)."""
    import evaluate
    import sample

    run_dir, _ = trained_run
    exported = tmp_path / "model.safetensors"
    sample.main(["--weights", str(run_dir), "--export", str(exported)])
    assert exported.is_file()
    outs = []
    for weights in (run_dir, exported):
        out = tmp_path / f"{weights.name}.npz"
        sample.main(["--weights", str(weights), "--out", str(out), "--seed", "4"])
        outs.append(np.load(out)["images"])
    assert np.array_equal(outs[0], outs[1])
    evaluate.main(["--weights", str(exported), "--no_classify", "--out", str(tmp_path / "e.json")])
    assert 0 < json.loads((tmp_path / "e.json").read_text())["bpd"] < 10


def test_latest_is_present_at_every_instant_of_a_save(tmp_path, monkeypatch):
    """A reader (sample.py, evaluate.py) may open latest.pt at any moment: every rename of a save happens while
    latest.pt exists, and previous.pt ends up as the file latest.pt was."""
    from checkpoint import atomic_torch_save

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


def test_keep_every_keeps_its_steps_whatever_save_every_is(tmp_path):
    run_dir = tmp_path / "run"
    result = run("train.py", *tiny_cli_args(run_dir, max_steps=6, save_every=100, keep_every=2, eval_every=0))
    assert result.returncode == 0, result.stderr[-2000:]
    kept = sorted(p.name for p in run_dir.glob("step-*.pt"))
    assert kept == ["step-00000002.pt", "step-00000004.pt", "step-00000006.pt"]
    assert [load(run_dir / name)["step"] for name in kept] == [2, 4, 6]


def test_resume_mid_cosine_schedule_is_bit_identical(tmp_path):
    """The cosine schedule depends on max_steps, so the stop is a kept step-N checkpoint of the same run: resuming
    from step 4 of 8 ends where the run that went straight through ended, bit for bit."""
    common = dict(lr_decay="cosine", warmup_iters=2, augment_shift=1, eval_every=0, save_every=100, keep_every=4,
                  log_every=1, max_steps=8)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run("train.py", *tiny_cli_args(straight, **common)).returncode == 0
    second = run("train.py", *tiny_cli_args(resumed, restore=straight / "step-00000004.pt", **common))
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = load(straight / "latest.pt"), load(resumed / "latest.pt")
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema", "optimizer", "scheduler", "rng", "epoch", "batch_in_epoch"):
        assert_same_tensors(a[key], b[key], key)
    assert a["scheduler"]["_last_lr"] != load(straight / "step-00000004.pt")["scheduler"]["_last_lr"]


def test_a_checkpoint_holds_its_own_device_generator_and_old_gpu_lists_resume(tmp_path):
    """The RNG state saved is the CPU's and this process's device's alone; a checkpoint of the older format, with
    every visible GPU's state (8 here), resumes on a machine with fewer (here none) without an IndexError."""
    from utils import saved_device_rng_state

    run_dir = tmp_path / "run"
    assert run("train.py", *tiny_cli_args(run_dir, max_steps=2, eval_every=0)).returncode == 0
    ckpt = load(run_dir / "latest.pt")
    assert set(ckpt["rng"]) == {"torch", "device"} and ckpt["rng"]["device"] is None  # a CPU run
    states = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    assert torch.equal(saved_device_rng_state({"torch": None, "cuda": states}), states[0])
    assert saved_device_rng_state({"torch": None, "cuda": []}) is None
    ckpt["rng"] = {"torch": ckpt["rng"]["torch"], "cuda": states}
    torch.save(ckpt, run_dir / "latest.pt")
    resumed = run("train.py", *tiny_cli_args(run_dir, max_steps=3, eval_every=0, restore="latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert load(run_dir / "latest.pt")["step"] == 3


def _hashes(folder) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_one_trainer_per_run_folder_and_no_stale_lock_after_sigkill(tmp_path):
    """A requeued job while its first copy still runs: the second trainer exits 2 with one line naming the holder
    and changes no file; once the holder is SIGKILLed, --restore latest resumes (the kernel dropped the lock)."""
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, max_steps=100000, save_every=5, eval_every=0, restore="latest")
    holder = start("train.py", *args)
    try:
        _wait_for_training(run_dir, holder)
        while not (run_dir / "latest.pt").exists():
            time.sleep(0.05)
        holder.send_signal(signal.SIGSTOP)  # frozen: its files hold still while the second one tries
        before = _hashes(run_dir)
        second = run("train.py", *args)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"is in use by pid {holder.pid} on " in lines[0], second.stderr
        assert _hashes(run_dir) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = run("train.py", *tiny_cli_args(run_dir, max_steps=load(run_dir / "latest.pt")["step"] + 2,
                                              save_every=5, eval_every=0, restore="latest"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout


def _bad_image_files(folder) -> list[str]:
    """A truncated JPEG (its header reads, its pixels do not), a zero-byte PNG and a text file named .png."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    noise = np.random.RandomState(0).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.jpg", quality=95)  # mostly entropy-coded pixels
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    return ["truncated.jpg", "empty.png", "notes.png"]


def test_unreadable_images_are_skipped_and_logged_and_a_folder_of_only_bad_ones_refused(tmp_path):
    from PIL import Image

    root = tmp_path / "pictures"
    for name, colour in [("cat", (200, 0, 0)), ("dog", (0, 0, 200))]:
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.new("RGB", (8, 8), colour).save(root / name / f"{i:02d}.png")
    _bad_image_files(root / "cat")
    run_dir = tmp_path / "run"
    args = ["--hps", "folder", "--data_root", str(root), "--save_dir", str(run_dir), "--width", "16", "--zdim", "4",
            "--enc_blocks", "8x1,8d2,4x1,4d4,1x1", "--dec_blocks", "1x1,4m1,4x1,8m4,8x1", "--num_mixtures", "2",
            "--n_batch", "16", "--max_steps", "8", "--log_every", "1", "--eval_every", "0", "--n_batch_eval", "8"]
    result = run("train.py", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (run_dir / "log.txt").read_text()
    assert "skipped 2 of " in log and "empty.png" in log and "notes.png" in log  # found by the header check
    # the truncated JPEG passed the header check; its batch came up during the run (every image did: 8 steps of
    # 16 over some 20 training images) and another cat stood in for it
    assert "skipped unreadable image" in log and "truncated.jpg" in log

    only_bad = tmp_path / "only_bad"
    _bad_image_files(only_bad)
    (only_bad / "truncated.jpg").write_bytes(b"\xff\xd8")  # not even a header now
    result = run("train.py", "--hps", "folder", "--data_root", str(only_bad), "--save_dir", str(tmp_path / "r2"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "none of the 3 image files" in lines[0], result.stderr


def test_out_of_memory_is_one_line_with_the_flags_that_help_and_saves_nothing(tmp_path, monkeypatch):
    import train

    run_dir = tmp_path / "run"
    real_step, calls = train.Trainer.step, []

    def step(self, images, labels):
        calls.append(1)
        if len(calls) == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, images, labels)
    monkeypatch.setattr(train.Trainer, "step", step)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"out of memory on cpu at step 5 with --n_batch 16 .* --grad_checkpoint "
                                        r"blocks.* --n_batch 8 --grad_accum 2; nothing was saved"):
        train.main(tiny_cli_args(run_dir, max_steps=10, save_every=3, eval_every=0))
    assert load(run_dir / "latest.pt")["step"] == 3 and not list(run_dir.glob(".*.tmp-*"))


def test_a_full_disk_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    import errno

    import train

    run_dir = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second checkpoint: some bytes reach the disk, then it is full
            f.write(b"\x80\x02partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.chdir(tmp_path)
    snapshot = {}

    real_replace = os.replace

    def replace(src, dst):  # remember latest.pt as the first save left it
        real_replace(src, dst)
        if str(dst).endswith("latest.pt"):
            snapshot["bytes"] = (run_dir / "latest.pt").read_bytes()
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(UserError, match=r"cannot write the step 4 checkpoint into .*No space left on device.*"
                                        r"latest.pt still holds the checkpoint before it, intact"):
        train.main(tiny_cli_args(run_dir, max_steps=10, save_every=2, eval_every=0))
    assert (run_dir / "latest.pt").read_bytes() == snapshot["bytes"]
    assert load(run_dir / "latest.pt")["step"] == 2 and not list(run_dir.glob(".*.tmp-*"))
