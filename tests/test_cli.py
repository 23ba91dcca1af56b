"""The entry points as a user runs them: train.py then sample.py in subprocesses, and the table of bad invocations (in
process, with one case of each script as a real process)."""
from __future__ import annotations

import importlib
import json

import numpy as np
import pytest
import torch

from conftest import run, tiny_cli_args, write_damaged_weights
from utils import run_cli


def test_train_writes_checkpoint_logs_and_samples(trained_run):
    run_dir, result = trained_run
    assert "model parameters:" in result.stdout
    assert (run_dir / "latest.pt").is_file() and (run_dir / "samples.png").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "config" and kinds[-1] == "final" and "train" in kinds and "eval" in kinds
    final = records[-1]
    assert final["step"] == 6 and 0 < final["test_bpd"] < 10
    ckpt = torch.load(run_dir / "latest.pt", weights_only=True)
    assert {"model", "ema", "optimizer", "step", "hps", "class_names"} <= set(ckpt)
    assert ckpt["class_names"] == [str(d) for d in range(10)] and ckpt["hps"]["width"] == 16
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])


def test_sample_png_and_npz(trained_run, tmp_path):
    run_dir, _ = trained_run
    png = tmp_path / "grid.png"
    result = run("sample.py", "--weights", str(run_dir), "--classes", "3,7", "--n_per_class", "4",
                 "--out", str(png))
    assert result.returncode == 0, result.stderr
    from PIL import Image

    width, height = Image.open(png).size
    assert width > height > 0  # 4 columns, 2 rows
    npz = tmp_path / "s.npz"
    result = run("sample.py", "--weights", str(run_dir / "latest.pt"), "--classes", "1,2,9",
                 "--n_per_class", "5", "--out", str(npz), "--seed", "3")
    assert result.returncode == 0, result.stderr
    arrays = np.load(npz)
    assert arrays["images"].shape == (15, 8, 8, 1) and arrays["images"].dtype == np.uint8
    assert arrays["labels"].tolist() == [1] * 5 + [2] * 5 + [9] * 5
    # the digits' 17 levels come back as multiples of 255/16
    levels = arrays["images"].astype(float) * 16 / 255
    assert np.allclose(levels, np.round(levels), atol=0.04)


def test_same_seed_same_samples(trained_run, tmp_path):
    run_dir, _ = trained_run
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.npz"
        assert run("sample.py", "--weights", str(run_dir), "--out", str(out), "--seed", "9").returncode == 0
        outs.append(np.load(out)["images"])
    assert np.array_equal(outs[0], outs[1])


def test_restore_continues_the_run(trained_run, tmp_path):
    run_dir, _ = trained_run
    resumed = tmp_path / "resumed"
    result = run("train.py", *tiny_cli_args(resumed, max_steps=9, restore=run_dir / "latest.pt"))
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(resumed / "latest.pt", weights_only=True)
    assert ckpt["step"] == 9


