"""Compiled sampling on the CPU (sample.py grid --compile, sampling.CompiledSampler): under the same seed it draws
the images eager sampling draws, batch by batch, a short last batch padded to the fixed one; new temperatures and
guidance scales compile nothing; a family without compiled regions is one line. CUDA graphs (reduce-overhead) and
the speed are the GPU check's to measure (bench/gpu_check.py, section sampling_compile)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import sampling
import vae
from conftest import ROOT, tiny_hps
from models import build_model
from sampling import compile_pays, sample_batched
from utils import UserError

N, N_BATCH = 7, 3  # three batches: 3, 3 and a last one of 1, padded to 3
# fp32 decoder features of eager and compiled sampling differ by float rounding alone: inductor fuses each block's
# pointwise operations (GELUs, residual adds, the prior's exp) into loops of its own, which round in another order
# (measured: at most 1e-6 on features of magnitude 4). Pixels and latents draw from the same random stream
FEATURE_TOLERANCE = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    """A tiny conditional digits vdvae (blocks at resolutions 1, 4 and 8: three compiled graphs), its weights moved
    off their zero initialisation so that every block's prior depends on the state above it."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = build_model(tiny_hps()).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    yield m
    torch._dynamo.reset()


def draw(model, compile: str, temperature, guidance: float, features: list) -> torch.Tensor:
    """N images for classes 0..6 under seed 1, recording the decoder features their pixels are drawn from."""
    original = vae.OutputNet.sample

    def recording(self, px_z, shared_noise=False):
        features.append(px_z[:self.draw_rows].clone() if self.draw_rows is not None else px_z.clone())
        return original(self, px_z, shared_noise)
    vae.OutputNet.sample = recording
    try:
        torch.manual_seed(1)
        return sample_batched(model, N, torch.arange(N), temperature, N_BATCH, None, guidance, compile=compile)
    finally:
        vae.OutputNet.sample = original


@pytest.mark.parametrize("temperature, guidance", [(1.0, 0.0), (0.7, 0.0), ("per_group", 0.0), (0.8, 2.0)])
def test_compiled_samples_equal_eager_samples_under_the_same_seed(model, temperature, guidance):
    """Every index of the three batches (the last one padded) is the image eager sampling draws: the latent noise
    and the pixel draws come from the same random stream, and the decoder features agree to float rounding."""
    if temperature == "per_group":
        temperature = [0.5 + 0.1 * i for i in range(model.n_groups)]
    eager_features, compiled_features = [], []
    eager = draw(model, "off", temperature, guidance, eager_features)
    compiled = draw(model, "on", temperature, guidance, compiled_features)
    assert eager.shape == compiled.shape == (N, 1, 8, 8) and eager.dtype == torch.uint8
    assert len(eager_features) == len(compiled_features) == 3  # batches of 3, 3 and 1 (padded to 3 compiled)
    for a, b in zip(eager_features, compiled_features):
        torch.testing.assert_close(b, a, **FEATURE_TOLERANCE)
    assert torch.equal(compiled, eager)
    assert len(set(map(bytes, eager.flatten(1).numpy()))) == N  # seven different images, not one repeated


def test_one_graph_per_block_shape_whatever_the_temperature_or_guidance(model):
    """After the first request, new temperatures, per-group temperatures and guidance scales (a tensor to the
    graphs), short requests that fill one batch and padded last batches compile nothing more."""
    draw(model, "on", 1.0, 0.0, [])
    draw(model, "on", 0.9, 1.0, [])  # the guided pass is a graph of its own: twice the rows, the guided prior
    graphs = counters["stats"]["unique_graphs"]
    for temperature, guidance in ((0.6, 0.0), ([0.9] * model.n_groups, 0.0), (1.3, 0.5), (0.7, 3.0)):
        draw(model, "on", temperature, guidance, [])
    assert counters["stats"]["unique_graphs"] == graphs


def test_the_callers_model_stays_eager(model):
    """The graphs belong to a compiled copy: the model the session holds still runs its blocks eager."""
    draw(model, "on", 1.0, 0.0, [])
    twin = sampling.compiled_for_sampling(model, torch.device("cpu"))
    assert twin is not model and all(getattr(b, "_compiled_call_impl", None) is None
                                     for b in model.decoder.dec_blocks)
    assert all(b._compiled_call_impl is not None for b in twin.decoder.dec_blocks)
    assert model.decoder.out_net.draw_rows is None and twin.decoder.out_net.draw_rows is None


def test_a_family_without_compiled_regions_is_one_line():
    """--compile on for the cvae (compiled whole in training, never by region) is refused; auto samples it eager."""
    cvae = build_model(tiny_hps(model="cvae", conv_width=8)).eval()
    with pytest.raises(UserError, match="cvae family has no repeated regions"):
        sample_batched(cvae, 2, torch.arange(2), 1.0, 2, None, compile="on")
    torch.manual_seed(0)
    assert sample_batched(cvae, 2, torch.arange(2), 1.0, 2, None, compile="auto").shape == (2, 1, 8, 8)


def test_auto_compiles_only_on_cuda_and_only_for_a_long_request():
    """--compile auto: never on the CPU; on CUDA only when the batches left would take longer eager than a cold
    compile is expected to cost (speed.COMPILE_COST_S). Compiling is lazy, so the decision runs on the CPU."""
    from speed import COMPILE_COST_S

    m = build_model(tiny_hps()).eval()
    cost = COMPILE_COST_S["cuda"]
    assert not compile_pays(m, torch.device("cpu"), batch_s=cost, batches_left=100)
    assert not compile_pays(m, torch.device("cuda"), batch_s=1.0, batches_left=int(cost) - 1)
    assert not compile_pays(m, torch.device("cuda"), batch_s=cost, batches_left=0)
    assert compile_pays(m, torch.device("cuda"), batch_s=1.0, batches_left=int(cost) + 1)
    cvae = build_model(tiny_hps(model="cvae", conv_width=8)).eval()
    assert not compile_pays(cvae, torch.device("cuda"), batch_s=1.0, batches_left=int(cost) + 1)


def test_a_bad_compile_value_is_one_line():
    """An unknown --compile value: one line and exit status 2, before any weights are read."""
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "grid", "--compile", "always"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "--compile" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
