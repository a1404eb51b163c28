"""Rewards for one batch of samples: self-confidence (and its variants) mixed with external rewards.

``R = sum_k weight_k * R_k``. Self-confidence scores latents (no decoding) through
:class:`solace.rewards.scorer.SelfConfidenceScorer`; external rewards (registry) see decoded images,
prompts and their metadata.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from solace.errors import ConfigError
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
        meta = list(metadata) if metadata is not None else None
        return {
            name: reward_scores(name, fn(images, list(prompts), meta), len(images))
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


def reward_scores(name: str, scores: object, batch: int) -> torch.Tensor:
    """A reward function's output as (B,) float32 on the CPU; anything else (a user reward returning one
    number, a (B, 1) tensor, a string) is a ConfigError naming the reward and its contract."""
    try:
        t = torch.as_tensor(scores).detach()
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.shape != (batch,) or t.is_complex():
        got = tuple(t.shape) if t is not None else type(scores).__name__
        raise ConfigError(
            f"reward {name}",
            f"returned {got} for {batch} images; a reward returns one real score per image, a tensor of "
            f"shape ({batch},)",
        )
    return t.float().cpu()
