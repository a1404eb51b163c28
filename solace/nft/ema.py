"""DiffusionNFT's old (sampling) policy: a soft-updated copy of the trained LoRA tensors.

DiffusionNFT samples each iteration's images with an old policy and trains the current one against it.
After each iteration the old parameters are moved towards the trained ones,

    theta_old <- d * theta_old + (1 - d) * theta,      d = decay(step)

where ``step`` counts optimizer steps so far. ``d = 0`` makes the old policy the trained policy at the start
of the next iteration (plain on-policy); ``d`` close to 1 makes it a slow average. The released code
(NVlabs/DiffusionNFT, ``return_decay`` in ``scripts/train_nft_sd3.py``, selected by ``decay_type`` in
``config/nft.py``) uses a ramp ``d = min(rate * max(step - delay, 0), max_decay)`` (0 before ``delay``):

* ``decay_type=1`` (default of every SD3.5-M config but OCR): ``rate=0.001, max_decay=0.5, delay=0``;
* ``decay_type=2`` (OCR): ``rate=0.0075, max_decay=0.999, delay=75``;
* ``decay_type=0``: always 0.

The old policy is kept there as a second LoRA adapter of the same model; here it is a list of tensors that
:meth:`EMAPolicy.swap_in` copies into the trained parameters to evaluate the model with the old weights.

The same class keeps the trainer's EMA of the LoRA for evaluation and export (``lora_ema``, any update),
with the ``warmup`` schedule ``d = min((1 + s) / (10 + s), max_decay)`` moved every ``every`` steps: the
released SOLACE code's ``train.ema`` (wookiekim/SOLACE ``solace/ema.py``, ``EMAModuleWrapper`` built with
``decay=0.9, update_step_interval=8`` in ``scripts/train_sd3_self.py``), the EMA DiffusionNFT's released
code also keeps for evaluation and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch

from solace.errors import ConfigError, check

DECAY_KINDS = ("constant", "ramp", "warmup")
#: whole tensors from sharded parameters' pieces or back (FSDP, :class:`solace.trainer.fsdp.ShardedParams`)
Reshard = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def ema_decay(
    step: int,
    kind: str = "ramp",
    decay: float = 0.0,
    rate: float = 0.001,
    max_decay: float = 0.5,
    delay: int = 0,
    every: int = 1,
) -> float:
    """Decay of the EMA update after ``step`` optimizer steps.

    * ``kind="constant"``: ``decay`` at every step (0 = on-policy copy).
    * ``kind="ramp"``: ``0`` while ``step < delay``, then ``min(rate * (step - delay), max_decay)``. The
      defaults are the released code's ``decay_type=1``; ``rate=0.0075, max_decay=0.999, delay=75`` is its
      ``decay_type=2`` (OCR).
    * ``kind="warmup"``: ``min((1 + step) / (10 + step), max_decay)`` (the released SOLACE code's evaluation
      EMA, ``EMAModuleWrapper.get_current_decay`` with ``max_decay`` 0.9).
    * ``every``: the average moves only after the steps with ``(step + 1) % every == 0`` (the released
      EMA's ``update_step_interval``, 8); after the others the decay is 1, no move.
    """
    check(kind in DECAY_KINDS, "kind", f"must be one of {DECAY_KINDS}, got {kind!r}")
    check(isinstance(step, int) and step >= 0, "step", f"must be an integer >= 0, got {step!r}")
    check(isinstance(every, int) and every >= 1, "every", f"must be an integer >= 1, got {every!r}")
    if (step + 1) % every:
        return 1.0
    if kind == "warmup":
        check(0.0 <= max_decay <= 1.0, "max_decay", f"must lie in [0, 1], got {max_decay}")
        return float(min((1 + step) / (10 + step), max_decay))
    if kind == "constant":
        check(0.0 <= decay <= 1.0, "decay", f"must lie in [0, 1], got {decay}")
        return float(decay)
    check(rate >= 0, "rate", f"must be >= 0, got {rate}")
    check(0.0 <= max_decay <= 1.0, "max_decay", f"must lie in [0, 1], got {max_decay}")
    check(isinstance(delay, int) and delay >= 0, "delay", f"must be an integer >= 0, got {delay!r}")
    if step < delay:
        return 0.0
    return float(min(rate * (step - delay), max_decay))


class EMAPolicy:
    """Old-policy copy of the trained tensors (e.g. the LoRA parameters), soft-updated by :meth:`update`.

    Args:
        params: the trained tensors, in a fixed order; they are referenced, not copied.
        decay_schedule: ``step -> decay`` (e.g. ``functools.partial(ema_decay, kind="ramp")``) or a constant.

    The copy starts equal to ``params``. ``with policy.swapped():`` (or ``swap_in()`` / ``swap_out()``) puts
    the old weights into ``params`` in place and restores the trained ones afterwards, bit for bit; no
    gradient is recorded. While swapped in, :meth:`update` refuses to run.
    """

    def __init__(self, params: Iterable[torch.Tensor], decay_schedule: Callable[[int], float] | float = 0.0):
        self.params = list(params)
        check(len(self.params) > 0, "params", "is empty; pass the trained (LoRA) tensors")
        if callable(decay_schedule):
            self.decay_schedule = decay_schedule
        else:
            value = float(decay_schedule)
            check(0.0 <= value <= 1.0, "decay_schedule", f"a constant decay must lie in [0, 1], got {value}")
            self.decay_schedule = lambda step: value
        self.old = [p.detach().clone() for p in self.params]
        self._stash: list[torch.Tensor] | None = None

    @property
    def is_swapped(self) -> bool:
        """Whether the old weights are in ``params`` now."""
        return self._stash is not None

    @torch.no_grad()
    def update(self, step: int) -> float:
        """``old <- d * old + (1 - d) * params`` with ``d = decay_schedule(step)``; returns ``d``.

        ``d = 0`` copies ``params`` exactly (the policy at the start of the next iteration); ``d = 1``
        leaves the copy as it is.
        """
        if self.is_swapped:
            raise RuntimeError("EMAPolicy.update while the old weights are swapped in; call swap_out() first")
        d = float(self.decay_schedule(step))
        check(0.0 <= d <= 1.0, "decay_schedule", f"returned {d} at step {step}; a decay must lie in [0, 1]")
        if d == 1.0:
            return d
        for old, p in zip(self.old, self.params, strict=True):
            if d == 0.0:
                old.copy_(p)
            else:
                old.mul_(d).add_(p.detach().to(old.dtype), alpha=1.0 - d)
        return d

    @torch.no_grad()
    def reset(self) -> None:
        """Make the copy equal to ``params`` now (as when it was built)."""
        if self.is_swapped:
            raise RuntimeError("EMAPolicy.reset while the old weights are swapped in; call swap_out() first")
        for old, p in zip(self.old, self.params, strict=True):
            old.copy_(p)

    @torch.no_grad()
    def swap_in(self) -> None:
        """Copy the old weights into ``params``, keeping the trained ones aside."""
        if self.is_swapped:
            raise RuntimeError("EMAPolicy.swap_in: the old weights are already swapped in")
        self._stash = [p.detach().clone() for p in self.params]
        for p, old in zip(self.params, self.old, strict=True):
            p.copy_(old)

    @torch.no_grad()
    def swap_out(self) -> None:
        """Put the trained weights back into ``params`` (exactly as they were before :meth:`swap_in`)."""
        if self._stash is None:
            raise RuntimeError("EMAPolicy.swap_out without swap_in")
        for p, kept in zip(self.params, self._stash, strict=True):
            p.copy_(kept)
        self._stash = None

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Context in which ``params`` hold the old weights; the trained ones come back on exit."""
        self.swap_in()
        try:
            yield
        finally:
            self.swap_out()

    def state_dict(self, to_full: Reshard | None = None) -> dict[str, torch.Tensor]:
        """The old weights as ``{"old.<i>": tensor}``: contiguous copies, ready for ``safetensors``.
        ``to_full`` makes whole tensors of sharded parameters' pieces (FSDP; a collective)."""
        old = to_full(self.old) if to_full is not None else self.old
        return {f"old.{i}": t.detach().clone().contiguous() for i, t in enumerate(old)}

    @torch.no_grad()
    def load_state_dict(
        self,
        state: dict[str, torch.Tensor],
        to_local: Reshard | None = None,
    ) -> None:
        """Load old weights saved by :meth:`state_dict` (same keys, shapes; cast to the stored dtype).
        ``to_local`` takes this process's pieces of the whole tensors saved (FSDP; a collective)."""
        expected = [f"old.{i}" for i in range(len(self.old))]
        if sorted(state) != sorted(expected):
            raise ConfigError(
                "state_dict",
                f"keys {sorted(state)[:4]}... do not match the {len(expected)} tensors old.0..old."
                f"{len(expected) - 1}; was it saved for the same LoRA parameters?",
            )
        if to_local is not None:
            state = dict(zip(expected, to_local([state[k] for k in expected]), strict=True))
        for key, old in zip(expected, self.old, strict=True):
            check(
                tuple(state[key].shape) == tuple(old.shape),
                "state_dict",
                f"{key} has shape {tuple(state[key].shape)}, expected {tuple(old.shape)}",
            )
        for key, old in zip(expected, self.old, strict=True):
            old.copy_(state[key])
