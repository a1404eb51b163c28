"""Atomic checkpoints (safetensors + JSON, never pickle) and resume.

A checkpoint is a folder ``checkpoints/iter_000010`` holding ``lora.safetensors`` (the trainable LoRA with
its PEFT config as metadata), ``optimizer.safetensors`` (AdamW moments, by parameter index), and
``state.json`` (iteration, optimizer step counts and hyper-parameters, metric history), and where the
policy update keeps tensors of its own ``update.safetensors`` (DiffusionNFT's old policy). It is written
to a temporary folder and renamed into place, then ``checkpoints/latest`` is replaced atomically, so a run
killed at any moment leaves the previous checkpoint intact.

Resuming trusts nothing it has not checked: :func:`find_resumable` takes the checkpoint ``latest`` names when
it is intact (every file parses: ``state.json`` as JSON naming its iteration, each safetensors file's header
and size; nothing is unpickled or loaded into tensors), else the newest intact older one, and names every
checkpoint it passes over. :func:`clean_partial` removes what interrupted writes left behind.
:func:`prune_checkpoints` keeps the newest intact checkpoints (``train.checkpoints_total_limit``), the one
a resume takes always among them. A checkpoint
may record the run's resolved configuration (``save_checkpoint(..., config=...)``, a plain JSON dict), read
back by :func:`read_state` / :func:`load_checkpoint` as ``state["config"]``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from solace.errors import ConfigError
from solace.trainer.guard import NonFiniteError
from solace.utils.files import safetensors_problem

UPDATE_FILE = "update.safetensors"


def _optimizer_tensors(
    opt: torch.optim.Optimizer | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt if isinstance(opt, dict) else opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        scalars["state"][str(idx)] = {}
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars["state"][str(idx)][k] = float(v) if torch.is_tensor(v) else v
    return tensors, scalars


def _load_optimizer(
    opt: torch.optim.Optimizer,
    tensors: dict[str, torch.Tensor],
    scalars: dict[str, Any],
    to_local: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for idx, st in scalars["state"].items():
        state[int(idx)] = {k: torch.tensor(v) if k == "step" else v for k, v in st.items()}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    sd = {"state": state, "param_groups": scalars["param_groups"]}
    opt.load_state_dict(to_local(sd) if to_local is not None else sd)


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """A checkpoint is always one to resume from: non-finite weights are never written (the trainer stops
    before they would be)."""
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        raise NonFiniteError(f"not checkpointed: non-finite weights {bad[:3]}; resume an earlier checkpoint")


def _write_files(
    tmp: Path,
    iteration: int,
    lora: dict[str, torch.Tensor],
    lora_meta: dict[str, str],
    opt: Any,
    extra: dict[str, Any],
    update_tensors: dict[str, torch.Tensor] | None,
) -> None:
    """A checkpoint's files into ``tmp``, made durable (fsync) before the caller's rename publishes them."""
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in lora.items()},
        str(tmp / "lora.safetensors"),
        metadata=lora_meta,
    )
    ot, os_ = _optimizer_tensors(opt)
    save_file(ot, str(tmp / "optimizer.safetensors"))
    if update_tensors:  # the policy update's own state (DiffusionNFT's old policy)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in update_tensors.items()}, str(tmp / UPDATE_FILE)
        )
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "optimizer": os_, **extra}))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)


def save_checkpoint(
    folder: Path,
    iteration: int,
    lora: dict[str, torch.Tensor],
    lora_meta: dict[str, str],
    opt: torch.optim.Optimizer | dict[str, Any],
    extra: dict[str, Any],
    config: dict[str, Any] | None = None,
    update_tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``iter_{iteration:06d}`` under ``folder`` atomically; returns its path.

    ``config``: the run's resolved configuration as a plain JSON dict, stored as ``state.json``'s
    ``config`` entry (then :func:`load_checkpoint` / :func:`read_state` return it unchanged). ``opt``: the
    optimizer, or its state dict with whole tensors (what FSDP's shards gather to).
    """
    _check_finite({**lora, **(update_tensors or {})})
    if config is not None:
        if not isinstance(config, dict):
            raise ConfigError("config", f"must be a plain dict, got {type(config).__name__}")
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ConfigError("config", f"must be plain JSON (dicts, lists, finite numbers): {e}") from e
        extra = {**extra, "config": config}
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"iter_{iteration:06d}"
    tmp = folder / f".tmp_iter_{iteration:06d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(tmp, iteration, lora, lora_meta, opt, extra, update_tensors)
    except (OSError, SafetensorError) as e:  # a full or failing disk: the previous checkpoint stays intact
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(
            "train.output_dir",
            f"writing checkpoint {final.name} under {folder} failed ({e}); free space there, then `--resume` "
            "continues from the last checkpoint, which is intact",
        ) from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(folder)
    latest_tmp = folder / f".latest_{os.getpid()}"
    with open(latest_tmp, "w") as fh:
        fh.write(final.name)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(latest_tmp, folder / "latest")
    _fsync_dir(folder)
    return final


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- integrity
_ITER_RE = re.compile(r"iter_(\d+)")


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from, or None when it is intact.

    Intact: ``state.json`` parses as a JSON object whose ``iteration`` matches the folder name and which
    holds the optimizer's scalars, and ``lora.safetensors`` and ``optimizer.safetensors`` pass
    :func:`safetensors_problem`. Nothing is unpickled or loaded into tensors.
    """
    path = Path(path)
    if not path.is_dir():
        return "the folder is missing"
    try:
        state = json.loads((path / "state.json").read_text())
    except FileNotFoundError:
        return "state.json is missing (the write was interrupted)"
    except (OSError, UnicodeDecodeError, ValueError):
        return "state.json is truncated or garbled"
    if not isinstance(state, dict) or not isinstance(state.get("optimizer"), dict):
        return "state.json is not a solace checkpoint state (no optimizer entry)"
    m = _ITER_RE.fullmatch(path.name)
    if m and state.get("iteration") != int(m[1]):
        return f"state.json says iteration {state.get('iteration')!r}, the folder name {int(m[1])}"
    names = ["lora.safetensors", "optimizer.safetensors"]
    if (path / UPDATE_FILE).exists():
        names.append(UPDATE_FILE)
    for name in names:
        problem = safetensors_problem(path / name)
        if problem:
            return problem
    return None


def _iteration_folders(root: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    for p in root.iterdir() if root.is_dir() else []:
        m = _ITER_RE.fullmatch(p.name)
        if m and p.is_dir():
            out[int(m[1])] = p
    return out


def find_resumable(root: Path) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from under ``root`` (``OUT/checkpoints``) and a warning per checkpoint passed
    over; ``(None, [])`` when there is nothing to resume.

    The folder ``latest`` names is taken when it is intact (:func:`checkpoint_problem`); newer folders
    beside it (left by an earlier run in the same folder, or written just before a kill that hit before the
    pointer moved) are named in a warning and not used, since nothing vouches for their lineage. When
    ``latest`` names a missing or broken folder, the newest intact checkpoint *older* than it is taken; when
    ``latest`` itself is missing or garbled, the newest intact checkpoint. ``(None, warnings)`` means
    checkpoints exist but none is intact.
    """
    root = Path(root)
    folders = _iteration_folders(root)
    warns: list[str] = []
    ptr = root / "latest"
    below: int | None = None  # only checkpoints before this iteration are candidates
    try:
        name = ptr.read_text().strip()
    except FileNotFoundError:
        name = None
        if folders:
            warns.append(f"{ptr} is missing; looking for the newest intact checkpoint")
    except (OSError, UnicodeDecodeError):
        name = ""
    if name is not None:
        m = _ITER_RE.fullmatch(name)
        if not m:
            warns.append(f"{ptr} holds {name[:40]!r}, not a checkpoint name; taking the newest intact one")
        else:
            named = root / name
            problem = checkpoint_problem(named)
            if problem is None:
                newer = sorted(p.name for i, p in folders.items() if i > int(m[1]))
                if newer:
                    warns.append(
                        f"{root}: {', '.join(newer)}, newer than {name} (named by latest), not used: left "
                        "by an earlier run in this folder, or written just before the pointer moved"
                    )
                return named, warns
            warns.append(f"skipped {named} (named by latest): {problem}")
            below = int(m[1])
    for it in sorted(folders, reverse=True):
        if below is not None and it >= below:
            if it > below:
                warns.append(f"skipped {folders[it]}: newer than what latest names (an earlier run's?)")
            continue
        problem = checkpoint_problem(folders[it])
        if problem is None:
            if warns:
                warns.append(f"resuming from {folders[it]}, the newest intact checkpoint")
            return folders[it], warns
        warns.append(f"skipped {folders[it]}: {problem}")
    if warns:
        warns.append(f"no intact checkpoint under {root}")
    return None, warns


