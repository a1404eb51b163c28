"""Shared plumbing of the external rewards: argument checks, device/dtype resolution, model loading that
fails with one clear line, CLIP-style preprocessing done in torch, and batching.

Nothing here imports transformers at module import time; every loader imports it on first use.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from solace.errors import ConfigError, MissingDependencyError

# OpenAI CLIP normalisation (also used by open_clip's OpenAI/LAION ViT-H-14, BLIP and ImageReward).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


# --------------------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None, field: str) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(field, f"invalid device {device!r} ({e})") from None


def resolve_dtype(dtype: str | torch.dtype | None, field: str) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ConfigError(field, f"unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return _DTYPES[key]


def check_batch_size(batch_size: int, field: str) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(field, f"must be a positive integer, got {batch_size!r}")
    return batch_size


def check_inputs(
    images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None, name: str
) -> tuple[int, list[str]]:
    """Validate the reward interface: images (B, 3, H, W) float in [0, 1], B prompts, B metadata dicts."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ConfigError(f"{name}.images", f"expected a tensor of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ConfigError(f"{name}.images", f"expected float RGB in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise ConfigError(f"{name}.prompts", "expected a list of strings, got a single string")
    prompts = list(prompts)
    batch = images.shape[0]
    if len(prompts) != batch:
        raise ConfigError(f"{name}.prompts", f"got {len(prompts)} prompts for {batch} images")
    if metadata is not None and len(metadata) != batch:
        raise ConfigError(f"{name}.metadata", f"got {len(metadata)} metadata records for {batch} images")
    return batch, prompts


def to_uint8_hwc(images: torch.Tensor) -> list:
    """(B, 3, H, W) float [0, 1] -> list of (H, W, 3) uint8 numpy arrays (the rounding Flow-GRPO uses)."""
    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    return [a.permute(1, 2, 0).contiguous().numpy() for a in arr]


def batched(
    fn: Callable[[slice], torch.Tensor], total: int, batch_size: int, out_device: torch.device
) -> torch.Tensor:
    """Run ``fn`` on consecutive slices of at most ``batch_size`` rows; concatenate as float32 (B,)."""
    outs = [
        fn(slice(i, min(i + batch_size, total))).detach().float().reshape(-1).to(out_device)
        for i in range(0, total, batch_size)
    ]
    if not outs:
        return torch.zeros(0, device=out_device)
    return torch.cat(outs)


# --------------------------------------------------------------------------------------------------------
# optional dependencies and model files
# --------------------------------------------------------------------------------------------------------


def require(module: str, install: str, what: str) -> Any:
    """Import ``module`` or raise a one-line :class:`MissingDependencyError` saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # also a package present but broken (its own import failing)
        raise MissingDependencyError(
            f"{what} needs the optional package {module!r} ({type(e).__name__}: {first_line(e)}); "
            f"install it with: {install}"
        ) from None


def first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def looks_local(path: str) -> bool:
    """A path on disk (existing, or written like a path) rather than a hub id such as ``org/name``."""
    return os.path.exists(path) or path.startswith(("/", "./", "../", "~", ".\\")) or path.count("/") > 1


def offline_default(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return bool(local_files_only)
    flags = (os.environ.get(k, "").lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def load_pretrained(
    loader: Callable[..., Any],
    path: str,
    *,
    field: str,
    what: str,
    local_files_only: bool | None = None,
    **kwargs: Any,
) -> Any:
    """``loader(path, **kwargs)`` (a ``from_pretrained``) with one-line errors instead of deep tracebacks.

    A local path is loaded with ``local_files_only=True``. A hub id is looked up in the local cache first
    and only then, unless offline (``local_files_only=True`` or ``HF_HUB_OFFLINE=1``), downloaded.
    """
    if not isinstance(path, str) or not path:
        raise ConfigError(field, f"expected a hub id or a local path for {what}, got {path!r}")
    if looks_local(path):
        expanded = os.path.expanduser(path)
        if not os.path.exists(expanded):
            raise MissingDependencyError(
                f"{field}: {what} not found at {path!r}; download it there or pass its hub id"
            )
        try:
            return loader(expanded, local_files_only=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - missing files, bad configs, size mismatches: all one line
            raise ConfigError(field, f"cannot load {what} from {path!r}: {first_line(e)}") from None
    try:
        return loader(path, local_files_only=True, **kwargs)
    except (OSError, ValueError) as e:
        cached_err = e
    if offline_default(local_files_only):
        raise MissingDependencyError(
            f"{field}: {what} {path!r} is not in the local Hugging Face cache and downloads are off "
            f"({first_line(cached_err)}); run `huggingface-cli download {path}` or pass a local path"
        ) from None
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as e:
        raise MissingDependencyError(
            f"{field}: cannot load {what} {path!r} ({first_line(e)}); run `huggingface-cli download {path}` "
            "on a machine with hub access or pass a local path"
        ) from None


def hub_file(
    repo_or_path: str, filename: str, *, field: str, what: str, local_files_only: bool | None = None
) -> str:
    """Path of one file: ``repo_or_path`` is a local file, a local directory holding ``filename``, or a
    hub repo (cache first, download unless offline)."""
    if looks_local(repo_or_path):
        p = os.path.expanduser(repo_or_path)
        if os.path.isdir(p):
            p = os.path.join(p, filename)
        if not os.path.isfile(p):
            raise MissingDependencyError(f"{field}: {what} not found at {p!r}; download {filename} there")
        return p
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_or_path, filename, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises several unrelated types here
        cached_err = e
    if offline_default(local_files_only):
        raise MissingDependencyError(
            f"{field}: {what} ({repo_or_path}/{filename}) is not in the local Hugging Face cache and "
            f"downloads are off ({first_line(cached_err)}); run `huggingface-cli download {repo_or_path} "
            f"{filename}` or pass a local path"
        ) from None
    try:
        return hf_hub_download(repo_or_path, filename)
    except Exception as e:  # noqa: BLE001
        raise MissingDependencyError(
            f"{field}: cannot download {what} ({repo_or_path}/{filename}): {first_line(e)}; run "
            f"`huggingface-cli download {repo_or_path} {filename}` elsewhere and pass the local path"
        ) from None


def load_state_dict_file(path: str, *, field: str, what: str) -> dict[str, torch.Tensor]:
    """Tensors from ``.safetensors`` or a torch pickle loaded with ``weights_only=True`` (no arbitrary code).

    A checkpoint dict wrapping the weights under ``state_dict`` (HPS) or ``model`` is unwrapped, and a
    ``module.`` prefix left by DataParallel is stripped.
    """
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd: Any = load_file(path, device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise ConfigError(
            field,
            f"cannot read {what} from {path!r} as safetensors or as a weights-only torch file "
            f"({first_line(e)}); convert it to .safetensors",
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(field, f"{path!r} does not hold a state dict of tensors for {what}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def read_json(path_or_id: str, filename: str, local_files_only: bool | None = None) -> dict | None:
    """``filename`` of a local directory or of a cached/downloadable hub repo, or ``None`` if absent."""
    if looks_local(path_or_id):
        p = os.path.join(os.path.expanduser(path_or_id), filename)
        if not os.path.isfile(p):
            return None
    else:
        try:
            from huggingface_hub import hf_hub_download

            try:
                p = hf_hub_download(path_or_id, filename, local_files_only=True)
            except Exception:  # noqa: BLE001
                if offline_default(local_files_only):
                    return None
                p = hf_hub_download(path_or_id, filename)
        except Exception:  # noqa: BLE001 - optional file: any failure means "use the defaults"
            return None
    with open(p) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------------------
# CLIP models
# --------------------------------------------------------------------------------------------------------


def load_clip(
    path: str,
    *,
    field: str,
    device: torch.device,
    dtype: torch.dtype,
    local_files_only: bool | None = None,
):
    """A transformers ``CLIPModel`` in eval mode, frozen, on ``device`` in ``dtype``."""
    transformers = require("transformers", "pip install 'transformers>=4.46'", "this reward")
    model = load_pretrained(
        transformers.CLIPModel.from_pretrained,
        path,
        field=field,
        what="CLIP model",
        local_files_only=local_files_only,
    )
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)


def load_tokenizer(path: str, *, field: str, local_files_only: bool | None = None) -> Any:
    transformers = require("transformers", "pip install 'transformers>=4.46'", "this reward")
    return load_pretrained(
        transformers.AutoTokenizer.from_pretrained,
        path,
        field=field,
        what="tokenizer",
        local_files_only=local_files_only,
    )


def image_norm(path: str, image_size: int, local_files_only: bool | None = None) -> tuple[int, tuple, tuple]:
    """(crop size, mean, std) from ``preprocessor_config.json`` of ``path`` if present, else the CLIP
    defaults at the vision tower's ``image_size``."""
    cfg = read_json(path, "preprocessor_config.json", local_files_only) or {}
    crop = cfg.get("crop_size", image_size)
    if isinstance(crop, dict):
        crop = crop.get("height", crop.get("shortest_edge", image_size))
    mean = tuple(cfg.get("image_mean", CLIP_MEAN))
    std = tuple(cfg.get("image_std", CLIP_STD))
    return int(crop), mean, std


def clip_preprocess(
    images: torch.Tensor,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    mode: str = "crop",
) -> torch.Tensor:
    """CLIP preprocessing on tensors (any device): float [0, 1] (B, 3, H, W) -> normalised (B, 3, size, size).

    ``mode="crop"`` is CLIPProcessor's / OpenAI CLIP's: bicubic resize of the shorter side to ``size``
    (long side ``int(size * long / short)``), centre crop. ``mode="letterbox"`` is HPSv2's
    ``ResizeMaxSize``: bicubic resize of the longer side to ``size``, zero padding (black, before
    normalisation) centred. Bicubic uses ``antialias=True``, close to PIL's resampling; for square inputs
    both modes reduce to a single resize to ``size`` x ``size``. Computed in float32.
    """
    x = images.float()
    h, w = x.shape[-2:]
    if mode == "crop":
        if h <= w:
            nh, nw = size, int(size * w / h)
        else:
            nh, nw = int(size * h / w), size
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    elif mode == "letterbox":
        scale = size / max(h, w)
        nh, nw = round(h * scale), round(w * scale)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        ph, pw = size - nh, size - nw
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
    else:
        raise ConfigError("preprocess.mode", f"unknown mode {mode!r}; use 'crop' or 'letterbox'")
    x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


class ClipEmbedder:
    """Image and text embeddings (projected, not normalised) of a transformers ``CLIPModel``.

    Calls the towers and projections directly, so it works whether ``get_*_features`` returns a tensor
    (transformers 4.x) or a model output (5.x).
    """

    def __init__(self, model, tokenizer, size: int, mean, std, mode: str = "crop"):
        self.model = model
        self.tokenizer = tokenizer
        self.size, self.mean, self.std, self.mode = size, mean, std, mode
        self.max_length = int(model.config.text_config.max_position_embeddings)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.no_grad()
    def image(self, images: torch.Tensor) -> torch.Tensor:
        px = clip_preprocess(images.to(self.device), self.size, self.mean, self.std, self.mode)
        out = self.model.vision_model(pixel_values=px.to(self.dtype))
        return self.model.visual_projection(out.pooler_output)

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model.text_model(
            input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
        )
        return self.model.text_projection(out.pooler_output)

    def cosine(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Row-wise cosine similarity of image i with prompt i, float32 (B,)."""
        img = F.normalize(self.image(images).float(), dim=-1)
        txt = F.normalize(self.text(prompts).float(), dim=-1)
        return (img * txt).sum(-1)


def build_clip_embedder(
    model: str,
    *,
    name: str,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
    tokenizer: str | None = None,
    mode: str = "crop",
    text: bool = True,
    local_files_only: bool | None = None,
) -> ClipEmbedder:
    """Load a CLIP model (and, if ``text``, its tokenizer) into a :class:`ClipEmbedder`."""
    dev = resolve_device(device, f"reward.{name}.device")
    dt = resolve_dtype(dtype, f"reward.{name}.dtype")
    field = f"reward.{name}.model"
    clip = load_clip(model, field=field, device=dev, dtype=dt, local_files_only=local_files_only)
    tok_path = tokenizer or model
    tok = (
        load_tokenizer(tok_path, field=f"reward.{name}.processor", local_files_only=local_files_only)
        if text
        else None
    )
    size, mean, std = image_norm(tok_path, int(clip.config.vision_config.image_size), local_files_only)
    return ClipEmbedder(clip, tok, size, mean, std, mode=mode)
