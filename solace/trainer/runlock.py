"""One run per output folder: a lock file ``OUT/.solace.lock`` taken atomically, released on exit.

Two runs writing into the same folder interleave ``log.csv``, overwrite each other's checkpoints and the
``latest`` pointer, and a fresh run deletes the log of the one still going. So a run takes the lock before it
writes anything. The lock file is created with ``O_CREAT | O_EXCL`` (atomic on local file systems and NFSv3+)
and holds JSON: ``pid``, ``host``, ``started`` (UTC), ``proc_start`` (the process start time on Linux, to
tell a reused pid from the holder), ``token`` (whose lock it is) and ``argv``.

A second taker while the holder lives gets a :class:`~solace.errors.ConfigError` on ``train.output_dir``
naming the folder, the holder and the fix. A lock whose holder is gone (a dead pid on this host, a zombie,
a pid reused by another process, or this very process without a live :class:`RunLock` on the folder, as
after a container restart where the run was pid 1 again) is *stale*: it is taken over with a
:class:`StaleLockWarning`, and the message is also returned. A lock from another host cannot be checked
and is never taken over: the error says to delete the file once that run is known to be gone.

Take it on the main process only (rank 0): ranks of one run share the folder. The liveness check trusts
the host name: containers that share a folder *and* a host name but not a pid namespace look like one host.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from solace.errors import ConfigError
from solace.trainer.distributed import rank0_decides
from solace.utils.files import earlier_run, remove_earlier_run

LOCK_NAME = ".solace.lock"
_BREAK_SUFFIX = ".break"
_BREAK_STALE_S = 30.0  # a break marker older than this was left by a process killed while breaking a lock
_HELD: set[str] = set()  # lock files held by live RunLock objects of this process


class StaleLockWarning(UserWarning):
    """A lock left by a run that is gone was taken over."""


def _proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:  # the command name (field 2) may hold spaces and parentheses: split after its last ')'
        return int(stat[stat.rindex(")") + 2 :].split()[19])
    except (ValueError, IndexError):
        return None


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2 :].split()[0] == "Z"
    except (OSError, ValueError, IndexError):
        return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host and has not exited (a zombie counts as exited)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    except OSError:
        return False
    return not _is_zombie(pid)


def read_lock(folder: str | Path) -> dict[str, Any] | None:
    """The content of ``folder``'s lock file; None when there is none; ``{}`` when it is not valid JSON."""
    path = Path(folder) / LOCK_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(text)
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


# What a run writes into its folder once it has started (``config.yaml`` first), and what a new run would
# mix with or replace: a folder holding any of these holds a run. ``tb/`` is not among them: the tracker
# opens it before the run starts (:func:`clear_earlier_run` removes only the earlier run's event files).
RUN_FILES = (
    "config.yaml",
    "inputs.json",
    "log.csv",
    "checkpoints",
    "lora",
    "evals.json",
    "monitor.json",
    "report.md",
    "report_curves.png",
    "images",
)


def clear_earlier_run(folder: str | Path, started: float) -> list[str]:
    """Remove an earlier run's files from ``folder`` (``--overwrite``): ``RUN_FILES`` and the TensorBoard
    event files under ``tb/`` older than ``started`` (this run's own are newer). Returns what was removed."""
    folder = Path(folder)
    removed = remove_earlier_run(folder, RUN_FILES)
    old_events = [f for f in (folder / "tb").rglob("events.out.tfevents.*") if f.stat().st_mtime < started]
    for f in old_events:
        f.unlink()
    if old_events:
        removed.append(f"tb/ ({len(old_events)} event file{'s' * (len(old_events) > 1)})")
    return removed


def _describe(info: dict[str, Any]) -> str:
    return (
        f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
        + (f", command: {info['argv']}" if info.get("argv") else "")
    )