def latest_checkpoint(folder: Path) -> Path | None:
    """:func:`find_resumable`, each warning issued with :func:`warnings.warn`; None when there are no
    checkpoints at all. Raises :class:`ConfigError` when checkpoints exist but none is intact, rather than
    let a resumed run start over (and overwrite the run's log) without saying so."""
    path, warns = find_resumable(folder)
    for w in warns:
        warnings.warn(w, RuntimeWarning, stacklevel=2)
    if path is None and warns:
        raise ConfigError(
            "resume",
            f"no intact checkpoint under {folder} ({'; '.join(warns)}). To start the run over, delete "
            f"{folder}; to keep it, train into another train.output_dir.",
        )
    return path


def checkpoints_to_prune(intact: dict[int, bool], resumable: int, keep: int) -> list[int]:
    """The checkpoint iterations to remove, given which are intact: every one older than the ``keep``-th
    newest intact checkpoint at or below ``resumable`` (the one a resume takes, intact, so always kept).
    Newer ones (not used by a resume) and broken ones between kept ones stay; ``keep`` < 1 keeps all."""
    if keep < 1:
        return []
    kept = [it for it in sorted(intact, reverse=True) if it <= resumable and intact[it]][:keep]
    return sorted(it for it in intact if it < kept[-1]) if kept else []


