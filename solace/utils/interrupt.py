"""Cooperative stops: long work (sampling steps, reward forwards) calls :func:`check` between forwards, and
raises :class:`StopNow` there once a stop was requested inside :func:`stoppable`. Nothing is interrupted in
the middle of a forward, a weight swap or an optimizer step, so whatever holds the weights (the trainer's
checkpoint) finds them whole. Outside :func:`stoppable` a request only waits to be seen; with no request
:func:`check` is a read of one global.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class StopNow(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A stop was requested while stoppable work ran; ``signum`` is the signal that asked (0: none)."""

    def __init__(self, signum: int = 0):
        super().__init__(signum)
        self.signum = signum


_requested: int | None = None  # the signal that asked for a stop
_depth = 0  # how many stoppable() blocks are open


def request(signum: int) -> None:
    """Ask the running work to stop (from a signal handler: only sets a flag)."""
    global _requested
    _requested = signum


def clear() -> None:
    global _requested
    _requested = None


def check() -> None:
    """Raise :class:`StopNow` when a stop was requested and the caller runs inside :func:`stoppable`."""
    if _requested is not None and _depth > 0:
        raise StopNow(_requested)


@contextlib.contextmanager
def stoppable(enabled: bool = True) -> Iterator[None]:
    """Inside (when ``enabled``), :func:`check` raises once a stop is requested; a request made before entry
    raises on entry. Work inside must be safe to drop and redo."""
    global _depth
    if not enabled:
        yield
        return
    _depth += 1
    try:
        check()
        yield
    finally:
        _depth -= 1
