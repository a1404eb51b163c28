"""Registry of external rewards / metrics: one interface, images + prompts -> scores.

A reward is any callable ``fn(images, prompts, metadata) -> Tensor (B,)`` where ``images`` is float RGB in
[0, 1] with shape (B, 3, H, W), ``prompts`` a list of B strings and ``metadata`` an optional list of B dicts
(e.g. GenEval's ``include``/``exclude`` records). Factories are registered by name and built lazily, so a
missing optional dependency only matters when that reward is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from solace.errors import ConfigError


class RewardFn(Protocol):
    def __call__(
        self, images: torch.Tensor, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> torch.Tensor: ...


_FACTORIES: dict[str, Callable[..., RewardFn]] = {}


def register_reward(name: str) -> Callable[[Callable[..., RewardFn]], Callable[..., RewardFn]]:
    """Decorator registering a factory ``factory(**kwargs) -> RewardFn`` under ``name``."""

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    # Importing these modules registers their rewards; each keeps heavy imports inside its factory.
    import importlib

    for mod in ("solace.toy.reward", "solace.rewards.external", "solace.rewards.control"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a module not written yet must not break the others
            if e.name != mod:
                raise


def available_rewards() -> list[str]:
    _load_builtin()
    return sorted(_FACTORIES)


def reward_parameters(name: str) -> list[str]:
    """Names of the keyword arguments the factory of reward ``name`` takes (``"**"`` if it takes any)."""
    import inspect

    _load_builtin()
    if name not in _FACTORIES:
        raise ConfigError(
            "reward.name", f"unknown reward {name!r}; available: {', '.join(sorted(_FACTORIES))}"
        )
    params = inspect.signature(_FACTORIES[name]).parameters.values()
    return [("**" if p.kind is inspect.Parameter.VAR_KEYWORD else p.name) for p in params]


def check_reward(name: str, kwargs: dict[str, Any], field: str = "reward") -> None:
    """The reward ``name`` exists and its factory takes every keyword of ``kwargs`` (nothing is built, no
    model loads): a typo fails in one line before any work."""
    params = reward_parameters(name)
    if "**" in params:
        return
    bad = sorted(set(kwargs) - set(params))
    if bad:
        takes = ", ".join(p for p in params) or "no keywords"
        raise ConfigError(
            f"{field}.kwargs", f"reward {name!r} takes no keyword {', '.join(bad)}; it takes: {takes}"
        )


def build_reward(name: str, **kwargs: Any) -> RewardFn:
    """Build the registered reward ``name`` with its keyword arguments."""
    check_reward(name, kwargs, f"reward.{name}")
    return _FACTORIES[name](**kwargs)
