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
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from solace.errors import ConfigError, check

DEFAULT_SIDE = 512
"""SD3/FLUX image side in pixels when no size is given."""


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


def image_size(
    resolution: int | None, height: int | None, width: int | None, step: int, why: str
) -> tuple[int, int]:
    """``(height, width)`` in pixels from the square shorthand ``resolution`` and/or an explicit ``height``
    and ``width`` (0 or None: not given; neither given: :data:`DEFAULT_SIDE`). Each side must be a positive
    multiple of ``step`` (``why`` says where it comes from); a resolution that disagrees with a height or
    width given with it is a ConfigError, as is a side off the grid, naming the argument that set it."""
    given = {"resolution": resolution, "height": height, "width": width}
    for name, v in given.items():
        check(
            v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            name,
            f"must be a whole number of pixels >= 0 (0: not given), got {v!r}",
        )
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
    """

    name: str
    denoiser: nn.Module
    lora_target_modules: list[str]

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


class AdapterHooks:
    """Optional hooks with their defaults, for adapters to inherit: what a model's own world adds to a
    training run (batch statistics of decoded training images, the prompts of the image grids)."""

    wants_batch_images: bool = False
    """Whether :meth:`batch_statistics` needs each training batch decoded to images."""

    def batch_statistics(self, images: torch.Tensor, metas: Sequence[dict]) -> dict[str, torch.Tensor]:
        """Per-image statistics of a training batch (name -> (n,) tensor), logged as batch means; none by
        default."""
        return {}

    def image_prompts(self) -> list[str] | None:
        """The prompts of a run's image grids when ``train.image_prompts`` is empty; None: the first
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
