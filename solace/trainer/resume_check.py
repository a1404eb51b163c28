"""A resumed run is the run it continues: its configuration is compared field by field with the one the
checkpoint recorded, and its ``log.csv`` is cut back to the checkpoint.

Which changes are safe (:data:`SAFE`): those that change neither the training trajectory nor what the run
has recorded so far. How long to train (``train.iterations``, ``train.max_minutes``), how often to evaluate,
draw grids and checkpoint, how many checkpoints to keep, whether to report, the thread count, the device (a
run moved to another machine) and the output folder (a moved folder), the grid prompts and rows, the
experiment trackers, the collapse monitor's thresholds, the base evaluation cache's file, the informational
``preset`` name, the process group's timeout, and where prompt embeddings are kept
(``model.embedding_cache``, ``model.embedding_lru_size``, ``model.offload_text_encoders``: each prompt is
encoded alone either way, the same values).

Evaluation settings (:data:`EVAL_FIELDS`: ``eval.*`` but how often to evaluate and draw grids, the grid
prompts and rows and the cache file) are *not* safe, a deliberate choice: they leave the training trajectory
alone, but the evaluations already recorded (restored from the checkpoint, starting with the baseline at
iteration 0 that the report, ``evals.json`` and the collapse monitor compare against) were measured the old
way, so the run's eval curve would silently mix two measurements. Changing them needs ``allow_changes``,
which says so in the log line.

A checkpoint of an earlier version records keys that have moved since (:data:`MOVED_KEYS`):
:func:`read_recorded_config` reads it with them where they live now.

Everything else (model, LoRA, data, sampling, reward, GRPO, optimiser, seed, batch sizes, which change the
samples, the gradients or merely their rounding) is unsafe: a resumed run would no longer be the run that
an uninterrupted one is, bit for bit.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from solace.errors import ConfigError
from solace.trainer.config import MOVED_KEYS, SolaceConfig, load_config

#: Dotted keys (``fnmatch`` patterns) whose change on resume is safe.
SAFE: tuple[str, ...] = (
    "train.iterations",
    "train.max_minutes",
    "eval.every",
    "eval.image_every",
    "train.checkpoint_every",
    "train.checkpoints_total_limit",
    "train.report",
    "train.threads",
    "eval.image_prompts",
    "eval.base_cache",
    "train.output_dir",
    "train.device",
    "train.log_with",
    "train.tracker_project",
    "train.process_group_timeout_minutes",
    "eval.metric_grid_rows",
    "monitor.*",
    "preset",
    "model.embedding_cache",
    "model.embedding_lru_size",
    "model.offload_text_encoders",
    # how the model is found, not what it is: model.name is compared, a family that built another network
    # fails on the LoRA's keys; checkpoints written before these keys existed record neither
    "model.family",
    "plugins",
)
#: Evaluation-only settings: unsafe because earlier evaluations of the run were measured with the old ones.
EVAL_FIELDS: tuple[str, ...] = (
    # the prompts, their number, samples, steps and CFG, the evaluator, its metrics and their arguments, its
    # batching (the eval.* keys in SAFE are safe)
    "eval.*",
)
#: How the command line spells ``allow_changes`` (used in the error message's fix).
ALLOW_FLAG = "--allow-changes"


class _Absent:
    """A key present on one side of :func:`config_diff` only."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


def _plain(v: Any) -> Any:
    """Tuples as lists (a JSON round trip makes them lists), recursively."""
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, bool) != isinstance(b, bool):  # True == 1 in Python, not in a config
        return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if _numeric(a, b):
        return a == b
    return type(a) is type(b) and a == b


def _numeric(a: Any, b: Any) -> bool:
    """Both int or float (not bool): 1 and 1.0 compare equal (YAML may write either)."""
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in (a, b))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, old value, new value), ...]`` for every leaf that differs, sorted by key.

    Nested dicts are walked (``{"train": {"seed": 0}}`` gives ``train.seed``); lists (e.g.
    ``reward.components``) are compared whole; tuples equal lists, ``1`` equals ``1.0``, NaN equals NaN, a
    bool never equals a number. A key on one side only has :data:`ABSENT` on the other.
    """
    a, b = _flatten(_plain(old)), _flatten(_plain(new))
    out = []
    for key in sorted(a.keys() | b.keys()):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va is ABSENT or vb is ABSENT or not _same(va, vb):
            out.append((key, va, vb))
    return out


def upgrade_recorded_config(old: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded config with the keys of earlier versions (:data:`MOVED_KEYS`) where they live
    now; a copy, the given one untouched. The batching fields that ``grpo`` and ``nft`` each had become the
    ``train`` ones of the recorded ``train.algorithm``'s section (the other section's were never used).
    Only a recorded config is read so: a YAML file or override with an old key fails (:func:`load_config`)."""
    new = {k: dict(v) if isinstance(v, dict) else v for k, v in old.items()}
    train = new.get("train")
    active = "nft" if isinstance(train, dict) and train.get("algorithm") == "nft" else "grpo"
    for key, to in MOVED_KEYS.items():
        section, name = key.split(".")
        if not isinstance(new.get(section), dict) or name not in new[section]:
            continue
        value = new[section].pop(name)
        if section in ("grpo", "nft") and section != active:
            continue
        to_section, to_name = to.split(".")
        new.setdefault(to_section, {})[to_name] = value
    return new