class RunLock:
    """``with RunLock(output_dir) as lock: ...`` holds ``output_dir/.solace.lock`` for the block.

    :meth:`acquire` returns None, or the message of a stale lock it took over (also warned as
    :class:`StaleLockWarning`); :meth:`release` deletes the file only while it is still this lock's
    (compared by token) and may be called any number of times.
    """

    def __init__(self, folder: str | Path, wait_unreadable_s: float = 2.0):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.wait_unreadable_s = wait_unreadable_s
        self.held = False
        self.takeover: str | None = None

    # ------------------------------------------------------------------ public
    def acquire(self) -> str | None:
        if self.held:
            return self.takeover
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        first_unreadable: float | None = None
        for _ in range(100):  # each round either takes the lock or removes a stale one
            if self._create():
                self.held = True
                _HELD.add(key)
                return self.takeover
            info = read_lock(self.folder)
            if info is None:  # released meanwhile
                continue
            if not info.get("token"):  # being written right now, or garbage
                now = time.monotonic()
                first_unreadable = first_unreadable if first_unreadable is not None else now
                if now - first_unreadable < self.wait_unreadable_s:
                    time.sleep(0.05)
                    continue
                reason = "its content is not a solace lock (unreadable or empty)"
            else:
                first_unreadable = None
                reason = self._stale_reason(info, key)
                if reason is None:
                    raise ConfigError("train.output_dir", self._held_message(info))
            if self._break(info):
                msg = (
                    f"took over the stale lock {self.path} ({_describe(info) if info else 'no holder'}): "
                    f"{reason}. Its run was interrupted; this run continues in the same folder."
                )
                self.takeover = msg if self.takeover is None else self.takeover
                warnings.warn(msg, StaleLockWarning, stacklevel=2)
            else:
                time.sleep(0.05)  # another process is breaking it: look again
        raise ConfigError("train.output_dir", f"could not take the lock {self.path}; delete it and retry")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(str(self.path.resolve()))
        info = read_lock(self.folder)
        if info and info.get("token") == self.token:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ internals
    def _create(self) -> bool:
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "proc_start": _proc_start(os.getpid()),
            "token": self.token,
            "argv": " ".join(sys.argv)[:300],
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(info))
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _stale_reason(self, info: dict[str, Any], key: str) -> str | None:
        """Why the lock described by ``info`` is stale; None while its holder may still run."""
        if info.get("host") != socket.gethostname():
            return None  # another machine's pid cannot be checked here
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            return "it names no valid pid"
        if pid == os.getpid():
            if key in _HELD:
                return None  # another RunLock of this process holds it
            return f"pid {pid} is this process, which holds no lock on the folder (a restarted container?)"
        if not pid_alive(pid):
            return f"pid {pid} is no longer running"
        recorded, now = info.get("proc_start"), _proc_start(pid)
        if recorded is not None and now is not None and int(recorded) != now:
            return f"pid {pid} now belongs to another process (its start time differs)"
        return None

    def _held_message(self, info: dict[str, Any]) -> str:
        pid, host = info.get("pid", "?"), info.get("host", "?")
        local = host == socket.gethostname()
        stop = f"stop it (kill {pid})" if local else f"stop it on host {host}"
        gone = (
            ""
            if local
            else f" If that run is known to be gone (this host cannot check another host's processes), "
            f"delete {self.path}."
        )
        return (
            f"the output folder {self.folder} is in use by another run ({_describe(info)}); its lock file is "
            f"{self.path}. Wait for that run to end, {stop}, or choose another train.output_dir.{gone}"
        )

    def _break(self, info: dict[str, Any]) -> bool:
        """Remove the stale lock ``info`` unless it changed meanwhile; False when another process is at it."""
        marker = self.path.with_name(self.path.name + _BREAK_SUFFIX)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - marker.stat().st_mtime > _BREAK_STALE_S:
                    marker.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            if read_lock(self.folder) == info:  # still the same stale lock (token and all)
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            marker.unlink(missing_ok=True)


@contextmanager
def run_lock(out: Path, acc: Any, warn: Callable[[str], None]) -> Iterator[None]:
    """Hold the output folder's lock for the run (rank 0 takes it; every rank fails if it cannot)."""
    lock, error = None, None
    if acc.is_main_process:
        lock = RunLock(out)
        try:
            msg = lock.acquire()
            if msg:
                warn(msg)
        except ConfigError as e:
            error = e
        except OSError as e:  # a file in the way, a read-only or full disk
            lock = None
            error = ConfigError(
                "train.output_dir", f"{out} cannot be written ({e.strerror}); choose another folder"
            )
    if rank0_decides(acc, error is not None):
        raise error or ConfigError("train.output_dir", f"{out} is locked by another run (see rank 0)")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def claim_folder(
    out: Path, acc: Any, created: float, asked_resume: bool, overwrite: bool, warn: Callable[[str], None]
) -> None:
    """A new run's folder holds no earlier run: stop (naming ``--resume`` and ``--overwrite``), or with
    ``overwrite`` remove the earlier run's files (those older than ``created``), saying which. ``--resume``
    with nothing to resume starts anew over a run that never checkpointed (its log is cut), as before."""
    error = None
    if acc.is_main_process:
        found = earlier_run(out, RUN_FILES)
        if found and overwrite:
            removed = clear_earlier_run(out, created)
            warn(f"--overwrite: removed the earlier run's {', '.join(removed)} from {out}")
        elif found and not asked_resume:
            error = ConfigError(
                "train.output_dir",
                f"{out} holds an earlier run ({', '.join(found)}); `--resume` continues it, "
                "`--overwrite` replaces it, or choose another train.output_dir",
            )
    if rank0_decides(acc, error is not None):
        raise error or ConfigError("train.output_dir", f"{out} holds an earlier run (see rank 0)")
