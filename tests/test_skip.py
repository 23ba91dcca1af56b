"""--skip_threshold auto: an update is skipped when its gradient norm is an outlier against the recent norms, decided
on the device; a run whose healthy norms climb past any fixed threshold keeps updating, a spike is skipped, and a
resumed run equals the uninterrupted one."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_cli_args
from hps import hparams_from_preset, parse_args
from trainer import AUTO_SKIP_HISTORY, auto_skip, auto_skip_limit
from utils import UserError


def decisions(norms: list[float], start: float = 400.0) -> list[bool]:
    statistic = torch.zeros(3)
    return [bool(auto_skip(statistic, torch.tensor(n), start)) for n in norms]


def lognormal(n: int, centre: float, spread: float = 0.15, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    return (math.log(centre) + spread * torch.randn(n, generator=g)).exp().tolist()


def test_healthy_norms_that_climb_past_any_fixed_threshold_keep_updating():
    g = torch.Generator().manual_seed(1)
    # from 20 to 4,000 over 5,000 steps, with the step-to-step noise of a healthy run
    norms = (torch.linspace(math.log(20), math.log(4000), 5000) + 0.15 * torch.randn(5000, generator=g)).exp()
    skipped = decisions(norms.tolist())
    assert sum(skipped) <= 0.01 * len(skipped), sum(skipped)
    assert sum(n >= 400 for n in norms.tolist()) > 2000  # a fixed 400 would have skipped all of these
    assert not any(skipped[-1000:])


def test_a_spike_of_ten_times_the_recent_norms_is_skipped_and_barely_moves_the_statistic():
    statistic = torch.zeros(3)
    for n in lognormal(500, 50.0):
        auto_skip(statistic, torch.tensor(n), 400.0)
    before = statistic.clone()
    assert bool(auto_skip(statistic, torch.tensor(500.0), 400.0))
    assert abs(float(statistic[1] - before[1])) < 0.03  # the mean of the log norm moved by 1% of the jump
    assert not bool(auto_skip(statistic, torch.tensor(55.0), 400.0))  # the next ordinary norm is taken


def test_a_spike_does_not_disarm_the_rule_for_the_burst_that_follows():
    # a 1000x spike entering the running spread unclipped lifted the threshold to about 36x the typical norm for
    # some 500 steps, so a 10x spike ten steps later was taken: blow-ups come in bursts
    norms = lognormal(500, 50.0) + [50_000.0] + lognormal(10, 50.0, seed=1) + [500.0]
    skipped = decisions(norms)
    assert skipped[500] and skipped[-1]
    assert not any(skipped[:500]) and not any(skipped[501:-1])


def test_a_lasting_rise_is_absorbed_within_a_few_hundred_steps():
    norms = lognormal(1000, 50.0) + lognormal(1000, 200.0, seed=1)  # the norms' level quadruples at step 1,000
    skipped = decisions(norms)
    assert not any(skipped[:1000])
    assert 0 < sum(skipped[1000:1300]) < 150 and not any(skipped[1300:])


def test_before_its_history_the_fixed_start_decides():
    skipped = decisions([500.0, 300.0] * (AUTO_SKIP_HISTORY // 2) + [500.0])
    assert skipped[:AUTO_SKIP_HISTORY] == [True, False] * (AUTO_SKIP_HISTORY // 2)
    assert skipped[-1] is False  # 500 is now a typical norm
    assert decisions([1e6] * 3, start=-1) == [False] * 3


def test_non_finite_norms_leave_the_statistic_alone():
    statistic = torch.zeros(3)
    for n in lognormal(150, 10.0):
        auto_skip(statistic, torch.tensor(n), 400.0)
    before = statistic.clone()
    for bad in (math.inf, math.nan):
        auto_skip(statistic, torch.tensor(bad), 400.0)
    assert torch.equal(statistic, before)
    limit = auto_skip_limit(statistic, 400.0)
    assert 20 < limit < 40  # the mean norm, 10, times exp(5 sigma) with sigma = 0.15 is about 21; times 2 at least


class NoHostSync(TorchDispatchMode):
    """Fails on any operator that copies a device value to the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            raise AssertionError(f"{func} waits for the device")
        return func(*args, **(kwargs or {}))


def test_the_decision_does_not_wait_for_the_device():
    statistic = torch.zeros(3)
    norms = torch.tensor(lognormal(200, 30.0))
    with NoHostSync():
        for n in norms:
            auto_skip(statistic, n, 400.0)
        auto_skip(statistic, norms[0] * 20, 400.0)
    with pytest.raises(AssertionError, match="waits for the device"), NoHostSync():
        float(statistic[0])  # the mode does catch a read-back


def test_the_setting_reads_auto_numbers_and_older_checkpoints_floats():
    assert hparams_from_preset("cifar10").skip_threshold == "auto"
    assert hparams_from_preset("digits").skip_threshold == -1.0
    h, _ = parse_args(["--hps", "cifar10", "--skip_threshold", "380"], "x")
    assert h.skip_threshold == 380.0
    assert hparams_from_preset("cifar10", {"skip_threshold": 400.0}).skip_threshold == 400.0  # a stored float
    for bad in (["--skip_threshold", "high"], ["--skip_threshold_start", "0"]):
        with pytest.raises(UserError, match="--skip_threshold"):
            parse_args(["--hps", "cifar10", *bad], "x")


def test_a_resumed_auto_run_equals_the_uninterrupted_one(tmp_path):
    import train

    common = {"skip_threshold": "auto", "skip_threshold_start": "5", "eval_every": 0, "log_every": 10}
    steps = AUTO_SKIP_HISTORY + 30
    train.main(tiny_cli_args(tmp_path / "straight", max_steps=steps, **common))
    train.main(tiny_cli_args(tmp_path / "cut", max_steps=steps // 2, **common))
    train.main(tiny_cli_args(tmp_path / "cut", max_steps=steps, restore="latest", **common))
    a = torch.load(tmp_path / "straight" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "latest.pt", weights_only=True)
    assert a["step"] == b["step"] == steps and a["skip_statistic"][0] >= AUTO_SKIP_HISTORY
    assert torch.equal(a["skip_statistic"], b["skip_statistic"]) and a["skipped_updates"] == b["skipped_updates"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
