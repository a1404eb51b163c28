"""Numeric precision (``solace/trainer/precision.py``): bf16 autocast through accelerate, fp16 refused in one
line wherever it is asked for, TF32 on CUDA only.

The on-policy bound: the first update's PPO ratio compares the log-probs the sampler stored with the ones
the update recomputes for the same weights. Under the same autocast both come from the same bf16
arithmetic, differing at most where a kernel rounds differently for another batch size (sampling batches
16 rows with CFG, the update 8); measured on this CPU: exactly 1 (fp32: 1 +- 2.4e-7). The bound 1e-3 (the
fp32 test's, ``test_trainer.py``) separates that from the fault it guards against, old log-probs computed
without the autocast the update runs under: fp32 samples scored by the bf16 policy give ratios 6.2e-3
from 1 on the same tiny model (checked below as the case that must fail).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from solace.errors import ConfigError
from solace.trainer.config import load_config
from solace.trainer.precision import check_accelerate, launcher_precision, set_tf32
from solace.trainer.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent))
from trainer_helpers import bf16_attention, make_tiny_toy_weights, tiny_overrides  # noqa: E402

RATIO_TOL = 1e-3


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one process-wide state whose precision cannot change once set: start from none and
    leave none behind (the other tests' Trainers set fp32)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield lambda: AcceleratorState._reset_state(reset_partial_state=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def _cli(args: list[str], env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from solace.cli.main import app

    res = CliRunner().invoke(app, args, env=env)
    return res.exit_code, [ln for ln in res.output.splitlines() if ln.strip()]


def test_fp16_is_refused_in_one_line_from_the_config_and_from_accelerate(tmp_path):
    code, lines = _cli(["train", "--config", "toy", "train.mixed_precision=fp16"])
    assert code == 2 and len(lines) == 1, lines
    assert (
        lines[0].startswith("error: train.mixed_precision: fp16 needs a loss scaler")
        and "use bf16" in lines[0]
    )
    # accelerate launch --mixed_precision fp16 (or its config file): refused before the model loads
    out = tmp_path / "run"
    code, lines = _cli(
        ["train", "--config", "toy", f"train.output_dir={out}"], {"ACCELERATE_MIXED_PRECISION": "fp16"}
    )
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: accelerate config mixed_precision: accelerate launch")
    assert "--mixed_precision no" in lines[0] and "train.mixed_precision=bf16" in lines[0]
    assert not out.exists()
    assert load_config("toy", ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"


def test_accelerate_precision_must_agree_with_the_config():
    assert launcher_precision({}) is None and launcher_precision({"ACCELERATE_MIXED_PRECISION": "no"}) is None
    assert launcher_precision({"ACCELERATE_MIXED_PRECISION": "BF16"}) == "bf16"
    check_accelerate("fp32", None, "x")  # nothing asked for
    check_accelerate("bf16", "bf16", "x")
    check_accelerate("fp32", "no", "x")  # accelerate spells fp32 "no"
    with pytest.raises(ConfigError, match=r"^accelerate config mixed_precision: x says bf16 .* "
                       r"set train.mixed_precision=bf16 or launch with --mixed_precision no"):  # fmt: skip
        check_accelerate("fp32", "bf16", "x")
    with pytest.raises(ConfigError, match=r"x says no but train.mixed_precision is bf16"):
        check_accelerate("bf16", "no", "x")  # an Accelerator built without autocast
    with pytest.raises(ConfigError, match=r"x says fp8 .*: launch with --mixed_precision no"):
        check_accelerate("fp32", "fp8", "x")


def test_tf32_is_set_on_cuda_only():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        set_tf32(True, "cpu")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        set_tf32(True, "cuda")
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        set_tf32(False, "cuda")
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    assert load_config("toy").train.tf32 and not load_config("toy", ["train.tf32=false"]).train.tf32


def test_bf16_autocast_keeps_the_first_update_on_policy_and_the_weights_float32(tmp_path, fresh_accelerate):
    with bf16_attention():  # the math attention where the simulated kernel set refuses bf16 flash attention
        _bf16_first_update_on_policy(tmp_path, fresh_accelerate)


def _bf16_first_update_on_policy(tmp_path, fresh_accelerate) -> None:
    weights = make_tiny_toy_weights(tmp_path / "tiny.safetensors")

    def trainer(precision: str, name: str) -> Trainer:
        fresh_accelerate()
        over = tiny_overrides(weights, tmp_path / name, **{"train.mixed_precision": precision})
        return Trainer(load_config("toy", over))

    fp32 = trainer("fp32", "a")
    ro32 = fp32.collect(0)
    bf16 = trainer("bf16", "b")
    assert bf16.acc.mixed_precision == "bf16"
    ro = bf16.collect(0)
    assert ro.latents.dtype == ro.log_probs.dtype == torch.float32
    assert (ro.latents[:, -1] - ro32.latents[:, -1]).abs().max() > 1e-3  # the autocast took effect
    stats = bf16.update(ro, 0)
    assert abs(stats["train/ratio_min"] - 1) <= RATIO_TOL and abs(stats["train/ratio_max"] - 1) <= RATIO_TOL
    assert stats["train/grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in bf16.params)  # fp32 LoRA ...
    moments = [
        v for s in bf16.ctx.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim
    ]
    assert moments and all(v.dtype == torch.float32 for v in moments)  # ... and fp32 AdamW state
    # must fail: log-probs sampled without the autocast the update runs under
    off = trainer("bf16", "c").update(ro32, 0)
    assert max(abs(off["train/ratio_min"] - 1), abs(off["train/ratio_max"] - 1)) > RATIO_TOL
