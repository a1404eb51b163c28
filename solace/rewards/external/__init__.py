"""External rewards and metrics, registered by name on import (see :mod:`solace.rewards.registry`).

Each factory builds a callable ``fn(images (B, 3, H, W) float [0, 1], prompts, metadata=None) -> Tensor (B,)``
(float32, on the images' device, no gradients). Heavy libraries are imported only inside the factories, so
importing this package costs nothing and a missing optional dependency only matters for the reward asked for.

=================  ===============================================  =========================================
name               score                                            needs
=================  ===============================================  =========================================
``clip_score``     ``scale * max(100 cos, 0)``  (CLIP ViT-L/14)       transformers; model weights
``pickscore``      ``exp(logit_scale) cos / divisor`` (26: reward)  transformers; model weights
``hps``            HPSv2.1 ``cos`` (open_clip ckpt -> CLIPModel)    transformers; HPS ckpt + ViT-H-14 config
``aesthetic``      LAION aesthetic v2 MLP on normalised CLIP-L/14   transformers; model + MLP head weights
``image_reward``   ImageReward ``(MLP(f) - mean) / std``            transformers; ImageReward.pt, BERT vocab
``ocr``            Flow-GRPO OCR edit-distance score in [0, 1]      ``pip install rapidocr onnxruntime``
``geneval``        GenEval with the official Mask2Former detector   mmdet 2.x + mmcv-full + detector weights
``unified_reward`` UnifiedReward judge via an OpenAI-compatible URL  a running VLM server
=================  ===============================================  =========================================

Model-backed factories take ``model`` (hub id or local path), ``device``, ``dtype`` and ``batch_size``; a
missing package or model file raises one-line :class:`~solace.errors.MissingDependencyError` /
:class:`~solace.errors.ConfigError` naming what to install or download.
"""

from solace.rewards.external import (  # noqa: F401 - imported to register the rewards
    aesthetic,
    clip_score,
    geneval,
    hps,
    image_reward,
    ocr,
    pickscore,
    unified_reward,
)

__all__ = [
    "aesthetic",
    "clip_score",
    "geneval",
    "hps",
    "image_reward",
    "ocr",
    "pickscore",
    "unified_reward",
]
