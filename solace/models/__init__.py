"""Model adapters behind one interface (:mod:`solace.models.base`), loaded by their family
(:mod:`solace.models.family`: ``model.family``, ``auto`` from the pipeline's own class name). The diffusers
families (SD3/SD3.5, FLUX.1) register on import of their modules here; the others from their plugins."""

from __future__ import annotations

from typing import Any

from solace.models import flux, sd3  # noqa: F401 - the diffusers families register on import
from solace.models.base import AdapterBase, Conditioning, FlowModelAdapter, adapters_disabled
from solace.models.family import AUTO, FAMILIES, ModelFamily, load_family_adapter, resolve_family

__all__ = [
    "AUTO",
    "FAMILIES",
    "AdapterBase",
    "Conditioning",
    "FlowModelAdapter",
    "ModelFamily",
    "adapters_disabled",
    "load_adapter",
    "model_family",
    "resolve_family",
]


def model_family(model: str | None, family: str = AUTO) -> str:
    """The registered name of ``model``'s family (``family``, or with ``auto`` the one that recognises it)."""
    return resolve_family(model, family)[0]


def load_adapter(model: str | None, family: str = AUTO, **settings: Any) -> FlowModelAdapter:
    """Build the adapter of ``model`` through its family (:func:`~solace.models.family.resolve_family`);
    ``settings`` (``device``, ``dtype``, ``height``, ...) go to the family's loader, which picks its own."""
    return load_family_adapter(model, family, **settings)
