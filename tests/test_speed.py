"""The speed switches change how the maths runs, never what it computes: recomputation, memory format,
autocast, the device-side skip and torch.compile, all on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_cli_args, tiny_hps
from trainer import Trainer
from vae import VAE


def _loss_and_grads(**overrides):
    # runs of several blocks at one resolution, so recomputed segments span more than one block
    h = tiny_hps(enc_blocks="8x3,8d2,4x2,4d4,1x2", dec_blocks="1x2,4m1,4x3,8m4,8x3", **overrides)
    torch.manual_seed(1)
    model = VAE(h)
    with torch.no_grad():  # move the zero-initialised heads off zero so every path carries gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    if overrides.get("channels_last") == "on":
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(6) % 10
    torch.manual_seed(2)
    out = model(images, labels)
    out["loss_nats"].backward()
    return out["loss_nats"].detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["gelu", "blocks"])
def test_recomputation_gives_the_same_loss_and_gradients(mode):
    loss, grads = _loss_and_grads(grad_checkpoint="none")
    loss_r, grads_r = _loss_and_grads(grad_checkpoint=mode)
    assert grads.abs().max() > 0
    torch.testing.assert_close(loss_r, loss)
    torch.testing.assert_close(grads_r, grads, rtol=1e-5, atol=1e-7)


def test_channels_last_gives_the_same_loss_and_gradients():
    loss, grads = _loss_and_grads(grad_checkpoint="none")
    loss_cl, grads_cl = _loss_and_grads(grad_checkpoint="gelu", channels_last="on")
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads_cl, grads, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_keeps_likelihood_and_kl_in_fp32_and_close():
    h = tiny_hps()
    torch.manual_seed(0)
    model = VAE(h)
    images = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    labels = torch.arange(8)
    torch.manual_seed(3)
    ref = model(images, labels)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, labels)
    assert out["loss"].dtype == torch.float32 and out["kl_groups"].dtype == torch.float32
    assert abs(out["loss"].item() / ref["loss"].item() - 1) < 0.01


def _trainer(**overrides) -> Trainer:
    torch.manual_seed(0)
    return Trainer(tiny_hps(**overrides), torch.device("cpu"))


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=gen), torch.arange(8) % 10


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_step_learns_and_a_bad_step_is_skipped_on_the_device(precision):
    trainer = _trainer(precision=precision, skip_threshold=1e6, ema_rate=0.5, warmup_iters=0)
    images, labels = _batch()
    skip, stats = trainer.step(images, labels)
    assert not skip.item() and torch.isfinite(stats).all()
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 1

    before = [p.detach().clone() for p in trainer.model.parameters()]
    ema_before = [p.detach().clone() for p in trainer.ema.parameters()]
    trainer.H.skip_threshold = 1e-9  # every gradient norm now reaches the threshold
    skip, _ = trainer.step(images, labels)
    assert skip.item()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 1  # Adam's clock did not move
    # a skipped update leaves the EMA too (as openai/vdvae does; issue 39): only the schedule advances
    assert all(torch.equal(a, b) for a, b in zip(ema_before, trainer.ema.parameters()))


def test_non_finite_loss_is_skipped():
    trainer = _trainer()
    images, labels = _batch()
    with torch.no_grad():
        trainer.model.decoder.gain.fill_(float("nan"))
    state = [p.detach().clone() for p in trainer.model.parameters()]
    skip, stats = trainer.step(images, labels)
    assert skip.item() and not torch.isfinite(stats[0])
    for a, b in zip(state, trainer.model.parameters()):
        assert torch.equal(a.nan_to_num(), b.detach().nan_to_num())


def test_compiled_training_saves_plain_weights(tmp_path):
    """torch.compile through inductor's C++ back end on the CPU; the checkpoint has no compiled prefixes."""
    import train

    run = tmp_path / "run"
    train.main(tiny_cli_args(run, max_steps=2, eval_every=0, compile="true", enc_blocks="8x1,8d8,1x1",
                             dec_blocks="1x1,8m1"))
    ckpt = torch.load(run / "latest.pt", weights_only=True)
    assert ckpt["hps"]["compile"] == "on" and ckpt["step"] == 2
    assert not any("_orig_mod" in key for key in ckpt["model"])
    model = VAE(tiny_hps(enc_blocks="8x1,8d8,1x1", dec_blocks="1x1,8m1"))
    model.load_state_dict(ckpt["model"])
    # what was compiled lies beside the checkpoint, and a resumed process hands it to torch.compile first
    assert (run / "compile_cache.bin").stat().st_size > 0
    train.main(tiny_cli_args(run, max_steps=3, eval_every=0, compile="on", enc_blocks="8x1,8d8,1x1",
                             dec_blocks="1x1,8m1", restore="latest"))
    log = (run / "log.txt").read_text()
    assert f"compile cache {run / 'compile_cache.bin'} loaded" in log and "compile default mode" in log
    assert torch.load(run / "latest.pt", weights_only=True)["step"] == 3


