"""The classic latent-space tools of small VAE codebases: sample.py manifold (a 2-D latent decoded at the prior's
quantiles), train.py --track_latents (posterior means per evaluation, latents.gif) and --outdir (samples and
reconstructions as an image folder with a manifest)."""
from __future__ import annotations

import csv
import shutil
from statistics import NormalDist

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import sampling
import train
from conftest import tiny_cli_args
from runlog import LatentTrajectory, read_metrics
from utils import UserError

CVAE_2D = {"model": "cvae", "zdim": 2, "conv_width": 8, "width": 16}


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    """A tiny digits cvae with a 2-D latent, trained for 6 steps with --track_latents 12: evaluations at steps 3
    (valid) and 6 (test)."""
    run_dir = tmp_path_factory.mktemp("cvae2d") / "run"
    train.main(tiny_cli_args(run_dir, track_latents=12, **CVAE_2D))
    return run_dir


def test_manifold_noise_is_the_priors_quantiles_in_plot_order():
    n = 5
    noise = sampling.manifold_noise(n).view(n, n, 2)  # rows of the picture, columns, (z1, z2)
    inv_cdf = NormalDist().inv_cdf  # an independent inverse normal CDF (Python's statistics module)
    expected = torch.tensor([inv_cdf((i + 0.5) / n) for i in range(n)])
    for r in range(n):
        assert torch.allclose(noise[r, :, 0], expected.float(), atol=1e-6)  # z1 rises left to right
        assert torch.allclose(noise[r, :, 1], expected[n - 1 - r].float().expand(n), atol=1e-6)  # z2 falls downwards
    assert noise[0, 0].tolist() == pytest.approx([inv_cdf(0.1), inv_cdf(0.9)], abs=1e-6)  # the extreme quantiles
    assert noise[-1, -1].tolist() == pytest.approx([inv_cdf(0.9), inv_cdf(0.1)], abs=1e-6)
    # each cell holds an equal share of the prior's mass: the CDF of the grid's values is evenly spaced
    cdf = torch.special.ndtr(noise[0, :, 0].double())
    assert torch.allclose(cdf.diff(), torch.full((n - 1,), 1.0 / n, dtype=torch.float64), atol=1e-6)


def test_manifold_decodes_the_grid_latents_in_order(cvae_run, tmp_path):
    args = sampling.build_parser().parse_args(["manifold", "--weights", str(cvae_run), "--class", "3", "--n", "4",
                                               "--out", str(tmp_path / "m.png")])
    session = sampling.Session(args)
    seen = []
    handle = session.model.decoder.register_forward_hook(lambda m, a, out: seen.append(a[0].detach().clone()))
    try:
        message = sampling.run_manifold(session)
    finally:
        handle.remove()
    assert "4x4" in message and (tmp_path / "m.png").is_file()
    assert len(seen) == 16  # --draws 16: the grid decoded once per pixel draw averaged into each cell
    for z in seen:  # the cvae's prior is N(0, I): the decoded latents are the grid itself
        assert torch.equal(z.cpu(), sampling.manifold_noise(4))
    # one draw is one decoding with pixel noise shared by the cells; the mean of 16 is smoother (less total variation)
    noise, labels = [sampling.manifold_noise(4)], session.labels(3, 16)
    one = sampling.mean_decoding(session, noise, labels, draws=1)
    assert torch.equal(one, session.decode(noise, labels))
    mean = sampling.mean_decoding(session, noise, labels, draws=16)
    assert mean.float().diff(dim=-1).abs().mean() < one.float().diff(dim=-1).abs().mean()
    width, height = Image.open(tmp_path / "m.png").size
    assert width >= 4 * 34 and height >= 4 * 34  # 8x8 digits drawn 4x larger, 2 pixels apart, axis labels around


