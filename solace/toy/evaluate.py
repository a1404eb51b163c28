"""The toy world's evaluation with its exact evaluator: held-out accuracy (``solace eval --suite toy`` and
the :class:`ToyEvaluator` during training), the statistics of a training batch (strict correctness,
foreground, objects), the records an evaluation scores, and the judge of ``solace rerank`` / ``analyze``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solace.errors import ConfigError
from solace.evaluation.cache import BaseEvalCache
from solace.evaluation.evaluators import EvalSetup, Evaluator, EvaluatorPlugin, Judge, common_settings
from solace.evaluation.sharding import Shards
from solace.models.base import FlowModelAdapter
from solace.prompts import Prompt, is_prompt_set, read_prompt_file
from solace.sampling.generate import generate_jobs
from solace.toy.evaluator import detect, format_table, score_detections, segment, summarize, to_uint8
from solace.toy.world import CATEGORIES, PromptRecord, balanced_subset, load_heldout, train_eval_prompts
from solace.utils.images import save_grid


def foreground(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(foreground fraction, number of detected objects) per image: what a collapse toward blank images
    flattens."""
    arr = to_uint8(images)
    fg = torch.tensor([float((segment(a) >= 0).mean()) for a in arr])
    n = torch.tensor([float(len(detect(a))) for a in arr])
    return fg, n


def batch_statistics(images: torch.Tensor, metas: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Per-image statistics of a training batch: foreground and objects, and strict correctness under the
    exact evaluator when every prompt carries GenEval metadata."""
    fg, nobj = foreground(images)
    out = {"monitor/foreground": fg, "monitor/objects": nobj}
    if any("include" in m for m in metas):
        out["train/strict_acc"] = torch.tensor(
            [
                float(score_detections(detect(a), PromptRecord.from_json(m))["strict"])
                for a, m in zip(to_uint8(images), metas, strict=True)
            ]
        )
    return out


def set_records(spec: str, limit: int = 0) -> list[PromptRecord] | None:
    """The records of the toy world's own evaluation sets: the held-out set (``toy_heldout``, ``limit`` of
    them taken round-robin over categories) or fresh prompts of the training distribution
    (``toy_train_eval``, ``limit`` of them, 64 by default); None for any other name."""
    if spec == "toy_heldout":
        return balanced_subset(load_heldout(), limit)
    if spec == "toy_train_eval":
        return train_eval_prompts(limit or 64)
    return None


def eval_records(spec: str, limit: int = 0) -> list[PromptRecord] | None:
    """The records the exact evaluator scores for ``eval.prompts``: the toy world's own sets
    (:func:`set_records`), or a ``.jsonl`` file whose every line carries GenEval metadata (``include``);
    None where there is nothing to score exactly (another prompt set, a file without that metadata)."""
    recs = set_records(spec, limit)
    if recs is not None or is_prompt_set(spec):
        return recs
    items = read_prompt_file(spec, "eval.prompts")
    if not all("include" in p.meta for p in items):
        return None
    recs = [PromptRecord.from_json(p.meta) for p in items]
    return balanced_subset(recs, limit) if limit else recs


def default_image_prompts() -> list[str]:
    """One held-out prompt per category: the rows of a training run's image grids."""
    held = load_heldout()
    return [next(r.prompt for r in held if r.tag == c) for c in CATEGORIES]