def test_throughput_bench_prints_every_mode_and_a_json_line():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "throughput.py"), "--hps", "digits", "--n_batch", "8",
                           "--quick", "--modes", "eager_fp32,default,checkpoint_blocks", "--compile", "off"],
                          capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["modes"]) == {"eager_fp32", "default", "checkpoint_blocks"}
    for figures in summary["modes"].values():
        assert figures["train_img_s"] > 0 and figures["sample_img_s"] > 0 and figures["peak_mem_mb"] > 0
        assert figures["ops_per_step"] > 100  # the profiler's leaf operator calls of one step
    assert summary["best_mode"] in summary["modes"] and summary["speedup_train"] > 0
    assert summary["device"]["cpu"] and "flags" in summary["device"] and summary["default_speedup_train"] > 0
    saver = summary["memory_saver"]["mode"]  # the fastest mode at most 0.6x eager_fp32's peak memory, if any
    assert saver is None or summary["modes"][saver]["peak_mem_mb"] <= 0.6 * summary["modes"]["eager_fp32"]["peak_mem_mb"]


def test_auto_precision_wants_native_bf16_on_a_gpu(monkeypatch):
    """V100 and T4 only emulate bf16: torch counts emulation unless asked not to, and there auto means fp16."""
    from utils import resolve_precision

    def bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation or native
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    cuda = torch.device("cuda", 0)
    for native, expected in [(False, torch.float16), (True, torch.bfloat16)]:
        assert resolve_precision("auto", cuda) == expected
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", cuda) == torch.bfloat16


