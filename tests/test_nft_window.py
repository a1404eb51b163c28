"""``nft.window``: DiffusionNFT trains only where Flow-GRPO does (the last ceil(rho |T|) reverse steps): the
window's sigmas in ``grid`` mode, the t range they cover in ``uniform`` mode; hand-computed cases, the
draws of a real update, the config's refusals, and the default (off) drawing outside the window."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from solace.errors import ConfigError
from solace.grpo.window import train_window, window_sigmas, window_t_range
from solace.nft.loss import sample_training_timesteps, unshift
from solace.sampling.schedule import flow_match_sigmas
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer
from solace.trainer.updates import nft_timestep_domain

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

SIG10 = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])  # 10 steps, no shift


def test_window_sigmas_and_t_range_by_hand():
    steps = train_window(10, 0.6)
    assert steps == [4, 5, 6, 7, 8, 9]
    assert torch.equal(window_sigmas(SIG10, steps), torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1]))
    assert window_t_range(SIG10, steps) == (0.0, pytest.approx(0.6))
    assert window_t_range(SIG10, [1, 2]) == (pytest.approx(0.7), pytest.approx(0.9))  # an early window
    with pytest.raises(ConfigError, match="contiguous"):
        window_t_range(SIG10, [1, 3])
    with pytest.raises(ConfigError, match="must lie in"):
        window_sigmas(SIG10, [10])


def test_unshift_inverts_the_resolution_shift():
    assert unshift(0.6, 3.0) == pytest.approx(1 / 3)  # 0.6 / (3 - 2 * 0.6)
    for s in (0.5, 1.0, 3.0):
        for u in (0.0, 0.2, 0.7, 1.0):
            t = s * u / (1 + (s - 1) * u)
            assert unshift(t, s) == pytest.approx(u)


class _Nft:
    def __init__(self, window, timesteps, shift=1.0, t_min=0.0, t_max=1.0):
        self.window, self.timesteps, self.shift, self.t_min, self.t_max = (
            window,
            timesteps,
            shift,
            t_min,
            t_max,
        )


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_draws_stay_in_the_window_and_leave_it_when_off(shift):
    sig = flow_match_sigmas(10, shift)
    steps = train_window(10, 0.6)
    top = float(sig[steps[0]])
    g = torch.Generator().manual_seed(0)
    grid, (lo, hi) = nft_timestep_domain(_Nft(True, "grid"), sig, steps)
    t = sample_training_timesteps(2000, "grid", g, sigmas=grid, per_sample=2)
    assert set(t.flatten().tolist()) == set(sig[steps].tolist())  # every window sigma, nothing else
    grid, (lo, hi) = nft_timestep_domain(_Nft(True, "uniform", shift), sig, steps)
    t = sample_training_timesteps(2000, "uniform", g, shift=shift, t_min=lo, t_max=hi)
    assert float(t.max()) < top + 1e-6 and float(t.max()) > 0.9 * top and float(t.min()) < 0.05 * top
    # off (DiffusionNFT's default): the same draws reach the noisier steps
    grid, (lo, hi) = nft_timestep_domain(_Nft(False, "grid"), sig, steps)
    assert float(sample_training_timesteps(2000, "grid", g, sigmas=grid).max()) == 1.0
    grid, (lo, hi) = nft_timestep_domain(_Nft(False, "uniform", shift), sig, steps)
    assert float(sample_training_timesteps(2000, "uniform", g, shift=shift, t_min=lo, t_max=hi).max()) > top


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


NFT = {"train.algorithm": "nft", "sampling.noise_level": 0, "train.micro_batch_size": 4}


@pytest.mark.parametrize("window", [True, False])
def test_the_update_trains_at_the_window_sigmas_only(weights, tmp_path, window):
    over = tiny_overrides(
        weights, tmp_path / "r", **NFT, **{"nft.window": window, "nft.timesteps_per_sample": 1}
    )
    tr = Trainer(load_config("toy", over))
    ro = tr.collect(0)
    steps = tr.ctx.window
    allowed = set(tr.ctx.sigmas[steps].tolist())
    seen = set()
    for epoch in range(8):
        seen |= set(tr.updater.micro_batch(ro, torch.arange(len(ro)), 0, epoch)["t"].flatten().tolist())
    if window:
        assert all(min(abs(s - a) for a in allowed) < 1e-6 for s in seen)
    else:
        assert any(min(abs(s - a) for a in allowed) > 1e-6 for s in seen)  # a noisier step is drawn


@pytest.mark.parametrize(
    "override,field",
    [
        (["nft.window=true", "nft.timesteps=uniform", "nft.t_max=0.6"], "nft.window"),
        (["nft.window=true", "nft.timesteps=uniform", "grpo.train_steps=1,3"], "nft.window"),
        (["nft.window=true", "nft.timesteps_per_sample=7"], "nft.timesteps_per_sample"),  # window: 6 steps
    ],
)
def test_window_config_refusals_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("toy", ["train.algorithm=nft", "sampling.noise_level=0", *override])


def test_window_config_accepts_what_fits():
    load_config("toy", ["train.algorithm=nft", "sampling.noise_level=0", "nft.window=true"])
    load_config(
        "toy", ["train.algorithm=nft", "sampling.noise_level=0", "nft.window=true", "grpo.train_steps=1,3"]
    )
    load_config("toy", ["train.algorithm=nft", "sampling.noise_level=0", "nft.timesteps_per_sample=7"])  # off
