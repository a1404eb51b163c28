"""HPSv2.1 (Human Preference Score v2.1, Wu et al. 2023) on transformers' ``CLIPModel`` -- no open_clip.

HPSv2.1 is an OpenCLIP ViT-H-14 fine-tuned on human preferences; its published checkpoint
(``HPS_v2.1_compressed.pt`` in the hub repo ``xswu/HPSv2``) is an open_clip state dict. It is loaded here
with ``torch.load(weights_only=True)`` (or from ``.safetensors``), its keys are converted to the transformers
CLIP layout (:func:`open_clip_to_hf`, e.g. ``attn.in_proj_weight`` split into q/k/v, ``proj`` transposed
into ``visual_projection.weight``), and it runs in ``CLIPModel`` with the architecture ``config.json`` and
tokenizer of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the same ViT-H-14, GELU, 77-token text tower).

    score = cos(E_img, E_txt)                                 (no logit scale; as in ``hpsv2.score``)

which is also Flow-GRPO's reward (``flow_grpo/hpsv2_scorer.py``: ``diag(image_features @ text_features.T)``
with normalised features). Values are ~0.2-0.35; papers tabulate HPSv2.1 on this cosine scale.

Preprocessing follows HPSv2's evaluation transform (``ResizeMaxSize``): bicubic resize of the *longer* side to
224 and zero padding, then OpenAI CLIP mean/std -- in torch, on any device. The tokenizer is transformers'
CLIP BPE, equivalent to open_clip's for ordinary text (open_clip additionally runs ``ftfy`` fixes).

If you prefer the reference implementation, ``pip install hpsv2`` (it needs torchvision and open_clip) and
call ``hpsv2.score``; this module does not import it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from solace.errors import ConfigError
from solace.rewards.external._common import (
    ClipEmbedder,
    batched,
    check_batch_size,
    check_inputs,
    hub_file,
    image_norm,
    load_pretrained,
    load_state_dict_file,
    load_tokenizer,
    require,
    resolve_device,
    resolve_dtype,
)
from solace.rewards.registry import RewardFn, register_reward

DEFAULT_MODEL = "xswu/HPSv2"
DEFAULT_FILENAME = "HPS_v2.1_compressed.pt"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

_BLOCK_RENAMES = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_TOP_RENAMES = {
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_IGNORED = re.compile(r"^(attn_mask|visual\.attn_mask|.*\.attn_mask)$")
_BLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


def open_clip_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an open_clip ``CLIP`` (ViT image tower, built-in text tower) state dict to transformers'
    ``CLIPModel`` key layout. Raises :class:`ConfigError` on keys it does not know (e.g. a timm or HF-text
    tower, or attention pooling), so nothing is silently dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
        elif key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
        elif _IGNORED.match(key):
            continue
        elif m := _BLOCK.match(key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix = f"{tower}.encoder.layers.{m.group(2)}."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                q, k, v = value.chunk(3, dim=0)
                out[prefix + f"self_attn.q_proj.{kind}"] = q
                out[prefix + f"self_attn.k_proj.{kind}"] = k
                out[prefix + f"self_attn.v_proj.{kind}"] = v
                continue
            for old, new in _BLOCK_RENAMES.items():
                if rest.startswith(old + "."):
                    out[prefix + new + rest[len(old) :]] = value
                    break
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise ConfigError(
            "reward.hps.model",
            f"not an open_clip ViT CLIP state dict: {len(unknown)} unknown keys, e.g. {unknown[:3]}",
        )
    return out


def build_hps_clip(state_dict: dict[str, torch.Tensor], config, field: str = "reward.hps.model"):
    """A transformers ``CLIPModel(config)`` holding the converted open_clip weights (strictly checked)."""
    transformers = require("transformers", "pip install 'transformers>=4.46'", "the hps reward")
    converted = open_clip_to_hf(state_dict)
    # Built on the meta device (no random init of ~1B parameters), then given the checkpoint's tensors.
    with torch.device("meta"):
        model = transformers.CLIPModel(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in converted and not k.endswith("position_ids")]
    unexpected = [k for k in converted if k not in expected]
    bad_shape = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or bad_shape:
        detail = (missing and f"missing {missing[:3]}") or (unexpected and f"unexpected {unexpected[:3]}")
        detail = detail or f"shape mismatch {bad_shape[:2]}"
        raise ConfigError(field, f"checkpoint does not fit the CLIP config ({detail}); check `processor`")
    model.load_state_dict(
        {k: v.to(expected[k].dtype) for k, v in converted.items()}, strict=False, assign=True
    )
    for module in model.modules():  # non-persistent buffers (position ids) are not in any checkpoint
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise ConfigError(field, f"cannot materialise buffer {name!r} of {type(module).__name__}")
                module._buffers[name] = torch.arange(buf.shape[-1]).expand(tuple(buf.shape)).contiguous()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ConfigError(field, f"checkpoint left parameters unset: {leftover[:3]}")
    return model


@register_reward("hps")
def hps(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 32,
    processor: str = DEFAULT_PROCESSOR,
    filename: str = DEFAULT_FILENAME,
    local_files_only: bool | None = None,
) -> RewardFn:
    """HPSv2.1 reward/metric (cosine). ``model``: the checkpoint file (``.pt`` or ``.safetensors``), a
    directory holding ``filename``, or a hub repo (``xswu/HPSv2``); ``processor``: hub id or local
    directory with the ViT-H-14 ``config.json`` and CLIP tokenizer
    (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``)."""
    check_batch_size(batch_size, "reward.hps.batch_size")
    transformers = require("transformers", "pip install 'transformers>=4.46'", "the hps reward")
    dev = resolve_device(device, "reward.hps.device")
    dt = resolve_dtype(dtype, "reward.hps.dtype")
    ckpt = hub_file(
        model, filename, field="reward.hps.model", what="HPSv2 checkpoint", local_files_only=local_files_only
    )
    config = load_pretrained(
        transformers.CLIPConfig.from_pretrained,
        processor,
        field="reward.hps.processor",
        what="ViT-H-14 CLIP config",
        local_files_only=local_files_only,
    )
    sd = load_state_dict_file(ckpt, field="reward.hps.model", what="HPSv2 weights")
    clip = build_hps_clip(sd, config).eval().requires_grad_(False).to(device=dev, dtype=dt)
    tok = load_tokenizer(processor, field="reward.hps.processor", local_files_only=local_files_only)
    size, mean, std = image_norm(processor, int(config.vision_config.image_size), local_files_only)
    emb = ClipEmbedder(clip, tok, size, mean, std, mode="letterbox")

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, "reward.hps")
        return batched(lambda s: emb.cosine(images[s], prompts[s]), n, batch_size, images.device)

    fn.embedder = emb  # type: ignore[attr-defined]
    return fn
