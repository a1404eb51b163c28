"""Prompt suites for metric evaluation: prompt files in their published formats, read by
:func:`solace.prompts.read_prompt_file` (``.txt`` one prompt a line, GenEval's ``.jsonl`` metadata).

The named suites (``drawbench``, ``geneval``, ``ocr``, ``pickscore``) are not shipped: each resolves to the
file the user passes with ``--prompts``; the name picks the default metrics and the report's title.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from solace.errors import ConfigError
from solace.prompts import Prompt, read_prompt_file

SUITES: dict[str, dict] = {
    "drawbench": {"file": "drawbench_test.txt", "metrics": ("clip_score", "pickscore", "hps")},
    "geneval": {"file": "geneval_test_metadata.jsonl", "metrics": ("geneval",)},
    "ocr": {"file": "ocr_test.txt", "metrics": ("ocr",)},
    "pickscore": {"file": "pickscore_test.txt", "metrics": ("pickscore",)},
}
"""Named suites: the published file name (for the error message) and the metrics used when none are given."""


@dataclass(frozen=True)
class PromptSuite:
    name: str
    path: str
    items: tuple[Prompt, ...]

    @property
    def prompts(self) -> list[str]:
        return [it.text for it in self.items]

    @property
    def metadata(self) -> list[dict]:
        return [it.meta for it in self.items]

    def __len__(self) -> int:
        return len(self.items)


def load_suite(
    name: str, prompts: str | Path | None = None, limit: int = 0, others: Sequence[str] = ()
) -> PromptSuite:
    """The suite ``name`` read from ``prompts`` (required for every named suite); ``limit`` > 0 keeps the
    first ``limit`` prompts. ``others``: the other suite names the command knows (for the error)."""
    if name not in SUITES:
        raise ConfigError("--suite", f"unknown suite {name!r}; use {', '.join([*others, *SUITES])}")
    if limit < 0:
        raise ConfigError("--limit", f"must be >= 0, got {limit}")
    if prompts is None or str(prompts) == "":
        raise ConfigError(
            "--prompts",
            f"suite {name!r} reads its prompts from a file: pass --prompts PATH "
            f"(e.g. the published {SUITES[name]['file']})",
        )
    items = read_prompt_file(prompts, "--prompts")
    if limit:
        items = items[:limit]
    return PromptSuite(name, str(prompts), tuple(items))
