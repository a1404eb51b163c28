"""Errors that name the offending field and the fix, raised instead of deep library tracebacks."""

from __future__ import annotations


class SolaceError(Exception):
    """Base class for errors solace raises on purpose."""


class ConfigError(SolaceError, ValueError):
    """A configuration field or function argument is invalid. The message names the field and the fix."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class MissingDependencyError(SolaceError, ImportError):
    """An optional dependency or model file is missing; the message says what to install or download."""


def check(condition: bool, field: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(field, message)
