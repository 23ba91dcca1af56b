"""openai/vdvae's checkpoints: each preset's key set, with names and shapes derived here from their module
structure, converts with nothing missing or unexpected; a renamed or reshaped key is named in a one-line error;
a .th file samples, evaluates and fine-tunes through the real command lines."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run
from models import OPENAI_PRESETS, checkpoint_from_openai, convert_state_dict, openai_hparams
from test_data import write_cifar10
from test_evaluate import assert_refused, watched
from checkpoint import CHECKPOINT_FORMAT
from utils import UserError
from vae import VAE


def layers(spec: str) -> list[tuple[int, int | None]]:
    """(resolution, mixin or down rate) per block, as openai/vdvae's block strings mean them."""
    out = []
    for item in spec.split(","):
        if "x" in item:
            res, count = item.split("x")
            out += [(int(res), None)] * int(count)
        else:
            res, other = item.replace("m", "d").split("d")
            out.append((int(res), int(other)))
    return out


def block_shapes(prefix: str, c_in: int, c_mid: int, c_out: int, res: int) -> dict[str, tuple]:
    k = 3 if res > 2 else 1  # their 3x3 convolutions become 1x1 at resolutions 1 and 2
    return {f"{prefix}.c1.weight": (c_mid, c_in, 1, 1), f"{prefix}.c1.bias": (c_mid,),
            f"{prefix}.c2.weight": (c_mid, c_mid, k, k), f"{prefix}.c2.bias": (c_mid,),
            f"{prefix}.c3.weight": (c_mid, c_mid, k, k), f"{prefix}.c3.bias": (c_mid,),
            f"{prefix}.c4.weight": (c_out, c_mid, 1, 1), f"{prefix}.c4.bias": (c_out,)}


def openai_state_shapes(preset: str) -> dict[str, tuple]:
    """openai/vdvae's state dict for a preset: names and shapes from its encoder (in_conv, residual blocks),
    decoder blocks (enc, prior, z_proj, resnet), learned initial states, DMOL head, gain and bias."""
    H = openai_hparams(preset)
    widths = {int(r): int(w) for r, w in (item.split(":") for item in H.custom_width_str.split(",") if item)}
    width = lambda res: widths.get(res, H.width)  # noqa: E731
    shapes = {"encoder.in_conv.weight": (H.width, 3, 3, 3), "encoder.in_conv.bias": (H.width,)}
    for i, (res, _) in enumerate(layers(H.enc_blocks)):
        w = width(res)
        shapes.update(block_shapes(f"encoder.enc_blocks.{i}", w, int(w * 0.25), w, res))
    dec = layers(H.dec_blocks)
    for i, (res, _) in enumerate(dec):
        w, z, p = width(res), H.zdim, f"decoder.dec_blocks.{i}"
        shapes.update(block_shapes(f"{p}.enc", 2 * w, int(w * 0.25), 2 * z, res))
        shapes.update(block_shapes(f"{p}.prior", w, int(w * 0.25), 2 * z + w, res))
        shapes.update(block_shapes(f"{p}.resnet", w, int(w * 0.25), w, res))
        shapes.update({f"{p}.z_proj.weight": (w, z, 1, 1), f"{p}.z_proj.bias": (w,)})
    for j, res in enumerate(r for r in sorted({r for r, _ in dec}) if r <= H.no_bias_above):
        shapes[f"decoder.bias_xs.{j}"] = (1, width(res), res, res)
    shapes.update({"decoder.out_net.out_conv.weight": (10 * H.num_mixtures, H.width, 1, 1),
                   "decoder.out_net.out_conv.bias": (10 * H.num_mixtures,),
                   "decoder.gain": (1, H.width, 1, 1), "decoder.bias": (1, H.width, 1, 1)})
    return shapes


def fake_state(preset: str, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.zeros(shape) for k, shape in openai_state_shapes(preset).items()}


@pytest.mark.parametrize("preset", OPENAI_PRESETS)
def test_each_presets_openai_key_set_converts_with_nothing_missing_or_unexpected(preset):
    state = fake_state(preset, prefix="module.")  # as DistributedDataParallel saved it
    converted = convert_state_dict(state, openai_hparams(preset))
    assert {k: tuple(v.shape) for k, v in converted.items()} == openai_state_shapes(preset)


