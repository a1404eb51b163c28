"""PickScore (Kirstain et al., 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences.

    score = exp(logit_scale) * cos(E_img, E_txt) / divisor

with the model ``yuvalkirstain/PickScore_v1`` and the tokenizer/preprocessing of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the PickScore model repo ships no processor).

* ``divisor=26`` (default) is Flow-GRPO's reward (``flow_grpo/pickscore_scorer.py``: ``scores / 26``,
  "norm to 0-1"; raw values sit around 18-24, so the reward is ~0.7-0.92).
* ``divisor=1`` gives the raw PickScore that papers tabulate as a metric (~20-23).

Preprocessing runs in torch (bicubic short-side resize to 224, centre crop, CLIP mean/std); no gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from solace.errors import ConfigError
from solace.rewards.external._common import batched, build_clip_embedder, check_batch_size, check_inputs
from solace.rewards.registry import RewardFn, register_reward

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
FLOW_GRPO_DIVISOR = 26.0


@register_reward("pickscore")
def pickscore(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 32,
    processor: str | None = DEFAULT_PROCESSOR,
    divisor: float = FLOW_GRPO_DIVISOR,
    local_files_only: bool | None = None,
) -> RewardFn:
    """PickScore reward (``divisor=26``) or metric (``divisor=1``). ``processor``: tokenizer and
    ``preprocessor_config.json`` location (``None``: use ``model``)."""
    check_batch_size(batch_size, "reward.pickscore.batch_size")
    if not isinstance(divisor, (int, float)) or isinstance(divisor, bool) or divisor <= 0:
        raise ConfigError("reward.pickscore.divisor", f"must be a positive number, got {divisor!r}")
    emb = build_clip_embedder(
        model,
        name="pickscore",
        device=device,
        dtype=dtype,
        tokenizer=processor,
        local_files_only=local_files_only,
    )

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.pickscore")

        def chunk(s: slice) -> torch.Tensor:
            logit_scale = emb.model.logit_scale.detach().float().exp()
            return logit_scale * emb.cosine(images[s], prompts[s]) / divisor

        return batched(chunk, n, batch_size, images.device)

    fn.embedder = emb  # type: ignore[attr-defined]
    return fn
