"""Scoring one iteration's rollout: the reward mixture on the whole (gathered) batch, group-relative
advantages (each process keeping its slice), and the batch statistics the collapse monitor watches.

Every step here runs on every process in step (the gathers are collectives); only warnings are the main
process's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from solace.grpo.advantages import drop_zero_advantages
from solace.models.base import Conditioning
from solace.prompts import Prompt
from solace.rewards.components import RewardContext
from solace.rewards.mixture import RewardMixture
from solace.sampling.rollout import GroupLayout, Rollout
from solace.trainer.context import UpdateContext
from solace.trainer.guard import all_zero, drop_nonfinite, group_advantages_masked
from solace.trainer.monitor import latent_texture
from solace.trainer.premise import PremiseProbe

if TYPE_CHECKING:
    from solace.trainer.config import SolaceConfig


def gather(acc: Any, t: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``t`` in process order, on the CPU (a collective on several processes)."""
    if acc.num_processes == 1:
        return t
    return acc.gather(t.to(acc.device).contiguous()).cpu()


class RolloutScoring:
    """Rewards, advantages and batch statistics of a rollout (``score`` sets ``ro.rewards``,
    ``ro.confidence``, ``ro.advantages`` and ``ro.keep``)."""

    def __init__(
        self,
        cfg: SolaceConfig,
        ctx: UpdateContext,
        encode: Callable[[list[str]], Conditioning],
        min_kept: int,
        warn: Callable[[str], None],
        layout: GroupLayout,
    ):
        self.cfg, self.ctx, self.encode, self.warn = cfg, ctx, encode, warn
        self.min_kept = min_kept  # samples each process keeps at least (the update's optimizer steps)
        self.rewards = RewardMixture(cfg)
        self.premise = PremiseProbe(cfg, layout, ctx.num_processes, ctx.accelerator.process_index)

    def prompts_to_encode(self, prompts: list[Prompt]) -> list[str]:
        """What the reward components and the logged premise components encode beyond the run's prompts."""
        return [*self.rewards.prompts_to_encode(prompts), *self.premise.prompts_to_encode(prompts)]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return gather(self.ctx.accelerator, t)

    def context(self, ro: Rollout, iteration: int) -> RewardContext:
        c = self.ctx
        return RewardContext(
            ro,
            c.adapter,
            iteration,
            c.streams,
            c.sigmas,
            self.encode,
            self.gather,
            self.cfg.sampling.batch_size,
        )

    @torch.no_grad()
    def score(self, ro: Rollout, iteration: int) -> dict[str, float]:
        """Every reward of the whole (gathered) batch, mixed; sets ``ro.advantages`` to this process's
        group-relative advantages; returns the reward and batch statistics."""
        t0 = time.perf_counter()
        rc = self.context(ro, iteration)
        mixed = self.rewards.score(rc)
        want = self.rewards.needs_images or self.ctx.adapter.wants_batch_images or self.premise.due(iteration)
        images = rc.images() if want else None
        t_reward = time.perf_counter() - t0
        total = mixed.total
        adv, keep, dropped, n_zero = self.advantages(ro, total)
        ro.rewards = ro.layout.local(total)
        if mixed.per_timestep is not None:
            ro.confidence = mixed.per_timestep
        flat = all_zero(adv)
        if flat:
            self.warn(
                "every advantage is 0 (rewards tie within every group): no policy signal this iteration"
            )
        kept = total if not dropped else total[keep]
        stats = {
            "reward/mean": float(kept.mean()),
            "reward/std": float(kept.std()) if len(kept) > 1 else math.nan,
            "guard/dropped": float(dropped),
            "guard/zero_advantages": float(flat),
        }
        if self.cfg.grpo.drop_zero_advantages:
            stats["adv/zero_dropped"] = float(n_zero)
        stats.update(mixed.stats)
        stats.update({"adv/abs_mean": float(adv.abs().mean()), "adv/max": float(adv.max())})
        per_sample = self.per_sample_statistics(ro, images)
        stats.update({k: float(v.mean()) for k, v in per_sample.items()})
        if self.premise.due(iteration):
            t1 = time.perf_counter()
            stats.update(self.premise.score(rc, per_sample, self.warn))
            stats["time/premise"] = time.perf_counter() - t1
        stats["time/reward"] = t_reward
        return stats

    def advantages(self, ro: Rollout, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """Group-relative advantages of the gathered rewards (this process's share set on ``ro``), with the
        samples the update leaves out (``ro.keep``): non-finite rewards, and with
        ``grpo.drop_zero_advantages`` zero advantages. Returns ``(adv, keep, dropped, zero_dropped)``."""
        g, groups = self.cfg.grpo, ro.layout.all_groups()
        keep, dropped = drop_nonfinite(total, groups)  # a non-finite reward leaves its group and the update
        adv = group_advantages_masked(
            total, groups, keep, global_std=g.global_std, eps=g.adv_eps, clip=g.adv_clip
        )
        ro.advantages = ro.layout.local(adv)
        if dropped:
            ro.keep = keep
            self.warn(
                f"{dropped} sample(s) with a non-finite reward dropped from their groups and the update"
            )
        n_zero = 0
        if g.drop_zero_advantages:  # Flow-GRPO's mask: no policy signal, no part in the loss (KL included)
            ro.keep, n_zero = drop_zero_advantages(adv, ro.keep, self.ctx.num_processes, self.min_kept)
        return adv, keep, dropped, n_zero

    def per_sample_statistics(self, ro: Rollout, images: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """What the collapse monitor watches and the model's own batch statistics
        (:meth:`~solace.models.base.AdapterBase.batch_statistics`), per sample of the whole gathered batch
        (the log has their means)."""
        stats = {"monitor/texture": self.gather(latent_texture(ro.z0).cpu())}
        if images is not None:
            for k, v in self.ctx.adapter.batch_statistics(images, ro.metas).items():
                stats[k] = self.gather(v)
        return stats
