"""Ctrl-C, SIGTERM and SIGHUP (the terminal closed) end a run cleanly: the command exits with a message and
a non-zero code (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP). A policy update in progress finishes and
the iteration is checkpointed. Sampling, rewards, evaluations and image grids (work that is redone on
resume) stop within seconds instead, at their next forward (:mod:`solace.utils.interrupt`), where the
trainer runs them as stoppable. A second signal aborts at once (the default handler, re-installed after the
first)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from solace.errors import SolaceError
from solace.utils import interrupt

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class RunInterrupted(SolaceError):
    """A run stopped on a signal after checkpointing; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """While active (``with StopRequest() as stop:``), SIGINT / SIGTERM / SIGHUP set ``stop.signum`` (and
    request a stop of stoppable work) instead of killing the process; the loop checks it between
    iterations. Outside the main thread (where Python cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one aborts at once
        interrupt.request(signum)  # stoppable work (solace.utils.interrupt) stops at its next check

    def __enter__(self) -> StopRequest:
        interrupt.clear()
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        interrupt.clear()
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
