"""Model adapters: the toy world, SD3/SD3.5 and FLUX.1 behind one interface (:mod:`solace.models.base`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from solace.errors import ConfigError
from solace.models.base import Conditioning, FlowModelAdapter, adapters_disabled

__all__ = ["Conditioning", "FlowModelAdapter", "adapters_disabled", "load_adapter", "model_family"]

TOY_SIDE = 32
"""The toy model draws TOY_SIDE x TOY_SIDE images, and no other size."""


def model_family(model: str | None) -> str:
    """``toy`` (default; the shipped base or a toy ``.safetensors``), ``sd3`` or ``flux``.

    A local diffusers folder is recognised by its ``model_index.json``; a hub id by its name.
    """
    if model in (None, "", "toy") or str(model).endswith(".safetensors"):
        return "toy"
    p = Path(str(model))
    index = p / "model_index.json"
    if index.exists():
        cls = json.loads(index.read_text()).get("_class_name", "")
        if "Flux" in cls:
            return "flux"
        if "StableDiffusion3" in cls:
            return "sd3"
        raise ConfigError("model", f"{model}: pipeline class {cls!r} is not supported (SD3/SD3.5 or FLUX.1)")
    if p.exists():
        raise ConfigError(
            "model", f"{model} is a path but holds no model_index.json (a diffusers pipeline folder)"
        )
    name = str(model).lower()
    if "flux" in name:
        return "flux"
    if "stable-diffusion-3" in name or "sd3" in name:
        return "sd3"
    raise ConfigError(
        "model",
        f"cannot tell the model family of {model!r}; use 'toy', a diffusers folder, "
        "or a hub id of SD3/SD3.5 or FLUX.1",
    )


def check_toy_size(kwargs: dict[str, Any]) -> None:
    """A size asked of the toy model (``resolution``, ``height``, ``width``; 0 or None: not given) is 32."""
    for key in ("resolution", "height", "width"):
        v = kwargs.get(key)
        if v not in (None, 0, TOY_SIDE):
            raise ConfigError(
                key,
                f"the toy model draws {TOY_SIDE} x {TOY_SIDE} images only, got {key} = {v}; leave the size "
                f"out (or give {TOY_SIDE}) for the toy model",
            )


def load_adapter(model: str | None = "toy", **kwargs: Any) -> FlowModelAdapter:
    """Build the adapter for ``model`` (see :func:`model_family`); keyword arguments go to its loader."""
    fam = model_family(model)
    if fam == "toy":
        from solace.models.toy import ToyAdapter

        weights = model if model and str(model).endswith(".safetensors") else None
        check_toy_size(kwargs)
        allowed = {k: v for k, v in kwargs.items() if k in ("device", "shift")}
        return ToyAdapter(weights=weights, **allowed)
    kwargs.pop("shift", None)  # SD3/FLUX take their shift from the pipeline's scheduler config
    if fam == "sd3":
        from solace.models.sd3 import SD3Adapter

        return SD3Adapter.from_pretrained(str(model), **kwargs)
    from solace.models.flux import FluxAdapter

    return FluxAdapter.from_pretrained(str(model), **kwargs)
