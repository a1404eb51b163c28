"""Registries by name, and the plugins that fill them.

Every pluggable concept (model families, prompt sets, rewards, policy updates, evaluators, edit providers)
keeps one :class:`Registry`. A plugin is a module that registers into them when imported: solace's own
embedded worlds and any installed package declare theirs under the ``solace.plugins`` entry-point group
(``[project.entry-points."solace.plugins"]`` in ``pyproject.toml``), and a config's ``plugins`` list names
more modules (importable from ``PYTHONPATH``). :func:`load_plugins` imports them once; a registry loads
them before it answers, so nothing else needs to know which plugins exist.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Generic, TypeVar, overload

from solace.errors import ConfigError

T = TypeVar("T")

ENTRY_POINT_GROUP = "solace.plugins"
_loaded: set[str] = set()
_entry_points_loaded = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def import_plugin(module: str, field: str = "plugins") -> None:
    """Import the plugin ``module`` (once); every failure is one ConfigError naming ``field``."""
    if module in _loaded:
        return
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ConfigError(
                field,
                f"no plugin module named {module!r}; put the folder that holds it on PYTHONPATH "
                "(e.g. PYTHONPATH=.) or install its package",
            ) from None
        raise ConfigError(field, f"plugin {module!r}: {_first_line(e)}; install what it imports") from None
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - a user's module failing is reported in one line
        raise ConfigError(field, f"plugin {module!r} failed to import ({_first_line(e)}); fix it") from None
    _loaded.add(module)


def load_plugins(extra: Iterable[str] = ()) -> None:
    """Import every plugin of the ``solace.plugins`` entry points (once) and the modules ``extra`` names."""
    global _entry_points_loaded
    if not _entry_points_loaded:
        _entry_points_loaded = True
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            import_plugin(ep.value.partition(":")[0], f"entry point {ep.name!r} of {ENTRY_POINT_GROUP}")
    for module in extra:
        import_plugin(module)


class Registry(Generic[T]):
    """Named entries of one kind (``kind`` names it in errors; ``field`` is the config key that picks one).

    ``register(name)`` is a decorator (or ``register(name, obj)`` a call); names are unique. ``get`` loads
    the plugins first, then fails in one line that names the field and lists what is registered.
    """

    def __init__(self, kind: str, field: str):
        self.kind, self.field = kind, field
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T) -> T: ...

    def register(self, name: str, obj: T | None = None) -> T | Callable[[T], T]:
        def add(o: T) -> T:
            if name in self._entries and self._entries[name] is not o:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = o
            return o

        return add if obj is None else add(obj)

    def names(self) -> list[str]:
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_plugins()
        return name in self._entries

    def get(self, name: str, field: str | None = None) -> T:
        load_plugins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(field or self.field, f"no {self.kind} named {name!r}; registered: {known}")
        return self._entries[name]

    def items(self) -> list[tuple[str, T]]:
        load_plugins()
        return sorted(self._entries.items())