BAD_INPUTS = [
    # presets, fields, types and ranges
    ("train.py", ["--hps", "nope"], "valid presets: cifar10, digits"),
    ("train.py", ["--hps", "digits", "--widht", "3"], "did you mean --width"),
    ("train.py", ["--hps", "digits", "--n_batch", "0"], "--n_batch must be > 0"),
    ("train.py", ["--hps", "digits", "--grad_accum", "0"], "--grad_accum must be > 0"),
    ("train.py", ["--hps", "digits", "--lr_decay_start", "50", "--warmup_iters", "100"],
     "--lr_decay_start 50 falls inside the warm-up"),
    ("train.py", ["--hps", "digits", "--enc_blocks", "8x1,8d2,4x1,4d4,1x1", "--dec_blocks", "1x1,2m1,2x1,8m2,8x1"],
     "--dec_blocks has blocks at 2x2, a resolution --enc_blocks never reaches"),
    ("train.py", ["--hps", "digits", "--dist_timeout", "0"], "--dist_timeout must be > 0"),
    ("train.py", ["--hps", "digits", "--n_batch", "512", "--grad_accum", "4"], "global batch (--n_batch 512 x 1"),
    ("train.py", ["--hps", "digits", "--lr", "-1"], "--lr must be > 0"),
    ("train.py", ["--hps", "digits", "--n_batch", "many"], "invalid int value"),
    ("train.py", ["--hps", "digits", "--n_classes", "7"], "must be 0 (unconditional) or 10"),
    ("train.py", ["--hps", "digits", "--max_steps", "-1"], "--max_steps must be >= 0"),
    ("train.py", ["--hps", "digits", "--ema_rate", "1.5"], "--ema_rate must be in [0, 1)"),
    ("train.py", ["--hps", "digits", "--precision", "fp8"], "--precision must be one of auto, fp32, bf16, fp16"),
    ("train.py", ["--hps", "digits", "--grad_checkpoint", "all"], "--grad_checkpoint must be one of"),
    ("train.py", ["--hps", "digits", "--channels_last", "maybe"], "--channels_last must be one of"),
    ("train.py", ["--hps", "digits", "--compile", "perhaps"], "--compile must be auto, on or off"),
    ("train.py", ["--hps", "digits", "--curves", "perhaps"], "expected true or false"),
    ("train.py", ["--hps", "digits", "--enc_blocks", "8x2,8q2"], "--enc_blocks: bad block spec item"),
    ("train.py", ["--hps", "digits", "--dec_blocks", "1x1,4m1,4x2"], "must end at the image size 8"),
    ("train.py", ["--hps", "digits", "--pixel_levels", "1"], "--pixel_levels must be in 2..256"),
    ("train.py", ["--hps", "digits", "--lr_decay", "linear"], "--lr_decay must be none or cosine"),
    ("train.py", ["--hps", "digits", "--skip_limit", "-1"], "--skip_limit must be >= 0"),
    ("train.py", ["--hps", "digits", "--n_batch", "5000"], "larger than the training set"),
    ("train.py", ["--hps", "digits", "--device", "tpu"], "unknown device 'tpu'"),
    ("train.py", ["--hps", "folder", "--data_root", "EMPTYDIR"], "no images in"),
    ("train.py", ["--hps", "digits", "--likelihood", "poisson"], "--likelihood must be one of dmol, bernoulli"),
    ("train.py", ["--hps", "digits", "--likelihood", "bernoulli", "--pixel_levels", "17"], "needs --pixel_levels 2"),
    ("train.py", ["--hps", "digits", "--gaussian_std", "-1"], "--gaussian_std must be >= 0"),
    # files: missing, damaged, foreign, another architecture, unwritable
    ("train.py", ["--hps", "digits", "--restore", "/nonexistent/x.pt"], "does not exist"),
    ("train.py", ["--hps", "digits", "--restore", "/nonexistent/x.pt", "--save_dir", "OUTDIR"], "does not exist"),
    ("train.py", ["--hps", "digits", "--restore", "CORRUPT", "--save_dir", "OUTDIR"], "cannot read checkpoint"),
    ("train.py", ["--hps", "digits", "--restore", "EMPTYDIR"], "holds no checkpoint"),
    ("train.py", ["--hps", "digits", "--width", "32", "--restore", "RUN", "--save_dir", "OUTDIR"],
     "the model differs in --width (16 there, 32 here)"),
    ("train.py", ["--hps", "digits", "--likelihood", "gaussian", "--restore", "RUN", "--save_dir", "OUTDIR"],
     "--likelihood ('dmol' there, 'gaussian' here)"),
    ("train.py", ["--hps", "digits", "--likelihood", "gaussian", "--gaussian_std", "0.1", "--restore", "RUN"],
     "--gaussian_std (0.0 there, 0.1 here)"),
    ("train.py", ["--hps", "digits", "--data_shift", "-70", "--restore", "RUN", "--save_dir", "OUTDIR"],
     "--data_shift (-78.0 there, -70.0 here)"),
    ("train.py", ["--hps", "digits", "--data_scale", "0.5", "--restore", "RUN", "--save_dir", "OUTDIR"],
     "--data_scale"),
    ("train.py", ["--hps", "digits", "--save_dir", "/proc/no/such/run"], "cannot create run folder"),
    ("sample.py", ["--weights", "/nonexistent/x.pt"], "does not exist"),
    ("sample.py", ["--weights", "CORRUPT"], "cannot read checkpoint"),
    ("sample.py", ["--weights", "FOREIGN"], "is not a checkpoint of this project"),
    ("sample.py", ["--weights", "EMPTYDIR"], "holds no checkpoint"),
    ("sample.py", ["--weights", "BADSAFETENSORS"], "cannot read"),
    ("sample.py", ["--weights", "EMASAFETENSORS", "--raw_weights"], "holds the EMA weights only"),
    # what to sample and where to write it
    ("sample.py", ["--weights", "RUN", "--classes", "horse"], "unknown class 'horse'"),
    ("sample.py", ["--weights", "RUN", "--classes", "12"], "out of range"),
    ("sample.py", ["--weights", "RUN", "--temperature", "0"], "must be a finite number > 0"),
    ("sample.py", ["--weights", "RUN", "--temperature", "inf"], "must be a finite number > 0, got inf"),
    ("sample.py", ["--weights", "RUN", "--temperature", "-1"], "must be a finite number > 0"),
    ("sample.py", ["--weights", "RUN", "--temperature", "nan"], "must be a finite number > 0"),
    ("sample.py", ["--weights", "RUN", "--n", "100000000"], "ask for fewer with --n"),
    ("sample.py", ["--weights", "RUN", "--n", "100000", "--out", "x.png"], "pixels across, more than 65,535"),
    ("sample.py", ["--weights", "RUN", "--temperature", "warm"], "must be a number, a comma-separated list or"),
    ("sample.py", ["--weights", "RUN", "--temperature", "16:0.5"], "names resolution 16"),
    ("sample.py", ["--weights", "RUN", "--temperature", "1,2"], "lists 2 values; this model has"),
    ("sample.py", ["--weights", "RUN", "--n_per_class", "0"], "must be > 0"),
    ("sample.py", ["--weights", "RUN", "--out", "x.jpg"], "must end in .png or .npz"),
    ("sample.py", ["--weights", "RUN", "--out", "/proc/no/such/x.png"], "cannot write"),
    ("sample.py", ["--weights", "RUN", "--device", "tpu"], "unknown device 'tpu'"),
    ("sample.py", ["--weights", "RUN", "--precision", "fp64"], "invalid choice: 'fp64'"),
    ("sample.py", ["--weights", "RUN", "--export", "model.bin"], "--export must end in .safetensors"),
    ("sample.py", ["--weights", "RUN", "--export", "/proc/no/such/x.safetensors"], "cannot write"),
    ("sample.py", ["--weights", "RUN", "--seed", "x"], "invalid int value"),
    # the exploration modes
    ("sample.py", ["warp", "--weights", "RUN"], "unrecognized arguments: warp"),
    ("sample.py", ["recon", "--weights", "RUN", "--k", "9"], "--k: 9 is out of range 0..5"),
    ("sample.py", ["recon", "--weights", "RUN", "--images", "5000"], "index 5000 is out of range"),
    ("sample.py", ["recon", "--weights", "RUN", "--split", "train"], "invalid choice: 'train'"),
    ("sample.py", ["interp", "--weights", "RUN", "--images", "1"], "--images needs two indices"),
    ("sample.py", ["interp", "--weights", "RUN", "--frames", "1"], "--frames must be >= 2"),
    ("sample.py", ["interp", "--weights", "RUN", "--images", "1,2", "--seeds", "3,4"], "at most one of"),
    ("sample.py", ["interp", "--weights", "RUN", "--out", "x.jpg"], "must end in .png or .gif"),
    ("sample.py", ["interp", "--weights", "RUN", "--out", "/proc/no/such/x.png"], "cannot write"),
    ("sample.py", ["explore", "--weights", "RUN", "--groups", "7"], "--groups: 7 is out of range 0..4"),
    ("sample.py", ["explore", "--weights", "RUN", "--class", "cat"], "unknown class 'cat'"),
    ("sample.py", ["swap", "--weights", "RUN", "--n", "0"], "--n must be > 0"),
    ("sample.py", ["swap", "--weights", "UNCONDITIONAL"], "is an unconditional model: swap needs classes"),
    ("sample.py", ["manifold", "--weights", "RUN"], "manifold needs a 2-dimensional latent"),
    ("sample.py", ["grid", "--weights", "RUN", "--outdir", "RUN"], "already exists and is not an empty folder"),
    ("sample.py", ["recon", "--weights", "RUN", "--outdir", "OUTDIR", "--k", "1,2"], "give one --k"),
    ("sample.py", ["grid", "--weights", "RUN", "--outdir", "/proc/no/such/folder"], "cannot create --outdir"),
    ("train.py", ["--hps", "digits", "--track_latents", "5", "--save_dir", "OUTDIR"],
     "--track_latents needs a 2-dimensional latent"),
    ("toy2d.py", ["--steps", "0"], "--steps must be > 0"),
]


