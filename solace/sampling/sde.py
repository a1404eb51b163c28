"""One reverse step of Flow-GRPO's SDE sampler, with the Gaussian log-probability of the step.

Flow-GRPO (Liu et al., 2025, Eq. 9-10; SOLACE paper Eq. 3-4) turns the probability-flow ODE
``dz = v dt`` into the SDE with the same marginals

    dz = [v + sigma_t^2 / (2 t) * (z + (1 - t) v)] dt + sigma_t dW,   sigma_t = a * sqrt(t / (1 - t)),

and discretises it with Euler-Maruyama. Each step is Gaussian, ``z_next ~ N(mean, (sigma_t sqrt|dt|)^2 I)``,
so the policy's log-probability of a sampled step is exact and cheap; that is what GRPO's ratio uses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SDEStep(NamedTuple):
    next: torch.Tensor  # z_{t_next}
    log_prob: torch.Tensor  # (B,) mean over non-batch dims of log N(next; mean, std_step^2)
    mean: torch.Tensor  # the step's Gaussian mean
    std: torch.Tensor  # sigma_t = a * sqrt(t / (1 - t)) (per-unit-time std; the step std is std * sqrt(-dt))


def _bcast(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if x.ndim == 0:
        return x
    return x.reshape(-1, *([1] * (like.ndim - 1)))


def sde_std(t: torch.Tensor, noise_level: float, sigma_max: float | torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's ``sigma_t = a * sqrt(t / (1 - t))`` (Eq. 3); at ``t = 1`` the denominator uses
    ``1 - sigma_max`` (the schedule's second sigma) instead of 0, exactly as Flow-GRPO's sampler."""
    t = torch.as_tensor(t)
    sigma_max = torch.as_tensor(sigma_max, dtype=t.dtype, device=t.device)
    denom = 1 - torch.where(t == 1, sigma_max, t)
    return noise_level * torch.sqrt(t / denom)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std_step: torch.Tensor) -> torch.Tensor:
    """``log N(x; mean, std_step^2)`` per element, reduced by the mean over every non-batch dimension."""
    lp = -((x - mean) ** 2) / (2 * std_step**2) - torch.log(std_step) - 0.5 * math.log(2 * math.pi)
    # reshape, not mean(dim=()): for (B,) inputs torch's mean over an empty dim tuple reduces *every* dim
    return lp.reshape(lp.shape[0], -1).mean(1)


def euler_step(
    z: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, t_next: torch.Tensor | float
) -> torch.Tensor:
    """Euler step of the probability-flow ODE ``z_next = z + v (t_next - t)`` (paper Eq. 2)."""
    return z + v * (_bcast(t_next, z) - _bcast(t, z))


def sde_step(
    z: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor | float,
    t_next: torch.Tensor | float,
    noise_level: float = 0.7,
    sigma_max: float | torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    next_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Flow-GRPO's ``sde`` step (Eq. 4 of the SOLACE paper / Eq. 10 of Flow-GRPO) with its log-prob.

    mean = z (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt,  dt = t_next - t < 0,
    next = mean + sigma_t sqrt(-dt) eps.

    Args:
        z, v: current latent and the (CFG) velocity at ``(z, t)``.
        t, t_next: current and next sigma (scalars or per-sample tensors of shape (B,)).
        noise_level: ``a`` in sigma_t. ``0`` gives the deterministic Euler ODE step; the log-prob of a
            deterministic step is undefined and returned as zeros.
        sigma_max: the guard used at t = 1 (Flow-GRPO passes the schedule's ``sigmas[1]``); defaults to
            ``t_next``.
        noise: the Gaussian noise ``eps`` to use (drawn with ``generator`` when omitted).
        next_sample: evaluate the log-prob of this given ``z_next`` instead of sampling one (the training
            pass recomputes log-probs of stored trajectories this way).

    Returns:
        :class:`SDEStep` ``(next, log_prob, mean, std)``; ``log_prob`` is the mean over non-batch dims.
    """
    tb, tnb = _bcast(t, z), _bcast(t_next, z)
    dt = tnb - tb
    if sigma_max is None:
        sigma_max = tnb
    std = sde_std(tb, noise_level, _bcast(sigma_max, z) if torch.is_tensor(sigma_max) else sigma_max)
    std = std.to(z.dtype)
    mean = z * (1 + std**2 / (2 * tb) * dt) + v * (1 + std**2 * (1 - tb) / (2 * tb)) * dt
    std_step = std * torch.sqrt(-dt)
    if next_sample is None:
        if noise is None:
            noise = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        next_sample = mean + std_step * noise
    if noise_level == 0:
        log_prob = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    else:
        log_prob = gaussian_log_prob(next_sample.detach(), mean, std_step.expand_as(mean))
    return SDEStep(next_sample, log_prob, mean, std)
