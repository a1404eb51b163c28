"""CLIPScore with OpenAI CLIP ViT-L/14 (transformers ``CLIPModel``).

    score = scale * max(100 * cos(E_img, E_txt), 0)          (clamp=True, the default)
    score = scale * 100 * cos(E_img, E_txt)                  (clamp=False)

This is the CLIPScore of Hessel et al. (2021), ``w * max(cos, 0)``, with the weight ``w = 100`` used by
torchmetrics and most text-to-image papers (Hessel et al. used ``w = 2.5`` with ViT-B/32). Conventions:

* ``scale=1`` (default): the 0-100 metric that T2I papers report as "CLIP score" (typically ~25-35 for
  ViT-L/14 on good image-prompt pairs).
* ``scale=0.01``: the plain cosine, ``max(cos, 0)`` in [0, 1] -- the scale of the "ClipScore" column of the
  Flow-GRPO paper's tables as far as we know (values below 1; not re-checked against the paper here).
* Flow-GRPO's *training* reward (``flow_grpo/clip_scorer.py``) is ``logits_per_image.diagonal() / 30``,
  i.e. ``100 * cos / 30`` with no clamp: ``scale=1/30, clamp=False``. (Its scorer also resizes with
  torchvision's default *bilinear* interpolation; here it is CLIP's bicubic.)

Images are preprocessed in torch (bicubic resize of the short side to 224, centre crop, CLIP mean/std), so
the reward runs on tensors on any device; it is not differentiable (``no_grad``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from solace.errors import ConfigError
from solace.rewards.external._common import batched, build_clip_embedder, check_batch_size, check_inputs
from solace.rewards.registry import RewardFn, register_reward

DEFAULT_MODEL = "openai/clip-vit-large-patch14"


@register_reward("clip_score")
def clip_score(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 32,
    scale: float = 1.0,
    clamp: bool = True,
    processor: str | None = None,
    local_files_only: bool | None = None,
) -> RewardFn:
    """CLIPScore reward/metric. ``model``: hub id or local path of a transformers CLIP checkpoint;
    ``processor``: where the tokenizer and ``preprocessor_config.json`` live (default: ``model``)."""
    check_batch_size(batch_size, "reward.clip_score.batch_size")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise ConfigError("reward.clip_score.scale", f"must be a number, got {scale!r}")
    emb = build_clip_embedder(
        model,
        name="clip_score",
        device=device,
        dtype=dtype,
        tokenizer=processor,
        local_files_only=local_files_only,
    )

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.clip_score")

        def chunk(s: slice) -> torch.Tensor:
            logits = 100.0 * emb.cosine(images[s], prompts[s])
            return scale * (logits.clamp_min(0.0) if clamp else logits)

        return batched(chunk, n, batch_size, images.device)

    fn.embedder = emb  # type: ignore[attr-defined]  # exposed for tests and diagnostics
    return fn
