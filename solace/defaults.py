"""The defaults that name an embedded world, read from ``solace/configs/defaults.yaml`` (so that no module
names one): the config's first layer (:func:`solace.trainer.config.load_config` applies it) and, in its
``cli`` section, the command line's defaults."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml


@cache
def defaults() -> dict[str, Any]:
    """The whole file, as a dict (``cli``: the command line's defaults; the rest: config keys)."""
    text = resources.files("solace").joinpath("configs", "defaults.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def default(key: str) -> Any:
    """One default by its dotted key, e.g. ``default("eval.prompts")`` or ``default("cli.suite")``."""
    node: Any = defaults()
    for part in key.split("."):
        node = node[part]
    return node
