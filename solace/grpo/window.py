"""Which reverse steps carry the GRPO loss (SOLACE Sec. 3.3), and which the authors' released scripts
probe and train (:func:`released_steps`, one rule for both)."""

from __future__ import annotations

import math

import torch

from solace.errors import check


def train_window(num_steps: int, rho: float) -> list[int]:
    """Indices of the last ``ceil(rho * |T|)`` reverse steps (the steps nearest the data).

    Training on all steps (rho = 1) collapses into blank images (paper Sec. 4.4); the paper uses rho = 0.6.
    Step ``i`` goes from ``sigmas[i]`` to ``sigmas[i + 1]``; with |T| = 10 and rho = 0.6 this is [4..9].
    """
    check(
        isinstance(num_steps, int) and num_steps >= 1,
        "num_steps",
        f"must be an integer >= 1, got {num_steps!r}",
    )
    check(0 < rho <= 1, "rho", f"must lie in (0, 1], got {rho}")
    n = math.ceil(round(rho * num_steps, 9))  # round first so 0.7 * 10 = 7.000000000000001 gives 7
    return list(range(num_steps - n, num_steps))


def window_sigmas(sigmas: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """The timesteps at which the window's reverse steps evaluate the model: step ``i`` runs from
    ``sigmas[i]`` to ``sigmas[i + 1]`` and evaluates the velocity at ``sigmas[i]``, so the window ``steps``
    trains at ``sigmas[steps]``. With 10 steps and rho = 0.6 (steps 4..9) these are the 6 least noisy
    sampler timesteps; DiffusionNFT's ``grid`` timesteps restricted to them train where Flow-GRPO does."""
    check(len(steps) >= 1, "steps", "the window is empty")
    check(
        all(0 <= i < len(sigmas) - 1 for i in steps),
        "steps",
        f"must lie in [0, {len(sigmas) - 1}), got {steps}",
    )
    return torch.as_tensor(sigmas)[list(steps)]


def window_t_range(sigmas: torch.Tensor, steps: list[int]) -> tuple[float, float]:
    """``(t_low, t_high)``: the noise levels the window's steps cover, from ``sigmas[last + 1]`` (the level
    the last step reaches) to ``sigmas[first]`` (where the first starts). The range of continuous training
    timesteps that matches the window (DiffusionNFT's ``uniform`` timesteps); a window with a gap covers
    no single range and is refused. With the rho suffix the low end is ``sigmas[T] = 0``."""
    check(len(steps) >= 1, "steps", "the window is empty")
    first, last = min(steps), max(steps)
    check(
        sorted(steps) == list(range(first, last + 1)),
        "steps",
        f"must be contiguous to cover one range of t, got {sorted(steps)}",
    )
    check(0 <= first and last < len(sigmas) - 1, "steps", f"must lie in [0, {len(sigmas) - 1}), got {steps}")
    return float(sigmas[last + 1]), float(sigmas[first])


#: The released scripts' rules, by name: where in the schedule their window of steps starts.
RELEASED_RULES: dict[str, float] = {"released_sd3": 0.5, "released_flux": 0.6}


def released_steps(num_steps: int, start: float, fraction: float = 0.99) -> list[int]:
    """The steps the authors' released SOLACE scripts probe with the reward *and* train, for ``num_steps``
    sampler steps (wookiekim/SOLACE).

    Both scripts cut the schedule at ``T' = int(num_steps * train.timestep_fraction)`` (``fraction`` = 0.99
    in every config of ``config/solace.py``; the reward also caps ``T'`` at ``num_steps - 1``, which changes
    nothing below 101 steps) and use the steps ``int(start * T') .. T' - 1``: ``start`` = 0.5 in
    ``scripts/train_sd3_self.py`` (``sds_self_confidence_scalar`` and the training loop's
    ``train_timesteps``), 0.6 in ``scripts/train_flux_self_accelerate.py`` (``j_start`` and its
    ``train_timesteps``). The last step (sigma nearest 0) is never used: 10 steps give 4..8 (SD3) and 5..8
    (FLUX); the project's ``later_half`` probes and ``rho = 0.5`` trains 5..9 instead.
    """
    check(
        isinstance(num_steps, int) and num_steps >= 1,
        "num_steps",
        f"must be an integer >= 1, got {num_steps!r}",
    )
    last = min(int(num_steps * fraction), num_steps - 1)
    return list(range(int(last * start), last))


def parse_steps(spec: str, num_steps: int) -> list[int]:
    """Sorted unique step indices from a comma list such as ``"1,2"``, or the steps a released script's rule
    names (``released_sd3``, ``released_flux``: :func:`released_steps`); each must lie in
    ``[0, num_steps)``.

    Raises ``ValueError`` naming the bad entry (the config turns it into an error naming the field).
    """
    name = str(spec).strip()
    if name in RELEASED_RULES:
        steps = released_steps(num_steps, RELEASED_RULES[name])
        if not steps:
            raise ValueError(f"{name} names no step at sampling.num_steps = {num_steps} (needs >= 2)")
        return steps
    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise ValueError(
                f"{part!r} is not a step index (use e.g. '1,2', released_sd3 or released_flux)"
            ) from None
        if not 0 <= i < num_steps:
            raise ValueError(f"step {i} is outside 0..{num_steps - 1} (sampling.num_steps = {num_steps})")
        out.add(i)
    return sorted(out)