def evaluate_records(
    adapter: FlowModelAdapter,
    records: Sequence[PromptRecord],
    samples_per_prompt: int = 16,
    num_steps: int = 40,
    cfg_scale: float = 7.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    keep_images: bool = False,
    negative_prompt: str = "",
    shards: Shards | None = None,
) -> dict:
    """Generate ``samples_per_prompt`` images per record and score them. Returns ``summary`` (per-category
    and overall strict/lenient accuracy), ``per_prompt`` rows, and optionally the ``images``. With
    ``shards`` every process samples and scores its block of the samples and all receive every sample's
    scores (:mod:`solace.evaluation.sharding`); the result is the same on every process."""
    shards = shards or Shards()
    S = samples_per_prompt
    prompts = [r.prompt for r in records]
    jobs = [(i, j) for i in range(len(records)) for j in range(S)]
    mine, real = shards.share(len(jobs), "eval")
    pairs: list[tuple[int, dict]] = []
    if mine:
        images = generate_jobs(
            adapter, prompts, [jobs[k] for k in mine], num_steps, cfg_scale, seed, batch_size,
            progress=progress, negative_prompt=negative_prompt,
        )[:real]  # fmt: skip
        rows = sample_rows(images, [records[jobs[k][0]] for k in mine[:real]])
        if keep_images:
            for row, im in zip(rows, images, strict=True):
                row["image"] = im
        pairs = list(zip(mine[:real], rows, strict=True))
    rows = shards.gather(pairs, len(jobs))
    out = summarize_rows(records, S, rows)
    if keep_images:
        out["images"] = torch.stack([row["image"] for row in rows])
    return out


def sample_rows(images: torch.Tensor, records: Sequence[PromptRecord]) -> list[dict]:
    """Per image (one record each): the exact evaluator's ``score``, and what a collapse toward blank,
    textureless images flattens: ``foreground`` fraction, detected ``objects``, ``pixel_std``."""
    arr = to_uint8(images)
    std = images.float().flatten(1).std(-1)
    rows = []
    for a, r, sd in zip(arr, records, std, strict=True):
        dets = detect(a)
        fg = float((segment(a) >= 0).mean())
        rows.append(
            {
                "score": score_detections(dets, r),
                "foreground": fg,
                "objects": len(dets),
                "pixel_std": float(sd),
            }
        )
    return rows


def summarize_rows(records: Sequence[PromptRecord], samples_per_prompt: int, rows: Sequence[dict]) -> dict:
    """:func:`sample_rows` of every sample (prompt-major) -> ``summary`` (per-category and overall accuracy,
    the image statistics on the same prompts and noise every time), ``per_prompt`` and ``scores``."""
    S = samples_per_prompt
    scores = [row["score"] for row in rows]
    per_prompt = []
    for i, r in enumerate(records):
        sc = scores[i * S : (i + 1) * S]
        per_prompt.append(
            {
                "prompt": r.prompt,
                "tag": r.tag,
                "strict": sum(x["strict"] for x in sc) / len(sc),
                "lenient": sum(x["lenient"] for x in sc) / len(sc),
            }
        )
    summary = summarize([r for r in records for _ in range(S)], scores)
    summary["images"] = {
        "foreground": float(np.mean([row["foreground"] for row in rows])),
        "objects": float(np.mean([row["objects"] for row in rows])),
        "pixel_std": float(torch.tensor([row["pixel_std"] for row in rows], dtype=torch.float32).mean()),
    }
    return {"summary": summary, "per_prompt": per_prompt, "scores": scores}


def run_toy_eval(
    adapter: FlowModelAdapter,
    out_dir: str,
    samples_per_prompt: int = 16,
    num_steps: int = 40,
    cfg_scale: float = 7.0,
    seed: int = 0,
    records: Sequence[PromptRecord] | None = None,
    batch_size: int = 64,
    label: str = "model",
    progress: bool = True,
    negative_prompt: str = "",
) -> dict:
    """Evaluate on the shipped held-out set; writes ``toy_eval.json``, ``toy_eval.md`` and a grid PNG
    (the first four samples of every prompt) into ``out_dir``. Returns the result dict."""
    recs = list(records) if records is not None else list(load_heldout())
    res = evaluate_records(
        adapter,
        recs,
        samples_per_prompt,
        num_steps,
        cfg_scale,
        seed,
        batch_size,
        progress=progress,
        keep_images=True,
        negative_prompt=negative_prompt,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "samples_per_prompt": samples_per_prompt,
        "num_steps": num_steps,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "num_prompts": len(recs),
        "model": label,
        **({"negative_prompt": negative_prompt} if negative_prompt else {}),
    }
    doc = {"settings": settings, "summary": res["summary"], "per_prompt": res["per_prompt"]}
    (out / "toy_eval.json").write_text(json.dumps(doc, indent=2))
    table = format_table(
        res["summary"],
        f"{label}: held-out toy world, {num_steps} steps, CFG {cfg_scale}, "
        f"{samples_per_prompt} samples x {len(recs)} prompts",
    )
    (out / "toy_eval.md").write_text(table + "\n")
    k = min(4, samples_per_prompt)
    imgs = res["images"].reshape(len(recs), samples_per_prompt, *res["images"].shape[1:])[:, :k]
    save_grid(
        out / "toy_eval_grid.png",
        list(imgs.reshape(-1, *imgs.shape[2:])),
        k,
        row_labels=[r.prompt.removeprefix("a photo of ") for r in recs],
        scale=3,
    )
    res["table"] = table
    return res