def test_the_vlae_manifold_maps_the_grid_through_its_flow(tmp_path):
    run_dir = tmp_path / "vlae"
    train.main(tiny_cli_args(run_dir, max_steps=1, **{**CVAE_2D, "model": "vlae", "made_hidden": 16}))
    args = sampling.build_parser().parse_args(["manifold", "--weights", str(run_dir), "--class", "2", "--n", "3",
                                               "--draws", "1", "--out", str(tmp_path / "m.png")])
    session = sampling.Session(args)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the flow starts as the identity: give it weights, as longer training would
        for p in session.model.prior.made.layer3.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    seen = []
    handle = session.model.decoder.register_forward_hook(lambda m, a, out: seen.append(a[0].detach().clone()))
    try:
        sampling.run_manifold(session)
    finally:
        handle.remove()
    grid, y = sampling.manifold_noise(3), torch.nn.functional.one_hot(session.labels(2, 9), 10).float()
    z = seen[0]
    assert not torch.allclose(z, grid, atol=1e-3)  # the flow moved the grid ...
    eps, _ = session.model.prior(z, y)  # ... and its forward map takes the decoded latents back onto it
    assert torch.allclose(eps, grid, atol=1e-5)


def test_manifold_without_a_class_writes_a_picture_per_class(cvae_run, tmp_path):
    sample.main(["manifold", "--weights", str(cvae_run), "--n", "3", "--out", str(tmp_path / "m.png")])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"m_{c}.png" for c in range(10))
    assert Image.open(tmp_path / "m_0.png").tobytes() != Image.open(tmp_path / "m_1.png").tobytes()


def test_manifold_and_tracking_need_a_2d_latent(trained_run, tmp_path):
    run_dir, _ = trained_run  # the tiny vdvae: five latent groups
    with pytest.raises(UserError, match="manifold needs a 2-dimensional latent.*vdvae model and it has 5 latent"):
        sample.main(["manifold", "--weights", str(run_dir), "--out", str(tmp_path / "m.png")])
    with pytest.raises(UserError, match="--track_latents needs a 2-dimensional latent.*latent has 4 dimensions"):
        train.main(tiny_cli_args(tmp_path / "run", track_latents=8, **{**CVAE_2D, "zdim": 4}))
    assert not (tmp_path / "run").exists()  # refused before any folder was written
    assert not (tmp_path / "m.png").exists()


def test_track_latents_writes_a_frame_per_evaluation(cvae_run):
    records = read_metrics(cvae_run)
    evals = [r["step"] for r in records if r["kind"] == "eval"]
    latents = [r for r in records if r["kind"] == "latents"]
    assert evals == [3, 6] and [r["step"] for r in latents] == evals
    assert Image.open(cvae_run / "latents.gif").n_frames == len(evals)
    for record in latents:
        assert np.asarray(record["means"]).shape == (12, 2) and np.isfinite(record["means"]).all()
        assert len(record["labels"]) == 12 and record["images"] == latents[0]["images"]  # the same images each time
    assert latents[0]["means"] != latents[1]["means"]  # the encoder moved between evaluations


