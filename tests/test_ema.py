"""The EMA of the weights: it moves only with a taken update (a skipped one leaves weights, optimiser state and EMA
as they were, as openai/vdvae does), and its decay warms up so that a short run's EMA holds no share of the initial
weights worth speaking of."""
from __future__ import annotations

import copy

import torch

from conftest import tiny_hps
from trainer import EMA_WARMUP, Trainer, ema_decay


def batch(H, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, H.image_channels, H.image_size, H.image_size), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


def snapshot(trainer: Trainer) -> dict:
    return {"model": copy.deepcopy(trainer.model.state_dict()), "ema": copy.deepcopy(trainer.ema.state_dict()),
            "optimizer": copy.deepcopy(trainer.optimizer.state_dict()["state"])}


def assert_same(a, b) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif torch.is_tensor(a):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_a_skipped_update_leaves_weights_optimiser_state_and_ema_unchanged():
    for optimizer in ("adamw", "adamax"):
        trainer = Trainer(tiny_hps(optimizer=optimizer, skip_threshold=1e6, ema_rate=0.9, warmup_iters=0),
                          torch.device("cpu"))
        start = snapshot(trainer)
        skip, _ = trainer.step(*batch(trainer.H, trainer.H.n_batch))  # a taken update first: weights, moments and
        assert not skip  # EMA move from their start
        before = snapshot(trainer)
        for key in ("model", "ema"):
            assert any(not torch.equal(before[key][k], start[key][k]) for k in start[key])
        trainer.H.skip_threshold = 1e-6  # every gradient norm now reaches the threshold
        skip, _ = trainer.step(*batch(trainer.H, trainer.H.n_batch, seed=1))
        assert skip
        assert_same(snapshot(trainer), before)
        assert trainer.scheduler.last_epoch == 2  # the schedule advances either way


def test_the_decay_warms_up_to_the_rate():
    assert ema_decay(0.999, 0) == 1 / EMA_WARMUP
    assert ema_decay(0.999, 90) == 91 / (EMA_WARMUP + 90)
    assert ema_decay(0.999, 10**6) == 0.999
    assert all(ema_decay(0.9999, t) <= ema_decay(0.9999, t + 1) for t in range(0, 200_000, 997))


def test_the_first_update_moves_the_ema_most_of_the_way_to_the_new_weights():
    trainer = Trainer(tiny_hps(ema_rate=0.9999, skip_threshold=-1, warmup_iters=0), torch.device("cpu"))
    start = copy.deepcopy(trainer.model.state_dict())
    trainer.step(*batch(trainer.H, trainer.H.n_batch))
    decay = ema_decay(0.9999, 0)
    assert any(not torch.equal(start[n], p) for n, p in trainer.model.named_parameters())
    for name, p in trainer.model.named_parameters():
        expected = torch.lerp(start[name], p.detach(), 1.0 - decay)
        # torch.lerp takes its second form above weight 0.5: equal to the rounding of a float32 (a few ulps)
        torch.testing.assert_close(trainer.ema.state_dict()[name], expected, rtol=1e-6, atol=1e-7)
        if not torch.equal(start[name], p.detach()):  # a parameter the update moved
            ema = trainer.ema.state_dict()[name]
            assert (ema - p).abs().max() < (ema - start[name]).abs().max()  # nearer the new weights than the old


def test_after_a_short_run_the_ema_holds_a_negligible_share_of_the_initial_weights():
    # the run: 2,217 updates at --ema_rate 0.999 kept 0.999**2217 = 11% of the initial weights
    share = 1.0
    for t in range(2217):
        share *= ema_decay(0.999, t)
    assert 0.999 ** 2217 > 0.10 and share < 1e-6
