"""The non-finite guard: a NaN or Inf in one sample's reward must not poison the batch, and a run that keeps
producing them must stop instead of training on garbage.

* :func:`drop_nonfinite` marks the samples to keep (a finite reward, and finite rows in any other per-sample
  tensor given, e.g. latents or log-probs).
* :func:`group_advantages_masked` computes GRPO advantages over the kept samples only: a dropped sample gets
  advantage 0 and takes no part in its group's mean and std (nor in the batch std with ``global_std``); a
  group left with fewer than 2 kept samples gets 0 throughout. With every sample kept it *is*
  :func:`solace.grpo.advantages.group_advantages` (bitwise).
* :class:`NonFiniteGuard` counts consecutive bad iterations and says when to stop; it checkpoints with the
  run (:meth:`~NonFiniteGuard.state_dict`).

A zero advantage does not make a sample harmless: its PPO term is ``0 * ratio``, which is NaN when its
latents or log-probs are, and its KL term is trained regardless. Dropped samples must therefore be left out
of the update, not only zeroed.
"""

from __future__ import annotations

from typing import Any

import torch

from solace.errors import ConfigError, SolaceError, check
from solace.grpo.advantages import group_advantages, group_ids_from_size


class NonFiniteError(SolaceError, RuntimeError):
    """Training produced non-finite values for too many consecutive iterations."""


def weights_finite(params: list[torch.Tensor]) -> bool:
    """Whether every trained weight is finite (an optimizer step can make NaN from finite gradients, e.g.
    AdamW dividing by ``sqrt(v) + eps`` near 0)."""
    if not params:
        return True
    return bool(torch.stack([torch.isfinite(p.detach()).all() for p in params]).all())  # one device sync


def nonfinite_weights_message(iteration: int, last_checkpoint: Any) -> str:
    """What to do when the weights became non-finite in ``iteration`` (nothing of it is checkpointed)."""
    where = (
        f"the last checkpoint, {last_checkpoint}, is finite: `--resume` continues from it"
        if last_checkpoint is not None
        else "no checkpoint was written before it: start the run again"
    )
    return (
        f"the LoRA weights became non-finite in iteration {iteration} (an optimizer step overflowed or "
        f"divided by ~0) and were not checkpointed; {where}, with a lower optim.lr (or a larger optim.eps)"
    )


def _rows_finite(t: torch.Tensor, n: int) -> torch.Tensor:
    check(
        t.ndim >= 1 and t.shape[0] == n,
        "per_sample",
        f"each per-sample tensor needs {n} rows, got shape {tuple(t.shape)}",
    )
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return torch.ones(n, dtype=torch.bool, device=t.device)
    return torch.isfinite(t.reshape(n, -1)).all(dim=1)


def drop_nonfinite(
    rewards: torch.Tensor, group_ids: torch.Tensor, *per_sample: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """``(keep, n_dropped)``: ``keep`` (N,) bool is True where ``rewards`` is finite and every row of each
    tensor in ``per_sample`` (shape (N, ...)) is finite; ``n_dropped`` counts the others.

    In a multi-process run pass the gathered rewards (every process then gets the same mask); a
    process-local per-sample tensor must have its rows' flags gathered first.
    """
    check(rewards.ndim == 1, "rewards", f"must be 1-D (N,), got shape {tuple(rewards.shape)}")
    check(
        group_ids.shape == rewards.shape,
        "group_ids",
        f"shape {tuple(group_ids.shape)} must match rewards {tuple(rewards.shape)}",
    )
    keep = torch.isfinite(rewards)
    for t in per_sample:
        keep = keep & _rows_finite(t, rewards.shape[0]).to(keep.device)
    return keep, int((~keep).sum())


def group_advantages_masked(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
    group_size: int | None = None,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float | None = None,
) -> torch.Tensor:
    """:func:`~solace.grpo.advantages.group_advantages` over the samples where ``keep`` is True.

    Dropped samples get exactly 0 and are excluded from their group's mean and std (and from the batch std
    with ``global_std``); a group with fewer than 2 kept samples gets 0 for all (one sample is a flat
    group). ``keep=None`` or all True returns ``group_advantages(...)`` itself, bitwise.
    """
    check(rewards.ndim == 1, "rewards", f"must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_ids is None:
        check(group_size is not None, "group_size", "give group_ids or group_size")
        group_ids = group_ids_from_size(rewards.numel(), group_size)  # type: ignore[arg-type]
    kw: dict[str, Any] = {"global_std": global_std, "eps": eps, "clip": clip}
    if keep is None or bool(keep.all()):
        return group_advantages(rewards, group_ids=group_ids, **kw)
    check(
        keep.shape == rewards.shape and keep.dtype == torch.bool,
        "keep",
        f"must be a bool tensor of shape {tuple(rewards.shape)}, got {keep.dtype} {tuple(keep.shape)}",
    )
    check(
        group_ids.shape == rewards.shape,
        "group_ids",
        f"shape {tuple(group_ids.shape)} must match rewards {tuple(rewards.shape)}",
    )
    keep = keep.to(rewards.device)
    adv = torch.zeros_like(rewards)
    if bool(keep.any()):
        adv[keep] = group_advantages(rewards[keep], group_ids=group_ids.to(rewards.device)[keep], **kw)
    return adv


def all_zero(adv: torch.Tensor) -> bool:
    """True when every advantage is exactly 0 (every group flat or dropped): the update has no policy
    signal, only the KL term."""
    return not bool(adv.ne(0).any())


class NonFiniteGuard:
    """Counts consecutive bad iterations (non-finite rewards dropped, a non-finite gradient skipped).

    ``record(bad)`` after each iteration returns True once ``max_consecutive`` bad iterations in a row have
    been recorded: time to stop (:meth:`message` says why). A good iteration resets the streak.
    ``max_consecutive=0`` never stops. :meth:`state_dict` / :meth:`load_state_dict` carry the counters
    through a checkpoint, so a resumed run continues the streak.
    """

    def __init__(self, max_consecutive: int):
        if not (isinstance(max_consecutive, int) and max_consecutive >= 0):
            raise ConfigError("max_consecutive", f"must be an integer >= 0, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def record(self, bad: bool) -> bool:
        if bad:
            self.consecutive += 1
            self.total += 1
        else:
            self.consecutive = 0
        return self.stop

    @property
    def stop(self) -> bool:
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def message(self) -> str:
        return (
            f"{self.consecutive} consecutive iterations produced non-finite rewards or gradients "
            f"(limit {self.max_consecutive}; {self.total} bad in all). Stopped without checkpointing; "
            "resume from the last checkpoint with a lower learning rate, or look for the cause (an "
            "fp16 overflow, a reward model returning NaN)."
        )

    def state_dict(self) -> dict[str, int]:
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consecutive = int(state.get("consecutive", 0))
        self.total = int(state.get("total", 0))