def test_a_renamed_or_reshaped_key_is_named():
    H = openai_hparams("cifar10")
    state = fake_state("cifar10")
    state["decoder.dec_blocks.3.z_projection.weight"] = state.pop("decoder.dec_blocks.3.z_proj.weight")
    with pytest.raises(UserError, match=r"missing 1 key\(s\): decoder.dec_blocks.3.z_proj.weight \| unexpected 1 "
                                        r"key\(s\): decoder.dec_blocks.3.z_projection.weight"):
        convert_state_dict(state, H)
    state = fake_state("cifar10")
    state["decoder.gain"] = torch.zeros(1, 256, 1, 1)
    with pytest.raises(UserError, match=r"shape mismatch\(es\): decoder.gain \(1, 256, 1, 1\) there, "
                                        r"\(1, 384, 1, 1\) here"):
        convert_state_dict(state, H)


def test_a_class_conditional_start_is_the_unconditional_model_until_it_trains():
    h0 = openai_hparams("cifar10")
    h0.width, h0.enc_blocks, h0.dec_blocks = 16, "32x1,32d4,8d8,1x1", "1x1,8m1,32m8"  # small, same names
    torch.manual_seed(0)
    source = VAE(h0)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.02 * torch.randn_like(p))
    h10 = openai_hparams("cifar10", n_classes=10)
    h10.width, h10.enc_blocks, h10.dec_blocks = h0.width, h0.enc_blocks, h0.dec_blocks
    conditional = VAE(h10)
    conditional.load_state_dict(convert_state_dict(source.state_dict(), h10))
    assert conditional.decoder.class_emb.weight.abs().sum() == 0
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    expected = source(images)["loss"]
    torch.manual_seed(1)
    torch.testing.assert_close(conditional(images, torch.tensor([0, 4, 9]))["loss"], expected)


