"""The DiffusionNFT update inside the shared trainer, on a tiny toy model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from solace.errors import ConfigError
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from trainer_helpers import make_tiny_toy_weights, tiny_overrides  # noqa: E402

SCRIPT = HERE / "run_tiny_training.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
NFT = {"train.algorithm": "nft", "sampling.noise_level": 0, "train.micro_batch_size": 4}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_toy_weights(tmp_path_factory.mktemp("w") / "tiny_toy.safetensors")


def _lora(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize(
    "reward",
    [
        "[{name: self_confidence, weight: 1.0}]",
        "[{name: toy_geneval, weight: 1.0, kwargs: {mode: dense}}, {name: self_confidence, weight: 0.5}]",
    ],
)
def test_nft_trains_with_any_reward_on_ode_samples(weights, tmp_path, reward):
    """Self-confidence (scored on the clean samples the update trains on) and a mixture plug in unchanged;
    ODE sampling keeps no log-probs; the LoRA moves and every logged value is finite."""
    over = tiny_overrides(weights, tmp_path / "r", **NFT) + [f"reward.components={reward}"]
    tr = Trainer(load_config("toy", over))
    ro = tr.collect(0)
    assert (ro.log_probs == 0).all() and ro.advantages.abs().sum() > 0
    tr.train()
    rows = list(csv.DictReader(open(tmp_path / "r" / "log.csv")))
    for key in ("train/loss", "train/grad_norm", "train/nft_r_mean", "train/nft_fm", "train/ema_decay"):
        assert all(torch.isfinite(torch.tensor(float(r[key]))) for r in rows), key
    assert float(rows[0]["train/grad_norm"]) > 0
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in _lora(tmp_path / "r").items())


def test_the_old_policy_samples_and_moves_by_its_decay(weights, tmp_path):
    """With decay 1 the old policy never moves: after an update the rollouts are still those of the initial
    policy, bitwise. With decay 0 it is the trained policy after each iteration."""
    frozen = Trainer(
        load_config("toy", tiny_overrides(weights, tmp_path / "a", **NFT, **{"nft.ema_decay": 1.0}))
    )
    fresh = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "b", **NFT)))
    frozen.update(frozen.collect(0), 0)
    assert torch.equal(frozen.sample_rollout(1).latents, fresh.sample_rollout(1).latents)
    on = Trainer(load_config("toy", tiny_overrides(weights, tmp_path / "c", **NFT)))
    before = [p.detach().clone() for p in on.params]
    stats = on.update(on.collect(0), 0)
    assert stats["train/ema_decay"] == 0.0
    assert all(torch.equal(o, p) for o, p in zip(on.updater.ema.old, on.params, strict=True))
    assert any(not torch.equal(b, p) for b, p in zip(before, on.params, strict=True))
    assert not torch.equal(on.sample_rollout(1).latents, fresh.sample_rollout(1).latents)


def test_two_process_nft_run_matches_one_process(weights, tmp_path):
    """Timesteps and noises are keyed by the global sample index, so 2 gloo processes train the LoRA that 1
    process trains (up to the order of float sums in the gradient all-reduce). Adam's first steps are
    lr * g / (|g| + eps): with the default eps a gradient entry near 0 turns a rounding difference into a
    difference of order lr, so the comparison takes eps = 1, where the step is smooth in g."""
    extra = [f"{k}={v}" for k, v in NFT.items()] + [
        "train.micro_batch_size=2",
        "optim.eps=1.0",
        "optim.lr=1.0",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(weights), str(one), "train", *extra], check=True, env=ENV
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29521"]
    subprocess.run(
        [*cmd, str(SCRIPT), str(weights), str(two), "train", *extra], check=True, env=ENV, cwd=tmp_path
    )
    a, b = _lora(one), _lora(two)
    assert a.keys() == b.keys()
    moved = max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k)
    assert moved > 1e-4
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)  # measured: at most 4e-8


@pytest.mark.parametrize(
    "override,field",
    [
        (["sampling.noise_level=0"], "sampling.noise_level"),  # Flow-GRPO needs SDE log-probs
        (["train.algorithm=nft", "nft.timesteps_per_sample=11"], "nft.timesteps_per_sample"),
        (["train.algorithm=nft", "nft.beta=0"], "nft.beta"),
        (["train.algorithm=nft", "nft.ema_decay=1.5"], "nft.ema_decay"),
        (["train.algorithm=nft", "nft.t_min=0.9", "nft.t_max=0.5"], "nft.t_min"),
        (["train.algorithm=ppo"], "train.algorithm"),
    ],
)
def test_update_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("toy", override)