@pytest.fixture(scope="module")
def bad_files(trained_run, tmp_path_factory):
    """Damaged and foreign weight files next to a good run."""
    folder = tmp_path_factory.mktemp("bad")
    run_dir, _ = trained_run
    damaged = write_damaged_weights(folder, run_dir)
    unconditional = folder / "unconditional"
    assert run("train.py", *tiny_cli_args(unconditional, n_classes=0, max_steps=1)).returncode == 0
    assert run("sample.py", "--weights", str(run_dir), "--export", str(folder / "ema.safetensors")).returncode == 0
    return {"RUN": str(run_dir), "UNCONDITIONAL": str(unconditional), "EMASAFETENSORS": str(folder / "ema.safetensors"),
            **{name: str(path) for name, path in damaged.items()}}


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_in_process(script: str, args: list[str], capsys) -> tuple[int, str]:
    """``script``'s main through run_cli, as its ``__main__`` block calls it: (exit status, stderr). In process, so
    that 79 cases take seconds rather than minutes of interpreter starts; test_each_script_exits_2_as_a_process
    runs one case of each script as a real process."""
    module = importlib.import_module(script.removesuffix(".py"))
    capsys.readouterr()  # what earlier steps printed
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, list(args))
    return stop.value.code, capsys.readouterr().err


