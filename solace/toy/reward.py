"""The toy world's exact evaluator as a registered reward (``toy_geneval``): Flow-GRPO with a verifiable
reward is one config line away. It needs each prompt's GenEval metadata (the trainer passes it along)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from solace.errors import ConfigError
from solace.rewards.registry import register_reward
from solace.toy.evaluator import detect, partial_score, score_detections, to_uint8
from solace.toy.world import PromptRecord


@register_reward("toy_geneval")
def toy_geneval(mode: str = "strict", lenient_weight: float = 0.5):
    """Exact toy-world correctness. ``mode``: ``strict`` (1 if the image is exactly the prompt's scene),
    ``lenient`` (GenEval's rules), ``mixed`` (strict + ``lenient_weight`` * lenient), or ``dense``
    (strict + :func:`~solace.toy.evaluator.partial_score`: partial credit with soft shape classes, so a group
    whose samples all fail still ranks them by how close each came)."""
    if mode not in ("strict", "lenient", "mixed", "dense"):
        raise ConfigError(
            "reward.components.kwargs.mode", f"must be strict, lenient, mixed or dense, got {mode!r}"
        )

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        if metadata is None or any(not m or "include" not in m for m in metadata):
            raise ConfigError(
                "reward",
                "toy_geneval needs GenEval metadata per prompt (toy prompts or a .jsonl "
                "file with 'include'); plain .txt prompts have none",
            )
        out = []
        for img, m in zip(to_uint8(images), metadata, strict=True):
            dets, rec = detect(img), PromptRecord.from_json(m)
            s = score_detections(dets, rec)
            if mode == "dense":
                out.append(float(s["strict"]) + partial_score(dets, rec))
            elif mode == "strict":
                out.append(float(s["strict"]))
            elif mode == "lenient":
                out.append(float(s["lenient"]))
            else:
                out.append(float(s["strict"]) + lenient_weight * float(s["lenient"]))
        return torch.tensor(out)

    return fn
