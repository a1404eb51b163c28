"""Ctrl-C and SIGTERM end a run cleanly: the iteration in progress finishes, a checkpoint is written, and
the command exits with a message and a non-zero code (130 for SIGINT, 143 for SIGTERM). A second signal
aborts at once (the default handler, re-installed after the first)."""

from __future__ import annotations

import signal
import threading
from types import FrameType

from solace.errors import SolaceError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(SolaceError):
    """A run stopped on a signal after checkpointing; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


class StopRequest:
    """While active (``with StopRequest() as stop:``), SIGINT / SIGTERM set ``stop.signum`` instead of
    killing the process; the loop checks it between iterations. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # a second one aborts at once

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.getsignal(s)
                signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