class ToyEvaluator(Evaluator):
    """The toy world's exact evaluator during training: held-out strict and lenient accuracy (overall and
    per category) and the images' collapse statistics, ``samples`` images per record from fixed noise, each
    process sampling its block (``shards``). The evaluation before training is read from / written to
    ``cache`` when one is given (the main process reads it and tells the others)."""

    kind = "toy"

    def __init__(
        self,
        adapter: FlowModelAdapter,
        records: Sequence[PromptRecord],
        label: str,
        *,
        samples: int,
        steps: int,
        cfg_scale: float,
        seed: int,
        cache: BaseEvalCache | None = None,
        negative_prompt: str = "",
        shards: Shards | None = None,
    ):
        self.adapter, self.records, self.label = adapter, list(records), label
        self.negative_prompt = negative_prompt
        self.samples, self.steps, self.cfg_scale, self.seed = samples, steps, cfg_scale, seed
        self.cache = cache
        self.shards = shards or Shards()

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict[str, Any]:
        cache = self.cache if iteration == 0 else None
        res = self.shards.from_main(cache.get() if self.shards.is_main else None) if cache else None
        if res is None:
            res = evaluate_records(
                self.adapter, self.records, self.samples, self.steps, self.cfg_scale, seed=self.seed,
                progress=self.progress, negative_prompt=self.negative_prompt, shards=self.shards,
            )  # fmt: skip
            if cache:
                cache.put(res)
        summ = res["summary"]
        return {
            "iteration": iteration,
            "strict": summ["overall"]["strict"],
            "lenient": summ["overall"]["lenient"],
            "categories": summ["categories"],
            "images": summ.get("images", {}),  # a cached evaluation from an older version lacks them
        }

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        return {
            "eval/strict": record["strict"],
            "eval/lenient": record["lenient"],
            **{f"eval/{k}": v for k, v in record["images"].items()},
            **{f"eval/{c}_strict": v["strict"] for c, v in record["categories"].items()},
        }

    def progress_line(self, record: dict[str, Any]) -> str:
        return f"held-out strict {record['strict']:.3f} lenient {record['lenient']:.3f}"

    def summary(self, evals: list[dict[str, Any]]) -> str:
        recs = [e for e in evals if "strict" in e]
        if not recs:
            return ""
        first, last = recs[0], recs[-1]
        return (
            f"{self.label} strict accuracy: {first['strict']:.3f} (base) -> {last['strict']:.3f} (trained); "
            f"lenient {first['lenient']:.3f} -> {last['lenient']:.3f}"
        )

    @property
    def title(self) -> str:
        """What the evaluation set is: the held-out compositions, or fresh prompts of the training
        distribution (``toy_train_eval``), or a prompt file."""
        names = {"toy_heldout": "Held-out accuracy", "toy_train_eval": "Training-distribution accuracy"}
        return names.get(self.label, f"Accuracy on {self.label}")

    def report_lines(self, evals: list[dict[str, Any]]) -> list[str]:
        recs = [e for e in evals if "strict" in e]
        if not recs:
            return []
        first, last = recs[0], recs[-1]
        lines = [
            f"## {self.title} (toy world, exact evaluator)",
            "",
            f"| | iteration {first['iteration']} (base) | iteration {last['iteration']} (trained) |",
            "|---|---|---|",
            f"| overall strict | {first['strict']:.3f} | {last['strict']:.3f} |",
            f"| overall lenient | {first['lenient']:.3f} | {last['lenient']:.3f} |",
        ]
        for c in last["categories"]:
            a = first["categories"].get(c, {}).get("strict", float("nan"))
            lines.append(f"| {c} strict | {a:.3f} | {last['categories'][c]['strict']:.3f} |")
        return [*lines, ""]

    def plot(self, ax: Any, evals: list[dict[str, Any]]) -> None:
        recs = [e for e in evals if "strict" in e]
        if recs:
            ax.plot([e["iteration"] for e in recs], [e["strict"] for e in recs], "o-", label="strict")
            ax.plot([e["iteration"] for e in recs], [e["lenient"] for e in recs], "s-", label="lenient")
            ax.legend()
        ax.set_title("held-out accuracy")
        ax.set_xlabel("iteration")


