"""Every output is checked before the work, and a refused command leaves nothing behind.

For each entry point and each flag that names an output: an unwritable place (under /proc, or under a regular file
where a folder should be) and, where the flag needs a new or empty folder, one that holds a file. Then the refusals
that come after the arguments are parsed (stages out of order, a model mismatch on restore, missing data, a failed
download). Each case asserts exit status 2, one ``error:`` line and no traceback; that the work never started (the
function that begins it is patched to record a call, and was not called); and that nothing appeared, vanished or
changed in the working folder or the run it pointed at."""
from __future__ import annotations

import importlib
import socket
import sys

import pytest

from conftest import ROOT, tiny_cli_args
from utils import UserError, check_output_file, check_output_folder, run_cli

sys.path.insert(0, str(ROOT / "bench"))

# (script, argv, message in the error line, "module.function" whose call would mean the work started)
OUTPUT_CASES = [
    ("train.py", ["--hps", "digits", "--save_dir", "/proc/no/such/run"], "cannot create run folder",
     "train.load_data_per_node"),
    ("train.py", ["--hps", "digits", "--save_dir", "AFILE/run"], "is a file, not a folder", "train.load_data_per_node"),
    ("sample.py", ["--weights", "RUN", "--out", "/proc/no/such/x.png"], "cannot write", "sampling.load_model"),
    ("sample.py", ["--weights", "RUN", "--out", "/proc/no/such/x.npz"], "cannot write", "sampling.load_model"),
    ("sample.py", ["--weights", "RUN", "--out", "AFILE/x.png"], "is a file, not a folder", "sampling.load_model"),
    ("sample.py", ["--weights", "RUN", "--out", "ADIR"], "must end in .png or .npz", "sampling.load_model"),
    ("sample.py", ["grid", "--weights", "RUN", "--outdir", "/proc/no/such/dir"], "cannot create --outdir",
     "sampling.load_model"),
    ("sample.py", ["grid", "--weights", "RUN", "--outdir", "FULLDIR"], "already exists and is not an empty folder",
     "sampling.load_model"),
    ("sample.py", ["recon", "--weights", "RUN", "--outdir", "FULLDIR"], "already exists and is not an empty folder",
     "sampling.load_model"),
    ("sample.py", ["recon", "--weights", "RUN", "--out", "/proc/no/such/r.png"], "cannot write", "sampling.load_model"),
    ("sample.py", ["interp", "--weights", "RUN", "--out", "/proc/no/such/i.png"], "cannot write",
     "sampling.load_model"),
    ("sample.py", ["interp", "--weights", "RUN", "--out", "GIFDIR.png"], "a folder of that name exists",
     "sampling.load_model"),
    ("sample.py", ["explore", "--weights", "RUN", "--out", "/proc/no/such/e.png"], "cannot write",
     "sampling.load_model"),
    ("sample.py", ["swap", "--weights", "RUN", "--out", "/proc/no/such/s.png"], "cannot write", "sampling.load_model"),
    ("sample.py", ["manifold", "--weights", "RUN", "--out", "/proc/no/such/m.png"], "cannot write",
     "sampling.load_model"),
    ("sample.py", ["--weights", "RUN", "--export", "/proc/no/such/x.safetensors"], "cannot write",
     "sample.export_safetensors"),
    ("sample.py", ["--weights", "RUN", "--export", "/proc/no/such/card", "--card"], "cannot create --export",
     "sample.export_with_card"),
    ("sample.py", ["--weights", "RUN", "--export", "AFILE", "--card"], "a file of that name exists",
     "sample.export_with_card"),
    ("evaluate.py", ["--weights", "RUN", "--out", "/proc/no/such/x.json"], "cannot write",
     "evaluate.evaluate_checkpoint"),
    ("evaluate.py", ["--weights", "RUN", "--out", "ADIR"], "a folder of that name exists",
     "evaluate.evaluate_checkpoint"),
    ("convert.py", ["model-ema.th", "--hps", "cifar10", "--out", "/proc/no/such/x.pt"], "cannot write",
     "convert.checkpoint_from_openai"),
    ("convert.py", ["model-ema.th", "--hps", "cifar10", "--out", "AFILE/x.safetensors"], "is a file, not a folder",
     "convert.checkpoint_from_openai"),
    ("plot.py", ["RUN", "--out", "/proc/no/such/c.png"], "cannot write", "plot.read_metrics"),
    ("toy2d.py", ["--out", "/proc/no/such/t.png"], "cannot write", "toy2d.train"),
    ("toy2d.py", ["--out", "t.png", "--json", "/proc/no/such/t.json"], "cannot write", "toy2d.train"),
    ("toy2d.py", ["--out", "t.png", "--json", "ADIR"], "a folder of that name exists", "toy2d.train"),
    ("bench/families.py", ["--out", "/proc/no/such/runs"], "cannot create --out", "families.measure_family"),
    ("bench/families.py", ["--pictures", "/proc/no/such/NAME.png"], "cannot write", "families.measure_family"),
    ("bench/gpu_check.py", ["--tiny", "--out", "/proc/no/such/check"], "cannot create --out", "gpu_check.Check"),
    ("bench/gpu_check.py", ["--tiny", "--out", "check", "--work", "AFILE/work"], "is a file, not a folder",
     "gpu_check.Check"),
]

