"""torchrun on the CPU with gloo: two processes are one process with twice the batch, and gradient accumulation
is one process with a bigger batch, syncing gradients only once per update."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from conftest import ROOT, free_port, tiny_cli_args, tiny_hps
from trainer import Trainer
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


def trains(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def assert_same_run(a_dir, b_dir) -> None:
    a, b = torch.load(a_dir / "latest.pt", weights_only=True), torch.load(b_dir / "latest.pt", weights_only=True)
    for key in ("model", "ema"):
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=1e-4, atol=1e-5)
    # the gradients themselves, through their logged norm: AdamW is blind to a constant gradient scale, so equal
    # weights alone would not catch a missing / grad_accum or a sum over ranks instead of a mean (which change
    # what grad_clip and skip_threshold mean); and the logged losses, averaged over ranks and passes
    for ra, rb in zip(trains(a_dir), trains(b_dir), strict=True):
        assert ra["step"] == rb["step"]
        assert abs(ra["grad_norm"] - rb["grad_norm"]) <= 1e-4 * ra["grad_norm"], (ra, rb)
        assert abs(ra["loss"] - rb["loss"]) <= 1e-5 * abs(ra["loss"]), (ra, rb)
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


def _steps_in_one_process(**overrides) -> tuple[list[float], list[dict], dict]:
    h = tiny_hps(lr=2e-3, warmup_iters=0, augment_shift=1, **overrides)
    torch.manual_seed(0)
    trainer = Trainer(h, torch.device("cpu"))
    data = torch.Generator().manual_seed(1)
    losses, grads = [], []
    for _ in range(3):
        images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=data)
        labels = torch.randint(0, 10, (16,), generator=data)
        skip, stats = trainer.step(images, labels)
        assert not skip
        losses.append(stats[0].item())
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None})
    return losses, grads, trainer.model.state_dict()


def test_gradient_accumulation_equals_one_pass_over_the_whole_batch():
    losses, grads, weights = _steps_in_one_process(n_batch=16)
    for accum, n_batch in [(2, 8), (4, 4)]:
        losses_a, grads_a, weights_a = _steps_in_one_process(n_batch=n_batch, grad_accum=accum)
        torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for step_grads, step_grads_a in zip(grads, grads_a):  # the gradient itself, not only what AdamW made of it
            assert step_grads.keys() == step_grads_a.keys()
            for name, g in step_grads.items():
                torch.testing.assert_close(step_grads_a[name], g, rtol=1e-4, atol=1e-7)
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


def test_accumulation_syncs_gradients_once_per_update(tmp_path):
    mp.spawn(_count_gradient_syncs, args=(2, free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        single, accumulated = map(int, (tmp_path / f"rank{rank}").read_text().split())
        # the inner passes run under no_sync: as many bucket all-reduces as a single pass, not three times as many
        assert single > 0 and accumulated == single


# A torchrun worker that has finished its work could die of SIGABRT while the interpreter finalized: gloo's worker
# thread drops the last reference to a reduced tensor a moment late, takes the GIL during finalization and is ended by
# Python through a forced unwind ("terminate called without an active exception"), in about 1 of 45 exits under load.
# A worker leaves through os._exit once its work is flushed, so finalization (and with it that race) never comes;
# finalization is observed through a cyclic object whose __del__ only the last garbage collection of a finalizing
# interpreter runs.
EXIT_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as tdist
from torch.nn.parallel import DistributedDataParallel
from utils import UserError, end_distributed, init_distributed, run_cli


class FinalizationMarker:
    def __init__(self, path):
        self.path, self.cycle = path, self

    def __del__(self):
        open(self.path, "w").write("finalized")


def main(argv):
    dist, _ = init_distributed("cpu")
    model = DistributedDataParallel(torch.nn.Linear(4, 4))  # keeps the process group alive, as in train.py
    model(torch.ones(2, 4)).sum().backward()
    tdist.all_reduce(torch.ones(8))
    FinalizationMarker(os.environ["MARKER"] + str(dist.rank))
    end_distributed(dist, completed=argv[0] == "ok")
    print("rank", dist.rank, "done", flush=True)
    if argv[0] == "user_error":
        raise UserError("a user error")
    if argv[0] == "signal":
        sys.exit(143)


run_cli(main, sys.argv[1:])
"""


