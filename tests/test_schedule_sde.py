"""Sigma schedules, Flow-GRPO's SDE step and the sampler, checked against diffusers and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
from mathcheck import assert_close

from solace.errors import ConfigError
from solace.models.base import AdapterBase, Conditioning, FlowModelAdapter
from solace.sampling.sampler import cfg_velocity, sample, step_policy
from solace.sampling.schedule import flow_match_sigmas, flux_mu, flux_sigmas
from solace.sampling.sde import euler_step, gaussian_log_prob, sde_std, sde_step

# --------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("shift", [3.0, 1.0])
@pytest.mark.parametrize("num_steps", [10, 40])
def test_flow_match_sigmas_equal_diffusers(shift, num_steps):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    ours = flow_match_sigmas(num_steps, shift=shift)
    assert ours.dtype == torch.float32
    assert ours.shape == (num_steps + 1,)
    assert torch.equal(ours, sched.sigmas)
    assert ours[0] == 1.0 and ours[-1] == 0.0


@pytest.mark.parametrize("num_steps", [10, 40])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_flux_sigmas_equal_diffusers_dynamic_shifting(num_steps, seq_len):
    mu = flux_mu(seq_len)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)
    ours = flux_sigmas(num_steps, mu)
    assert ours.shape == (num_steps + 1,)
    assert torch.equal(ours, sched.sigmas)


@pytest.mark.parametrize("num_steps", [10, 40])
def test_flow_match_sigmas_with_mu_equal_diffusers(num_steps):
    mu = flux_mu(1024)
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sched.set_timesteps(num_steps, mu=mu)
    assert torch.equal(flow_match_sigmas(num_steps, mu=mu), sched.sigmas)


def test_flux_mu_is_linear_in_seq_len():
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)  # midpoint


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: flow_match_sigmas(0), "num_steps"),
        (lambda: flow_match_sigmas(10, shift=0.0), "shift"),
        (lambda: flux_sigmas(0, 1.0), "num_steps"),
    ],
)
def test_schedule_errors_name_the_field(call, field):
    with pytest.raises(ConfigError) as exc:
        call()
    assert exc.value.field == field
    assert field in str(exc.value)


# -------------------------------------------------------------------------------------------- SDE step


def _step_inputs(B=3, shape=(2, 4, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, *shape, generator=g)
    v = torch.randn(B, *shape, generator=g)
    noise = torch.randn(B, *shape, generator=g)
    return z, v, noise


@pytest.mark.parametrize(("t", "t_next"), [(1.0, 0.9), (0.7, 0.55), (0.2, 0.0)])
def test_sde_step_with_zero_noise_is_euler_step(t, t_next):
    z, v, noise = _step_inputs()
    st = sde_step(z, v, t, t_next, noise_level=0.0, sigma_max=0.9, noise=noise)
    euler = euler_step(z, v, t, t_next)
    assert_close(st.next, euler, rtol=0, atol=1e-6)
    assert_close(euler, z + v * (t_next - t))
    assert torch.equal(st.log_prob, torch.zeros(3))


def test_sde_step_mean_matches_flow_grpo_formula():
    z, v, noise = _step_inputs()
    a, t, tn = 0.7, 0.6, 0.45
    st = sde_step(z, v, t, tn, noise_level=a, noise=noise)
    std = a * math.sqrt(t / (1 - t))
    dt = tn - t
    mean = z * (1 + std**2 / (2 * t) * dt) + v * (1 + std**2 * (1 - t) / (2 * t)) * dt
    assert_close(st.std, torch.tensor(std))
    assert_close(st.mean, mean)
    assert_close(st.next, mean + std * math.sqrt(-dt) * noise)


@pytest.mark.parametrize("per_sample_t", [False, True])
def test_sde_log_prob_equals_torch_normal(per_sample_t):
    z, v, noise = _step_inputs()
    a = 0.7
    if per_sample_t:
        t, tn = torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.8, 0.45, 0.1])
    else:
        t, tn = torch.tensor(0.5), torch.tensor(0.4)
    st = sde_step(z, v, t, tn, noise_level=a, noise=noise)
    tb, tnb = t.reshape(-1, 1, 1, 1), tn.reshape(-1, 1, 1, 1)
    std = a * torch.sqrt(tb / (1 - tb))
    ref = (
        torch.distributions.Normal(st.mean, std * torch.sqrt(tb - tnb)).log_prob(st.next).mean(dim=(1, 2, 3))
    )
    assert st.log_prob.shape == (3,)
    assert_close(st.log_prob, ref, rtol=1e-5, atol=1e-5)


def test_log_prob_of_given_next_sample_equals_sampled_one():
    z, v, noise = _step_inputs()
    sampled = sde_step(z, v, 0.8, 0.7, noise_level=0.7, noise=noise)
    again = sde_step(z, v, 0.8, 0.7, noise_level=0.7, next_sample=sampled.next)
    assert torch.equal(again.next, sampled.next)
    assert_close(again.log_prob, sampled.log_prob, rtol=0, atol=1e-6)


def test_log_prob_gradient_flows_through_the_mean_only():
    z, v, noise = _step_inputs()
    v = v.clone().requires_grad_(True)
    nxt = sde_step(z, v.detach(), 0.8, 0.7, noise=noise).next.requires_grad_(True)
    st = sde_step(z, v, 0.8, 0.7, next_sample=nxt)
    st.log_prob.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert nxt.grad is None  # next_sample is detached in the log-prob, as in Flow-GRPO


def test_gaussian_log_prob_matches_normal_and_handles_flat_latents():
    g = torch.Generator().manual_seed(1)
    x, m = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    s = torch.rand(4, 5, generator=g) + 0.1
    ref = torch.distributions.Normal(m, s).log_prob(x).mean(1)
    assert_close(gaussian_log_prob(x, m, s), ref)
    # one number per sample: the result stays per sample (B,), not a batch mean
    lp = gaussian_log_prob(x[:, 0], m[:, 0], s[:, 0])
    assert lp.shape == (4,)
    assert_close(lp, torch.distributions.Normal(m[:, 0], s[:, 0]).log_prob(x[:, 0]))


def test_sde_std_guard_at_t_equal_one():
    t = torch.tensor([1.0, 0.5])
    std = sde_std(t, 0.7, 0.9)
    assert torch.isfinite(std).all()
    assert_close(std, torch.tensor([0.7 * math.sqrt(1 / (1 - 0.9)), 0.7]))
    # the step from t = 1 uses sigma_max (default: t_next) and is finite
    z, v, noise = _step_inputs()
    st = sde_step(z, v, 1.0, 0.9, noise_level=0.7, noise=noise)
    assert (
        torch.isfinite(st.std).all() and torch.isfinite(st.next).all() and torch.isfinite(st.log_prob).all()
    )
    assert_close(st.std, torch.tensor(0.7 * math.sqrt(10.0)))


# Gaussian toy: data x0 ~ N(0, s0^2) per element, so z_t ~ N(0, var(t)) and the exact velocity is linear.
S0 = 0.5


def _toy_var(t):
    return (1 - t) ** 2 * S0**2 + t**2


def _toy_velocity(z, t):
    return z * (t - (1 - t) * S0**2) / _toy_var(t)


@pytest.mark.parametrize("t", [0.9, 0.5, 0.2])
def test_sde_step_preserves_gaussian_marginal_locally(t):
    """One step from the exact marginal N(0, var(t)) lands on var(t_next) up to O(dt^2) (a wrong drift or
    diffusion term would be off at O(dt)); computed exactly since the step is affine in z."""
    for h in (1e-2, 1e-3):
        tt, tn = torch.tensor(t, dtype=torch.float64), torch.tensor(t - h, dtype=torch.float64)
        one = torch.ones(1, 1, dtype=torch.float64)
        st = sde_step(one, _toy_velocity(one, tt), tt, tn, noise_level=0.7, noise=torch.zeros_like(one))
        var_next = st.mean.item() ** 2 * _toy_var(t) + st.std.item() ** 2 * h
        assert abs(var_next / _toy_var(t - h) - 1) < 20 * h**2


def test_sde_sampling_reaches_the_data_marginal_statistically():
    g = torch.Generator().manual_seed(0)
    sig = torch.linspace(1, 0, 51, dtype=torch.float64)
    z = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    for i in range(50):
        z = sde_step(z, _toy_velocity(z, sig[i]), sig[i], sig[i + 1], 0.7, float(sig[1]), generator=g).next
    assert abs(z.mean().item()) < 0.02
    assert abs(z.var().item() / S0**2 - 1) < 0.05


# --------------------------------------------------------------------------------------------- sampler

LATENT = (2, 3, 3)


class LinearAdapter(AdapterBase):
    """A fake adapter whose velocity is the analytic linear field ``v = -(1 + t) z / 2 + t * c``."""

    name = "linear-fake"
    lora_target_modules: list[str] = []

    def __init__(self, dtype=torch.float32):
        self.denoiser = torch.nn.Identity()
        self._dtype = dtype
        self.batch_sizes: list[int] = []

    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return self._dtype

    def latent_shape(self):
        return LATENT

    def encode_prompts(self, prompts):
        return Conditioning({"emb": torch.tensor([[float(len(p))] for p in prompts])})

    def velocity(self, latents, t, cond):
        self.batch_sizes.append(latents.shape[0])
        c = cond.tensors["emb"].to(latents.dtype).reshape(-1, 1, 1, 1)
        tb = t.to(latents.dtype).reshape(-1, 1, 1, 1)
        return -0.5 * (1 + tb) * latents + tb * c

    def decode(self, latents):
        raise NotImplementedError

    def encode_images(self, images):
        raise NotImplementedError

    def sigmas(self, num_steps):
        return flow_match_sigmas(num_steps, 3.0)


def _manual_cfg_velocity(z, t, c, scale):
    # v_u uses c = 0, so v_u + s (v_c - v_u) = -(1 + t) z / 2 + s t c
    return -0.5 * (1 + t) * z + scale * t * c.reshape(-1, 1, 1, 1)


def _conds(B=3):
    cond = Conditioning({"emb": torch.arange(1.0, B + 1).reshape(B, 1)})
    null = Conditioning({"emb": torch.zeros(B, 1)})
    return cond, null


def test_fake_adapter_satisfies_the_protocol():
    assert isinstance(LinearAdapter(), FlowModelAdapter)


@pytest.mark.parametrize("scale", [1.0, 4.5])
def test_cfg_velocity(scale):
    adapter = LinearAdapter()
    cond, null = _conds()
    z = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 0.6)
    v = cfg_velocity(adapter, z, t, cond, null, scale)
    assert_close(v, _manual_cfg_velocity(z, 0.6, cond.tensors["emb"], scale))
    # one forward: B rows without guidance, 2B rows (null + cond batched) with it
    assert adapter.batch_sizes == ([3] if scale == 1.0 else [6])


def test_ode_sampling_equals_hand_written_euler_loop():
    adapter = LinearAdapter()
    cond, null = _conds()
    sigmas = adapter.sigmas(8)
    z1 = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(0))
    traj = sample(adapter, cond, null, sigmas, z1, cfg_scale=4.5, noise_level=0.0)
    z = z1.clone()
    for i in range(8):
        t, tn = float(sigmas[i]), float(sigmas[i + 1])
        z = z + _manual_cfg_velocity(z, t, cond.tensors["emb"], 4.5) * (tn - t)
    assert traj.latents.shape == (3, 9, *LATENT)
    assert_close(traj.final, z, rtol=0, atol=1e-6)
    assert torch.equal(traj.log_probs, torch.zeros(3, 8))
    assert not traj.sde_mask.any()


def test_step_policy_log_prob_equals_sampled_log_prob():
    adapter = LinearAdapter()
    cond, null = _conds()
    sigmas = adapter.sigmas(6)
    z1 = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(0))
    traj = sample(
        adapter,
        cond,
        null,
        sigmas,
        z1,
        cfg_scale=4.5,
        noise_level=0.7,
        sde_steps=[0, 2, 3, 5],
        generator=torch.Generator().manual_seed(1),
    )
    assert traj.sde_mask.tolist() == [True, False, True, True, False, True]
    assert torch.equal(traj.log_probs[:, [1, 4]], torch.zeros(3, 2))
    for i in (0, 2, 3, 5):
        st = step_policy(adapter, traj.latents[:, i], traj.latents[:, i + 1], sigmas, i, cond, null, 4.5, 0.7)
        assert torch.isfinite(st.log_prob).all()
        assert_close(st.log_prob, traj.log_probs[:, i], rtol=0, atol=1e-5)
    # the ODE steps are plain Euler steps
    v = _manual_cfg_velocity(traj.latents[:, 1], float(sigmas[1]), cond.tensors["emb"], 4.5)
    assert_close(traj.latents[:, 2], traj.latents[:, 1] + v * float(sigmas[2] - sigmas[1]))


def test_sampling_is_reproducible_and_keep_trajectory_false_keeps_ends():
    adapter = LinearAdapter()
    cond, null = _conds()
    sigmas = adapter.sigmas(4)
    z1 = torch.randn(3, *LATENT, generator=torch.Generator().manual_seed(0))
    a = sample(adapter, cond, null, sigmas, z1, generator=torch.Generator().manual_seed(5))
    b = sample(
        adapter, cond, null, sigmas, z1, generator=torch.Generator().manual_seed(5), keep_trajectory=False
    )
    assert b.latents.shape == (3, 2, *LATENT)
    assert torch.equal(a.final, b.final)
    assert torch.equal(a.log_probs, b.log_probs)
    assert torch.equal(a.latents[:, 0], z1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sde_steps": [4]}, "sde_steps"),
        ({"noise_level": -0.1}, "noise_level"),
        ({"sigmas": torch.ones(1)}, "sigmas"),
    ],
)
def test_sample_errors_name_the_field(kwargs, field):
    adapter = LinearAdapter()
    cond, null = _conds()
    args = {"sigmas": adapter.sigmas(4), **kwargs}
    with pytest.raises(ConfigError) as exc:
        sample(adapter, cond, null, init_noise=torch.zeros(3, *LATENT), **args)
    assert exc.value.field == field