# refusals after the arguments are parsed: (argv of train.py, message, the function that would mean training began)
LATE_REFUSALS = [
    (["--model", "vqvae", "--stage", "prior", "--save_dir", "OUTDIR"], "trains on top of a finished autoencoder",
     "train.Trainer"),
    (["--width", "32", "--restore", "RUN", "--save_dir", "OUTDIR"], "the model differs in --width", "train.Trainer"),
    (["--restore", "/nonexistent/x.pt", "--save_dir", "OUTDIR"], "does not exist", "train.Trainer"),
    (["--hps", "folder", "--data_root", "EMPTYDIR", "--save_dir", "OUTDIR"], "no images in", "train.Trainer"),
    (["--n_batch", "5000", "--save_dir", "OUTDIR"], "larger than the training set", "train.Trainer"),
    (["--track_latents", "5", "--save_dir", "OUTDIR"], "--track_latents needs a 2-dimensional latent",
     "train.Trainer"),
]


def tree(folder) -> dict:
    """Every file and folder below ``folder``, a file by its bytes: what a refused command must leave as it was."""
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


def entry_point(script: str):
    name = script.removesuffix(".py").split("/")[-1]
    return importlib.import_module(name)


class Called(Exception):
    """Raised by a patched function: the work it begins was reached."""


def patch_work(monkeypatch, target: str) -> list:
    module_name, attr = target.split(".")
    calls: list = []

    def record(*args, **kwargs):
        calls.append(args)
        raise Called(target)

    monkeypatch.setattr(importlib.import_module(module_name), attr, record)
    return calls


