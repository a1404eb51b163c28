"""Sigma schedules of the flow-matching samplers (diffusers' ``FlowMatchEulerDiscreteScheduler``)."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from solace.errors import check

TimeShift = Literal["exponential", "linear"]
"""The dynamic-shift forms of ``FlowMatchEulerDiscreteScheduler`` (its ``time_shift_type``)."""


def shift_sigmas(sigmas: np.ndarray | torch.Tensor, shift: float) -> np.ndarray | torch.Tensor:
    """SD3's resolution shift ``sigma' = s * sigma / (1 + (s - 1) * sigma)`` (SD3 paper, Eq. 23)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flux_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """FLUX's exponential time shift ``e^mu / (e^mu + (1/sigma - 1))`` (dynamic shifting, exponent 1)."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))


def linear_time_shift(mu: float, sigmas: np.ndarray) -> np.ndarray:
    """The scheduler's ``time_shift_type="linear"``: ``mu / (mu + (1/sigma - 1))`` (exponent 1)."""
    return mu / (mu + (1.0 / sigmas - 1.0))


def dynamic_time_shift(mu: float, sigmas: np.ndarray, time_shift_type: str = "exponential") -> np.ndarray:
    """Dynamic shifting as ``FlowMatchEulerDiscreteScheduler.time_shift`` with its ``time_shift_type``:
    :func:`flux_time_shift` (``exponential``, FLUX.1) or :func:`linear_time_shift` (``linear``)."""
    check(
        time_shift_type in ("exponential", "linear"),
        "scheduler.time_shift_type",
        f"must be exponential or linear (diffusers' choices), got {time_shift_type!r}",
    )
    if time_shift_type == "exponential":
        return flux_time_shift(mu, sigmas)
    check(mu > 0, "scheduler.time_shift_type", f"the linear time shift needs mu > 0, got mu = {mu}")
    return linear_time_shift(mu, sigmas)


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The ``mu`` FLUX pipelines compute from the packed image sequence length (linear in seq_len)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def flow_match_sigmas(
    num_steps: int,
    shift: float = 3.0,
    num_train_timesteps: int = 1000,
    mu: float | None = None,
    time_shift_type: TimeShift = "exponential",
) -> torch.Tensor:
    """Sampler sigmas of ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (float32), with a trailing 0.

    Flow-GRPO (Eq. 1-2 of the SOLACE paper's background) samples on exactly these points. The scheduler
    builds its training sigmas ``shift(i / N)`` for ``i = N..1``, then spaces ``num_steps`` points linearly
    between the largest and smallest of them and shifts *again* (so ``sigma_min`` is shifted twice); this
    reproduces that quirk so that our schedule equals diffusers' to float precision.

    Args:
        num_steps: number of sampling steps (|T|); the result has ``num_steps + 1`` entries.
        shift: SD3's static shift (3.0 for SD3/SD3.5). Ignored when ``mu`` is given.
        num_train_timesteps: the scheduler's ``num_train_timesteps``.
        mu: use the dynamic shift with this ``mu`` instead of the static shift.
        time_shift_type: the dynamic shift's form (the scheduler config's ``time_shift_type``).
    """
    check(
        isinstance(num_steps, int) and num_steps >= 1,
        "num_steps",
        f"must be an integer >= 1, got {num_steps!r}",
    )
    check(shift > 0, "shift", f"must be > 0, got {shift}")
    train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
    train_sigmas = train / num_train_timesteps
    if mu is None:
        train_sigmas = shift_sigmas(train_sigmas, shift)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    ts = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, num_steps)
    sig = ts / num_train_timesteps
    sig = dynamic_time_shift(mu, sig, time_shift_type) if mu is not None else shift_sigmas(sig, shift)
    out = torch.from_numpy(np.asarray(sig)).to(torch.float32)
    return torch.cat([out, torch.zeros(1)])


def flux_sigmas(num_steps: int, mu: float, time_shift_type: TimeShift = "exponential") -> torch.Tensor:
    """Sigmas of diffusers' FLUX.1 pipelines: ``linspace(1, 1/N, N)`` through the exponential time shift.

    ``FluxPipeline.__call__`` passes these sigmas explicitly to ``FlowMatchEulerDiscreteScheduler`` with
    ``use_dynamic_shifting=True`` and the ``mu`` of :func:`flux_mu`; a trailing 0 is appended.
    ``time_shift_type`` is the scheduler config's (FLUX.1: ``exponential``).
    """
    check(
        isinstance(num_steps, int) and num_steps >= 1,
        "num_steps",
        f"must be an integer >= 1, got {num_steps!r}",
    )
    sig = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    out = torch.from_numpy(np.asarray(dynamic_time_shift(mu, sig, time_shift_type)).astype(np.float32))
    return torch.cat([out, torch.zeros(1)])
