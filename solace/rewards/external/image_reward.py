"""ImageReward (Xu et al., 2023): BLIP (ViT-L/16 image encoder + BERT-base text encoder with cross-attention)
with an MLP head, through the ``image-reward`` package (``import ImageReward``).

For image i and prompt i (BERT tokens, max 35, padded), as in ``ImageReward.ImageReward.score``:

    f = BLIP text_encoder(tokens, encoder_hidden_states=visual_encoder(pixels)).last_hidden_state[:, 0]
    score = (MLP(f) - 0.16717362830052426) / 1.0333394966054072      (model.mean, model.std)

The package's own methods take PIL images and one prompt; this adapter feeds tensors in batches with one
prompt per image (pixels preprocessed in torch: bicubic short-side resize to 224, centre crop, CLIP
mean/std -- the package's transform). Flow-GRPO uses the score raw as its reward; papers tabulate it raw
(roughly -2..2, ~1 for good generations).

``image-reward`` depends on timm 0.6, fairscale, datasets and torchvision, and pip resolves those to a
different torch than solace's; install it where that is acceptable:

    pip install image-reward

``model``: ``"ImageReward-v1.0"`` (the package downloads ``THUDM/ImageReward`` into ``download_root``) or a
local ``ImageReward.pt``; with a local file, ``med_config`` (default: ``med_config.json`` beside it) avoids
the package's download. BLIP's tokenizer (``bert-base-uncased``) comes from the Hugging Face cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from solace.errors import ConfigError, MissingDependencyError
from solace.rewards.external._common import (
    CLIP_MEAN,
    CLIP_STD,
    batched,
    check_batch_size,
    check_inputs,
    clip_preprocess,
    first_line,
    load_state_dict_file,
    resolve_device,
    resolve_dtype,
)
from solace.rewards.registry import RewardFn, register_reward

INSTALL = "pip install image-reward"
DEFAULT_MODEL = "ImageReward-v1.0"
MAX_TEXT_LENGTH = 35  # ImageReward.score / inference_rank
IMAGE_SIZE = 224


def _import_package():
    try:
        import ImageReward as RM  # noqa: N813 - the package's name
    except Exception as e:  # noqa: BLE001 - a half-installed timm/torchvision raises more than ImportError
        raise MissingDependencyError(
            f"the image_reward reward needs the 'image-reward' package ({type(e).__name__}: "
            f"{first_line(e)}); install it with: {INSTALL} (it pulls timm, fairscale and torchvision)"
        ) from None
    return RM


def load_image_reward(
    model: str, device: torch.device, med_config: str | None = None, download_root: str | None = None
):
    """The package's ``ImageReward`` module, eval mode, frozen, on ``device``."""
    RM = _import_package()  # noqa: N806
    path = os.path.expanduser(model)
    try:
        if os.path.isfile(path):
            med = med_config or os.path.join(os.path.dirname(path), "med_config.json")
            if not os.path.isfile(med):
                raise MissingDependencyError(
                    f"reward.image_reward.med_config: {med!r} not found; download med_config.json of "
                    "THUDM/ImageReward beside the checkpoint or pass med_config"
                )
            from ImageReward.ImageReward import ImageReward as IRModel

            net = IRModel(med_config=med, device=device)
            sd = load_state_dict_file(path, field="reward.image_reward.model", what="ImageReward weights")
            net.load_state_dict(sd, strict=False)
        else:
            net = RM.load(model, device=device, download_root=download_root)
    except (MissingDependencyError, ConfigError):
        raise
    except Exception as e:  # noqa: BLE001 - download / hub / unpickling failures
        raise MissingDependencyError(
            f"reward.image_reward.model: cannot load {model!r} ({type(e).__name__}: {first_line(e)}); "
            "download ImageReward.pt and med_config.json from THUDM/ImageReward and pass the local path"
        ) from None
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def image_reward_scores(net, pixel_values: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Batched ImageReward of preprocessed ``pixel_values`` (B, 3, 224, 224) and B prompts -> (B,) float32."""
    device = pixel_values.device
    blip = net.blip
    tok = blip.tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
    )
    image_embeds = blip.visual_encoder(pixel_values)
    image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)
    out = blip.text_encoder(
        tok["input_ids"].to(device),
        attention_mask=tok["attention_mask"].to(device),
        encoder_hidden_states=image_embeds,
        encoder_attention_mask=image_atts,
        return_dict=True,
    )
    feats = out.last_hidden_state[:, 0, :].float()
    rewards = net.mlp(feats.to(next(net.mlp.parameters()).dtype)).float()
    return ((rewards - net.mean) / net.std).reshape(-1)


@register_reward("image_reward")
def image_reward(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 16,
    med_config: str | None = None,
    download_root: str | None = None,
) -> RewardFn:
    """ImageReward reward/metric (raw normalised score). Needs ``pip install image-reward``."""
    check_batch_size(batch_size, "reward.image_reward.batch_size")
    dev = resolve_device(device, "reward.image_reward.device")
    dt = resolve_dtype(dtype, "reward.image_reward.dtype")
    net = load_image_reward(model, dev, med_config, download_root).to(dtype=dt)

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.image_reward")

        def chunk(s: slice) -> torch.Tensor:
            px = clip_preprocess(images[s].to(dev), IMAGE_SIZE, CLIP_MEAN, CLIP_STD).to(dt)
            return image_reward_scores(net, px, prompts[s])

        return batched(chunk, n, batch_size, images.device)

    fn.net = net  # type: ignore[attr-defined]
    return fn
