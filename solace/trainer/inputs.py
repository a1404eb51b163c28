"""The files a run reads, fingerprinted in its folder (``inputs.json``), so that ``--resume`` notices one
replaced under it: a prompt file edited between a run and its resumption would otherwise make the report
compare accuracies over different prompt sets.

What counts: the prompt files (``data.train_prompts``, ``eval.prompts``), the model (``model.name``:
a weights file or a pipeline folder), the LoRA a run starts from (``model.lora.init_from``) and the user
negatives of the edits variant. Names that are not paths (``toy``, a hub id) are not fingerprinted. A file
of up to 64 MB is hashed whole; a larger one (model weights) by its size and its first and last MiB, which
catches a replaced file without reading gigabytes at every start.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from solace.errors import ConfigError
from solace.trainer.config import MOVED_KEYS

INPUTS_FILE = "inputs.json"
WHOLE = 64 << 20  # hash files up to this size whole
EDGE = 1 << 20  # of larger ones, the first and last MiB and the size


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= WHOLE:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(EDGE))
            f.seek(size - EDGE)
            h.update(f.read(EDGE))
            h.update(str(size).encode())
    return h.hexdigest()[:16]


def digest(spec: str | None) -> str | None:
    """The fingerprint of a file or folder (its files in order, by relative name), None when ``spec`` names
    no existing path."""
    if not spec:
        return None
    p = Path(spec).expanduser()
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith(".")):
            h.update(f"{f.relative_to(p)}:{file_digest(f)}\n".encode())
        return h.hexdigest()[:16]
    return None


def run_inputs(cfg: Any) -> dict[str, str]:
    """``{config field: fingerprint}`` of every input of ``cfg`` that is a path."""
    fields = {
        "data.train_prompts": cfg.data.train_prompts,
        "eval.prompts": cfg.eval.prompts,
        "model.name": cfg.model.name,
        "model.lora.init_from": cfg.model.lora.init_from,
        "reward.self_confidence.negatives": cfg.reward.self_confidence.negatives,
    }
    return {k: d for k, v in fields.items() if (d := digest(v)) is not None}


def record_inputs(folder: Path, cfg: Any) -> None:
    (Path(folder) / INPUTS_FILE).write_text(json.dumps(run_inputs(cfg), indent=1))


def changed_inputs(folder: Path, cfg: Any) -> list[str]:
    """The fields whose file changed since the run in ``folder`` recorded them (a run that recorded none,
    from an earlier version, compares nothing)."""
    path = Path(folder) / INPUTS_FILE
    if not path.exists():
        return []
    new = run_inputs(cfg)
    old = {MOVED_KEYS.get(k, k): v for k, v in json.loads(path.read_text()).items()}  # earlier versions' keys
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def check_inputs(folder: Path, cfg: Any, allow_changes: bool) -> list[str]:
    """On ``--resume``: stop when an input file changed (naming it and the fix) unless ``allow_changes``;
    returns the changed fields (then re-recorded)."""
    changed = changed_inputs(folder, cfg)
    if changed and not allow_changes:
        names = ", ".join(f"{k} ({getattr_path(cfg, k)})" for k in changed)
        raise ConfigError(
            "--resume",
            f"input changed since the run started: {names}; restore it, or pass --allow-changes to continue "
            "with the new file (the run's earlier evaluations then used the old one)",
        )
    return changed


def getattr_path(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
