"""Prompt sources for training and evaluation: the toy world, or prompt files in published formats.

* ``.txt``: one prompt a line (DrawBench, OCR, Pick-a-Pic as published with Flow-GRPO's datasets);
* ``.jsonl``: one JSON object a line with a ``prompt`` field; other fields (GenEval's ``tag``, ``include``,
  ``exclude``) travel along as metadata for rewards that need them.

Which prompts an iteration uses depends only on ``(seed, iteration)``, so every process agrees on them and a
resumed run continues with exactly the prompts it would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from solace.errors import ConfigError


@dataclass(frozen=True)
class Prompt:
    text: str
    meta: dict


def read_prompt_file(path: str | Path) -> list[Prompt]:
    p = Path(path)
    if not p.exists():
        raise ConfigError("prompts", f"prompt file {p} does not exist")
    out: list[Prompt] = []
    if p.suffix == ".jsonl":
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError("prompts", f"{p}:{n}: not valid JSON ({e.msg})") from None
            if "prompt" not in d:
                raise ConfigError("prompts", f"{p}:{n}: a JSON line needs a 'prompt' field")
            out.append(Prompt(d["prompt"], d))
    else:
        out = [Prompt(line.strip(), {}) for line in p.read_text().splitlines() if line.strip()]
    if not out:
        raise ConfigError("prompts", f"{p} holds no prompts")
    return out


class PromptSource:
    """Deterministic prompts per iteration from the toy world's train distribution or a fixed list."""

    def __init__(self, spec: str, seed: int):
        self.spec, self.seed = spec, seed
        self.items: list[Prompt] | None = None
        if spec == "toy_heldout":
            from solace.toy.world import load_heldout

            self.items = [Prompt(r.prompt, r.to_json()) for r in load_heldout()]
        elif spec != "toy":
            self.items = read_prompt_file(spec)

    def for_iteration(self, iteration: int, n: int) -> list[Prompt]:
        rng = random.Random(self.seed * 1_000_003 + iteration)
        if self.items is None:
            from solace.toy.world import sample_train_prompt

            recs = [sample_train_prompt(rng) for _ in range(n)]
            return [Prompt(r.prompt, r.to_json()) for r in recs]
        # Walk a per-epoch shuffle so every prompt is used once per epoch.
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
            raise ConfigError(
                "data.eval_prompts", "'toy' is the train distribution; use 'toy_heldout' or a file"
            )
        return self.items[:limit] if limit else list(self.items)
