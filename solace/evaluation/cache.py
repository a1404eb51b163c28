"""The cache of base evaluations: runs that share a base model, its evaluation settings and a seed (an
ablation grid) evaluate the base once (``eval.base_cache``)."""

from __future__ import annotations

import json
from pathlib import Path

from solace.errors import ConfigError
from solace.utils.files import write_json_atomic


class BaseEvalCache:
    """A JSON file of evaluations keyed by every setting they depend on (model, prompts, samples, steps,
    CFG, seed). Runs sharing a base model and a seed, such as an ablation grid, evaluate the base once."""

    FORMAT = "solace base-evaluation cache"

    def __init__(self, path: str | Path, key: dict, writes: bool = True):
        self.path = Path(path) if path else None
        self.key = json.loads(json.dumps(key, sort_keys=True))
        self.writes = writes  # False: read only (a process other than the main one)
        if self.path is not None and self.path.exists() and not self._ours():
            raise ConfigError(
                "eval.base_cache",
                f"{self.path} exists and is not a base-evaluation cache solace wrote (it is never "
                "overwritten): name another file, or '' for no cache",
            )

    def _ours(self) -> bool:
        """Whether the file at ``path`` is one this class wrote (its format mark, or the unmarked
        ``{"entries": [...]}`` of earlier versions), so that a user's file is never overwritten."""
        try:
            doc = json.loads(self.path.read_text())  # type: ignore[union-attr]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            return False
        return doc.get("format", self.FORMAT) == self.FORMAT and set(doc) <= {"format", "entries"}

    def _entries(self) -> list[dict]:
        if self.path is None or not self.path.exists():
            return []
        try:
            return list(json.loads(self.path.read_text()).get("entries", []))
        except (json.JSONDecodeError, AttributeError):
            return []  # a corrupt cache is recomputed, never trusted

    def get(self) -> dict | None:
        for e in self._entries():
            if e.get("key") == self.key:
                return e["result"]
        return None

    def put(self, result: dict) -> None:
        if self.path is None or not self.writes:
            return
        keep = {k: v for k, v in result.items() if k != "images"}
        entries = [e for e in self._entries() if e.get("key") != self.key]
        doc = {"format": self.FORMAT, "entries": [*entries, {"key": self.key, "result": keep}]}
        write_json_atomic(self.path, doc)
