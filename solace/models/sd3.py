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

from collections.abc import Sequence
from typing import Any

import torch

from solace.errors import MissingDependencyError, check
from solace.models.base import Conditioning, SizeRule
from solace.models.diffusers_common import (
    ATTENTION_LORA_TARGETS,
    DiffusersAdapter,
    check_scheduler_config,
    default_device,
    diffusers_family,
    load_pipeline,
    parse_dtype,
)
from solace.models.family import FAMILIES
from solace.sampling.schedule import flow_match_sigmas, flux_mu

SD3_SIZES = SizeRule(grid="vae_scale_factor * patch_size")
"""SD3's image sizes: multiples of the VAE's downsampling times the transformer's patch (16 for SD3.5)."""

SD3_LORA_TARGETS = list(ATTENTION_LORA_TARGETS)
"""Attention projections of the MMDiT's image and text streams (Flow-GRPO's SD3 LoRA targets)."""


class SD3Adapter(DiffusersAdapter):
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
        self._keep(pipeline, "sd3", name, max_sequence_length)
        self.lora_target_modules = list(SD3_LORA_TARGETS)
        self.patch_size = int(self.denoiser.config.patch_size)
        step = self.vae_scale_factor * self.patch_size
        self.height, self.width = SD3_SIZES.resolve(resolution, height, width, step)
        self.resolution = self.height if self.height == self.width else None  # the square side
        sched = pipeline.scheduler.config
        check_scheduler_config(sched, "SD3")
        self.num_train_timesteps = int(sched.get("num_train_timesteps", 1000))
        self.shift = float(sched.get("shift", 3.0))
        encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
        self._prepare("sd3", encoders, gradient_checkpointing, (embedding_cache, vae_slicing, vae_tiling))

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

    # ------------------------------------------------------------------ FlowModelAdapter
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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``latents / scaling_factor + shift_factor`` -> VAE decoder -> RGB in [0, 1], float32."""
        return self._decode_latents(latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> VAE encoder (posterior mode) -> ``(z - shift) * scaling_factor``."""
        return self._encode_latents(images).to(self.dtype)

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


FAMILIES.register(
    "sd3", diffusers_family(SD3Adapter, "StableDiffusion3", SD3_SIZES, frozenset({"text_encoder_3"}))
)
