"""Prompts: one type, one reader of prompt files, and the deterministic prompts of each training iteration.

Prompt files come in their published formats:

* ``.txt``: one prompt a line (DrawBench, OCR, Pick-a-Pic as published with Flow-GRPO's datasets); blank
  lines are skipped and each line is stripped;
* ``.jsonl``: one JSON object a line with a non-empty string ``prompt`` field (GenEval's published metadata
  format: ``tag``, ``include``, ``exclude``, ``prompt``). The whole object travels with the prompt as its
  metadata, which rewards and metrics such as GenEval (and exact evaluators) need.

Training and evaluation read files through :func:`read_prompt_file`, so a file is accepted or rejected the
same way everywhere, with an error that names the field, the file and the line. Named prompt sets
(:data:`PROMPT_SETS`, registered by plugins such as the embedded world) stand wherever a file does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from solace.errors import ConfigError
from solace.registry import Registry


@dataclass(frozen=True)
class Prompt:
    """A prompt and its metadata (the JSON line it came from; empty for plain text)."""

    text: str
    meta: dict = field(default_factory=dict)


def read_prompt_file(path: str | Path, field_name: str = "prompts") -> list[Prompt]:
    """Read a ``.txt`` (one prompt a line) or ``.jsonl`` (a ``prompt`` field a line) prompt file.

    Every problem is a :class:`ConfigError` naming ``field_name`` (the config field or CLI option the path
    came from), the file and, for a bad line, its number."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a folder, not a prompt file" if p.is_dir() else "does not exist"
        raise ConfigError(field_name, f"{p} {what}")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(field_name, f"{p} is not UTF-8 text ({e.reason}); save it as UTF-8") from None
    suffix = p.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        hint = " (a .json file is one JSON document: write one object a line as .jsonl)" * (suffix == ".json")
        raise ConfigError(field_name, f"{p}: prompt files are .txt (one a line) or .jsonl (GenEval){hint}")
    items: list[Prompt] = []
    if suffix == ".jsonl":
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
            problem = _geneval_problem(rec)
            if problem:
                raise ConfigError(field_name, f"{p}:{n}: {problem} (GenEval metadata)")
            items.append(Prompt(rec["prompt"].strip(), rec))
    else:
        items = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
        first = items[0].text if items else ""
        if first.startswith("{") and first.endswith("}"):
            raise ConfigError(field_name, f"{p}:1: a JSON object in a .txt file; name a GenEval file .jsonl")
    if not items:
        raise ConfigError(field_name, f"{p} holds no prompts")
    return items


def _geneval_problem(rec: dict) -> str:
    """What is wrong with a JSON line's ``include`` / ``exclude`` entries (empty: nothing): each a list of
    objects with a non-empty string ``class``, a whole ``count`` >= 1 (include; optional in exclude, >= 0)
    and, where given, a string ``color``."""
    for key, least in (("include", 1), ("exclude", 0)):
        entries = rec.get(key, [])
        if not isinstance(entries, list):
            return f"'{key}' must be a list of objects with a 'class'"
        for x in entries:
            if not isinstance(x, dict) or not isinstance(x.get("class"), str) or not x["class"].strip():
                return f"'{key}' must be a list of objects with a 'class'"
            if key == "include" and "count" not in x:
                return f"'include' entry {x['class']!r} needs a 'count' (how many to draw)"
            count = x.get("count", least)
            if isinstance(count, bool) or not isinstance(count, int) or count < least:
                return f"'{key}' count {count!r} of {x['class']!r} must be a whole number >= {least}"
            if "color" in x and not isinstance(x["color"], str):
                return f"'{key}' color {x['color']!r} of {x['class']!r} must be a string"
    return ""


@dataclass(frozen=True)
class PromptSet:
    """A named source of prompts (``data.train_prompts``, ``eval.prompts``, ``--prompts``), registered in
    :data:`PROMPT_SETS` by a plugin. Each part is optional:

    * ``draw(rng)``: one prompt of a distribution (training prompts drawn afresh every iteration);
    * ``fixed()``: a fixed list (training walks it in per-epoch shuffles; the analysis commands take its
      first prompts);
    * ``evaluation(limit)``: the prompts an evaluation scores (``limit``: how many, 0: the set's default;
      the set chooses which).
    """

    description: str
    draw: Callable[[random.Random], Prompt] | None = None
    fixed: Callable[[], list[Prompt]] | None = None
    evaluation: Callable[[int], list[Prompt]] | None = None


