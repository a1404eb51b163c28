"""Prompt suites for metric evaluation: prompt files in their published formats.

* ``.txt``: one prompt a line (DrawBench, OCR, Pick-a-Pic test splits as published with Flow-GRPO's data);
  blank lines are skipped, nothing else is touched.
* ``.jsonl``: one JSON object a line with a ``prompt`` field -- GenEval's published metadata format
  (``tag``, ``include``, ``exclude``, ``prompt``). The whole record travels with the prompt as its metadata,
  which the ``geneval`` metric needs.

The named suites (``drawbench``, ``geneval``, ``ocr``, ``pickscore``) are not shipped: each resolves to the
file the user passes with ``--prompts``; the name picks the default metrics and the report's title.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from solace.errors import ConfigError

SUITES: dict[str, dict] = {
    "drawbench": {"file": "drawbench_test.txt", "metrics": ("clip_score", "pickscore", "hps")},
    "geneval": {"file": "geneval_test_metadata.jsonl", "metrics": ("geneval",)},
    "ocr": {"file": "ocr_test.txt", "metrics": ("ocr",)},
    "pickscore": {"file": "pickscore_test.txt", "metrics": ("pickscore",)},
}
"""Named suites: the published file name (for the error message) and the metrics used when none are given."""


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PromptSuite:
    name: str
    path: str
    items: tuple[PromptItem, ...]

    @property
    def prompts(self) -> list[str]:
        return [it.prompt for it in self.items]

    @property
    def metadata(self) -> list[dict]:
        return [it.metadata for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


def read_prompts(path: str | Path, field_name: str = "--prompts") -> list[PromptItem]:
    """Read a ``.txt`` (one prompt a line) or ``.jsonl`` (GenEval metadata) prompt file."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a prompt file" if p.is_dir() else "does not exist"
        raise ConfigError(field_name, f"{p} {what}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(field_name, f"{p} is not UTF-8 text ({e.reason})") from None
    items: list[PromptItem] = []
    if p.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(field_name, f"{p}:{n}: not valid JSON ({e.msg})") from None
            if (
                not isinstance(rec, dict)
                or not isinstance(rec.get("prompt"), str)
                or not rec["prompt"].strip()
            ):
                raise ConfigError(
                    field_name, f"{p}:{n}: each JSON line needs a non-empty string 'prompt' field"
                )
            items.append(PromptItem(rec["prompt"].strip(), rec))
    else:
        items = [PromptItem(line.strip()) for line in text.splitlines() if line.strip()]
    if not items:
        raise ConfigError(field_name, f"{p} holds no prompts")
    return items


def load_suite(name: str, prompts: str | Path | None = None, limit: int = 0) -> PromptSuite:
    """The suite ``name`` read from ``prompts`` (required for every named suite); ``limit`` > 0 keeps the
    first ``limit`` prompts."""
    if name not in SUITES:
        raise ConfigError("--suite", f"unknown suite {name!r}; use toy, {', '.join(SUITES)}")
    if limit < 0:
        raise ConfigError("--limit", f"must be >= 0, got {limit}")
    if prompts is None or str(prompts) == "":
        raise ConfigError(
            "--prompts",
            f"suite {name!r} reads its prompts from a file: pass --prompts PATH "
            f"(e.g. the published {SUITES[name]['file']})",
        )
    items = read_prompts(prompts)
    if limit:
        items = items[:limit]
    return PromptSuite(name, str(prompts), tuple(items))
