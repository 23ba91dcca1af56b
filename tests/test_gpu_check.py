"""bench/gpu_check.py, the prepared GPU check, run whole at tiny sizes on the CPU so that it cannot rot while no GPU
is at hand: every section runs, and what each reports is what its code path did."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
from data import load_data  # noqa: E402


def test_the_synthetic_cifar_files_load_through_the_real_cifar10_reader(tmp_path):
    gpu_check.write_cifar10(tmp_path)
    data = load_data("cifar10", str(tmp_path))
    n_train = gpu_check.N_TRAIN_FILES * gpu_check.PER_FILE
    assert len(data.train) + len(data.valid) == n_train and len(data.test) == gpu_check.N_TEST
    assert data.train.images.shape[1:] == (3, 32, 32) and data.train.images.dtype == torch.uint8
    assert data.class_names[7] == "horse"
    # learnable: the per-class patterns make the class means differ far more than noise would
    means = torch.stack([data.test.images[data.test.labels == c].float().mean(0) for c in range(10)])
    assert (means - means.mean(0)).abs().mean() > 5.0


def test_errors_anywhere_in_a_section_are_found():
    result = {"ok": True, "modes": {"a": {"train_img_s": 1.0}, "b": {"error": "exit 1: boom"}},
              "flops": {"error": "exit 124: timed out"}}
    assert gpu_check.errors_in(result) == ["modes.b: exit 1: boom", "flops: exit 124: timed out"]
    assert gpu_check.errors_in({"ok": True}) == []


def test_the_gpu_check_runs_every_section_at_tiny_sizes_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--budget_s", "1500"], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    sections = summary["sections"]
    assert list(sections) == [name for name, *_ in gpu_check.SECTIONS]
    for name, result in sections.items():
        assert gpu_check.errors_in(result) == [], (name, result)
    P = gpu_check.plan(tiny=True)

    for preset in ("cifar10_efficient", "cifar10_efficient_c1"):  # the Efficient-VDVAE presets, measured too
        efficient = sections["efficient"][preset]
        assert efficient["hps"] == preset and efficient["modes"]["default"]["train_img_s"] > 0
    modes = sections["throughput"]["modes"]
    for mode in ("eager_fp32", "default"):
        assert modes[mode]["train_img_s"] > 0 and set(modes[mode]["sample_img_s_by_batch"]) == {"4", "8"}
    assert ("reference" in modes) == gpu_check.has_reference(str(ROOT / ".vdvae"))
    assert sections["throughput"]["flops"]["train_flops_per_image"] > 0

    parity = sections["parity"]
    for curve in parity["curves"].values():
        assert len(curve["loss_bpd"]) == P["parity_steps"]
    first = [curve["loss_bpd"][0] for curve in parity["curves"].values()]
    assert first[0] > 0 and abs(first[1] - first[0]) < 0.02 * first[0]  # the same model, batch and noise
    assert parity["final_rel_diff"] < 0.02  # the same init, batches and noise: only rounding differs

    sweep = sections["batch_sweep"]["batches"]
    assert list(sweep) == [str(b) for b in P["sweep"]] and all(b["img_s"] > 0 for b in sweep.values())
    per_step = sections["profile"]["per_step"]
    assert per_step["operator_calls"] > 100 and per_step["step_s_unprofiled"] > 0
    assert modes["default"]["ops_per_step"] > 100
    digits = sections["digits"]
    assert digits["ok"] and digits["final"]["step"] == 20 and digits["evaluate"]["bpd"] > 0
    assert (out / "digits_samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    resume = sections["resume"]
    assert resume["ok"] and resume["killed"] and resume["log_says_resumed"]
    assert resume["resumed_to_step"] == resume["killed_at_checkpoint_step"] + P["resume_more"]
    assert resume["killed_at_checkpoint_step"] >= 2 * P["resume_every"]
    assert resume["cpu_sample_written"]

    launch = sections["torchrun"]
    assert launch["ok"] and launch["python"]["img_per_s"] > 0 and launch["torchrun"]["img_per_s"] > 0

    paths = sections["cuda_paths"]
    assert paths["ok"] and paths["compiled_accum_frames_after_each_pass"] == [paths[
        "compiled_accum_frames_after_each_pass"][0]] * 4
    assert paths["head_dtype"] == "torch.float32" and paths["top_group_roundtrip_max_err"] < 1e-4
    assert paths["eval_rel_diff"] < 0.02

    top = sections["profile"]["top"]
    assert top and all(entry["ms_per_step"] >= 0 for entry in top)
    for mode in ("none", "gelu", "blocks"):
        assert sections["max_batch"][mode]["largest_fitting"] == P["max_batch_cap"]  # tiny: no limit reached

    compiled = sections["sampling_compile"]  # eager and compiled sampling at one batch: both timed, the same images
    assert compiled["eager_s_per_batch"] > 0 and compiled["compiled_s_per_batch"] > 0
    ratio = compiled["eager_s_per_batch"] / compiled["compiled_s_per_batch"]  # of the rounded figures
    assert abs(compiled["compiled_vs_eager"] - ratio) <= 0.01 * ratio
    assert compiled["same_pixels_share"] == 1.0  # fp32 on the CPU: the same seed draws the same images

    targets = summary["targets"]
    assert targets["parity_final_rel_diff"] == parity["final_rel_diff"]
    assert targets["functions_ok"] == {"digits": True, "resume": True, "torchrun": True, "cuda_paths": True}
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == targets


def test_a_part_names_its_sections_in_order(tmp_path):
    """--sections part1: the sections of the first 6-minute command, in order (a zero budget skips each, which the
    summary records); an unknown name is one line naming the parts and sections."""
    import gpu_check

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out),
                           "--sections", "part1", "--budget_s", "0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sections = json.loads((out / "summary.json").read_text())["sections"]
    assert list(sections) == list(gpu_check.PARTS["part1"]) == ["machine", "profile", "throughput", "batch_sweep",
                                                                "efficient", "sampling_compile"]
    assert all("skipped" in s for s in sections.values())
    bad = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(tmp_path / "b"),
                          "--sections", "part9"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "part1, part2" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
