"""torchrun on the CPU with gloo: two processes are one process with twice the batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from conftest import ROOT, tiny_cli_args


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))


def evals(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_two_processes_match_one_with_twice_the_batch_and_resume_in_one(tmp_path):
    common = dict(lr_decay="none", warmup_iters=0, augment_shift=1, max_steps=4, eval_every=2, log_every=1,
                  n_batch_eval=100)
    two, one = tmp_path / "two", tmp_path / "one"
    result = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
                 *tiny_cli_args(two, n_batch=8, **common))
    assert result.returncode == 0, result.stderr[-3000:]
    result = run(str(ROOT / "train.py"), *tiny_cli_args(one, n_batch=16, **common))
    assert result.returncode == 0, result.stderr[-3000:]

    a, b = torch.load(one / "latest.pt", weights_only=True), torch.load(two / "latest.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-5)
    # evaluation split over ranks and summed equals one process's, step for step
    for ra, rb in zip(evals(one), evals(two), strict=True):
        assert ra["step"] == rb["step"] and abs(ra["loss"] - rb["loss"]) < 1e-6
    assert (two / "log.txt").read_text().count("processes 2 | global batch 16 (8 per process)") == 1

    resumed = run(str(ROOT / "train.py"), *tiny_cli_args(two, n_batch=8, restore="latest",
                                                          **dict(common, max_steps=6)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = torch.load(two / "latest.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["global_batch"] == 8
