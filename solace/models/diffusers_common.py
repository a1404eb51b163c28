"""What the diffusers-backed adapters (:mod:`solace.models.sd3`, :mod:`solace.models.flux`) share: dtypes and
devices, the scheduler options solace reproduces, freezing, the VAE's scale factor, scaling and memory
switches, loading a pipeline with an error that says what to download, and :class:`DiffusersAdapter`, the
base class of both adapters (device, dtype, text encoders, VAE scaling).

diffusers itself is imported only when a pipeline loads (:func:`load_pipeline`'s callers)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from solace.errors import ConfigError, MissingDependencyError, check
from solace.models.base import AdapterBase, SizeRule
from solace.models.family import MEMORY_SETTINGS, ModelFamily
from solace.models.text_cache import TextEncoders, text_identity

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ATTENTION_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
"""Attention projections of the MMDiT's image and text streams (Flow-GRPO's SD3 and FLUX LoRA targets)."""

_UNSUPPORTED_SCHEDULER_OPTIONS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "shift_terminal",
    "invert_sigmas",
    "stochastic_sampling",
)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16" | "fp16" | "fp32"`` (or a ``torch.dtype``) -> ``torch.dtype``; else a ConfigError."""
    if isinstance(dtype, torch.dtype):
        check(dtype in DTYPES.values(), "dtype", f"must be one of {list(DTYPES)}, got {dtype}")
        return dtype
    check(dtype in DTYPES, "dtype", f"must be one of {list(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_scheduler_config(config: Any, what: str) -> None:
    """Refuse scheduler options that :mod:`solace.sampling.schedule` does not reproduce."""
    for opt in _UNSUPPORTED_SCHEDULER_OPTIONS:
        if config.get(opt, None):
            raise ConfigError(
                "scheduler",
                f"{what}'s FlowMatchEulerDiscreteScheduler sets {opt}={config.get(opt)!r}, which "
                "solace's Flow-GRPO schedule does not reproduce; use a scheduler config without it",
            )


def freeze(*modules: nn.Module | None) -> None:
    """``requires_grad_(False)`` on each module that is not None."""
    for m in modules:
        if m is not None:
            m.requires_grad_(False)


def vae_scale_factor_of(pipeline: Any) -> int:
    """The pipeline's ``vae_scale_factor`` (from its VAE's blocks; 8, diffusers' default, without a VAE)."""
    if getattr(pipeline, "vae_scale_factor", None):
        return int(pipeline.vae_scale_factor)
    vae = getattr(pipeline, "vae", None)
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8


def vae_scaling(vae: nn.Module | None) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` of a VAE; a ConfigError when the adapter has no VAE."""
    check(vae is not None, "vae", "this adapter was built without a VAE; decode/encode_images need one")
    cfg = vae.config
    return float(cfg.scaling_factor), float(cfg.get("shift_factor", None) or 0.0)


def configure_vae(vae: nn.Module | None, slicing: bool = False, tiling: bool = False) -> None:
    """diffusers' ``AutoencoderKL.enable_slicing`` (a batch decoded one image at a time) and ``enable_tiling``
    (large latents decoded in overlapping, blended tiles) when asked for; a ConfigError without a VAE."""
    for on, name, method in (
        (slicing, "vae_slicing", "enable_slicing"),
        (tiling, "vae_tiling", "enable_tiling"),
    ):
        if on:
            check(vae is not None, f"model.{name}", "this adapter has no VAE; turn the switch off")
            getattr(vae, method)()


def load_pipeline(pipeline_cls: Any, model: str, torch_dtype: torch.dtype, **kwargs: Any) -> Any:
    """``pipeline_cls.from_pretrained`` with a solace error that says what to download when it fails."""
    try:  # newer diffusers renamed from_pretrained's ``torch_dtype`` to ``dtype``
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401

        dtype_kw = "dtype"
    except ImportError:
        dtype_kw = "torch_dtype"
    try:
        return pipeline_cls.from_pretrained(model, **{dtype_kw: torch_dtype}, **kwargs)
    except (OSError, ValueError) as e:
        # diffusers raises OSError for hub/cache misses and ValueError for a path that is neither a folder
        # nor a repo id; other ValueErrors (a broken config in an existing folder) propagate unchanged.
        if isinstance(e, ValueError) and os.path.exists(model):
            raise
        raise MissingDependencyError(
            f"could not load {pipeline_cls.__name__} from {model!r}: {e}. Pass a local folder written by "
            f"save_pretrained, or download it first (e.g. `huggingface-cli download {model}`; gated models "
            "need `huggingface-cli login` and an accepted licence)."
        ) from e


class DiffusersAdapter(AdapterBase):
    """The part of :class:`~solace.models.sd3.SD3Adapter` and :class:`~solace.models.flux.FluxAdapter` that
    does not depend on the backbone: the pipeline's components checked, frozen and kept, the text encoders
    behind :attr:`text` (embedding cache, offloading), the VAE's memory switches and scaling."""

    def _keep(self, pipeline: Any, family: str, name: str, max_sequence_length: int) -> None:
        """Check and keep ``pipeline`` (its transformer is :attr:`denoiser`), its VAE and scale factor."""
        for comp in ("transformer", "scheduler"):
            check(getattr(pipeline, comp, None) is not None, "pipeline", f"has no {comp}")
        check(
            1 <= max_sequence_length <= 512,
            "max_sequence_length",
            f"must lie in 1..512 ({family.upper()}'s T5 limit), got {max_sequence_length}",
        )
        self.pipeline = pipeline
        self.name = name
        self.denoiser: nn.Module = pipeline.transformer
        self.vae: nn.Module | None = getattr(pipeline, "vae", None)
        self.max_sequence_length = max_sequence_length
        self.vae_scale_factor = vae_scale_factor_of(pipeline)

    def _prepare(
        self,
        family: str,
        text_encoder_names: tuple[str, ...],
        gradient_checkpointing: bool,
        memory: tuple[str | None, bool, bool],
    ) -> None:
        """Freeze the transformer, the VAE and the text encoders named, apply the memory switches
        ``(embedding_cache, vae_slicing, vae_tiling)`` and set up :attr:`text`."""
        pipeline = self.pipeline
        freeze(self.denoiser, self.vae, *(getattr(pipeline, n, None) for n in text_encoder_names))
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        embedding_cache, vae_slicing, vae_tiling = memory
        configure_vae(self.vae, vae_slicing, vae_tiling)
        msl = self.max_sequence_length
        self.text = TextEncoders(pipeline, lambda: text_identity(pipeline, family, msl), lambda: self.device)
        if embedding_cache:
            self.text.use_store(embedding_cache)

    def offload_text_encoders(self, mode: str) -> None:
        """Move the text encoders to the CPU (``cpu``) or free them (``free``); see :class:`TextEncoders`."""
        self.text.offload(mode)  # type: ignore[arg-type]

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def _vae_scale(self) -> tuple[float, float]:
        return vae_scaling(self.vae)

    def _decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Unpacked latents -> ``/ scaling_factor + shift_factor`` -> VAE decoder -> RGB in [0, 1]."""
        scale, shift = self._vae_scale()
        z = z.to(self.vae.device, self.vae.dtype) / scale + shift
        img = self.vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def _encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> VAE encoder (posterior mode) -> ``(z - shift) * scaling_factor`` (unpacked)."""
        scale, shift = self._vae_scale()
        x = images.to(self.vae.device, self.vae.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return (z - shift) * scale


_LOADER_KEYS = frozenset(
    {"device", "dtype", "max_sequence_length", "gradient_checkpointing", "resolution", "height", "width"}
    | {"embedding_cache", "vae_slicing", "vae_tiling"}
)
"""The ``model.*`` settings every diffusers family's ``from_pretrained`` reads (a family adds its own)."""


def diffusers_family(adapter: type, class_marker: str, sizes: SizeRule, own: frozenset[str]) -> ModelFamily:
    """A diffusers pipeline family: loads ``adapter.from_pretrained`` with the settings it reads (the common
    ones and the family's ``own``), and ``auto`` picks it for a pipeline whose class name (from
    ``model_index.json``; never the model's name) contains ``class_marker``."""
    keys = _LOADER_KEYS | own

    def load(model: str, **settings: Any) -> Any:
        return adapter.from_pretrained(model, **{k: v for k, v in settings.items() if k in keys})

    def recognises(model: str, pipeline_class: str | None) -> bool:
        return pipeline_class is not None and class_marker in pipeline_class

    settings = frozenset({"max_sequence_length", "gradient_checkpointing", *own, *MEMORY_SETTINGS})
    return ModelFamily(load=load, recognises=recognises, sizes=sizes, settings=settings)
