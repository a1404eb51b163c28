"""Which reverse steps carry the GRPO loss (SOLACE Sec. 3.3), and which the authors' released scripts
probe and train (:func:`released_steps`, one rule for both)."""

from __future__ import annotations

import math

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
