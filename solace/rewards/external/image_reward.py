"""ImageReward (Xu et al., 2023): BLIP (ViT-L/16 image encoder at 224 px + BERT-base "med" text encoder with
cross-attention to the image tokens) with an MLP head.

For image i and prompt i (BERT tokens, max 35, padded to 35), as in ``ImageReward.ImageReward.score``:

    f = BLIP text_encoder(tokens, encoder_hidden_states=visual_encoder(pixels)).last_hidden_state[:, 0]
    score = (MLP(f) - 0.16717362830052426) / 1.0333394966054072      (model.mean, model.std)

MLP = Linear 768-1024, Dropout, 1024-128, Dropout, 128-64, Dropout, 64-16, 16-1 (no activations; the
layout of the LAION aesthetic head, keys ``mlp.layers.{0,2,4,6,7}``). Pixels are preprocessed in torch:
bicubic short-side resize to 224, centre crop, CLIP mean/std (the package's transform). Flow-GRPO uses the
score raw as its reward; papers tabulate it raw (roughly -2..2, ~1 for good generations).

Two backends compute the same score (``backend``):

``"package"``: the ``image-reward`` package (``import ImageReward``). It depends on timm 0.6, fairscale,
    datasets and torchvision, and pip resolves those to a different torch than solace's; install it where
    that is acceptable (``pip install image-reward``). ``model``: ``"ImageReward-v1.0"`` (the package
    downloads ``THUDM/ImageReward`` into ``download_root``) or a local ``ImageReward.pt``; with a local
    file, ``med_config`` (default: ``med_config.json`` beside it) avoids the package's download. Its BLIP
    tokenizer (``bert-base-uncased``) comes from the Hugging Face cache.

``"transformers"``: no extra package. The same network is built from transformers' BLIP modules
    (``BlipVisionModel`` + ``BlipTextModel`` with cross-attention, run as an encoder like
    ``BlipForImageTextRetrieval``'s ITM branch) and the MLP in plain torch, and the official
    ``ImageReward.pt`` (BLIP/LAVIS key names ``blip.visual_encoder.*``, ``blip.text_encoder.*``,
    ``mlp.layers.*``) is renamed key by key (:func:`rename_official_key`) and loaded strictly, read with
    ``torch.load(weights_only=True)`` or from ``.safetensors``. ``model``: ``"ImageReward-v1.0"``
    (``ImageReward.pt`` of the hub repo ``THUDM/ImageReward``: ``download_root`` if it holds the file, else
    the Hugging Face cache, downloaded unless offline), a local ``.pt``/``.safetensors`` file, a local
    directory holding ``ImageReward.pt``, or another hub repo holding it. ``tokenizer``: ``bert-base-uncased``
    (hub id or local path; BLIP adds ``[DEC]`` and ``[ENC]``, giving its 30524-token vocabulary).
    ``blip_config`` (``{"vision": {...}, "text": {...}}``) overrides the published architecture (ViT-L/16
    224 px with LayerNorm eps 1e-6; BERT-base, vocabulary 30524) -- for tests on tiny models.

``"auto"`` (default): the package when ``import ImageReward`` works, else the transformers backend.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from solace.errors import ConfigError, MissingDependencyError
from solace.rewards.external._common import (
    CLIP_MEAN,
    CLIP_STD,
    batched,
    check_batch_size,
    check_inputs,
    clip_preprocess,
    first_line,
    hub_file,
    load_state_dict_file,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from solace.rewards.external.aesthetic import AestheticMLP
from solace.rewards.registry import RewardFn, register_reward

INSTALL = "pip install image-reward"
DEFAULT_MODEL = "ImageReward-v1.0"
HUB_REPO = "THUDM/ImageReward"
CHECKPOINT = "ImageReward.pt"
DEFAULT_TOKENIZER = "bert-base-uncased"
MAX_TEXT_LENGTH = 35  # ImageReward.score / inference_rank
IMAGE_SIZE = 224
MEAN = 0.16717362830052426  # ImageReward.mean
STD = 1.0333394966054072  # ImageReward.std
BACKENDS = ("auto", "package", "transformers")
FIELD = "reward.image_reward"


# --------------------------------------------------------------------------------------------------------
# package backend
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# transformers backend
# --------------------------------------------------------------------------------------------------------

# The published architecture: BLIP_Pretrain(image_size=224, vit="large") with BLIP's med_config.json
# (encoder_width set to the ViT width). BLIP's ViT uses LayerNorm(eps=1e-6) and exact GELU; med uses
# LayerNorm(eps=1e-12), GELU, absolute positions and no token-type embeddings.
PUBLISHED_VISION: dict[str, Any] = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=224,
    patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
)  # fmt: skip
PUBLISHED_TEXT: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,
)  # fmt: skip

# BLIP ViT (timm naming, after "blip.visual_encoder.") -> BlipVisionModel (after "vision_model."); the
# mapping of transformers' convert_blip_original_pytorch_to_hf.py, written out rule by rule.
_VISION_RULES: tuple[tuple[re.Pattern, str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"^cls_token$", "embeddings.class_embedding"),
        (r"^pos_embed$", "embeddings.position_embedding"),
        (r"^patch_embed\.proj\.(weight|bias)$", r"embeddings.patch_embedding.\1"),
        (r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$", r"encoder.layers.\1.layer_norm\2.\3"),
        (r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", r"encoder.layers.\1.self_attn.qkv.\2"),
        (r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$", r"encoder.layers.\1.self_attn.projection.\2"),
        (r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$", r"encoder.layers.\1.mlp.\2.\3"),
        (r"^norm\.(weight|bias)$", r"post_layernorm.\1"),
    )
)
# Parts of BLIP_Pretrain the score never uses: the contrastive projections, a BERT pooler, and med's
# ``position_ids`` buffer (an arange; transformers keeps its own, non-persistent).
_UNUSED = re.compile(
    r"^blip\.(vision_proj|text_proj|text_encoder\.pooler)\.|^blip\.text_encoder\..*\.position_ids$"
)


def rename_official_key(key: str) -> str | None:
    """Name in :class:`ImageRewardBLIP` of a key of the official ``ImageReward.pt``.

    ``None`` for a key the score does not use (dropped); a key outside the known naming comes back
    unchanged, so a strict load reports it as unexpected. BLIP's med text encoder already uses BERT's
    names, which ``BlipTextModel`` keeps (``embeddings.word_embeddings``, ``encoder.layer.N.attention``,
    ``.crossattention``, ``.intermediate``, ``.output``); the MLP keeps ``mlp.layers.N``.
    """
    if _UNUSED.search(key):
        return None
    if key.startswith("blip.visual_encoder."):
        rest = key[len("blip.visual_encoder.") :]
        for pattern, repl in _VISION_RULES:
            if pattern.match(rest):
                return "vision_model." + pattern.sub(repl, rest)
        return key
    if key.startswith("blip.text_encoder."):
        return "text_encoder." + key[len("blip.text_encoder.") :]
    return key  # "mlp.layers.N.*" is already the name here; anything else stays unexpected


def convert_official_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state dict under :class:`ImageRewardBLIP`'s names, unused keys dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        new = rename_official_key(key)
        if new is not None:
            out[new] = value
    return out


def blip_configs(overrides: Mapping[str, Any] | None = None):
    """(``BlipVisionConfig``, ``BlipTextConfig``) of the published ImageReward, with ``overrides``
    (``{"vision": {...}, "text": {...}}``) applied."""
    from transformers import BlipTextConfig, BlipVisionConfig

    field = f"{FIELD}.blip_config"
    overrides = dict(overrides or {})
    unknown = set(overrides) - {"vision", "text"}
    if unknown or not all(isinstance(v, Mapping) for v in overrides.values()):
        raise ConfigError(
            field, f"expected {{'vision': {{...}}, 'text': {{...}}}}, got keys {sorted(overrides)}"
        )
    vision = {**PUBLISHED_VISION, **overrides.get("vision", {})}
    text = {**PUBLISHED_TEXT, **overrides.get("text", {})}
    # is_decoder=True only makes BlipTextModel build the cross-attention layers; forward() runs it as an
    # encoder (bidirectional self-attention), as med's BertModel in its default "multimodal" mode.
    text.update(encoder_hidden_size=vision["hidden_size"], is_decoder=True)
    try:
        return BlipVisionConfig(**vision), BlipTextConfig(**text)
    except (TypeError, ValueError) as e:
        raise ConfigError(field, f"invalid BLIP configuration ({first_line(e)})") from None


class ImageRewardBLIP(nn.Module):
    """ImageReward on transformers' BLIP modules: ``vision_model`` (BLIP ViT), ``text_encoder`` (BLIP's
    BERT with cross-attention, no pooler) and ``mlp``; ``forward`` returns the normalised score (B,)."""

    mean = MEAN
    std = STD

    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        self.vision_model = BlipVisionModel(vision_config)
        self.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP((text_config.hidden_size, 1024, 128, 64, 16, 1))

    def features(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The [CLS] state of the text encoder cross-attending to the image tokens, (B, hidden)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            is_decoder=False,
        )
        return out.last_hidden_state[:, 0, :]

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        feats = self.features(pixel_values, input_ids, attention_mask).float()
        rewards = self.mlp(feats.to(self.mlp.layers[0].weight.dtype)).float()
        return ((rewards - self.mean) / self.std).reshape(-1)


def build_image_reward_blip(blip_config: Mapping[str, Any] | None = None) -> ImageRewardBLIP:
    """A randomly initialised :class:`ImageRewardBLIP` (published sizes unless overridden), eval mode."""
    return ImageRewardBLIP(*blip_configs(blip_config)).eval()


def load_image_reward_blip(
    path: str, blip_config: Mapping[str, Any] | None = None, field: str = f"{FIELD}.model"
) -> ImageRewardBLIP:
    """:class:`ImageRewardBLIP` with the weights of an official ``ImageReward.pt`` (or ``.safetensors``),
    renamed and loaded strictly: a missing, unexpected or misshapen key is a one-line ConfigError."""
    sd = convert_official_state_dict(load_state_dict_file(path, field=field, what="ImageReward weights"))
    net = build_image_reward_blip(blip_config)
    want = net.state_dict()
    missing = sorted(set(want) - set(sd))
    unexpected = sorted(set(sd) - set(want))
    if missing or unexpected:
        raise ConfigError(
            field,
            f"{path!r} is not an ImageReward checkpoint in BLIP naming: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]} (after renaming with "
            "rename_official_key)",
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in want.items() if sd[k].shape != v.shape]
    if bad:
        raise ConfigError(
            field,
            f"{path!r}: {len(bad)} tensors do not match the architecture (checkpoint vs model), e.g. "
            f"{bad[:2]}; check blip_config",
        )
    net.load_state_dict(sd, strict=True)
    return net.requires_grad_(False)


def resolve_checkpoint(model: str, download_root: str | None, local_files_only: bool | None) -> str:
    """Path of ``ImageReward.pt`` for the transformers backend (see the module docstring)."""
    field = f"{FIELD}.model"
    if not isinstance(model, str) or not model:
        raise ConfigError(field, f"expected {DEFAULT_MODEL!r}, a local path or a hub repo, got {model!r}")
    if model == DEFAULT_MODEL:
        if download_root:
            p = os.path.join(os.path.expanduser(download_root), CHECKPOINT)
            if os.path.isfile(p):
                return p
        model = HUB_REPO
    return hub_file(
        model, CHECKPOINT, field=field, what="ImageReward weights", local_files_only=local_files_only
    )


def load_blip_tokenizer(path: str, vocab_size: int, local_files_only: bool | None = None):
    """BERT tokenizer with BLIP's two added tokens (``[DEC]`` then ``[ENC]``, as BLIP's init_tokenizer)."""
    field = f"{FIELD}.tokenizer"
    tok = load_tokenizer(path, field=field, local_files_only=local_files_only)
    tok.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)
    if len(tok) > vocab_size:
        raise ConfigError(
            field, f"{path!r} has {len(tok)} tokens with BLIP's [DEC]/[ENC] but the text encoder {vocab_size}"
        )
    return tok


@torch.no_grad()
def blip_image_reward_scores(
    net: ImageRewardBLIP, tokenizer, pixel_values: torch.Tensor, prompts: Sequence[str]
) -> torch.Tensor:
    """Batched ImageReward of preprocessed ``pixel_values`` and one prompt per image -> (B,) float32."""
    tok = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
    )
    dev = pixel_values.device
    return net(pixel_values, tok["input_ids"].to(dev), tok["attention_mask"].to(dev))


# --------------------------------------------------------------------------------------------------------
# factory
# --------------------------------------------------------------------------------------------------------


def choose_backend(backend: str) -> str:
    """``"package"`` or ``"transformers"``; ``"auto"`` is the package when it imports, else transformers."""
    if backend not in BACKENDS:
        raise ConfigError(
            f"{FIELD}.backend", f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}"
        )
    if backend != "auto":
        return backend
    try:
        _import_package()
    except MissingDependencyError:
        return "transformers"
    return "package"


@register_reward("image_reward")
def image_reward(
    model: str = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = "float32",
    batch_size: int = 16,
    backend: str = "auto",
    med_config: str | None = None,
    download_root: str | None = None,
    tokenizer: str = DEFAULT_TOKENIZER,
    blip_config: Mapping[str, Any] | None = None,
    local_files_only: bool | None = None,
) -> RewardFn:
    """ImageReward reward/metric (raw normalised score): the ``image-reward`` package if importable, else
    transformers' BLIP with the official weights (``backend``; see the module docstring)."""
    check_batch_size(batch_size, f"{FIELD}.batch_size")
    dev = resolve_device(device, f"{FIELD}.device")
    dt = resolve_dtype(dtype, f"{FIELD}.dtype")
    chosen = choose_backend(backend)
    if chosen == "package":
        net = load_image_reward(model, dev, med_config, download_root).to(dtype=dt)
        size, tok = IMAGE_SIZE, None
    else:
        try:
            path = resolve_checkpoint(model, download_root, local_files_only)
        except MissingDependencyError as e:
            if backend != "auto":
                raise
            raise MissingDependencyError(f"{e}; or install the image-reward package: {INSTALL}") from None
        net = load_image_reward_blip(path, blip_config).to(device=dev, dtype=dt)
        size = int(net.vision_model.config.image_size)
        tok = load_blip_tokenizer(tokenizer, int(net.text_encoder.config.vocab_size), local_files_only)

    def fn(
        images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor:
        n, prompts = check_inputs(images, prompts, metadata, FIELD)

        def chunk(s: slice) -> torch.Tensor:
            px = clip_preprocess(images[s].to(dev), size, CLIP_MEAN, CLIP_STD).to(dt)
            if tok is None:
                return image_reward_scores(net, px, prompts[s])
            return blip_image_reward_scores(net, tok, px, prompts[s])

        return batched(chunk, n, batch_size, images.device)

    fn.net = net  # type: ignore[attr-defined]
    fn.tokenizer = tok  # type: ignore[attr-defined]
    fn.backend = chosen  # type: ignore[attr-defined]
    return fn
