"""The model summary (train.py --summary, sample.py --summary): a row per module with its output shape and
parameters, the latent groups, totals that equal the model's own count, and nothing else done: no data read, no
optimiser built, no run folder touched."""
from __future__ import annotations

import re

import pytest
import torch

from conftest import ROOT, run
from hps import hparams_from_preset
from models import build_model, model_summary
from vae import count_parameters


def table_total(text: str) -> tuple[int, int]:
    """(the sum of the parameters column, the total line) of a summary."""
    rows = [line for line in text.splitlines() if re.search(r"\s[\d,]+$", line) and not line.startswith("total")]
    column = sum(int(line.split()[-1].replace(",", "")) for line in rows)
    total = int(re.search(r"total parameters: ([\d,]+)", text).group(1).replace(",", ""))
    return column, total


@pytest.mark.parametrize("model", ["vdvae", "cvae", "vlae", "vqvae"])
def test_the_rows_and_the_total_are_the_models_parameters(model):
    h = hparams_from_preset("digits", {"model": model})
    h.image_size, h.image_channels = 8, 1
    text = model_summary(h)
    column, total = table_total(text)
    assert column == total == count_parameters(build_model(h))
    groups = re.search(r"latent groups: (\d+)", text).group(1)
    assert int(groups) == build_model(h).n_groups


def test_train_summary_prints_the_table_and_does_nothing_else(tmp_path, monkeypatch):
    import train

    def no_optimiser(*args, **kwargs):
        raise AssertionError("--summary built an optimiser")
    monkeypatch.setattr(torch.optim, "AdamW", no_optimiser)
    monkeypatch.setattr(train, "load_data_for", lambda *a, **k: pytest.fail("--summary read the data"))
    monkeypatch.chdir(tmp_path)
    train.main(["--hps", "cifar10", "--summary"])  # the paper's model, on the meta device: no memory
    assert list(tmp_path.iterdir()) == []  # no weights/ folder, no run folder, no log
    result = run("train.py", "--hps", "cifar10", "--summary", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "decoder.dec_blocks.42" in result.stdout and "total parameters: 39,149,540" in result.stdout
    assert re.search(r"decoder\.dec_blocks\.42\s+\(1, 384, 32, 32\)\s+32", result.stdout)
    assert list(tmp_path.iterdir()) == []


def test_sample_summary_of_the_shipped_weights():
    result = run("sample.py", "--weights", str(ROOT / "weights" / "digits.safetensors"), "--summary")
    assert result.returncode == 0, result.stderr[-2000:]
    assert table_total(result.stdout) == (247_071, 247_071)
    assert "latent groups: 9 (1 x (16, 1, 1), 6 x (16, 4, 4), 2 x (16, 8, 8)), top first" in result.stdout


def test_a_summary_that_needs_the_data_is_one_line(tmp_path):
    result = run("train.py", "--hps", "folder", "--summary", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --summary of --hps folder needs the class count of its data: give --n_classes"]