def test_a_resumed_run_keeps_its_earlier_frames(cvae_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(cvae_run, run_dir)
    train.main(tiny_cli_args(run_dir, track_latents=12, max_steps=9, restore="latest", **CVAE_2D))
    steps = [r["step"] for r in read_metrics(run_dir) if r["kind"] == "latents"]
    assert steps == [3, 6, 9] and Image.open(run_dir / "latents.gif").n_frames == 3


def test_a_resumed_trajectory_replaces_the_frames_it_trains_again(tmp_path):
    def record(step: int, shift: float) -> dict:
        return {"step": step, "split": "test", "labels": [0, 1], "means": [[shift, 0.0], [0.0, -shift]]}

    trajectory = LatentTrajectory(tmp_path / "l.gif", ["a", "b"], [record(2, 1.0), record(4, 2.0), record(6, 2.5)])
    trajectory.add(record(4, 0.5))  # resumed from the step-2 checkpoint: steps 4 and 6 were never saved
    assert sorted(trajectory.records) == [2, 4] and trajectory.records[4]["means"][0][0] == 0.5
    assert Image.open(tmp_path / "l.gif").n_frames == 2
    trajectory.add(record(6, 7.2))  # a mean beyond +-3: wider axes, shared by every frame
    assert trajectory.bound() == 8.0 and Image.open(tmp_path / "l.gif").n_frames == 3
    unlabelled = LatentTrajectory(tmp_path / "u.gif", [])  # a dataset without class names: one colour, still drawn
    unlabelled.add(record(1, 1.0))
    frame = np.asarray(Image.open(tmp_path / "u.gif").convert("RGB")).astype(int)
    assert ((frame[..., 2] - frame[..., 0]) > 80).any()  # blue points on the white plot


def read_folder(root) -> tuple[list[dict], list[np.ndarray]]:
    with open(root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, [np.asarray(Image.open(root / row["file"])) for row in rows]


def test_grid_outdir_writes_n_files_per_class_with_the_grids_pixels(trained_run, tmp_path):
    run_dir, _ = trained_run
    common = ["--weights", str(run_dir), "--classes", "3,7", "--n", "3", "--seed", "4"]
    sample.main(["grid", *common, "--out", str(tmp_path / "grid.npz")])
    sample.main(["grid", *common, "--outdir", str(tmp_path / "folder")])
    rows, pictures = read_folder(tmp_path / "folder")
    assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == ["3", "7", "manifest.csv"]
    assert [len(list((tmp_path / "folder" / c).glob("*.png"))) for c in ("3", "7")] == [3, 3]
    assert [r["file"] for r in rows[:3]] == ["3/00001.png", "3/00002.png", "3/00003.png"]
    assert [r["class"] for r in rows] == ["3"] * 3 + ["7"] * 3 and {r["seed"] for r in rows} == {"4"}
    grid = np.load(tmp_path / "grid.npz")
    assert np.array_equal(np.stack(pictures), grid["images"][..., 0])  # grayscale PNGs: the same uint8 pixels
    assert [int(r["label"]) for r in rows] == grid["labels"].tolist()
    with pytest.raises(UserError, match="already exists and is not an empty folder"):
        sample.main(["grid", *common, "--outdir", str(tmp_path / "folder")])  # never over earlier samples
    # a folder has no picture-size limit: 2,100 samples in a row would be a PNG 71,400 pixels across
    sample.main(["grid", "--weights", str(run_dir), "--classes", "5", "--n", "2100", "--outdir", str(tmp_path / "many")])
    assert len(list((tmp_path / "many" / "5").glob("*.png"))) == 2100


def test_recon_outdir_writes_each_images_reconstruction_under_its_class(trained_run, tmp_path):
    run_dir, _ = trained_run
    sample.main(["recon", "--weights", str(run_dir), "--images", "5,0,9", "--outdir", str(tmp_path / "r"), "--k", "5"])
    rows, pictures = read_folder(tmp_path / "r")
    args = sampling.build_parser().parse_args(["recon", "--weights", str(run_dir)])
    session = sampling.Session(args)
    images, labels, _ = session.pick(session.held_out(), [5, 0, 9], 0)
    torch.manual_seed(0)  # the default seed
    expected = session.model.reconstruct(images, labels, n_posterior=5)
    assert [int(r["image"]) for r in rows] == [5, 0, 9] and [int(r["label"]) for r in rows] == labels.tolist()
    assert all(r["file"].startswith(f"{r['class']}/") and r["k"] == "5" for r in rows)
    assert np.array_equal(np.stack(pictures), expected[:, 0].numpy())
    with pytest.raises(UserError, match="give one --k"):
        sample.main(["recon", "--weights", str(run_dir), "--outdir", str(tmp_path / "s"), "--k", "1,5"])
