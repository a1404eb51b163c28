"""The defaults that name an embedded world, read from YAML files so that no module names one:
``solace/configs/defaults.yaml`` (the config's first layer, which :func:`solace.trainer.config.load_config`
applies; :func:`default` reads a key of it) and ``solace/cli/defaults.yaml`` (the command line's own
defaults: the preset, the suite, table labels; :func:`cli_default`)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

import yaml


@cache
def _read(*parts: str) -> dict[str, Any]:
    text = resources.files("solace").joinpath(*parts).read_text(encoding="utf-8")
    return yaml.safe_load(text) or {}


def _lookup(doc: dict[str, Any], key: str) -> Any:
    node: Any = doc
    for part in key.split("."):
        node = node[part]
    return node


def default(key: str) -> Any:
    """A config default by its dotted key, e.g. ``default("eval.prompts")``."""
    return _lookup(_read("configs", "defaults.yaml"), key)


def cli_default(key: str) -> Any:
    """A command-line default by its dotted key, e.g. ``cli_default("suite")``."""
    return _lookup(_read("cli", "defaults.yaml"), key)
