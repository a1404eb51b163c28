"""Registry of external rewards / metrics: one interface, images + prompts -> scores.

A reward is any callable ``fn(images, prompts, metadata) -> Tensor (B,)`` where ``images`` is float RGB in
[0, 1] with shape (B, 3, H, W), ``prompts`` a list of B strings and ``metadata`` an optional list of B dicts
(e.g. GenEval's ``include``/``exclude`` records). Factories are registered by name and built lazily, so a
missing optional dependency only matters when that reward is asked for.

A reward name may also be ``package.module:function``: a factory of the user's own with the same contract
(``function(**kwargs) -> fn``), imported from ``sys.path`` (``PYTHONPATH``) when it is named.
:func:`check_reward` resolves a name to its factory and binds the keyword arguments without calling it, so
a typo in the name, an unimportable module, a missing function or a bad keyword fails in one line before any
model loads.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from solace.errors import ConfigError
from solace.registry import Registry


class RewardFn(Protocol):
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor: ...


REWARDS: Registry[Callable[..., RewardFn]] = Registry("reward", "reward.name")
"""Reward factories by name: solace's own (:mod:`solace.rewards.external`, :mod:`solace.rewards.control`)
and the plugins' (the embedded worlds' rewards register from their plugin modules)."""


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator registering a factory ``factory(**kwargs) -> RewardFn`` under ``name``."""
    return REWARDS.register(name)


def available_rewards() -> list[str]:
    return REWARDS.names()


_USER_NAME = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
_PATH_HINT = "put the folder that holds it on PYTHONPATH (e.g. PYTHONPATH=. when it is in the current folder)"


def is_user_reward(name: str) -> bool:
    """``package.module:function`` names a factory of the user's own (registered names hold no colon)."""
    return ":" in name


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _import_module(module: str, name: str, field: str) -> Any:
    """Import the module of the user reward ``name``; every failure is one ConfigError naming ``field``."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):  # the module itself is missing
            raise ConfigError(
                field, f"reward {name!r}: no module named {e.name!r}; {_PATH_HINT}, or install its package"
            ) from None
        raise ConfigError(
            field, f"reward {name!r}: importing {module!r} failed ({_first_line(e)}); install what it imports"
        ) from None
    except Exception as e:  # noqa: BLE001 - any error of the user's module is reported in one line
        raise ConfigError(
            field, f"reward {name!r}: importing {module!r} failed ({_first_line(e)}); fix the module"
        ) from None


def user_reward_factory(name: str, field: str = "reward.name") -> Callable[..., RewardFn]:
    """The factory ``function`` of module ``package.module`` for ``name = "package.module:function"``."""
    if not _USER_NAME.match(name):
        raise ConfigError(
            field, f"{name!r} is not of the form package.module:function (e.g. my_rewards:brightness)"
        )
    module, _, attr = name.partition(":")
    mod = _import_module(module, name, field)
    factory = getattr(mod, attr, None)
    if factory is None:
        defined = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            field,
            f"module {module!r} ({getattr(mod, '__file__', '?')}) has no {attr!r}; "
            f"it defines: {', '.join(defined) or 'no functions'}",
        )
    if not callable(factory):
        raise ConfigError(field, f"{name} is a {type(factory).__name__}, not a factory function")
    return factory


def reward_factory(name: str, field: str = "reward.name") -> Callable[..., RewardFn]:
    """The factory of a registered reward, or of the user's own ``package.module:function``."""
    if is_user_reward(name):
        return user_reward_factory(name, field)
    if name not in REWARDS:
        raise ConfigError(
            field,
            f"unknown reward {name!r}; available: {', '.join(REWARDS.names())}, "
            "or your own factory as package.module:function",
        )
    return REWARDS.get(name, field)


def _signature(factory: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(factory)
    except (TypeError, ValueError):  # a builtin or C callable without a signature: not checkable
        return None


def reward_parameters(name: str, field: str = "reward.name") -> list[str]:
    """Names of the keyword arguments the factory of reward ``name`` takes (``"**"`` if it takes any)."""
    sig = _signature(reward_factory(name, field))
    if sig is None:
        return ["**"]
    return [("**" if p.kind is inspect.Parameter.VAR_KEYWORD else p.name) for p in sig.parameters.values()]


def check_reward(name: str, kwargs: dict[str, Any], field: str = "reward") -> None:
    """The reward ``name`` resolves to a factory (a user module is imported) and the factory's signature
    accepts ``kwargs`` (nothing is built, no model loads): a typo fails in one line, naming
    ``{field}.name`` or ``{field}.kwargs``, before any work."""
    factory = reward_factory(name, f"{field}.name")
    sig = _signature(factory)
    if sig is None:
        return
    params = reward_parameters(name, f"{field}.name")
    bad = sorted(set(kwargs) - set(params)) if "**" not in params else []
    if bad:
        takes = ", ".join(p for p in params if p != "**") or "no keywords"
        raise ConfigError(
            f"{field}.kwargs", f"reward {name!r} takes no keyword {', '.join(bad)}; it takes: {takes}"
        )
    try:
        sig.bind(**kwargs)
    except TypeError as e:  # a required keyword missing, or one the factory takes positionally only
        raise ConfigError(
            f"{field}.kwargs", f"reward {name!r}: {e}; give its factory's keywords in kwargs"
        ) from None


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build the reward ``name`` (registered, or ``package.module:function``) with its keyword arguments."""
    check_reward(name, kwargs, f"reward.{name}")
    fn = reward_factory(name)(**kwargs)
    if not callable(fn):
        raise ConfigError(
            f"reward.{name}",
            f"its factory returned a {type(fn).__name__}; a reward factory returns a function "
            "fn(images, prompts, metadata) -> Tensor (B,)",
        )
    return fn