def test_a_torchrun_worker_ends_with_its_status_and_without_finalizing(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(EXIT_SCRIPT.format(root=str(ROOT)))
    for how, status in [("ok", 0), ("user_error", 2), ("signal", 143)]:
        marker = tmp_path / f"finalized-{how}-rank"
        env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()), MARKER=str(marker))
        procs = [subprocess.Popen([sys.executable, str(script), how], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
        for rank, p in enumerate(procs):
            out, err = p.communicate(timeout=120)
            assert p.returncode == status, f"{how}: rank {rank} exited {p.returncode}: {err[-2000:]}"
            assert f"rank {rank} done" in out  # stdout was flushed before the exit
            assert ("error: a user error" in err) == (how == "user_error")
            assert not Path(f"{marker}{rank}").exists(), "the interpreter finalized with gloo's threads alive"


def _vote_steps(rank: int, world: int, port: int, out_dir: str) -> None:
    """Rank 1 receives SIGTERM during step 3; every rank records the step at which StopSignal agrees to stop."""
    import signal as signals

    from trainer import StopSignal

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    stop = StopSignal(Dist(rank, world))
    agreed_at = None
    for step in range(1, 20):
        if rank == 1 and step == 3:
            os.kill(os.getpid(), signals.SIGTERM)
        if stop.agreed() is not None:
            agreed_at = step
            break
    stop.close()
    (Path(out_dir) / f"rank{rank}").write_text(str(agreed_at))
    torch.distributed.destroy_process_group()


def test_a_signal_to_one_rank_stops_every_rank_at_the_next_step(tmp_path):
    mp.spawn(_vote_steps, args=(2, free_port(), str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["4", "4"]


def _environ(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_sigterm_to_one_torchrun_worker_saves_within_a_few_steps(tmp_path):
    """A pre-empted multi-process job: SIGTERM reaches one worker; all stop at the same step soon after (not at the
    next log step, 1000 here), save once, and exit with 128 + SIGTERM, which torchrun reports."""
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, n_batch=8, max_steps=100000, log_every=1000, skip_limit=0, save_every=10,
                         eval_every=0)
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 120
    while not (run_dir / "latest.pt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:] if proc.poll() else "slow"
        time.sleep(0.2)
    workers = _children(proc.pid)
    rank1 = next(w for w in workers if _environ(w).get("RANK") == "1")
    step_before = torch.load(run_dir / "latest.pt", weights_only=True)["step"]
    os.kill(rank1, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun reports the stop as a failure of the job: it did not finish
    assert "exitcode  : 143" in stderr, stderr[-2000:]
    assert "terminate called" not in stderr
    step = torch.load(run_dir / "latest.pt", weights_only=True)["step"]
    log = (run_dir / "log.txt").read_text()
    assert f"SIGTERM at step {step}: saved" in log
    assert step_before <= step < step_before + 100  # 10 steps between saves, a few more to agree; not 1000


def test_two_process_resume_is_bit_identical(tmp_path):
    """Two processes, 8 steps straight, against the same two processes resumed from the step-4 checkpoint of that
    run: weights, EMA and optimiser bit for bit (every rank restores the same RNG state: one stream by design)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = dict(COMMON, max_steps=8, eval_every=0, save_every=100, keep_every=4, n_batch=8)
    result = torchrun(straight, **common)
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun(resumed, restore=straight / "step-00000004.pt", **common)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = torch.load(straight / "latest.pt", weights_only=True), torch.load(resumed / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == 8
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


def _load_data_in_turn(rank: int, world: int, port: int, out_dir: str) -> None:
    import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)

    def slow_load(H, data_root=None):  # stands in for a download: 1 s, with its start and end recorded
        start = time.time()
        time.sleep(1.0)
        (Path(out_dir) / f"rank{rank}").write_text(f"{start} {time.time()}")
        return "data"

    train.load_data_for = slow_load
    assert train.load_data_per_node(tiny_hps(), Dist(rank, world, local_rank=rank)) == "data"
    torch.distributed.destroy_process_group()


def test_the_first_process_of_a_node_loads_the_data_before_the_others(tmp_path):
    mp.spawn(_load_data_in_turn, args=(2, free_port(), str(tmp_path)), nprocs=2)
    (start0, end0), (start1, _) = [map(float, (tmp_path / f"rank{r}").read_text().split()) for r in range(2)]
    assert start1 >= end0  # rank 1 read only after rank 0 had finished writing


def test_a_torchrun_job_takes_one_lock_and_a_second_job_on_its_folder_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_cli_args(run_dir, n_batch=8, max_steps=100000, log_every=1, save_every=1000, eval_every=0)
    first = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(ROOT / "train.py"), *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while not trains(run_dir) if (run_dir / "metrics.jsonl").exists() else True:
            assert first.poll() is None and time.time() < deadline, "the first job did not start"
            time.sleep(0.2)
        workers = _children(first.pid)
        holder = (run_dir / ".lock").read_text().split()[1]
        assert holder in {str(w) for w in workers} and _environ(int(holder)).get("RANK") == "0"  # rank 0 holds it
        second = run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "train.py"),
                     *tiny_cli_args(run_dir, n_batch=8, max_steps=2, eval_every=0))
        assert second.returncode != 0 and f"is in use by pid {holder} on " in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


def _train_with_a_slow_probe(rank: int, world: int, port: int, run_dir: str) -> None:
    import train

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    real_probe = train.choose_speed_settings

    def slow_probe(*args, **kwargs):  # stands in for a cold compile of a deep model: longer than --dist_timeout
        time.sleep(12.0)
        return real_probe(*args, **kwargs)

    train.choose_speed_settings = slow_probe
    train.main(tiny_cli_args(run_dir, n_batch=8, max_steps=2, eval_every=0, dist_timeout=4))


def test_the_other_ranks_wait_out_a_speed_probe_longer_than_the_collective_timeout(tmp_path):
    """Rank 0 probes (and may compile for minutes) while the others wait: that wait is not the training loop's
    --dist_timeout (here 4 s, the probe 12 s), so the job starts and trains."""
    mp.spawn(_train_with_a_slow_probe, args=(2, free_port(), str(tmp_path / "run")), nprocs=2)
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["step"] == 2