FAMILY = "toy"
"""The model family the exact evaluator judges (the toy world's own model)."""


def judge_images(images: torch.Tensor, record: PromptRecord) -> np.ndarray:
    """Strict correctness (N,) bool of images (N, 3, H, W) in [0, 1] under the exact evaluator."""
    return np.array([score_detections(detect(a), record)["strict"] for a in to_uint8(images)], dtype=bool)


class ToyEvaluatorPlugin(EvaluatorPlugin):
    """``eval.evaluator=toy``: the exact evaluator, for the toy model on prompts with the toy world's GenEval
    metadata (``toy_heldout``, ``toy_train_eval`` or a GenEval ``.jsonl`` file)."""

    description = "the toy world's exact evaluator (strict and lenient accuracy)"

    def problem(self, setup: EvalSetup) -> ConfigError | None:
        if setup.family != FAMILY:
            return ConfigError(
                "eval.evaluator",
                f"toy: the exact evaluator scores the toy world only, not {setup.model!r}; use "
                "eval.metrics=[clip_score,pickscore] (eval.evaluator=auto or metrics)",
            )
        if eval_records(setup.prompts, setup.limit) is None:
            return ConfigError(
                "eval.prompts",
                f"eval.evaluator=toy needs GenEval metadata ('include') on every prompt of "
                f"{setup.prompts!r}: use toy_heldout, toy_train_eval or a GenEval .jsonl file",
            )
        return None

    def build(self, setup: EvalSetup, adapter: Any, cache: BaseEvalCache | None, shards: Shards) -> Evaluator:
        recs = eval_records(setup.prompts, setup.limit) or []
        return ToyEvaluator(
            adapter, recs, setup.prompts, cache=cache, shards=shards, **common_settings(setup)
        )

    def judge(self, prompts: Sequence[Prompt], family: str) -> Judge | None:
        """On the toy model, prompts that all carry the toy world's GenEval metadata (``tag``,
        ``include``)."""
        if family != FAMILY or not prompts or not all({"tag", "include"} <= set(p.meta) for p in prompts):
            return None
        records = [PromptRecord.from_json(p.meta) for p in prompts]
        return Judge(
            metas=[p.meta for p in prompts],
            tags=[r.tag for r in records],
            correct=lambda images, i: judge_images(images, records[i]),
        )

    suite_samples = 16

    def run_suite(self, adapter: Any, out_dir: Path, label: str, **settings: Any) -> tuple[dict, str]:
        """The shipped held-out prompts (``limit``: the first N per category), :func:`run_toy_eval`."""
        limit = settings.pop("limit", 0)
        recs = list(load_heldout())
        if limit:
            recs = [r for c in CATEGORIES for r in [x for x in recs if x.tag == c][:limit]]
        s = settings
        res = run_toy_eval(
            adapter, str(out_dir), s["samples"], s["steps"], s["cfg_scale"], s["seed"], recs, label=label,
            negative_prompt=s.get("negative_prompt", ""),
        )  # fmt: skip
        return res["summary"], res["table"]
