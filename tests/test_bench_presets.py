"""bench/presets.py: each preset's parameters, memory and budget, and the time its budget takes here."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import ROOT
from hps import PRESETS, hparams_from_preset
from utils import UserError, run_cli

sys.path.insert(0, str(ROOT / "bench"))

import presets as bench_presets  # noqa: E402


def test_every_preset_has_a_known_end():
    budgets = {name: hparams_from_preset(name).max_steps for name in PRESETS}
    assert all(steps > 0 for steps in budgets.values()), budgets
    # openai/vdvae's published budgets
    assert (budgets["cifar10"], budgets["imagenet32"], budgets["imagenet64"], budgets["ffhq256"],
            budgets["ffhq1024"]) == (1_000_000, 1_700_000, 1_600_000, 1_700_000, 1_700_000)


def test_the_table_counts_parameters_memory_and_days(capsys):
    from models import build_model
    from vae import count_parameters

    run_cli(bench_presets.main, ["--presets", "digits,cifar10", "--measure", "digits", "--steps", "1",
                                 "--memory_gb", "16"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| preset |") and len(out) == 5  # header, rule, two rows, the JSON line
    report = json.loads(out[-1])
    digits, cifar10 = report["presets"]
    h = bench_presets.preset_hparams("digits")
    assert digits["params"] == count_parameters(build_model(h)) == 247_071
    assert cifar10["params"] == 39_149_540  # the paper's 39,145,700 and the 10 x 384 class embedding
    for row in (digits, cifar10):  # recomputing less saves more: none > gelu > blocks
        a = row["activation_mb_per_image"]
        assert a["none"] > a["gelu"] > a["blocks"] > 0
        assert row["largest_batch"]["blocks"] >= row["largest_batch"]["none"]
    speed = report["measured"]["digits"]
    assert speed["img_per_s"] == pytest.approx(speed["steps_per_s"] * 64, rel=1e-3)
    assert speed["days_to_budget"] == pytest.approx(2500 / speed["steps_per_s"] / 86400, abs=0.06)
    # a preset's budget is priced at its paper's global batch: cifar10's 32, two passes of its --n_batch 16 here
    assert (digits["global_batch"], cifar10["n_batch"], cifar10["global_batch"]) == (64, 16, 32)
    assert "| cifar10 | vdvae | 39,149,540 | 16 (32) |" in out[3]


def test_an_unknown_preset_is_one_line():
    with pytest.raises(UserError, match="unknown preset 'cifar11'"):
        bench_presets.main(["--measure", "cifar11"])