def test_adam_moments_take_their_parameters_layout_after_a_resume():
    """A checkpoint written with contiguous moments (CPU) resumed channels-last (CUDA's default), and the reverse:
    load_state_dict keeps the saved strides, which CUDA's fused AdamW refuses; restore_run gives each moment its
    parameter's layout (the CPU kernel tolerates the mismatch, so the layouts are checked directly)."""
    from trainer import reshape_optimizer_state_like_parameters

    for saved_layout, resumed_layout in [("off", "on"), ("on", "off")]:
        torch.manual_seed(0)
        saver = Trainer(tiny_hps(channels_last=saved_layout), torch.device("cpu"))
        saver.step(torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8), torch.arange(16) % 10)
        resumed = Trainer(tiny_hps(channels_last=resumed_layout), torch.device("cpu"))
        resumed.optimizer.load_state_dict(saver.optimizer.state_dict())
        four_d = [p for p in resumed.model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert any(resumed.optimizer.state[p]["exp_avg"].stride() != p.stride() for p in four_d)  # the bug's setup
        reshape_optimizer_state_like_parameters(resumed.optimizer)
        for p in resumed.model.parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                moment = resumed.optimizer.state[p][key]
                assert moment.stride() == p.stride() and moment.dtype == p.dtype
        saved = {k: v["exp_avg"] for k, v in saver.optimizer.state_dict()["state"].items()}
        for index, p in enumerate(resumed.optimizer.param_groups[0]["params"]):
            assert torch.equal(resumed.optimizer.state[p]["exp_avg"], saved[index])  # same values, new layout


def test_compiled_accumulation_passes_share_one_graph(monkeypatch):
    """--compile with --grad_accum: the pass index reaches the noise draw as a tensor, so passes 2..4 run what the
    first pass compiled (with the index as a Python int on the modules, each pass compiled its own graphs)."""
    from torch._dynamo.testing import CompileCounter

    import trainer as trainer_module

    counter = CompileCounter()
    real_compile = torch.compile
    monkeypatch.setattr(trainer_module.torch, "compile", lambda module, **options: real_compile(
        module, **{k: v for k, v in options.items() if k != "mode"}, backend=counter))
    torch._dynamo.reset()
    torch.manual_seed(0)
    trainer = Trainer(tiny_hps(n_batch=4, grad_accum=4, compile="on"), torch.device("cpu"))
    images, labels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.arange(4) % 10
    counts = []
    for index in range(4):
        trainer._forward(images, labels, (index, 4))
        counts.append(counter.frame_count)
    torch._dynamo.reset()
    assert counts[0] >= 1 and counts == [counts[0]] * 4, counts


# ---- auto speed settings (speed.py): decided by measuring, cached, explicit flags first ----------------------


def _auto_hps(**overrides):
    return tiny_hps(precision="auto", channels_last="auto", grad_checkpoint="auto", **overrides)


def _fake_measure(seconds: dict, losses: dict | None = None, calls: list | None = None, compiled_factor: float = 1.0):
    """A timer stand-in: seconds per step (and fixed-batch loss) by (precision, channels_last, grad_checkpoint),
    times ``compiled_factor`` for a compiled candidate (recorded in ``compiled`` calls apart)."""
    def measure(H, device, settings):
        key = (settings["precision"], settings["channels_last"], settings["grad_checkpoint"])
        compiled = settings.get("compile") == "on"
        if calls is not None:
            calls.append((*key, "compiled") if compiled else key)
        return seconds.get(key, 1.0) * (compiled_factor if compiled else 1.0), (losses or {}).get(key, 5.0)
    return measure


def test_auto_picks_the_fastest_measured_setting_and_a_low_precision_only_when_accurate(tmp_path, monkeypatch):
    import speed

    monkeypatch.setattr(speed, "low_precision", lambda device: "bf16")
    cpu = torch.device("cpu")
    seconds = {("fp32", "on", "none"): 0.5, ("bf16", "off", "none"): 0.3, ("fp32", "off", "gelu"): 0.9}
    calls = []
    choice = speed.choose_speed_settings(_auto_hps(), cpu, 1e6, log=lambda m: None,
                                         cache_path=tmp_path / "a.json", measure=_fake_measure(seconds, calls=calls))
    assert choice == {"precision": "bf16", "channels_last": "off", "grad_checkpoint": "none", "compile": "off"}
    # 2 precisions x 2 layouts x (none, gelu): the tiny model fits without recomputing; then the winner compiled
    # (a million steps repay a compile), no faster here
    assert len(calls) == 9 and calls[-1] == ("bf16", "off", "none", "compiled")
    calls = [c for c in calls if "compiled" not in c]
    # the same timings, but bf16 moves the fixed batch's loss by 2%: the fastest fp32 setting instead
    losses = {k: 5.0 for k in calls} | {("bf16", "off", "none"): 5.1}
    choice = speed.choose_speed_settings(_auto_hps(), cpu, 1e6, log=lambda m: None,
                                         cache_path=tmp_path / "b.json", measure=_fake_measure(seconds, losses))
    assert choice == {"precision": "fp32", "channels_last": "on", "grad_checkpoint": "none", "compile": "off"}


def test_auto_compile_is_timed_for_runs_long_enough_to_repay_it(tmp_path):
    """--compile auto: the fastest eager settings timed compiled, kept when faster, and only when the probe's share
    of the run covers a cold compile (speed.COMPILE_COST_S); --compile on or off is never timed."""
    import speed

    cpu = torch.device("cpu")
    fixed = dict(precision="fp32", channels_last="off", grad_checkpoint="none")
    for factor, expected in ((0.5, "on"), (1.5, "off")):
        calls = []
        choice = speed.choose_speed_settings(tiny_hps(**fixed), cpu, 1e6, log=lambda m: None,
                                             cache_path=tmp_path / f"{factor}.json",
                                             measure=_fake_measure({}, calls=calls, compiled_factor=factor))
        assert choice == {**fixed, "compile": expected}
        assert calls == [("fp32", "off", "none"), ("fp32", "off", "none", "compiled")]
    # the digits preset's length: 0.05 x 2,500 steps x 0.15 s is far below a compile's cost, so it is not tried
    calls = []
    choice = speed.choose_speed_settings(tiny_hps(**fixed), cpu, 2500, log=lambda m: None,
                                         cache_path=tmp_path / "short.json",
                                         measure=_fake_measure({("fp32", "off", "none"): 0.15}, calls=calls,
                                                               compiled_factor=0.1))
    assert choice["compile"] == "off" and calls == [("fp32", "off", "none")]
    for explicit in ("on", "off"):
        calls = []
        choice = speed.choose_speed_settings(tiny_hps(**fixed, compile=explicit), cpu, 1e6,
                                             cache_path=tmp_path / "x.json", measure=_fake_measure({}, calls=calls))
        assert choice == {**fixed, "compile": explicit} and calls == []


def test_explicit_speed_flags_win_over_auto(tmp_path):
    import speed

    calls = []
    measure = _fake_measure({("fp32", "off", "gelu"): 0.1}, calls=calls)
    fixed = tiny_hps(precision="fp32", channels_last="on", grad_checkpoint="blocks", compile="off")
    assert speed.choose_speed_settings(fixed, torch.device("cpu"), 1e6, cache_path=tmp_path / "c.json",
                                       measure=measure) == {"precision": "fp32", "channels_last": "on",
                                                            "grad_checkpoint": "blocks", "compile": "off"}
    assert calls == []  # nothing left to decide: no probe
    partly = tiny_hps(precision="fp32", channels_last="auto", grad_checkpoint="gelu", compile="off")
    choice = speed.choose_speed_settings(partly, torch.device("cpu"), 1e6, log=lambda m: None,
                                         cache_path=tmp_path / "c.json", measure=measure)
    assert sorted(calls) == [("fp32", "off", "gelu"), ("fp32", "on", "gelu")]  # only the auto field varies
    assert choice == {"precision": "fp32", "channels_last": "off", "grad_checkpoint": "gelu", "compile": "off"}


def test_the_cache_spares_the_probe_until_torch_or_the_model_changes(tmp_path, monkeypatch):
    import speed

    cache, calls, log = tmp_path / "speed.json", [], []
    measure = _fake_measure({}, calls=calls)

    def choose(h):
        return speed.choose_speed_settings(h, torch.device("cpu"), 1e6, log=log.append, cache_path=cache,
                                           measure=measure)
    first = choose(_auto_hps())
    probes = len(calls)
    assert probes > 0 and cache.is_file()
    assert choose(_auto_hps()) == first and len(calls) == probes and "from the cache" in log[-1]
    choose(_auto_hps(n_batch=32))  # another batch: measured again
    assert len(calls) == 2 * probes
    choose(_auto_hps(width=24))  # another model shape
    assert len(calls) == 3 * probes
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch
    choose(_auto_hps())
    assert len(calls) == 4 * probes
    assert len(json.loads(cache.read_text())) == 4


def test_short_runs_use_the_rule_and_memory_decides_the_recomputation(tmp_path):
    import speed

    calls, log = [], []
    choice = speed.choose_speed_settings(_auto_hps(), torch.device("cpu"), 20, log=log.append,
                                         cache_path=tmp_path / "d.json", measure=_fake_measure({}, calls=calls))
    assert calls == [] and "by rule" in log[-1] and choice["grad_checkpoint"] == "none"
    # activation memory, measured on the meta device: recomputing GELUs saves memory, recomputing blocks more
    h = _auto_hps()
    none, gelu, blocks = (speed.activation_bytes_per_image(h, m) for m in ("none", "gelu", "blocks"))
    assert none > gelu > blocks > 0
    # a budget that holds the state and the GELU-recomputing activations but not all of them
    state = speed.parameter_count(h) * speed.STATE_BYTES_PER_PARAMETER
    budget = (state + h.n_batch * (gelu + none) / 2) / speed.MEMORY_HEADROOM
    fitting, _ = speed.fitting_checkpoint_modes(_auto_hps(memory_budget=budget / 2**30), torch.device("cpu"))
    assert fitting == ["gelu", "blocks"]
    fitting, _ = speed.fitting_checkpoint_modes(_auto_hps(memory_budget=1e-9), torch.device("cpu"))
    assert fitting == ["blocks"]  # nothing fits: the least memory there is


def test_the_probe_leaves_the_runs_random_stream_alone(tmp_path):
    """The real probe seeds and trains candidates; the run that asked must draw its initialisation from its own
    stream, so that the same command gives the same model whether the probe ran or its cache answered."""
    import speed

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    # eager candidates only (a compiled one is timed the same way, minutes of CPU later)
    choice = speed.choose_speed_settings(_auto_hps(compile="off"), torch.device("cpu"), 1e6, log=lambda m: None,
                                         cache_path=tmp_path / "c.json")
    assert set(choice) == {*speed.SPEED_FIELDS, "compile"}
    assert torch.equal(torch.rand(3), expected)


def test_a_resume_keeps_the_checkpoints_speed_settings_unless_the_command_line_sets_one(tmp_path, monkeypatch):
    """After a wiped speed cache (or on another node) a resumed run does not probe again and switch precision,
    layout, recomputation or compilation half-way: it keeps its checkpoint's, and says so in the log."""
    import train

    run = tmp_path / "run"
    chosen = dict(precision="bf16", channels_last="on", grad_checkpoint="gelu", compile="off")
    train.main(tiny_cli_args(run, max_steps=2, eval_every=0, **chosen))
    cache = tmp_path / "empty-cache" / "speed.json"
    monkeypatch.setenv("VDVAE_SPEED_CACHE", str(cache))
    train.main(tiny_cli_args(run, max_steps=3, eval_every=0, restore="latest"))  # the preset's auto everywhere
    saved = torch.load(run / "latest.pt", weights_only=True)
    assert saved["step"] == 3 and {k: saved["hps"][k] for k in chosen} == chosen
    assert saved["device_type"] == "cpu" and not cache.exists()  # nothing was probed
    log = (run / "log.txt").read_text()
    assert ("resumed with the checkpoint's speed settings: precision bf16, channels_last on, grad_checkpoint gelu, "
            "compile off") in log
    train.main(tiny_cli_args(run, max_steps=4, eval_every=0, restore="latest", precision="fp32"))
    saved = torch.load(run / "latest.pt", weights_only=True)["hps"]
    assert saved["precision"] == "fp32" and saved["channels_last"] == "on" and saved["grad_checkpoint"] == "gelu"
