"""``bench/gpu_check.py --bf16-latents`` does what it says: the sampler carries the trajectory in bfloat16
(float32 without the flag), on the CPU smoke setup."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

from solace.sampling.sampler import sample

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--tiny", "--iters", "1", "--group-size", "2", "--steps", "2", "--probes", "2", "--train-batch", "2"]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("flag,dtype", [([], "torch.float32"), (["--bf16-latents"], "torch.bfloat16")])
def test_bf16_latents_flag_sets_the_trajectory_dtype(capsys, flag, dtype):
    mod = _gpu_check()
    assert mod.latent_dtype(mod.parse_args(ARGS + flag)) == getattr(torch, dtype.split(".")[1])
    assert mod.main(ARGS + flag) == 0
    out = capsys.readouterr().out
    assert f"latents {dtype}" in out  # the recipe line
    assert f"trajectory latents {dtype}" in out  # what the sampler actually returned
    # and it matters: bf16 step log-probs are no longer the training pass's float32 ones (ratio != 1)
    ratio_dev = float(re.search(r"max\|ratio-1\| (\S+),", out).group(1))
    assert (ratio_dev > 1e-3) if flag else (ratio_dev == 0.0)


def test_sampler_carries_latents_in_the_asked_dtype():
    class Linear:
        dtype = torch.float32

        def velocity(self, z, t, cond):
            return -z

    from solace.models.base import Conditioning

    cond = Conditioning({"x": torch.zeros(2, 1)})
    sig = torch.tensor([1.0, 0.5, 0.0])
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    lo = sample(Linear(), cond, None, sig, noise, 1.0, 0.7, generator=gen, latent_dtype=torch.bfloat16)
    hi = sample(Linear(), cond, None, sig, noise, 1.0, 0.7, generator=torch.Generator().manual_seed(1))
    assert lo.latents.dtype == torch.bfloat16 and hi.latents.dtype == torch.float32
    assert lo.log_probs.dtype == torch.float32
    assert not torch.equal(lo.final.float(), hi.final)  # bf16 rounding is visible
    torch.testing.assert_close(lo.final.float(), hi.final, rtol=0, atol=0.05)
