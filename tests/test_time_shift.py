"""The scheduler's ``time_shift_type="linear"`` dynamic shift: solace's sigmas equal the scheduler's own
``set_timesteps`` sigmas, for the schedule functions and through the SD3 and FLUX adapters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline
from tiny_pipelines import TINY_RESOLUTION as RES

from solace.errors import ConfigError
from solace.models.flux import FluxAdapter
from solace.models.sd3 import SD3Adapter
from solace.sampling.schedule import dynamic_time_shift, flow_match_sigmas, flux_sigmas

DYNAMIC = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)


def _scheduler(kind: str) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(shift=3.0, time_shift_type=kind, **DYNAMIC)


@pytest.mark.parametrize("num_steps", [1, 10, 40])
@pytest.mark.parametrize("mu", [0.46, 1.15])
def test_linear_shift_sigmas_equal_the_schedulers(num_steps, mu):
    sched = _scheduler("linear")
    sched.set_timesteps(num_steps, mu=mu)  # SD3-style: the scheduler's own timestep grid
    assert torch.equal(flow_match_sigmas(num_steps, mu=mu, time_shift_type="linear"), sched.sigmas)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)  # FluxPipeline-style
    assert torch.equal(flux_sigmas(num_steps, mu, "linear"), sched.sigmas)
    # the exponential form differs: the linear one is not silently replaced by it
    assert (flux_sigmas(num_steps, mu) - sched.sigmas).abs().max() > 1e-3 or num_steps == 1


def test_bad_time_shift_is_a_config_error():
    with pytest.raises(ConfigError, match="time_shift_type"):
        dynamic_time_shift(1.0, np.array([0.5]), "cosine")
    with pytest.raises(ConfigError, match="mu > 0"):
        dynamic_time_shift(0.0, np.array([0.5]), "linear")


def test_adapters_follow_the_linear_time_shift(tiny_sd3_pipe, tiny_flux_pipe):
    sd3_pipe = StableDiffusion3Pipeline(**{**tiny_sd3_pipe.components, "scheduler": _scheduler("linear")})
    a = SD3Adapter(sd3_pipe, resolution=RES)
    flux_pipe = FluxPipeline(**{**tiny_flux_pipe.components, "scheduler": _scheduler("linear")})
    b = FluxAdapter(flux_pipe, resolution=RES)
    for steps in (3, 10):
        mu = 0.5 + (a.image_seq_len() - 256) * (1.15 - 0.5) / (4096 - 256)  # SD3's calculate_shift
        sd3_pipe.scheduler.set_timesteps(steps, mu=mu)
        assert (a.sigmas(steps) - sd3_pipe.scheduler.sigmas).abs().max() <= 1e-7
        flux_pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=b.mu)
        assert (b.sigmas(steps) - flux_pipe.scheduler.sigmas).abs().max() <= 1e-7