def read_recorded_config(old: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded config (:func:`upgrade_recorded_config`) through this version's schema, so
    fields added since do not count as changes; one this version cannot read is returned with its keys
    moved only (the comparison then lists its differences)."""
    old = upgrade_recorded_config(old)
    try:
        cfg: SolaceConfig = load_config(None, check_paths=False, layers_after=[OmegaConf.create(old)])
    except Exception:  # noqa: BLE001 - a config this version cannot read is compared as it is
        return old
    return dataclasses.asdict(cfg)


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatchcase(key, p) for p in patterns)


def _fmt(key: str, old: Any, new: Any) -> str:
    def short(v: Any) -> str:
        r = repr(v)
        return r if len(r) <= 80 else r[:77] + "..."

    return f"{key}: {short(old)} -> {short(new)}"


# What the checkpoint's tensors are shaped by or belong to: no --allow-changes can resume across these
# (the LoRA's shape and scale, the update whose state the checkpoint holds).
STRUCTURAL: tuple[str, ...] = (
    "model.lora.rank",
    "model.lora.alpha",
    "model.lora.target_modules",
    "train.algorithm",
    "lora_ema.enabled",
)


def check_resume(old: dict[str, Any], new: dict[str, Any], allow_changes: bool = False) -> list[str]:
    """Compare the configuration a checkpoint recorded (``old``) with the resuming run's (``new``).

    Raises :class:`ConfigError` on ``--resume`` listing every change outside :data:`SAFE` (evaluation
    settings, :data:`EVAL_FIELDS`, with their own reason) and the fix, unless ``allow_changes``. Returns one
    line ``"key: old -> new"`` per accepted change, for the log (unsafe ones allowed by ``allow_changes`` end
    with ``(unsafe, allowed)``).
    """
    safe, unsafe = [], []
    structural = [_fmt(k, a, b) for k, a, b in config_diff(old, new) if _matches(k, STRUCTURAL)]
    if structural:
        raise ConfigError(
            "--resume",
            f"the checkpoint cannot continue with {'; '.join(structural)} (its tensors were made for the old "
            "value, even with --allow-changes); keep the old value or train into another train.output_dir",
        )
    for key, a, b in config_diff(old, new):
        line = _fmt(key, a, b)
        if _matches(key, SAFE):
            safe.append(line)
        elif _matches(key, EVAL_FIELDS):
            unsafe.append(line + " (evaluation only, but this run's earlier evaluations used the old value)")
        else:
            unsafe.append(line)
    if unsafe and not allow_changes:
        raise ConfigError(
            "--resume",
            f"the configuration differs from the one the checkpoint was trained with in {len(unsafe)} "
            "field(s) that change what the run computes:\n  "
            + "\n  ".join(unsafe)
            + f"\nResume with the checkpoint's values, train into another train.output_dir, or pass "
            f"{ALLOW_FLAG} to continue with the changed settings anyway (the run is then no longer "
            "comparable with an uninterrupted one).",
        )
    return safe + [u + " (unsafe, allowed)" for u in unsafe]


def truncate_log(csv_path: str | Path, iteration: int) -> int:
    """Drop the rows of ``log.csv`` whose ``iteration`` is above ``iteration`` (the checkpoint's), which a
    killed run wrote after its last checkpoint and its resumption writes again. Also drops a row cut short
    by a kill (no final newline, a wrong field count, or an unreadable ``iteration``). The header is kept;
    the file is rewritten through a temporary file and ``os.replace``, and left untouched when nothing is
    dropped. An empty file is removed (the next write starts it with a header). Returns the rows dropped;
    0 when there is no file. Raises :class:`ConfigError` when the header has no ``iteration`` column.
    """
    path = Path(csv_path)
    try:
        with open(path, newline="") as fh:
            text = fh.read()
    except FileNotFoundError:
        return 0
    if not text.strip():
        path.unlink()
        return 0
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    partial_last = not text.endswith("\n")
    if partial_last and not body:  # the header itself was cut short: no row was written yet
        path.unlink()
        return 0
    if "iteration" not in header:
        raise ConfigError("log.csv", f"{path} has no iteration column; move it away to resume")
    col = len(header)
    idx = header.index("iteration")
    keep, dropped = [], 0
    for i, row in enumerate(body):
        ok = len(row) == col and not (partial_last and i == len(body) - 1)
        if ok:
            try:
                ok = float(row[idx]) <= iteration
            except ValueError:
                ok = False
        if ok:
            keep.append(row)
        else:
            dropped += 1
    if not dropped:
        return 0
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(keep)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return dropped
