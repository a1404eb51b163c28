"""Group-relative advantages of GRPO (Flow-GRPO Eq. 6; SOLACE Eq. 15)."""

from __future__ import annotations

import torch

from solace.errors import check


def group_ids_from_size(num: int, group_size: int) -> torch.Tensor:
    """Group ids ``[0]*G + [1]*G + ...`` for ``num`` rewards laid out group after group."""
    check(
        isinstance(group_size, int) and group_size >= 1,
        "group_size",
        f"must be an integer >= 1, got {group_size!r}",
    )
    check(
        num % group_size == 0,
        "group_size",
        f"{num} rewards do not split into groups of {group_size}; pass group_ids or fix the batch size",
    )
    return torch.arange(num // group_size).repeat_interleave(group_size)


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor | None = None,
    group_size: int | None = None,
    global_std: bool = False,
    eps: float = 1e-4,
    clip: float | None = None,
) -> torch.Tensor:
    """``A_i = (R_i - mean_g) / (std + eps)``, per prompt group (Eq. 15).

    Args:
        rewards: (N,) rewards.
        group_ids: (N,) integer id of each sample's prompt group (or ``group_size`` for contiguous groups).
        global_std: divide by the std of the whole batch instead of each group's (Dr.GRPO-style option).
        eps: added to the std. A group whose rewards are all identical gets exactly zero advantage.
        clip: clip advantages to ``[-clip, clip]`` (Flow-GRPO's ``adv_clip_max``); ``None`` disables.
    Population std (ddof 0) is used, as in Flow-GRPO's per-prompt stat tracker.
    """
    check(rewards.ndim == 1, "rewards", f"must be 1-D (N,), got shape {tuple(rewards.shape)}")
    check(eps >= 0, "eps", f"must be >= 0, got {eps}")
    check(clip is None or clip > 0, "clip", f"must be > 0 or None, got {clip}")
    if group_ids is None:
        check(group_size is not None, "group_size", "give group_ids or group_size")
        group_ids = group_ids_from_size(rewards.numel(), group_size)  # type: ignore[arg-type]
    check(
        group_ids.shape == rewards.shape,
        "group_ids",
        f"shape {tuple(group_ids.shape)} must match rewards {tuple(rewards.shape)}",
    )
    r = rewards.double()
    _, inv = torch.unique(group_ids.to(rewards.device), return_inverse=True)
    n_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, r) / count
    centered = r - mean[inv]
    gmax = torch.full((n_groups,), -torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, inv, r, "amax"
    )
    gmin = torch.full((n_groups,), torch.inf, dtype=r.dtype, device=r.device).scatter_reduce(
        0, inv, r, "amin"
    )
    flat = (gmax == gmin)[inv]
    if global_std:
        std = r.std(unbiased=False).expand_as(r)
    else:
        var = torch.zeros(n_groups, dtype=r.dtype, device=r.device).index_add_(0, inv, centered**2) / count
        std = var.sqrt()[inv]
    adv = torch.where(flat, torch.zeros_like(r), centered / (std + eps))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.to(rewards.dtype)


def drop_zero_advantages(
    adv: torch.Tensor, keep: torch.Tensor | None, num_processes: int = 1, min_per_process: int = 1
) -> tuple[torch.Tensor | None, int]:
    """Flow-GRPO's filter: samples whose advantage is exactly 0 take no part in the update, the policy loss
    and the KL term alike (yifan123/flow_grpo ``scripts/train_sd3.py`` and wookiekim/SOLACE
    ``scripts/train_sd3_self.py``: the samples whose advantages are all zero are masked out before
    training).

    ``adv`` (N,) are the gathered advantages, ``keep`` (N,) bool the samples kept so far (None: all), laid
    out as ``num_processes`` equal contiguous shares. Returns ``(keep', n)``: the samples still trained and
    how many zero-advantage samples left. When some process would keep fewer than ``min_per_process``
    samples (every process must take the same optimizer steps), nothing is dropped: ``(keep, 0)``. (The
    released code instead puts random zero-advantage samples back until its batches divide evenly, and
    has no rule for a batch left empty.)
    """
    check(adv.ndim == 1, "adv", f"must be 1-D (N,), got shape {tuple(adv.shape)}")
    check(
        adv.numel() % num_processes == 0,
        "num_processes",
        f"{adv.numel()} samples do not split evenly over {num_processes} processes",
    )
    base = torch.ones_like(adv, dtype=torch.bool) if keep is None else keep.to(adv.device)
    trained = base & adv.ne(0)
    n = int((base & ~trained).sum())
    if n == 0 or int(trained.view(num_processes, -1).sum(1).min()) < min_per_process:
        return keep, 0
    return trained, n