@pytest.fixture(scope="module")
def openai_file(tmp_path_factory):
    """A .th file with openai/vdvae's exact names for cifar10 (a nudged random model), as their trainer saves."""
    folder = tmp_path_factory.mktemp("vdvae")
    torch.manual_seed(0)
    model = VAE(openai_hparams("cifar10"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = folder / "cifar10-seed0-iter-900000-model-ema.th"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)
    write_cifar10(folder / "data", per_batch=4)
    return path, folder


def test_a_th_file_converts_samples_and_evaluates_from_the_command_line(openai_file, tmp_path):
    path, folder = openai_file
    out = tmp_path / "c10.pt"
    result = run("convert.py", str(path), "--hps", "cifar10", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "step 900000" in result.stdout and torch.load(out, weights_only=True)["step"] == 900000
    result = run("sample.py", "--weights", str(path), "--hps", "cifar10", "--n", "2", "--out",
                 str(tmp_path / "s.npz"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run("evaluate.py", "--weights", str(path), "--hps", "cifar10", "--data_root", str(folder / "data"),
                 "--out", str(tmp_path / "eval.json"), "--n_batch", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    via_th = json.loads((tmp_path / "eval.json").read_text())["bpd"]
    result = run("evaluate.py", "--weights", str(out), "--data_root", str(folder / "data"),
                 "--out", str(tmp_path / "eval2.json"), "--n_batch", "4", cwd=tmp_path)
    assert result.returncode == 0 and json.loads((tmp_path / "eval2.json").read_text())["bpd"] == via_th


def test_train_restore_of_a_th_file_starts_a_new_run_from_its_weights(openai_file, tmp_path):
    """What ``train.py --hps cifar10 --restore X.th`` does before its first step (in-process: a full-size
    training run is too slow for the CPU tests)."""
    from trainer import RunState, Trainer, checkpoint_to_resume, restore_run

    path, _ = openai_file
    H = openai_hparams("cifar10", n_classes=10)
    H.restore = str(path)
    trainer = Trainer(H, torch.device("cpu"))
    state = RunState()
    source, ckpt = checkpoint_to_resume(H, tmp_path, print)
    restore_run(source, ckpt, H, trainer, state)
    theirs = torch.load(path, weights_only=True)
    for name, value in trainer.ema.state_dict().items():
        expected = theirs.get(f"module.{name}", torch.zeros_like(value))  # the class embedding starts at zero
        assert torch.equal(value, expected), name
    assert state.step == 0 and trainer.optimizer.state_dict()["state"] == {}


def test_a_th_file_needs_its_preset(openai_file, tmp_path):
    path, _ = openai_file
    result = run("sample.py", "--weights", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "name its preset with --hps" in result.stderr
    result = run("convert.py", str(path), "--hps", "imagenet32", "--out", str(tmp_path / "x.pt"), cwd=tmp_path)
    assert result.returncode == 2 and "does not fit the imagenet32 model" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_from_openai_names_cifar10_classes_only_when_conditional(openai_file):
    path, _ = openai_file
    assert checkpoint_from_openai(path, "cifar10")["class_names"] == []
    assert checkpoint_from_openai(path, "cifar10", n_classes=10)["class_names"][7] == "horse"


CONVERT_BAD_INPUTS = [
    # the command line
    ([], "the following arguments are required: checkpoint, --hps, --out"),
    (["{GOOD_TH}", "--out", "{OUTDIR}/x.pt"], "the following arguments are required: --hps"),
    (["{GOOD_TH}", "--hps", "digits", "--out", "{OUTDIR}/x.pt"], "argument --hps: invalid choice: 'digits'"),
    (["{GOOD_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.bin"], "--out must end in .pt or .safetensors"),
    (["{GOOD_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt", "--n_classes", "7"],
     "--n_classes must be 0 or 10 for cifar10"),
    (["{GOOD_TH}", "--hps", "imagenet32", "--out", "{OUTDIR}/x.pt", "--n_classes", "10"],
     "--n_classes must be 0 or 1000 for imagenet32"),
    (["{GOOD_TH}", "--hps", "ffhq256", "--out", "{OUTDIR}/x.pt", "--n_classes", "10"],
     "ffhq256 is unconditional: --n_classes must be 0"),
    (["{GOOD_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt", "--n_classes", "x"],
     "argument --n_classes: invalid int value: 'x'"),
    # the file: missing, a folder, damaged, not a state dict (one of our checkpoints), keys not theirs
    (["/nonexistent/x.th", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt"],
     "openai/vdvae checkpoint /nonexistent/x.th does not exist"),
    (["{EMPTYDIR}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt"], "does not exist"),
    (["{CORRUPT_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt"], "cannot read openai/vdvae checkpoint"),
    (["{EMPTY_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.safetensors"], "cannot read openai/vdvae checkpoint"),
    (["{FOREIGN_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt"], "is not a state dict of tensors"),
    (["{OURS}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt"], "is not a state dict of tensors"),
    (["{RESHAPED_TH}", "--hps", "cifar10", "--out", "{OUTDIR}/x.pt"],
     "1 shape mismatch(es): decoder.gain (1, 256, 1, 1) there, (1, 384, 1, 1) here"),
    # where it goes: a folder that cannot be made, a folder where no file can be made
    (["{GOOD_TH}", "--hps", "cifar10", "--out", "/proc/no/such/x.pt"], "cannot write /proc/no/such/x.pt"),
    (["{GOOD_TH}", "--hps", "cifar10", "--out", "/proc/x.safetensors"], "cannot write /proc/x.safetensors"),
]


@pytest.fixture(scope="module")
def convert_bad_files(tmp_path_factory):
    """Files convert.py must refuse: damaged, empty, foreign, one of our checkpoints, a key of the wrong shape."""
    folder = tmp_path_factory.mktemp("bad_convert")
    (folder / "empty").mkdir()
    (folder / "corrupt.th").write_bytes(b"PK\x03\x04 not a zip archive")
    (folder / "empty.th").write_bytes(b"")
    torch.save({"step": 5, "weights": torch.zeros(2)}, folder / "foreign.th")
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.zeros(2)}, "step": 3}, folder / "ours.pt")
    torch.save({"module.decoder.gain": torch.zeros(1, 256, 1, 1)}, folder / "reshaped.th")
    return {"EMPTYDIR": folder / "empty", "CORRUPT_TH": folder / "corrupt.th", "EMPTY_TH": folder / "empty.th",
            "FOREIGN_TH": folder / "foreign.th", "OURS": folder / "ours.pt", "RESHAPED_TH": folder / "reshaped.th",
            "folder": folder}


@pytest.mark.parametrize("args,message", CONVERT_BAD_INPUTS, ids=[" ".join(a) or "no arguments" for a, _ in
                                                                 CONVERT_BAD_INPUTS])
def test_convert_bad_input_is_one_line_and_exit_2(openai_file, convert_bad_files, tmp_path, args, message):
    """Each bad invocation: exit status 2, one line on stderr naming the problem, no traceback, the files it read
    left as they were, and nothing written where it ran: no file, no --out folder that did not exist before."""
    path, folder = openai_file
    outdir = tmp_path / "out"
    names = {**convert_bad_files, "GOOD_TH": path, "OUTDIR": outdir}
    before = watched(folder, convert_bad_files["folder"])
    result = run("convert.py", *[a.format(**names) for a in args], cwd=tmp_path)
    assert_refused(result, message)
    assert watched(folder, convert_bad_files["folder"]) == before
    assert not outdir.exists() and not list(tmp_path.iterdir())