def check_bad_input(bad_files, run_dir, tmp_path, script, args, message, runner) -> None:
    """Exit status 2, one line on stderr naming the problem, no traceback, the run folder it pointed at unchanged,
    and nothing written where it ran."""
    names = dict(bad_files, OUTDIR=str(tmp_path / "out"))
    args = [names.get(a, a) for a in args]
    before = snapshot(run_dir)
    code, stderr = runner(script, args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], stderr
    assert "Traceback" not in stderr
    assert snapshot(run_dir) == before
    # nothing written where it ran: no picture, no run folder (OUTDIR, weights/digits) that did not exist before
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script,args,message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(trained_run, bad_files, tmp_path, monkeypatch, capsys, script, args,
                                          message):
    run_dir, _ = trained_run
    monkeypatch.chdir(tmp_path)  # relative paths and default run folders land where a user would run it
    check_bad_input(bad_files, run_dir, tmp_path, script, args, message,
                    lambda name, argv: run_in_process(name, argv, capsys))


@pytest.mark.parametrize("script,args,message", [next(case for case in BAD_INPUTS if case[0] == script)
                                                 for script in ("train.py", "sample.py", "toy2d.py")])
def test_each_script_exits_2_as_a_process(trained_run, bad_files, tmp_path, script, args, message):
    """The first case of each script in a real process: its ``__main__`` block, the interpreter's exit status."""
    run_dir, _ = trained_run

    def in_a_process(name: str, argv: list[str]) -> tuple[int, str]:
        result = run(name, *argv, cwd=tmp_path)
        return result.returncode, result.stderr
    check_bad_input(bad_files, run_dir, tmp_path, script, args, message, in_a_process)


def test_help_lists_every_field():
    from hps import SETTABLE

    result = run("train.py", "--help")
    assert result.returncode == 0
    for f in SETTABLE:
        assert f"--{f.name}" in result.stdout


def test_cifar10_preset_trains_and_samples_by_class_name(tmp_path):
    """The RGB path end to end: CIFAR-10 files in their real format, a narrow cifar10 model, 'horse' by name."""
    from test_data import write_cifar10

    write_cifar10(tmp_path / "data", per_batch=8)
    run_dir = tmp_path / "run"
    result = run("train.py", "--hps", "cifar10", "--data_root", str(tmp_path / "data"), "--save_dir", str(run_dir),
                 "--width", "16", "--zdim", "4", "--enc_blocks", "32x1,32d2,16x1,16d16,1x1",
                 "--dec_blocks", "1x1,16m1,16x1,32m16", "--max_steps", "2", "--n_batch", "4", "--n_batch_eval", "20",
                 cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    final = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["kind"] == "final" and 5 < final["test_bpd"] < 12  # near log2(256) = 8 when untrained
    out = tmp_path / "horses.npz"
    result = run("sample.py", "--weights", str(run_dir), "--classes", "horse,airplane", "--n_per_class", "3",
                 "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arrays = np.load(out)
    assert arrays["images"].shape == (6, 32, 32, 3) and arrays["labels"].tolist() == [7, 7, 7, 0, 0, 0]


def test_a_default_run_writes_only_into_its_run_folder(tmp_path):
    """A run from the repository's folder leaves the README's pictures in assets/ alone: they are files under
    version control, refreshed by hand, and a run writes only into weights/<preset>."""
    (tmp_path / "assets").mkdir()
    picture = tmp_path / "assets" / "digits_samples.png"
    picture.write_bytes(b"the README's picture")
    assert run("train.py", *tiny_cli_args(None, max_steps=1, curves="true"), cwd=tmp_path).returncode == 0
    assert picture.read_bytes() == b"the README's picture" and sorted(p.name for p in tmp_path.iterdir()) == \
        ["assets", "weights"]
    assert sorted(p.name for p in (tmp_path / "assets").iterdir()) == ["digits_samples.png"]
    assert (tmp_path / "weights" / "digits" / "latest.pt").is_file()
    assert (tmp_path / "weights" / "digits" / "samples.png").read_bytes()[:4] == b"\x89PNG"
