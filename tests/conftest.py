"""Shared fixtures: the repository on sys.path, and tiny settings that train in seconds on a CPU."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# the speed settings' cache (speed.py) of the tests and of every command they start: never the user's own
os.environ["VDVAE_SPEED_CACHE"] = str(Path(tempfile.mkdtemp(prefix="vdvae-speed-cache-")) / "speed.json")

# A digits model small enough for a training step in milliseconds: every resolution, every block kind.
TINY = {"width": 16, "zdim": 4, "num_mixtures": 3, "enc_blocks": "8x1,8d2,4x1,4d4,1x1",
        "dec_blocks": "1x1,4m1,4x1,8m4,8x1"}


def tiny_hps(**overrides):
    """Hyperparameters of a tiny digits model, with its data-derived fields filled in."""
    from hps import hparams_from_preset

    h = hparams_from_preset("digits", {**TINY, **overrides})
    h.image_size, h.image_channels = 8, 1
    return h


def tiny_cli_args(save_dir, **overrides) -> list[str]:
    """train.py arguments for a tiny digits run that finishes in seconds (save_dir None: the default)."""
    # curves.png costs about 0.7 s a run (matplotlib's import and two drawings): drawn where a test asks for it
    values = {**TINY, "max_steps": 6, "eval_every": 3, "save_every": 3, "log_every": 2, "n_batch": 16,
              "n_batch_eval": 180, "curves": "false", **({} if save_dir is None else {"save_dir": str(save_dir)}),
              **overrides}
    args = ["--hps", "digits"]
    for key, value in values.items():
        args += [f"--{key}", str(value)]
    return args


def free_port() -> int:
    """A localhost TCP port nobody listens on (for a process group's rendezvous, or app.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(script: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, capturing its output."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True,
                          cwd=cwd or ROOT, timeout=600, check=False)


@pytest.fixture
def tiny():
    return tiny_hps


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A tiny digits model trained for 6 steps through the real command line: (run folder, the run's result)."""
    run_dir = tmp_path_factory.mktemp("run") / "digits"
    result = run("train.py", *tiny_cli_args(run_dir, curves="true"))
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir, result


def write_damaged_weights(folder: Path, run_dir: Path) -> dict[str, Path]:
    """Weights files that must be refused, next to a good run: a truncated checkpoint, a foreign .pt, a safetensors
    file with a broken header, an empty folder."""
    import torch

    (folder / "corrupt.pt").write_bytes((run_dir / "latest.pt").read_bytes()[:2000])
    torch.save({"weights": torch.zeros(3)}, folder / "foreign.pt")
    (folder / "bad.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    (folder / "empty").mkdir()
    return {"CORRUPT": folder / "corrupt.pt", "FOREIGN": folder / "foreign.pt",
            "BADSAFETENSORS": folder / "bad.safetensors", "EMPTYDIR": folder / "empty"}