def check_refused(script, argv, message, work, names, run_dir, tmp_path, monkeypatch, capsys) -> None:
    argv = [names.get(a, a) for a in argv]
    module = entry_point(script)
    calls = patch_work(monkeypatch, work)
    before_cwd, before_run = tree(tmp_path), tree(run_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(module.main, argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert calls == [], f"{work} ran before the refusal"
    assert tree(tmp_path) == before_cwd, "the working folder changed"
    assert tree(run_dir) == before_run, "the run folder changed"


@pytest.fixture
def places(trained_run, tmp_path, monkeypatch):
    """The working folder (tmp_path, the current folder) with a file, an empty and a non-empty folder, and a folder
    where interp's GIF would go; the names the cases use for them."""
    run_dir, _ = trained_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a file where a folder should be")
    (tmp_path / "adir").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "00001.png").write_bytes(b"an earlier sample")
    (tmp_path / "gifdir.gif").mkdir()
    names = {"RUN": str(run_dir), "AFILE": str(tmp_path / "afile"), "ADIR": str(tmp_path / "adir"),
             "EMPTYDIR": str(tmp_path / "empty"), "FULLDIR": str(tmp_path / "full"), "OUTDIR": str(tmp_path / "out"),
             "GIFDIR.png": str(tmp_path / "gifdir.png")}
    names.update({f"AFILE/{rest}": str(tmp_path / "afile" / rest) for rest in ("run", "x.png", "x.safetensors",
                                                                                 "work")})
    return names, run_dir


@pytest.mark.parametrize("script,argv,message,work", OUTPUT_CASES)
def test_an_unwritable_output_is_refused_before_the_work(places, tmp_path, monkeypatch, capsys, script, argv,
                                                         message, work):
    names, run_dir = places
    check_refused(script, argv, message, work, names, run_dir, tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("argv,message,work", LATE_REFUSALS)
def test_a_refused_run_leaves_no_run_folder(places, tmp_path, monkeypatch, capsys, argv, message, work):
    names, run_dir = places
    argv = [*tiny_cli_args(None), *argv]  # the case's flags come last, so they win
    check_refused("train.py", argv, message, work, names, run_dir, tmp_path, monkeypatch, capsys)
    assert not (tmp_path / "out").exists() and not (tmp_path / "weights").exists()


def test_a_failed_download_leaves_nothing_behind(places, tmp_path, monkeypatch, capsys):
    """CIFAR-10 absent and its download failing half-way (a partial archive and an extracted folder already
    written): the refusal removes both, and the data folder it had created."""
    import torchvision

    def partial_download(root, train=True, download=False):
        from pathlib import Path

        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / "cifar-10-python.tar.gz").write_bytes(b"the first bytes")
        (Path(root) / "cifar-10-batches-py").mkdir()
        raise OSError("connection reset")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", partial_download)
    names, run_dir = places
    argv = ["--hps", "cifar10", "--data_root", str(tmp_path / "data" / "cifar"), "--save_dir", "OUTDIR"]
    check_refused("train.py", argv, "could not be downloaded", "train.Trainer", names, run_dir, tmp_path,
                  monkeypatch, capsys)
    assert not (tmp_path / "data").exists()


def test_a_failed_download_keeps_what_was_there(tmp_path, monkeypatch):
    """Into a data folder that already holds files: only what the download wrote goes."""
    import torchvision

    from data import load_data

    root = tmp_path / "data"
    root.mkdir()
    (root / "notes.txt").write_text("the user's")

    def partial_download(root_arg, train=True, download=False):
        from pathlib import Path

        (Path(root_arg) / "cifar-10-python.tar.gz").write_bytes(b"the first bytes")
        raise OSError("connection reset")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", partial_download)
    with pytest.raises(UserError, match="could not be downloaded"):
        load_data("cifar10", str(root))
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]


def test_a_taken_port_is_refused_before_the_model_loads(places, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gradio")
    names, run_dir = places
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        check_refused("app.py", ["--port", str(port)], f"cannot serve on 127.0.0.1:{port}", "app.App", names,
                      run_dir, tmp_path, monkeypatch, capsys)


def test_the_checks_create_nothing_and_accept_writable_places(tmp_path):
    """A place that can be written passes, and checking it leaves no file or folder behind (the probe file is
    removed); a new folder's missing parents are not made by the check."""
    assert check_output_file(tmp_path / "a" / "b" / "x.png") == tmp_path / "a" / "b" / "x.png"
    assert check_output_folder(tmp_path / "new" / "run", "--save_dir") == tmp_path / "new" / "run"
    check_output_folder(tmp_path, "--outdir")  # existing, not required empty
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    check_output_folder(tmp_path / "full", "--save_dir")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["full", "x"]
    with pytest.raises(UserError, match="no folder"):
        check_output_file(tmp_path / "missing" / "x.json", parent_must_exist=True)
    with pytest.raises(UserError, match="not an empty folder"):
        check_output_folder(tmp_path / "full", "--outdir", empty=True)
