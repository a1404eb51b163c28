"""FLUX.1 (dev-style) behind the :class:`~solace.models.base.FlowModelAdapter` interface.

Conventions and how they map onto solace's:

* **Noise/time.** FLUX uses the same rectified flow as SD3, ``z_t = (1 - sigma) z0 + sigma eps``, and its
  transformer predicts ``eps - z0``; ``t = sigma`` in [0, 1]. ``FluxPipeline.__call__`` hands the transformer
  ``timestep / 1000`` with ``timesteps = sigmas * 1000``, i.e. sigma itself (the transformer multiplies by
  1000 internally). :meth:`FluxAdapter.velocity` passes ``timestep = t``, computed as ``(1000 t) / 1000`` in
  the latent dtype so that it is bit-identical to the pipeline's.
* **Schedule.** FLUX.1-dev's scheduler uses *dynamic* shifting: sigmas are ``linspace(1, 1/N, N)`` through
  the exponential time shift with ``mu = flux_mu(image_seq_len)`` (``base_shift``/``max_shift`` from the
  scheduler config). :meth:`FluxAdapter.sigmas` returns exactly those (plus the trailing 0). There is no
  static ``shift`` in play; :attr:`FluxAdapter.shift` only mirrors the config and :attr:`FluxAdapter.mu`
  holds the shift actually used.
* **Packed latents.** The sampler, the trajectories and the rewards work on FLUX's *packed* latents,
  shape ``(seq, 4 C)`` per sample with ``seq = (H/2)(W/2)`` (2x2 patches of the 16-channel VAE latent),
  exactly what ``FluxPipeline`` iterates on and returns with ``output_type="latent"``. Packing is a fixed
  permutation of the VAE latent's elements, so every elementwise operation of solace (Euler/SDE steps,
  Gaussian log-probs averaged over elements, re-noising, MSEs) is unchanged by it; only :meth:`decode` and
  :meth:`encode_images` unpack/pack. :meth:`latent_shape` is the packed shape.
* **Positional ids.** ``img_ids`` (``(seq, 3)``, from the latent grid) and ``text_ids`` (zeros, ``(L, 3)``)
  are not batched: :meth:`encode_prompts` puts them in ``Conditioning.shared``; :meth:`velocity` falls back
  to computing them when a conditioning lacks them.
* **Guidance.** FLUX.1-dev is *guidance-distilled*: the guidance scale is an input of the transformer
  (``guidance_embeds=True``; default 3.5) and sampling uses a single conditional forward. Run solace's
  sampler with ``cfg_scale=1`` (the default for FLUX configs); ``cfg_scale > 1`` with the empty prompt as
  ``null_cond`` is FluxPipeline's "true CFG" (``true_cfg_scale`` with ``negative_prompt=""``), which doubles
  the cost and is rarely useful for dev. The guidance embedding is part of :meth:`velocity`, so probes and
  training passes see the same guidance value as sampling.

**Self-confidence probing on FLUX.** The SOLACE reward re-noises a clean packed latent ``z0`` as
``z_t = (1 - t) z0 + t eps`` at the *sampler's own* sigmas (the dynamically shifted FLUX sigmas of
:meth:`sigmas`, excluding the final 0), asks :meth:`velocity` (conditional, with the guidance embedding) for
``v`` and recovers ``eps_hat = v + z0``. Since the probe noises are i.i.d. Gaussian per element, drawing
them in packed shape is the same distribution as drawing them unpacked, and the per-element MSE is identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
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
from solace.sampling.schedule import flux_mu, flux_sigmas, shift_sigmas

FLUX_SIZES = SizeRule(grid="2 * vae_scale_factor")
"""FLUX's image sizes: multiples of the VAE's downsampling times the 2 x 2 packing (16 for FLUX.1)."""

FLUX_LORA_TARGETS = list(ATTENTION_LORA_TARGETS)
"""Attention projections of the double-stream blocks (and q/k/v of the single-stream blocks), as Flow-GRPO."""


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/2)(W/2), 4C): FLUX's 2x2 patch packing (``FluxPipeline._pack_latents``)."""
    B, C, H, W = latents.shape
    x = latents.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, (H/2)(W/2), 4C) -> (B, C, H, W), ``H``/``W`` in latent pixels (inverse of :func:`pack_latents`)."""
    B, _, C4 = packed.shape
    x = packed.view(B, height // 2, width // 2, C4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C4 // 4, height, width)


def latent_image_ids(
    height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(H/2 * W/2, 3)`` ids ``(0, row, col)`` of the packed tokens (as ``FluxPipeline``)."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxAdapter(DiffusersAdapter):
    """:class:`~solace.models.base.FlowModelAdapter` over the components of a ``FluxPipeline``.

    Args:
        pipeline: a ``FluxPipeline`` (CLIP pooled + T5 text encoders, ``FluxTransformer2DModel``, VAE; the
            VAE and text encoders may be ``None`` for latent-only use, as for :class:`SD3Adapter`).
        resolution: image side in pixels, shorthand for ``height = width`` (default 512); a ``height`` or
            ``width`` given too must agree.
        height, width: image size in pixels, multiples of ``2 * vae_scale_factor`` (16 for FLUX.1: the VAE
            downsamples by 8 and the latent is packed in 2x2 patches).
        max_sequence_length: T5 tokens per prompt (FLUX.1-dev: up to 512).
        guidance_scale: value fed to the guidance embedding when ``transformer.config.guidance_embeds``.
        gradient_checkpointing: enable the transformer's gradient checkpointing.
        name: identifier for logs.
        embedding_cache, vae_slicing, vae_tiling: as for :class:`~solace.models.sd3.SD3Adapter`.
    """

    lora_target_modules: list[str]
    # CFG (FluxPipeline's "true CFG") runs the negative prompt in a forward of its own, as FluxPipeline does,
    # so that solace's samples equal the pipeline's bitwise (one batched forward rounds differently)
    cfg_in_two_passes = True

    def __init__(
        self,
        pipeline: Any,
        resolution: int | None = None,
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        gradient_checkpointing: bool = False,
        name: str = "flux",
        embedding_cache: str | None = None,
        vae_slicing: bool = False,
        vae_tiling: bool = False,
        *,
        height: int | None = None,
        width: int | None = None,
    ) -> None:
        self._keep(pipeline, "flux", name, max_sequence_length)
        check(guidance_scale >= 0, "guidance_scale", f"must be >= 0, got {guidance_scale}")
        self.guidance_scale = float(guidance_scale)
        self.lora_target_modules = list(FLUX_LORA_TARGETS)
        step = 2 * self.vae_scale_factor
        self.height, self.width = FLUX_SIZES.resolve(resolution, height, width, step)
        self.resolution = self.height if self.height == self.width else None  # the square side
        self.latent_height = self.height // self.vae_scale_factor  # unpacked latent pixels
        self.latent_width = self.width // self.vae_scale_factor
        sched = pipeline.scheduler.config
        check_scheduler_config(sched, "FLUX")
        self.num_train_timesteps = int(sched.get("num_train_timesteps", 1000))
        self.shift = float(sched.get("shift", 1.0))
        self.dynamic_shift = bool(sched.get("use_dynamic_shifting", False))
        self.mu: float | None = (
            flux_mu(
                self.image_seq_len(),
                int(sched.get("base_image_seq_len", 256)),
                int(sched.get("max_image_seq_len", 4096)),
                float(sched.get("base_shift", 0.5)),
                float(sched.get("max_shift", 1.15)),
            )
            if self.dynamic_shift
            else None
        )
        self.guidance_embeds = bool(getattr(self.denoiser.config, "guidance_embeds", False))
        self._img_ids: torch.Tensor | None = None
        encoders = ("text_encoder", "text_encoder_2")
        self._prepare("flux", encoders, gradient_checkpointing, (embedding_cache, vae_slicing, vae_tiling))

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        dtype: str | torch.dtype = "bf16",
        max_sequence_length: int = 512,
        guidance_scale: float = 3.5,
        device: torch.device | str | None = None,
        gradient_checkpointing: bool = False,
        resolution: int | None = None,
        height: int | None = None,
        width: int | None = None,
        **memory: Any,
    ) -> FluxAdapter:
        """Load a ``FluxPipeline`` (hub id such as ``black-forest-labs/FLUX.1-dev``, or a local folder);
        ``memory``: ``embedding_cache``, ``vae_slicing``, ``vae_tiling``."""
        torch_dtype = parse_dtype(dtype)
        try:
            from diffusers import FluxPipeline
        except ImportError as e:  # pragma: no cover - diffusers is a hard dependency
            raise MissingDependencyError("FluxAdapter needs diffusers>=0.32: pip install diffusers") from e
        pipe = load_pipeline(FluxPipeline, model, torch_dtype)
        pipe.to(device if device is not None else default_device())
        pipe.set_progress_bar_config(disable=True)
        return cls(
            pipe,
            resolution=resolution,
            max_sequence_length=max_sequence_length,
            guidance_scale=guidance_scale,
            gradient_checkpointing=gradient_checkpointing,
            height=height,
            width=width,
            **memory,
        )

    # ------------------------------------------------------------------ FlowModelAdapter
    def image_seq_len(self) -> int:
        """Packed image tokens at :attr:`height` x :attr:`width`: ``(H/2)(W/2)`` in latent pixels."""
        return (self.latent_height // 2) * (self.latent_width // 2)

    def latent_shape(self) -> tuple[int, ...]:
        """The *packed* latent shape ``(seq, 4 C)`` (see the module docstring)."""
        return (self.image_seq_len(), int(self.denoiser.config.in_channels))

    def img_ids(self) -> torch.Tensor:
        """The packed tokens' positional ids at :attr:`height` x :attr:`width` (cached)."""
        if self._img_ids is None or self._img_ids.device != self.device:
            self._img_ids = latent_image_ids(self.latent_height, self.latent_width, self.device, self.dtype)
        return self._img_ids

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """``FluxPipeline.encode_prompt``: T5 tokens, CLIP pooled embedding, ``text_ids`` (shared), through
        the embedding cache and the encoders' placement (:attr:`text`); then the image's ``img_ids``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        check(len(prompts) > 0, "prompts", "must hold at least one prompt")
        cond = self.text.encode(prompts, self._encode_text)
        return Conditioning(cond.tensors, {**cond.shared, "img_ids": self.img_ids()})

    def _encode_text(self, prompts: list[str]) -> Conditioning:
        prompt_embeds, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        return Conditioning(
            {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}, {"text_ids": text_ids}
        )

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Conditional velocity on packed latents ``(B, seq, 4C)``; ``timestep = t``, guidance embedded."""
        B = latents.shape[0]
        latents = latents.to(self.device, self.dtype)
        t = torch.as_tensor(t, device=self.device)
        t = t.expand(B) if t.ndim == 0 else t
        # FluxPipeline: timesteps = sigmas * 1000 (float32), cast to the latent dtype, then / 1000.
        timestep = (t.to(device=self.device, dtype=torch.float32) * self.num_train_timesteps).to(self.dtype)
        timestep = timestep / self.num_train_timesteps
        guidance = (
            torch.full((B,), self.guidance_scale, device=self.device, dtype=torch.float32)
            if self.guidance_embeds
            else None
        )
        prompt_embeds = cond.tensors["prompt_embeds"].to(self.device, self.dtype)
        txt_ids = cond.shared.get("text_ids")
        if txt_ids is None:
            txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=self.device, dtype=self.dtype)
        img_ids = cond.shared.get("img_ids")
        if img_ids is None or img_ids.shape[0] != latents.shape[1]:
            img_ids = self.img_ids()
        return (self.forward_module or self.denoiser)(
            hidden_states=latents,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=cond.tensors["pooled_prompt_embeds"].to(self.device, self.dtype),
            encoder_hidden_states=prompt_embeds,
            txt_ids=txt_ids.to(self.device),
            img_ids=img_ids.to(self.device),
            return_dict=False,
        )[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents -> unpack -> ``/ scaling_factor + shift_factor`` -> VAE -> RGB in [0, 1]."""
        return self._decode_latents(unpack_latents(latents, self.latent_height, self.latent_width))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] -> VAE posterior mode -> ``(z - shift) * scaling_factor`` -> packed latents."""
        return pack_latents(self._encode_latents(images)).to(self.dtype)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """FluxPipeline's sigmas: ``linspace(1, 1/N, N)`` through the dynamic shift with :attr:`mu` and the
        scheduler config's ``time_shift_type`` (exponential or linear), or through the static ``shift`` for
        schedulers without dynamic shifting (e.g. FLUX.1-schnell); plus a trailing 0."""
        if self.mu is not None:
            kind = self.pipeline.scheduler.config.get("time_shift_type", None) or "exponential"
            return flux_sigmas(num_steps, self.mu, kind)
        check(
            isinstance(num_steps, int) and num_steps >= 1,
            "num_steps",
            f"must be an integer >= 1, got {num_steps!r}",
        )
        sig = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
        out = torch.from_numpy(np.asarray(shift_sigmas(sig, self.shift), dtype=np.float32))
        return torch.cat([out, torch.zeros(1)])


FAMILIES.register("flux", diffusers_family(FluxAdapter, "Flux", FLUX_SIZES, frozenset({"guidance_scale"})))
