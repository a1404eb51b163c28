"""One interface for every term of the reward: a :class:`RewardComponent` scores an iteration's batch
through a :class:`RewardContext` and returns the whole (gathered) batch's scores.

The context holds what any component may need: this process's rollout (clean latents, conditioning, the
CFG null, prompts and their metadata, the group layout), the iteration, the run's random streams, the
sampler's timesteps, an ``encode`` function (prompts a component makes up, e.g. minimal edits), a ``gather``
function (this process's rows into the whole batch, on every process) and the decoded images, made once
when some component asks for them.

Components are registered by name (:data:`COMPONENTS`: ``self_confidence`` and what plugins add, each
factory ``factory(spec, cfg) -> RewardComponent``); any other name is an image reward of
:mod:`solace.rewards.registry` (or a user factory ``package.module:function``), wrapped by
:class:`ImageReward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from solace.errors import ConfigError
from solace.models.base import Conditioning
from solace.prompts import Prompt
from solace.registry import Registry
from solace.rewards.registry import build_reward
from solace.sampling.rollout import Rollout
from solace.utils.seeding import TrainStreams


@dataclass
class RewardContext:
    """What a reward component scores one iteration's batch through (see the module docstring)."""

    rollout: Rollout
    adapter: Any
    iteration: int
    streams: TrainStreams
    sigmas: torch.Tensor
    encode: Callable[[list[str]], Conditioning]
    gather: Callable[[torch.Tensor], torch.Tensor]
    decode_batch: int = 32  # samples per decoding forward
    _images: torch.Tensor | None = field(default=None, repr=False)

    def images(self) -> torch.Tensor:
        """This process's samples decoded once (float RGB in [0, 1], (n, 3, H, W), on the CPU)."""
        if self._images is None:
            z0, bs = self.rollout.z0, self.decode_batch
            parts = [self.adapter.decode(z0[b : b + bs]).cpu() for b in range(0, len(self.rollout), bs)]
            self._images = torch.cat(parts)
        return self._images

    @property
    def decoded(self) -> bool:
        """Whether the images were decoded (some component asked for them)."""
        return self._images is not None


@dataclass
class ComponentScore:
    """A component's scores of the whole gathered batch ``reward`` (N,), the scalars it logs, and where it
    has them its per-timestep scores of this process's samples (n, T')."""

    reward: torch.Tensor
    stats: dict[str, float] = field(default_factory=dict)
    per_timestep: torch.Tensor | None = None


class RewardComponent:
    """A term of the reward mixture. ``score`` runs on every process (it may gather)."""

    needs_images: ClassVar[bool] = False  # the mixture decodes the batch once for those that do

    def __init__(self, name: str):
        self.name = name

    def prompts_to_encode(self, prompts: Sequence[Prompt]) -> list[str]:
        """Prompts beyond the run's own that scoring these training prompts encodes (encoded ahead of a run
        whose text encoders are offloaded, and by ``solace embed``)."""
        return []

    def score(self, ctx: RewardContext) -> ComponentScore:
        raise NotImplementedError


# ``factory(spec, cfg)``: ``spec`` one ``reward.components`` entry (name, weight, kwargs), ``cfg`` the run's
# SolaceConfig; their types are not imported (the config checks names against this registry: a cycle).
ComponentFactory = Callable[[Any, Any], RewardComponent]
COMPONENTS: Registry[ComponentFactory] = Registry("reward component", "reward.components")
"""Reward components by name (beyond the image rewards of :mod:`solace.rewards.registry`)."""


class ImageReward(RewardComponent):
    """An image reward (registered in :mod:`solace.rewards.registry` or a user factory): decoded images,
    prompts and metadata in, one score per image out; gathered over the processes."""

    needs_images = True

    def __init__(self, name: str, kwargs: dict[str, Any]):
        super().__init__(name)
        self.fn = build_reward(name, **kwargs)

    def score(self, ctx: RewardContext) -> ComponentScore:
        ro, images = ctx.rollout, ctx.images()
        metas = ro.metas
        scores = self.fn(images, list(ro.texts), list(metas) if metas is not None else None)
        return ComponentScore(ctx.gather(reward_scores(self.name, scores, len(images))))


def build_component(spec: Any, cfg: Any) -> RewardComponent:
    """The component ``spec.name`` names: a registered one, else an image reward."""
    if spec.name in COMPONENTS:
        return COMPONENTS.get(spec.name)(spec, cfg)
    return ImageReward(spec.name, dict(spec.kwargs))


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
