"""Stable Diffusion 3 / 3.5 behind the :class:`~solace.models.base.FlowModelAdapter` interface.

SD3 already lives in solace's convention: its ``FlowMatchEulerDiscreteScheduler`` noises with
``z_t = (1 - sigma) z0 + sigma eps`` and the MMDiT predicts ``eps - z0``, so the adapter only has to

* scale time: the transformer takes ``timestep = sigma * num_train_timesteps`` (0..1000), exactly the
  ``scheduler.timesteps`` that ``StableDiffusion3Pipeline.__call__`` feeds it;
* encode text with the pipeline's own ``encode_prompt`` (two CLIPs + optional T5), once per prompt, without
  the pipeline's CFG duplication (solace's sampler batches ``[null, cond]`` itself, in the same order);
* (de)normalise latents with the VAE's ``scaling_factor`` and ``shift_factor``.

With the same initial noise, ``solace.sampling.sampler.sample(..., noise_level=0)`` therefore reproduces
``pipe(..., output_type="latent")`` (tested on tiny random pipelines).

Text encoders, the VAE and the transformer's base weights are frozen (``requires_grad=False``); training
adds LoRA to :attr:`SD3Adapter.denoiser` with :func:`solace.models.lora.add_lora`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from solace.errors import ConfigError, MissingDependencyError, check
from solace.models.base import AdapterHooks, Conditioning, image_size
from solace.models.text_cache import TextEncoders, text_identity
from solace.sampling.schedule import flow_match_sigmas, flux_mu

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

SD3_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]
"""Attention projections of the MMDiT's image and text streams (Flow-GRPO's SD3 LoRA targets)."""

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


class SD3Adapter(AdapterHooks):
    """:class:`~solace.models.base.FlowModelAdapter` over the components of a ``StableDiffusion3Pipeline``.

    Args:
        pipeline: a ``StableDiffusion3Pipeline`` (kept as :attr:`pipeline`; its ``encode_prompt``,
            transformer, VAE and scheduler config are used). Components may be ``None`` where unused: a
            pipeline without VAE cannot :meth:`decode`, one without text encoders cannot
            :meth:`encode_prompts` (pass precomputed :class:`Conditioning` instead).
        resolution: image side in pixels, shorthand for ``height = width`` (default 512); a ``height`` or
            ``width`` given too must agree.
        height, width: image size in pixels (multiples of ``vae_scale_factor * patch_size``, 16 for SD3);
            they set :meth:`latent_shape` and the dynamic shift if any.
        max_sequence_length: T5 tokens per prompt (SD3 default 256).
        gradient_checkpointing: enable the transformer's gradient checkpointing (saves memory when training).
        name: identifier for logs.
        embedding_cache: folder of prompt embeddings on disk (:mod:`solace.models.text_cache`); None: none.
        vae_slicing, vae_tiling: :func:`configure_vae`.

    :attr:`text` manages the text encoders (:meth:`offload_text_encoders`) and the embedding cache.
    """

    lora_target_modules: list[str]
    forward_module: nn.Module | None = None  # set by the trainer to the DDP/FSDP-wrapped denoiser

    def __init__(
        self,
        pipeline: Any,
        resolution: int | None = None,
        max_sequence_length: int = 256,
        gradient_checkpointing: bool = False,
        name: str = "sd3",
        embedding_cache: str | None = None,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        for comp in ("transformer", "scheduler"):
            check(getattr(pipeline, comp, None) is not None, "pipeline", f"has no {comp}")
        check(
            1 <= max_sequence_length <= 512,
            "max_sequence_length",
            f"must lie in 1..512 (SD3's T5 limit), got {max_sequence_length}",
        )
        self.pipeline = pipeline
        self.name = name
        self.denoiser: nn.Module = pipeline.transformer
        self.vae: nn.Module | None = getattr(pipeline, "vae", None)
        self.max_sequence_length = max_sequence_length
        self.lora_target_modules = list(SD3_LORA_TARGETS)
        self.vae_scale_factor = vae_scale_factor_of(pipeline)
        self.patch_size = int(self.denoiser.config.patch_size)
        step = self.vae_scale_factor * self.patch_size
        self.height, self.width = image_size(resolution, height, width, step, "vae_scale_factor * patch_size")
        self.resolution = self.height if self.height == self.width else None  # the square side
        sched = pipeline.scheduler.config
        check_scheduler_config(sched, "SD3")
        self.num_train_timesteps = int(sched.get("num_train_timesteps", 1000))
        self.shift = float(sched.get("shift", 3.0))
        freeze(
            self.denoiser,
            self.vae,
            *(getattr(pipeline, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")),
        )
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        configure_vae(self.vae, vae_slicing, vae_tiling)
        self.text = TextEncoders(
            pipeline, lambda: text_identity(pipeline, "sd3", max_sequence_length), lambda: self.device
        )
        if embedding_cache:
            self.text.use_store(embedding_cache)

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        dtype: str | torch.dtype = "bf16",
        text_encoder_3: bool = True,
        max_sequence_length: int = 256,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        resolution: int | None = None,
        height: int | None = None,
        width: int | None = None,
        **memory: Any,
    ) -> SD3Adapter:
        """Load a ``StableDiffusion3Pipeline`` (hub id or local folder) and wrap it.

        ``text_encoder_3=False`` skips T5-XXL (about 9.5 GB in bf16): the pipeline then feeds zeros in place
        of the T5 tokens, as diffusers documents for memory-constrained SD3 inference. ``memory``:
        ``embedding_cache``, ``vae_slicing``, ``vae_tiling`` (see the class).
        """
        torch_dtype = parse_dtype(dtype)
        try:
            from diffusers import StableDiffusion3Pipeline
        except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
            raise MissingDependencyError("SD3Adapter needs diffusers>=0.32: pip install diffusers") from e
        kwargs: dict[str, Any] = {} if text_encoder_3 else {"text_encoder_3": None, "tokenizer_3": None}
        pipe = load_pipeline(StableDiffusion3Pipeline, model, torch_dtype, **kwargs)
        pipe.to(device if device is not None else default_device())
        pipe.set_progress_bar_config(disable=True)
        return cls(
            pipe,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            **memory,
        )

    def offload_text_encoders(self, mode: str) -> None:
        """Move the text encoders to the CPU (``cpu``) or free them (``free``); see :class:`TextEncoders`."""
        self.text.offload(mode)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ FlowModelAdapter
    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    def latent_shape(self) -> tuple[int, ...]:
        """``(in_channels, height / vae_scale_factor, width / vae_scale_factor)``."""
        f = self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), self.height // f, self.width // f)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The pipeline's ``encode_prompt`` on all its encoders, one row per prompt, no CFG duplication
        (through the embedding cache and the encoders' placement, :attr:`text`)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check(len(prompts) > 0, "prompts", "must hold at least one prompt")
        return self.text.encode(prompts, self._encode_text)

    def _encode_text(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning({"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled})

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's output at ``timestep = t * num_train_timesteps`` (as SD3's pipeline)."""
        B = latents.shape[0]
        t = torch.as_tensor(t, device=latents.device)
        t = t.expand(B) if t.ndim == 0 else t
        timestep = t.to(device=self.device, dtype=torch.float32) * self.num_train_timesteps
        return (self.forward_module or self.denoiser)(
            hidden_states=latents.to(self.device, self.dtype),
            timestep=timestep,
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(self.device, self.dtype),
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.device, self.dtype),
            return_dict=False,
        )[0]

    def _vae_scale(self) -> tuple[float, float]:
        return vae_scaling(self.vae)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents / scaling_factor + shift_factor`` -> VAE decoder -> RGB in [0, 1], float32."""
        scale, shift = self._vae_scale()
        z = latents.to(self.vae.device, self.vae.dtype) / scale + shift
        img = self.vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> VAE encoder (posterior mode) -> ``(z - shift) * scaling_factor``."""
        scale, shift = self._vae_scale()
        x = images.to(self.vae.device, self.vae.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        return ((z - shift) * scale).to(self.dtype)

    def image_seq_len(self) -> int:
        """Number of image tokens the transformer sees at :attr:`height` x :attr:`width`."""
        step = self.vae_scale_factor * self.patch_size
        return (self.height // step) * (self.width // step)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps).sigmas`` from the scheduler config
        (static ``shift``, or the dynamic ``mu`` SD3's pipeline computes when ``use_dynamic_shifting``,
        through the config's ``time_shift_type``: exponential or linear)."""
        cfg = self.pipeline.scheduler.config
        mu = None
        if cfg.get("use_dynamic_shifting", False):
            mu = flux_mu(
                self.image_seq_len(),
                int(cfg.get("base_image_seq_len", 256)),
                int(cfg.get("max_image_seq_len", 4096)),
                float(cfg.get("base_shift", 0.5)),
                float(cfg.get("max_shift", 1.16)),
            )
        kind = cfg.get("time_shift_type", None) or "exponential"
        return flow_match_sigmas(num_steps, self.shift, self.num_train_timesteps, mu=mu, time_shift_type=kind)
