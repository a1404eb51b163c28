"""Which reverse steps carry the GRPO loss (SOLACE Sec. 3.3)."""

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


def parse_steps(spec: str, num_steps: int) -> list[int]:
    """Sorted unique step indices from a comma list such as ``"1,2"``; each must lie in ``[0, num_steps)``.

    Raises ``ValueError`` naming the bad entry (the config turns it into an error naming the field).
    """
    out = set()
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise ValueError(f"{part!r} is not a step index (use e.g. '1,2')") from None
        if not 0 <= i < num_steps:
            raise ValueError(f"step {i} is outside 0..{num_steps - 1} (sampling.num_steps = {num_steps})")
        out.add(i)
    return sorted(out)
