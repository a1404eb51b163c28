"""Rewards for one batch of samples: self-confidence (and its variants) mixed with external rewards.

``R = sum_k weight_k * R_k``. Self-confidence scores latents (no decoding) through
:class:`solace.rewards.scorer.SelfConfidenceScorer`; external rewards (registry) see decoded images,
prompts and their metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from solace.rewards.registry import build_reward
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer

SELF_CONFIDENCE = "self_confidence"


class RewardMixture:
    """Builds the configured rewards once: the self-confidence scorer and every external reward."""

    def __init__(self, components: Sequence, sc_cfg: SelfConfidenceCfg, cfg_scale: float):
        self.components = list(components)
        self.confidence = SelfConfidenceScorer(sc_cfg, cfg_scale)
        self.external = {
            c.name: build_reward(c.name, **dict(c.kwargs))
            for c in self.components
            if c.name != SELF_CONFIDENCE
        }

    @property
    def uses_self_confidence(self) -> bool:
        return any(c.name == SELF_CONFIDENCE for c in self.components)

    def external_rewards(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None
    ) -> dict[str, torch.Tensor]:
        """Each external reward of the batch, (B,) float on the CPU."""
        return {
            name: fn(images, list(prompts), list(metadata) if metadata is not None else None).float().cpu()
            for name, fn in self.external.items()
        }

    def combine(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of the components (every configured one must be present)."""
        total = None
        for c in self.components:
            r = components[c.name] * c.weight
            total = r if total is None else total + r
        assert total is not None
        return total
