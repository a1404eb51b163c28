"""Model families by name: what ``model.family`` picks (``auto``: recognised from the pipeline's own class
name), each with its adapter's loader and its image-size rule.

A family registers a :class:`ModelFamily` into :data:`FAMILIES` when its module is imported: SD3/SD3.5 and
FLUX.1 from :mod:`solace.models.sd3` and :mod:`solace.models.flux`, the toy world from its plugin, and a
user's own from a module named in the config's ``plugins`` list (or an installed package's
``solace.plugins`` entry point). :func:`resolve_family` is the one place a model name becomes a family.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solace.errors import ConfigError
from solace.models.base import FlowModelAdapter, SizeRule
from solace.registry import Registry

AUTO = "auto"

MEMORY_SETTINGS = ("embedding_cache", "offload_text_encoders", "vae_slicing", "vae_tiling")
"""The ``model.*`` memory switches; a family that does not read one refuses it when set."""


def _never(model: str, pipeline_class: str | None) -> bool:
    return False


def _itself(model: str) -> str:
    return model


@dataclass(frozen=True)
class ModelFamily:
    """A model family: how its adapter loads and how ``model.family: auto`` recognises its models.

    Attributes:
        load: ``load(model_name, **settings)`` -> the adapter. ``settings`` are ``device`` and the
            ``model.*`` values as keywords (``dtype``, ``height``, ``width``, ``max_sequence_length``, ...;
            None where not given); a loader takes what it reads and ignores the rest.
        recognises: ``recognises(model_name, pipeline_class)``: whether ``auto`` picks this family.
            ``pipeline_class`` is the ``_class_name`` of the model's ``model_index.json`` (a local diffusers
            folder, or a hub id found in the hub cache), None when it has none.
        sizes: the image sizes the family draws (:class:`~solace.models.base.SizeRule`).
        settings: the ``model.*`` keys it reads beyond the name, dtype and size (config validation refuses
            a memory switch or the probes' guidance where the family does not read it).
        weights_file: ``weights_file(model_name)``: the file whose content identifies the base (a
            base-evaluation cache's key; a folder or hub id is no file and is fingerprinted otherwise).
    """

    load: Callable[..., FlowModelAdapter]
    recognises: Callable[[str, str | None], bool] = _never
    sizes: SizeRule = field(default_factory=SizeRule)
    settings: frozenset[str] = frozenset()
    weights_file: Callable[[str], str] = _itself


FAMILIES: Registry[ModelFamily] = Registry("model family", "model.family")


def _hub_index(model: str) -> Path | None:
    """The hub cache's ``model_index.json`` of the hub id ``model``, or None (not cached, not a hub id)."""
    try:  # huggingface_hub comes with diffusers; imported only for a name that is no local path
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - diffusers depends on it
        return None
    try:
        found = try_to_load_from_cache(model, "model_index.json")
    except Exception:  # noqa: BLE001 - not a valid repo id: nothing cached under it
        return None
    return Path(found) if isinstance(found, str) else None


def pipeline_class(model: str, field: str = "model.family") -> str | None:
    """``_class_name`` of ``model``'s ``model_index.json``: a local diffusers folder's, or for a hub id the
    hub cache's; None where there is none (a file, or a hub id not downloaded)."""
    p = Path(model)
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise ConfigError(
                field,
                f"auto: {model} is a folder without model_index.json (not a diffusers pipeline folder); "
                f"name the pipeline folder, or set {field} to one of: {', '.join(FAMILIES.names())}",
            )
    elif p.exists() or not model:
        return None
    else:
        index = _hub_index(model)
        if index is None:
            return None
    try:
        cls = json.loads(index.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(field, f"auto: {index} is not readable JSON ({type(e).__name__}); fix it") from None
    return cls if isinstance(cls, str) else None


def resolve_family(
    model: str | None, family: str = AUTO, field: str = "model.family"
) -> tuple[str, ModelFamily]:
    """``(name, family)`` of ``model``: the one ``family`` names, or with ``auto`` the first registered family
    that recognises the model by its name alone, else by its pipeline class (:func:`pipeline_class`). Every
    failure is one ConfigError naming ``field`` and the registered families."""
    model = model or ""
    if family != AUTO:
        return family, FAMILIES.get(family, field)
    for name, fam in FAMILIES.items():
        if fam.recognises(model, None):
            return name, fam
    cls = pipeline_class(model, field)
    if cls is not None:
        for name, fam in FAMILIES.items():
            if fam.recognises(model, cls):
                return name, fam
    names = ", ".join(FAMILIES.names())
    why = (
        f"its pipeline class {cls!r} is no registered family's"
        if cls
        else "no model_index.json: neither a local diffusers folder nor in the hub cache"
    )
    raise ConfigError(
        field, f"auto cannot tell the family of {model!r} ({why}); set {field} to one of: {names}"
    )


def load_family_adapter(
    model: str | None, family: str = AUTO, field: str = "model.family", **settings: Any
) -> FlowModelAdapter:
    """The adapter of ``model`` by its family (:func:`resolve_family`); the size settings given
    (``resolution``, ``height``, ``width``) are checked against the family's rule first."""
    name, fam = resolve_family(model, family, field)
    fam.sizes.check(name, {k: settings[k] for k in ("resolution", "height", "width") if k in settings})
    return fam.load(model or "", **settings)
