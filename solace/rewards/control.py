"""Control rewards: scores that carry no information about the prompt, to measure what training moves by
itself. ``random``: a uniform score in [0, 1) that depends only on the image's pixels (and ``seed``), so a
run is reproducible and resumable, but the score says nothing about the image. A run trained on it shows
how far the policy drifts, and what held-out accuracy does, when the advantages are pure noise at the
same learning rate and budget: the baseline every other condition's change has to beat."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from solace.rewards.registry import register_reward
from solace.utils.images import to_uint8


def image_uniform(image_u8: bytes, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the image's bytes and ``seed`` (the first 8 bytes of a BLAKE2b
    digest): equal images score equally, any pixel change draws a fresh number."""
    h = hashlib.blake2b(image_u8, digest_size=8, key=seed.to_bytes(8, "little", signed=True)).digest()
    return int.from_bytes(h, "little") / 2.0**64


@register_reward("random")
def random_reward(seed: int = 0):
    """An uninformative reward: see the module docstring."""

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        return torch.tensor([image_uniform(a.tobytes(), seed) for a in to_uint8(images)], dtype=torch.float32)

    return fn
