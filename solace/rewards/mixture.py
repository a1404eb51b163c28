"""The reward of one batch: ``R = sum_k weight_k * R_k`` over the configured components.

Every component is a :class:`~solace.rewards.components.RewardComponent` scoring the batch through a
:class:`~solace.rewards.components.RewardContext` (self-confidence on the latents, image rewards on the
images decoded once); the mixture knows none of them by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from solace.prompts import Prompt
from solace.rewards import confidence_reward  # noqa: F401 - registers the self_confidence component
from solace.rewards.components import COMPONENTS, RewardComponent, RewardContext, build_component


@dataclass
class MixedReward:
    """The mixed reward of the whole batch (N,), each component's (N,), the components' scalars and the
    per-timestep scores of this process's samples where a component has them."""

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    per_timestep: torch.Tensor | None = None


class RewardMixture:
    """Builds the configured components once (``reward.components``: name, weight, kwargs)."""

    def __init__(self, cfg: Any):
        self.specs = list(cfg.reward.components)
        self.components: dict[str, RewardComponent] = {s.name: build_component(s, cfg) for s in self.specs}

    @property
    def needs_images(self) -> bool:
        return any(c.needs_images for c in self.components.values())

    def prompts_to_encode(self, prompts: Sequence[Prompt]) -> list[str]:
        """What the components encode beyond the run's prompts (e.g. minimal edits)."""
        return [t for c in self.components.values() for t in c.prompts_to_encode(prompts)]

    def score(self, ctx: RewardContext) -> MixedReward:
        """Every component's scores of the whole batch (on every process), and their weighted sum."""
        scored = {name: c.score(ctx) for name, c in self.components.items()}
        comps = {name: s.reward for name, s in scored.items()}
        stats = {f"reward/{k}_mean": float(v.mean()) for k, v in comps.items()}
        per_timestep = None
        for s in scored.values():
            stats.update(s.stats)
            per_timestep = s.per_timestep if s.per_timestep is not None else per_timestep
        return MixedReward(self.combine(comps), comps, stats, per_timestep)

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the components (every configured one must be present)."""
        total = None
        for c in self.specs:
            r = components[c.name] * c.weight
            total = r if total is None else total + r
        assert total is not None
        return total


def component_prompts(cfg: Any, prompts: Sequence[Prompt]) -> list[str]:
    """The prompts the registered (latent) components of ``cfg`` encode for ``prompts``, those of the reward
    and those logged (``premise``), without building the image rewards (``solace embed``)."""
    specs = [*cfg.reward.components, *cfg.premise.components]
    comps = [build_component(s, cfg) for s in specs if s.name in COMPONENTS]
    return [t for c in comps for t in c.prompts_to_encode(prompts)]
