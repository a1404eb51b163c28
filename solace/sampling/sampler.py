"""Flow-GRPO's sampler: CFG velocity, SDE (or ODE) steps, and the per-step log-probs GRPO needs."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch

from solace.errors import check
from solace.models.base import Conditioning, FlowModelAdapter
from solace.sampling.sde import SDEStep, euler_step, sde_step
from solace.utils import interrupt


@dataclass
class Trajectory:
    """One batch of sampled trajectories.

    latents: (B, T+1, *latent): the states z at ``sigmas[0..T]`` (``latents[:, -1]`` is the clean sample).
    log_probs: (B, T): log-prob of each step under the sampling policy (0 for deterministic ODE steps).
    sigmas: (T+1,) the schedule used.
    sde_mask: (T,) bool, which steps were stochastic.
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sigmas: torch.Tensor
    sde_mask: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        return self.latents[:, -1]


def cfg_velocity(
    adapter: FlowModelAdapter,
    z: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    null_cond: Conditioning | None,
    cfg_scale: float,
    detach_uncond: bool = False,
) -> torch.Tensor:
    """Classifier-free guidance ``v = v(z, t, null) + s (v(z, t, c) - v(z, t, null))`` in one batched
    forward (two forwards for an adapter whose ``cfg_in_two_passes`` is set, as its pipeline computes it);
    ``cfg_scale == 1`` (or no ``null_cond``) is the plain conditional velocity.

    ``detach_uncond``: the unconditional branch enters as a constant, so a gradient flows through the
    conditional one only, ``s dv(c)`` instead of ``(1 - s) dv(null) + s dv(c)``; the value is the same
    (Flow-GRPO's training forward, yifan123/flow_grpo ``scripts/train_sd3.py`` ``compute_log_prob``; the
    released SOLACE code and the paper keep the gradient).

    The model runs in ``adapter.dtype`` (e.g. bf16); the returned velocity is float32, like ``z``, so that the
    SDE step and its log-prob are computed in float32 (bf16 log-probs are far too coarse for PPO ratios).
    """
    zin = z.to(adapter.dtype)
    if cfg_scale == 1.0 or null_cond is None:
        return adapter.velocity(zin, t, cond).float()
    if adapter.cfg_in_two_passes:  # as the adapter's pipeline does (FLUX's true CFG)
        v_c = adapter.velocity(zin, t, cond).float()
        v_u = adapter.velocity(zin, t, null_cond).float()
    else:
        zz = torch.cat([zin, zin])
        tt = torch.cat([t, t])
        v_u, v_c = adapter.velocity(zz, tt, Conditioning.cat([null_cond, cond])).float().chunk(2)
    if detach_uncond:
        v_u = v_u.detach()
    return v_u + cfg_scale * (v_c - v_u)


def step_policy(
    adapter: FlowModelAdapter,
    z: torch.Tensor,
    z_next: torch.Tensor,
    sigmas: torch.Tensor,
    step: int,
    cond: Conditioning,
    null_cond: Conditioning | None,
    cfg_scale: float,
    noise_level: float,
    detach_uncond: bool = False,
) -> SDEStep:
    """Re-evaluate one stored SDE step under the current policy: returns its log-prob, mean and std.

    Used by the training pass (with gradients) and for the LoRA-off reference (under no_grad).
    ``detach_uncond``: no gradient through CFG's unconditional branch (:func:`cfg_velocity`)."""
    B = z.shape[0]
    t = sigmas[step].expand(B).to(z.device)
    v = cfg_velocity(adapter, z, t, cond, null_cond, cfg_scale, detach_uncond)
    return sde_step(
        z,
        v,
        sigmas[step],
        sigmas[step + 1],
        noise_level=noise_level,
        sigma_max=float(sigmas[1]),
        next_sample=z_next,
    )


@torch.no_grad()
def sample(
    adapter: FlowModelAdapter,
    cond: Conditioning,
    null_cond: Conditioning | None,
    sigmas: torch.Tensor,
    init_noise: torch.Tensor,
    cfg_scale: float = 7.0,
    noise_level: float = 0.7,
    sde_steps: Collection[int] | None = None,
    generator: torch.Generator | None = None,
    keep_trajectory: bool = True,
    step_noise: torch.Tensor | None = None,
    latent_dtype: torch.dtype = torch.float32,
) -> Trajectory:
    """Sample a batch with Flow-GRPO's SDE sampler (``noise_level > 0``) or the Euler ODE (``0``).

    Args:
        cond, null_cond: conditioning for each of the B samples (null: the empty prompt, for CFG).
        sigmas: (T+1,) schedule from 1 to 0 (``adapter.sigmas(T)``).
        init_noise: (B, *latent) initial noise z_1.
        sde_steps: indices of steps that are stochastic (default: all); the others are Euler ODE steps.
        generator: drives the SDE noise, for reproducible trajectories.
        keep_trajectory: keep every intermediate latent (training needs them); otherwise only z_1 and z_0.
        step_noise: (B, T, *latent) the SDE noise of every sample and step, instead of drawing it from
            ``generator``; makes each sample's trajectory independent of how samples are batched (the
            trainer draws it per sample, so 1 and N processes produce the same samples).
        latent_dtype: the dtype the latents, velocities and SDE steps are carried in. float32 (default,
            whatever the model's dtype) everywhere in solace, the trainer included; bfloat16 is there to
            measure what low-precision trajectories do to the PPO ratio.
    """
    check(sigmas.ndim == 1 and sigmas.numel() >= 2, "sigmas", "must be a 1-D schedule with T+1 >= 2 entries")
    check(noise_level >= 0, "noise_level", f"must be >= 0, got {noise_level}")
    check(len(cond) == init_noise.shape[0], "cond", f"has {len(cond)} rows for {init_noise.shape[0]} samples")
    T = sigmas.numel() - 1
    mask = torch.zeros(T, dtype=torch.bool)
    for i in range(T) if sde_steps is None else sde_steps:
        check(0 <= i < T, "sde_steps", f"step {i} outside 0..{T - 1}")
        mask[i] = True
    if noise_level == 0:
        mask[:] = False
    z = init_noise.to(latent_dtype)  # float32 by default, whatever the model's dtype
    B = z.shape[0]
    states = [z]
    log_probs = torch.zeros(B, T, device=z.device)
    sigma_max = float(sigmas[1])
    for i in range(T):
        interrupt.check()  # a requested stop ends stoppable sampling between steps
        t = sigmas[i].expand(B).to(z.device)
        v = cfg_velocity(adapter, z, t, cond, null_cond, cfg_scale).to(latent_dtype)
        if mask[i]:
            if step_noise is not None:
                noise = step_noise[:, i]
            else:
                noise = torch.randn(
                    z.shape,
                    generator=generator,
                    dtype=torch.float32,
                    device=generator.device if generator is not None else z.device,
                )
            st = sde_step(
                z,
                v,
                sigmas[i],
                sigmas[i + 1],
                noise_level,
                sigma_max,
                noise=noise.to(z.device, latent_dtype),
            )
            z, log_probs[:, i] = st.next, st.log_prob.float()
        else:
            z = euler_step(z, v, sigmas[i], sigmas[i + 1])
        if keep_trajectory or i == T - 1:
            states.append(z)
    return Trajectory(torch.stack(states, 1), log_probs, sigmas, mask)
