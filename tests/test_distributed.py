"""torchrun on the CPU with gloo: two processes are one process with twice the batch, and gradient accumulation
is one process with a bigger batch, syncing gradients only once per update."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

from conftest import ROOT, tiny_cli_args, tiny_hps
from train import Trainer
from utils import Dist

COMMON = dict(lr_decay="none", warmup_iters=0, augment_shift=1, max_steps=4, eval_every=2, log_every=1,
              n_batch_eval=100)


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          check=False, env=dict(os.environ, OMP_NUM_THREADS="1"))


def torchrun(save_dir, **overrides) -> subprocess.CompletedProcess:
    return run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
               *tiny_cli_args(save_dir, **overrides))


def evals(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def assert_same_run(a_dir, b_dir) -> None:
    a, b = torch.load(a_dir / "latest.pt", weights_only=True), torch.load(b_dir / "latest.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-5)
    # evaluation split over ranks and summed equals one process's, step for step
    for ra, rb in zip(evals(a_dir), evals(b_dir), strict=True):
        assert ra["step"] == rb["step"] and abs(ra["loss"] - rb["loss"]) < 1e-6


def test_two_processes_match_one_with_twice_the_batch_and_resume_in_one(tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    result = torchrun(two, n_batch=8, **COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    result = run(str(ROOT / "train.py"), *tiny_cli_args(one, n_batch=16, **COMMON))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(one, two)
    assert (two / "log.txt").read_text().count("processes 2 | global batch 16 (n_batch 8 x 2 processes") == 1

    resumed = run(str(ROOT / "train.py"), *tiny_cli_args(two, n_batch=8, restore="latest",
                                                          **dict(COMMON, max_steps=6)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = torch.load(two / "latest.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["global_batch"] == 8

    # two processes accumulating two passes of 4 images: the same updates again
    accum = tmp_path / "accum"
    result = torchrun(accum, n_batch=4, grad_accum=2, **COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_run(one, accum)
    assert torch.load(accum / "latest.pt", weights_only=True)["global_batch"] == 16


def _steps_in_one_process(**overrides) -> tuple[list[float], dict]:
    h = tiny_hps(lr=2e-3, warmup_iters=0, augment_shift=1, **overrides)
    torch.manual_seed(0)
    trainer = Trainer(h, torch.device("cpu"))
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=data)
        labels = torch.randint(0, 10, (16,), generator=data)
        skip, stats = trainer.step(images, labels)
        assert not skip
        losses.append(stats[0].item())
    return losses, trainer.model.state_dict()


def test_gradient_accumulation_equals_one_pass_over_the_whole_batch():
    losses, weights = _steps_in_one_process(n_batch=16)
    for accum, n_batch in [(2, 8), (4, 4)]:
        losses_a, weights_a = _steps_in_one_process(n_batch=n_batch, grad_accum=accum)
        torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for name, w in weights.items():
            torch.testing.assert_close(weights_a[name], w, rtol=1e-4, atol=1e-6)


def _count_gradient_syncs(rank: int, world: int, port: int, out_dir: str) -> None:
    """Bucket all-reduces of one update with 1 and with 3 accumulation passes, written to out_dir/rank<r>."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    counts = []
    for accum in (1, 3):
        torch.manual_seed(0)
        trainer = Trainer(tiny_hps(n_batch=4, grad_accum=accum), torch.device("cpu"), dist=Dist(rank, world))
        calls = []

        def counting_hook(state, bucket, calls=calls):
            calls.append(bucket.index())
            return allreduce_hook(state, bucket)

        trainer.ddp.register_comm_hook(None, counting_hook)
        images = torch.randint(0, 256, (4 * accum, 1, 8, 8), dtype=torch.uint8)
        trainer.step(images, torch.arange(4 * accum) % 10)
        counts.append(len(calls))
    (Path(out_dir) / f"rank{rank}").write_text(" ".join(map(str, counts)))
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_accumulation_syncs_gradients_once_per_update(tmp_path):
    mp.spawn(_count_gradient_syncs, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        single, accumulated = map(int, (tmp_path / f"rank{rank}").read_text().split())
        # the inner passes run under no_sync: as many bucket all-reduces as a single pass, not three times as many
        assert single > 0 and accumulated == single
