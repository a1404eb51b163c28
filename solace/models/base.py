"""The model-adapter interface every backbone implements (toy world, SD3/SD3.5, FLUX.1).

The trainer, the sampler and the rewards only ever talk to a :class:`FlowModelAdapter`. An adapter hides
the backbone's own conventions (timestep scale, latent packing, VAE scaling, text encoders) behind four
operations in the rectified-flow convention used throughout solace:

* ``z_t = (1 - t) * z0 + t * eps`` with ``t = sigma`` in [0, 1] (t = 1 is pure noise);
* ``velocity(z_t, t, cond)`` returns ``v ~ eps - z0`` (the *conditional* velocity, no CFG);
* the sampler integrates from t = 1 to t = 0 with ``z_{next} = z + v * (t_next - t)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from solace.errors import ConfigError, check

DEFAULT_SIDE = 512
"""Image side in pixels of a family whose size is a grid (SD3/FLUX) when no size is given."""


@dataclass
class Conditioning:
    """Text conditioning for a batch: named tensors whose first dimension is the batch.

    Each adapter decides which tensors it needs (toy: token embeddings and a mask; SD3: ``prompt_embeds``
    and ``pooled_prompt_embeds``; FLUX: ``prompt_embeds``, ``pooled_prompt_embeds``, ``text_ids``).
    Tensors listed in ``shared`` are not batched (e.g. FLUX's ``text_ids``) and pass through unchanged.
    """

    tensors: dict[str, torch.Tensor]
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def index(self, idx: torch.Tensor | Sequence[int] | slice) -> Conditioning:
        if not isinstance(idx, slice | torch.Tensor):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return Conditioning({k: v[idx] for k, v in self.tensors.items()}, dict(self.shared))

    def expand(self, n: int) -> Conditioning:
        """A one-row conditioning seen as ``n`` rows without a copy (``Tensor.expand``: every row is the same
        memory), e.g. the empty prompt of CFG for a whole batch."""
        if len(self) != 1:
            raise ValueError(f"Conditioning.expand needs one row, got {len(self)}")
        return Conditioning(
            {k: v.expand(n, *v.shape[1:]) for k, v in self.tensors.items()}, dict(self.shared)
        )

    def repeat_interleave(self, n: int) -> Conditioning:
        return Conditioning(
            {k: v.repeat_interleave(n, dim=0) for k, v in self.tensors.items()}, dict(self.shared)
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return Conditioning(
            {k: mv(v) for k, v in self.tensors.items()}, {k: mv(v) for k, v in self.shared.items()}
        )

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        if not items:
            raise ValueError("Conditioning.cat needs at least one item")
        keys = items[0].tensors.keys()
        return Conditioning(
            {k: torch.cat([c.tensors[k] for c in items], dim=0) for k in keys}, dict(items[0].shared)
        )


def _check_pixels(name: str, v: Any) -> None:
    check(
        v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
        name,
        f"must be a whole number of pixels >= 0 (0: not given, the model's own size), got {v!r}",
    )


@dataclass(frozen=True)
class SizeRule:
    """The image sizes a model family draws, declared with its registry entry
    (:class:`solace.models.family.ModelFamily`): one square side only (``only``, e.g. 32), or any
    height x width on a grid whose step its pipeline sets when it loads (``grid`` says what the step is,
    e.g. ``vae_scale_factor * patch_size``; :meth:`resolve`)."""

    only: int | None = None
    grid: str = ""

    def check(self, family: str, sizes: dict[str, int | None]) -> None:
        """What can be checked before a model loads: each size (key: the field or option that set it, for
        the error; 0 or None: not given) is a whole number of pixels >= 0 and, for a one-size family, that
        size."""
        for name, v in sizes.items():
            _check_pixels(name, v)
            n = self.only
            check(
                n is None or v in (None, 0, n),
                name,
                f"the {family} model draws {n} x {n} images only, got {v}; leave {name} out or set it to {n}",
            )

    def resolve(
        self, resolution: int | None, height: int | None, width: int | None, step: int
    ) -> tuple[int, int]:
        """``(height, width)`` of a grid family's loaded model, whose grid step is ``step``
        (:func:`image_size`)."""
        return image_size(resolution, height, width, step, self.grid)


def image_size(
    resolution: int | None, height: int | None, width: int | None, step: int, why: str
) -> tuple[int, int]:
    """``(height, width)`` in pixels from the square shorthand ``resolution`` and/or an explicit ``height``
    and ``width`` (0 or None: not given; neither given: :data:`DEFAULT_SIDE`). Each side must be a positive
    multiple of ``step`` (``why`` says where it comes from); a resolution that disagrees with a height or
    width given with it is a ConfigError, as is a side off the grid, naming the argument that set it."""
    given = {"resolution": resolution, "height": height, "width": width}
    for name, v in given.items():
        _check_pixels(name, v)
    for name in ("height", "width"):
        if resolution and given[name] and given[name] != resolution:
            raise ConfigError(
                "resolution",
                f"{resolution} conflicts with {name} = {given[name]}: resolution sets both height and "
                "width; give either resolution or height and width",
            )
    size = []
    for name in ("height", "width"):
        v = given[name] or resolution or DEFAULT_SIDE
        field = name if given[name] else ("resolution" if resolution else name)
        check(v % step == 0, field, f"must be a positive multiple of {why} = {step}, got {v}")
        size.append(v)
    return size[0], size[1]


@runtime_checkable
class FlowModelAdapter(Protocol):
    """What solace needs from a text-to-image flow-matching model.

    Attributes:
        name: short identifier written to logs and reports.
        denoiser: the ``nn.Module`` that LoRA is attached to (SD3/FLUX transformer, toy U-Net).
        lora_target_modules: module-name patterns for PEFT's ``target_modules``.
        shift: the scheduler's sigma shift (SD3: 3.0); ``schedule`` uses it.

    The rest (the wrapped forward, the pipeline, text encoders, CFG in two passes, guidance, image size,
    FSDP's ignored modules, the training-batch statistics and grid prompts) has defaults in
    :class:`AdapterBase`, which adapters inherit.
    """

    name: str
    denoiser: nn.Module
    lora_target_modules: list[str]
    forward_module: nn.Module | None
    pipeline: Any
    text: Any  # solace.models.text_cache.TextEncoders or None (text_cache imports this module)
    cfg_in_two_passes: bool
    guidance_scale: float | None
    height: int | None
    width: int | None
    wants_batch_images: bool

    @property
    def fsdp_ignored_modules(self) -> list[nn.Module]: ...

    def offload_text_encoders(self, mode: str) -> None: ...

    def image_pixels(self) -> tuple[int, int]: ...

    def batch_statistics(self, images: torch.Tensor, metas: Sequence[dict]) -> dict[str, torch.Tensor]: ...

    def image_prompts(self) -> list[str] | None: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one sample's latent (no batch dimension)."""
        ...

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts once; the empty string gives the unconditional embedding used by CFG."""
        ...

    def velocity(self, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Conditional velocity ``v(z_t, t, c)`` for a batch; ``t`` has shape (B,) with values in [0, 1]."""
        ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images as float RGB in [0, 1], shape (B, 3, H, W)."""
        ...

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images float RGB in [0, 1] (B, 3, H, W) -> clean latents z0."""
        ...

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The sampler's sigma schedule, ``num_steps + 1`` values from 1 (noise) down to 0 (data)."""
        ...


class AdapterBase:
    """What callers use of an adapter beyond the operations of :class:`FlowModelAdapter`, with the defaults
    of a model that has none of it; the adapters inherit it and override what they have."""

    name: str = "model"

    forward_module: nn.Module | None = None
    """Set by the trainer to the DDP/FSDP-wrapped :attr:`denoiser`, which :meth:`velocity` then calls."""

    pipeline: Any = None
    """The diffusers pipeline the adapter wraps (its class writes the exported LoRA); None: none."""

    text: Any = None  # a solace.models.text_cache.TextEncoders (text_cache imports this module)
    """The text encoders' placement and embedding cache (``model.offload_text_encoders``,
    ``model.embedding_cache``, ``solace embed``); None: the model has none to manage."""

    cfg_in_two_passes: bool = False
    """CFG's negative prompt in a forward of its own (as the adapter's pipeline computes it), not batched."""

    guidance_scale: float | None = None
    """The value fed to a guidance embedding (FLUX.1); None: the model has no guidance input."""

    height: int | None = None
    width: int | None = None
    """Image size in pixels; None: the size of :meth:`latent_shape` (latents are pixels)."""

    wants_batch_images: bool = False
    """Whether :meth:`batch_statistics` needs each training batch decoded to images."""

    @property
    def fsdp_ignored_modules(self) -> list[nn.Module]:
        """Modules FSDP must leave whole (called outside the denoiser's forward); none by default."""
        return []

    def offload_text_encoders(self, mode: str) -> None:
        """Move the text encoders to the CPU (``cpu``) or free them (``free``); a model without :attr:`text`
        has none to move."""
        raise ConfigError(
            "model.offload_text_encoders", f"the {self.name} model has no text encoders to offload; use off"
        )

    def image_pixels(self) -> tuple[int, int]:
        """``(height, width)`` of the adapter's images in pixels (:attr:`height` / :attr:`width`, else the
        latent's own)."""
        if self.height and self.width:
            return int(self.height), int(self.width)
        h, w = self.latent_shape()[-2:]  # type: ignore[attr-defined]
        return int(h), int(w)

    def batch_statistics(self, images: torch.Tensor, metas: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Per-image statistics of a training batch (name -> (n,) tensor), logged as batch means; none by
        default."""
        return {}

    def image_prompts(self) -> list[str] | None:
        """The prompts of a run's image grids when ``eval.image_prompts`` is empty; None: the first
        training prompts."""
        return None


@contextlib.contextmanager
def adapters_disabled(module: nn.Module) -> Iterator[None]:
    """Run the LoRA-off reference policy, whether or not ``module`` is wrapped (DDP/FSDP) or has LoRA.

    Works on a bare module, a PEFT model, or a module whose submodules carry PEFT LoRA layers, and through
    ``DistributedDataParallel``/FSDP wrappers (which expose the wrapped model as ``.module``).
    """
    inner = module
    while hasattr(inner, "module") and isinstance(inner.module, nn.Module):
        inner = inner.module
    if hasattr(inner, "disable_adapter") and callable(inner.disable_adapter):
        with inner.disable_adapter():
            yield
        return
    # Layers injected with peft.inject_adapter_in_model / add_adapter: toggle each LoRA layer.
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a hard dependency
        yield
        return
    layers = [m for m in inner.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m.disable_adapters for m in layers]
    try:
        for m in layers:
            m.enable_adapters(False)
        yield
    finally:
        for m, was_disabled in zip(layers, previous, strict=True):
            m.enable_adapters(not was_disabled)