def prune_checkpoints(root: Path, keep: int) -> list[Path]:
    """``train.checkpoints_total_limit``: remove what :func:`checkpoints_to_prune` names under ``root`` (the
    resumable checkpoint from :func:`find_resumable`; nothing when there is none). Each folder is renamed to
    a ``.tmp_iter_*`` name first (atomic), then deleted, so a kill mid-delete leaves what
    :func:`clean_partial` removes, never a half checkpoint. Call it only while holding the run's lock, after
    a checkpoint was written. Returns the removed folders."""
    if keep < 1:
        return []
    root = Path(root)
    resumable, _ = find_resumable(root)
    if resumable is None:
        return []
    folders = _iteration_folders(root)
    newest = int(_ITER_RE.fullmatch(resumable.name)[1])
    intact = {it: it > newest or checkpoint_problem(p) is None for it, p in folders.items()}
    removed = []
    for it in checkpoints_to_prune(intact, newest, keep):
        doomed = root / f".tmp_iter_{it:06d}_pruned_{os.getpid()}"
        os.replace(folders[it], doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(folders[it])
    return removed


def clean_partial(root: Path) -> list[Path]:
    """Remove what interrupted checkpoint writes left under ``root``: ``.tmp_iter_*`` folders and
    ``.latest_*`` pointer files. Returns the removed paths. Call it only while holding the run's lock
    (:class:`solace.trainer.runlock.RunLock`): a live writer's temporaries look the same."""
    root = Path(root)
    removed: list[Path] = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.name.startswith(".tmp_iter_") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".latest_") and not p.is_dir():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    return removed


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of checkpoint ``path`` (iteration, histories, ``config`` when recorded)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except FileNotFoundError:
        raise ConfigError("resume", f"{path} is not a solace checkpoint (no state.json)") from None
    except ValueError as e:
        raise ConfigError("resume", f"{path}/state.json is garbled ({e})") from None


def load_update_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The policy update's tensors saved with checkpoint ``path`` (empty when it saved none)."""
    f = Path(path) / UPDATE_FILE
    return load_file(str(f)) if f.exists() else {}


def load_checkpoint(
    path: Path,
    opt: torch.optim.Optimizer,
    to_local: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer in place; return (lora state dict, state.json content). ``to_local`` maps the
    saved state dict (whole tensors) to the optimizer's own (FSDP: this process's shards)."""
    state = read_state(path)
    _load_optimizer(opt, load_file(str(path / "optimizer.safetensors")), state["optimizer"], to_local)
    return load_file(str(path / "lora.safetensors")), state