PROMPT_SETS: Registry[PromptSet] = Registry("prompt set", "data.train_prompts")
"""Prompt sets by name; any other value of a prompts field is a ``.txt`` / ``.jsonl`` file."""


def is_prompt_set(spec: str) -> bool:
    """Whether ``spec`` names a registered prompt set (else it is a prompt file's path)."""
    return spec in PROMPT_SETS


def evaluation_prompts(spec: str, limit: int = 0, field_name: str = "eval.prompts") -> list[Prompt]:
    """The evaluation prompts of ``spec``: a prompt set's (``limit`` applied its own way) or a prompt file's
    (its first ``limit``; 0: all)."""
    if is_prompt_set(spec):
        ps = PROMPT_SETS.get(spec, field_name)
        if ps.evaluation is None:
            raise ConfigError(
                field_name, f"{spec!r} has no evaluation prompts ({ps.description}); {_others()}"
            )
        return ps.evaluation(limit)
    items = read_prompt_file(spec, field_name)
    return items[:limit] if limit else items


def fixed_prompts(spec: str, limit: int = 0, field_name: str = "--prompts") -> list[Prompt]:
    """A fixed list of prompts: a prompt set's (its fixed list, else its evaluation prompts) or a prompt
    file's, the first ``limit`` (0: all)."""
    if is_prompt_set(spec):
        ps = PROMPT_SETS.get(spec, field_name)
        if ps.fixed is not None:
            items = ps.fixed()
        elif ps.evaluation is not None:
            items = ps.evaluation(0)
        else:
            raise ConfigError(field_name, f"{spec!r} is a distribution ({ps.description}); {_others()}")
    else:
        items = read_prompt_file(spec, field_name)
    return items[:limit] if limit else list(items)


def _others() -> str:
    sets = ", ".join(PROMPT_SETS.names()) or "none registered"
    return f"use a prompt file (.txt / .jsonl) or another prompt set ({sets})"


class PromptSource:
    """The prompts of each training iteration: a registered prompt set (its distribution, or its fixed list)
    or a prompt file.

    Which prompts an iteration uses depends only on ``(seed, iteration)``, so every process agrees on them
    and a resumed run continues with exactly the prompts it would have seen. A fixed list is walked in a
    per-epoch shuffle, so every prompt is used once per epoch."""

    def __init__(self, spec: str, seed: int, field_name: str = "data.train_prompts"):
        self.spec, self.seed = spec, seed
        self.items: list[Prompt] | None = None
        self.draw: Callable[[random.Random], Prompt] | None = None
        if is_prompt_set(spec):
            ps = PROMPT_SETS.get(spec, field_name)
            self.draw = ps.draw
            if ps.draw is None:
                if ps.fixed is None:
                    raise ConfigError(field_name, f"{spec!r} has no training prompts ({ps.description})")
                self.items = ps.fixed()
        else:
            self.items = read_prompt_file(spec, field_name)

    def for_iteration(self, iteration: int, n: int) -> list[Prompt]:
        rng = random.Random(self.seed * 1_000_003 + iteration)
        if self.items is None:
            assert self.draw is not None
            return [self.draw(rng) for _ in range(n)]
        out = []
        per_epoch = len(self.items)
        for k in range(iteration * n, iteration * n + n):
            epoch, pos = divmod(k, per_epoch)
            order = list(range(per_epoch))
            random.Random(self.seed * 7919 + epoch).shuffle(order)
            out.append(self.items[order[pos]])
        return out

    def all(self, limit: int = 0) -> list[Prompt]:
        if self.items is None:
            raise ConfigError("eval.prompts", f"{self.spec!r} is a distribution; {_others()}")
        return self.items[:limit] if limit else list(self.items)
