"""Evaluation during training, behind one interface: what the trainer calls before training, every
``eval.every`` iterations and at the end, whatever the model.

* :class:`MetricsEvaluator`: any model, ``solace eval``'s registry metrics (CLIPScore, PickScore, OCR,
  GenEval, ...: ``eval.metrics``) on the held-out prompts ``eval.prompts``. The LoRA-off base is
  evaluated once (and cached in ``eval.base_cache`` when set); every evaluation samples the same
  prompts from the same initial noise, so the curves are paired, and equal ``solace eval`` on those prompts,
  that noise and the exported LoRA.
* the evaluators that plugins register in :data:`EVALUATORS` (an :class:`EvaluatorPlugin` each: an embedded
  world's exact evaluator), asked by ``eval.evaluator=auto`` whether they can score a run.

:func:`make_evaluator` picks one from what the run asks for (an :class:`EvalSetup`, which the trainer builds
from its config; ``eval.evaluator``, :func:`evaluator_kind`). An evaluation is a JSON record
(``evals.json``, checkpoints); the evaluator also turns its records into tensorboard scalars, a progress
line, the command's closing line and the report's table and curve.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from solace.errors import ConfigError
from solace.evaluation.cache import BaseEvalCache
from solace.evaluation.metrics_eval import (
    PAPER_NAMES,
    build_metrics,
    check_suite_metadata,
    format_number,
    format_table,
    generate_and_score,
    summarize_scores,
    write_grid,
)
from solace.evaluation.sharding import Shards
from solace.evaluation.suites import PromptSuite
from solace.models.base import adapters_disabled
from solace.prompts import Prompt, evaluation_prompts, is_prompt_set
from solace.registry import Registry

EVAL_SEED_OFFSET = 999
"""Evaluations draw their initial noise from ``train.seed + 999``."""

GENERIC_EVALUATORS = ("auto", "metrics", "none")
"""``eval.evaluator`` values that are not plugins: choose, registry metrics, no evaluation."""


class Evaluator(ABC):
    """One way of evaluating the model being trained. ``evaluate`` runs on every process of a run at the same
    points: each samples its block of the evaluation and all return the same record
    (:mod:`solace.evaluation.sharding`); the main process writes its files."""

    kind: str = ""
    progress: bool = False  # a progress bar while sampling (the process that writes shows it)

    @abstractmethod
    def evaluate(self, iteration: int) -> dict[str, Any]:
        """Evaluate the model as it is now: a JSON-able record with at least ``iteration``."""

    @abstractmethod
    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        """Tensorboard / tracker scalars of one record."""

    @abstractmethod
    def progress_line(self, record: dict[str, Any]) -> str:
        """One line for the progress bar after a periodic evaluation."""

    @abstractmethod
    def summary(self, evals: list[dict[str, Any]]) -> str:
        """The closing line of ``solace train``: the first evaluation against the last."""

    @abstractmethod
    def report_lines(self, evals: list[dict[str, Any]]) -> list[str]:
        """The report's Markdown section (a table, and for the metrics an image grid)."""

    @abstractmethod
    def plot(self, ax: Any, evals: list[dict[str, Any]]) -> None:
        """Draw the evaluations on the report's evaluation panel (a matplotlib axis)."""


@dataclass(frozen=True)
class EvalSetup:
    """What a run's evaluation depends on, as the trainer's config gives it (evaluation reads no config).

    ``model``: the model's name, ``family`` its family, ``weights`` the file whose content identifies the
    base ('' for a folder or hub id: ``model_settings`` then carries its fingerprint); ``prompts`` /
    ``limit``: ``eval.prompts`` / ``eval.prompts_limit``; ``evaluator``: ``eval.evaluator``;
    ``seed``: the run's seed (evaluations draw from ``seed + EVAL_SEED_OFFSET``); ``cfg_scale``: the
    evaluation CFG; ``model_settings``: the model's settings the base's evaluation depends on (part of the
    cache key)."""

    model: str
    family: str
    prompts: str
    evaluator: str = "auto"
    weights: str = ""
    limit: int = 0
    metrics: tuple[str, ...] = ()
    metric_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    samples: int = 16
    steps: int = 40
    cfg_scale: float = 7.0
    seed: int = 0
    negative_prompt: str = ""
    batch_size: int = 8
    grid_prompts: int = 8
    cache_path: str = ""
    starts_at_base: bool = True
    model_settings: dict[str, Any] = field(default_factory=dict)
    size: tuple[int, int] = (0, 0)
    key_settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Judge:
    """An exact judge of generated images on known prompts (``solace rerank`` / ``analyze rationale``):
    the prompts' metadata (their minimal edits use it), their category ``tags`` and ``correct(images, i)``,
    the strict correctness (N,) bool of images (N, 3, H, W) in [0, 1] of prompt ``i``."""

    metas: Sequence[dict]
    tags: Sequence[str]
    correct: Callable[[torch.Tensor, int], np.ndarray]


class EvaluatorPlugin(ABC):
    """An evaluator a plugin registers in :data:`EVALUATORS` under the name ``eval.evaluator`` gives it."""

    description: str = ""

    @abstractmethod
    def problem(self, setup: EvalSetup) -> ConfigError | None:
        """Why it cannot evaluate ``setup`` (a ConfigError naming the field and the fix), None if it can."""

    @abstractmethod
    def build(self, setup: EvalSetup, adapter: Any, cache: BaseEvalCache | None, shards: Shards) -> Evaluator:
        """The evaluator of ``setup`` (``cache``: the base evaluations' cache, or None)."""

    def judge(self, prompts: Sequence[Prompt], family: str) -> Judge | None:
        """A :class:`Judge` of ``prompts`` for a model of ``family``, or None where it cannot judge them."""
        return None

    suite_samples: int = 0
    """Samples per prompt of its own suite (``solace eval --suite NAME``); 0: it has no suite of its own."""

    def run_suite(self, adapter: Any, out_dir: Path, label: str, **settings: Any) -> tuple[dict, str]:
        """``solace eval --suite NAME``: evaluate ``adapter`` on the plugin's own prompts (``settings``:
        ``samples``, ``steps``, ``cfg_scale``, ``seed``, ``limit``, ``negative_prompt``), writing its files
        into ``out_dir``; returns (summary, table)."""
        raise ConfigError("--suite", f"{self.description} has no suite of its own")


EVALUATORS: Registry[EvaluatorPlugin] = Registry("evaluator", "eval.evaluator")
"""Evaluators by name (``eval.evaluator``), registered by plugins; ``auto`` asks each in name order."""


def find_judge(prompts: Sequence[Prompt], family: str) -> Judge | None:
    """The first registered evaluator's judge of ``prompts`` on a model of ``family`` (None: none can)."""
    for _name, plugin in EVALUATORS.items():
        judge = plugin.judge(prompts, family)
        if judge is not None:
            return judge
    return None


# ------------------------------------------------------------------------------------------------ choosing


def evaluator_kind(setup: EvalSetup) -> str:
    """The evaluator of ``setup``: ``eval.evaluator`` (a registered one must be able to score, else a
    :class:`ConfigError`), or with ``auto`` the metrics when ``eval.metrics`` names any, else the first
    registered evaluator that can score ``eval.prompts`` on this model, else ``none``."""
    e = setup.evaluator
    if e in ("metrics", "none"):
        return e
    if e == "auto":
        if setup.metrics:
            return "metrics"
        return next((n for n, p in EVALUATORS.items() if p.problem(setup) is None), "none")
    if e not in EVALUATORS:
        known = ", ".join([*GENERIC_EVALUATORS, *EVALUATORS.names()])
        raise ConfigError("eval.evaluator", f"no evaluator named {e!r}; use one of {known}")
    err = EVALUATORS.get(e).problem(setup)
    if err is not None:
        raise err
    return e


def make_evaluator(
    setup: EvalSetup,
    adapter: Any,
    out_dir: str | Path,
    writes: bool = True,
    shards: Shards | None = None,
) -> Evaluator | None:
    """The evaluator ``setup`` asks for (:func:`evaluator_kind`), or None. Metric models load here, before
    training, on every process. ``shards``: this process's part in each evaluation (None: one process).
    ``writes=False``: the same evaluations, but no file written (no grid, no base-evaluation cache): the
    processes other than the main one (which also show no progress bar)."""
    ev = _make_evaluator(setup, adapter, out_dir, writes, shards or Shards())
    if ev is not None:
        ev.progress = writes
    return ev


def _make_evaluator(
    s: EvalSetup, adapter: Any, out_dir: str | Path, writes: bool, shards: Shards
) -> Evaluator | None:
    kind = evaluator_kind(s)
    if kind == "none":
        return None
    if kind != "metrics":
        cache = BaseEvalCache(s.cache_path, base_eval_key(s), writes) if s.cache_path else None
        return EVALUATORS.get(kind).build(s, adapter, cache, shards)
    suite = eval_suite(s.prompts, s.limit)
    check_suite_metadata(suite, s.metrics, "eval.prompts")
    metrics = build_metrics(list(s.metrics), {m: dict(s.metric_args.get(m, {})) for m in s.metrics})
    key = {**base_eval_key(s), **metrics_key_extra(s)}
    cache = BaseEvalCache(s.cache_path, key, writes) if s.cache_path else None
    return MetricsEvaluator(
        adapter, suite, metrics, batch_size=s.batch_size, out_dir=Path(out_dir), writes=writes,
        grid_prompts=s.grid_prompts, cache=cache, shards=shards, starts_at_base=s.starts_at_base,
        **common_settings(s),
    )  # fmt: skip


def common_settings(s: EvalSetup) -> dict[str, Any]:
    """The sampling settings every evaluator of ``s`` takes: samples, steps, CFG, seed, negative prompt."""
    return dict(
        samples=s.samples,
        steps=s.steps,
        cfg_scale=s.cfg_scale,
        seed=s.seed + EVAL_SEED_OFFSET,
        negative_prompt=s.negative_prompt,
    )


def eval_suite(spec: str, limit: int = 0) -> PromptSuite:
    """``eval.prompts`` as a :class:`~solace.evaluation.suites.PromptSuite`: a prompt file (its first
    ``limit`` prompts, as ``solace eval --limit``), or a registered prompt set's evaluation prompts with
    their metadata."""
    items = evaluation_prompts(spec, limit, "eval.prompts")
    return PromptSuite(spec if is_prompt_set(spec) else Path(spec).stem, spec, tuple(items))


def base_eval_key(s: EvalSetup) -> dict[str, Any]:
    """Everything the evaluation before training depends on (the key of ``eval.base_cache``)."""
    weights = Path(s.weights) if s.weights else None
    return {
        "model": s.model,
        # the weights themselves, so a changed base (new shipped weights) is evaluated anew
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()
        if weights is not None and weights.is_file()
        else "",
        **s.key_settings,
        "eval_prompts": s.prompts,
        "limit": s.limit,
        "samples": s.samples,
        "steps": s.steps,
        "cfg": s.cfg_scale,
        "seed": s.seed,
        # only when set, so that the caches of runs before these settings existed stay valid
        **({"negative_prompt": s.negative_prompt} if s.negative_prompt else {}),
        **({"size": list(s.size)} if any(s.size) else {}),
    }


def metrics_key_extra(s: EvalSetup) -> dict[str, Any]:
    """What a metric evaluation of the base depends on beyond :func:`base_eval_key`: the metrics, their
    arguments, the batching, the diffusers model's settings and a fingerprint of its weight files."""
    return {
        "evaluator": "metrics",
        "metrics": list(s.metrics),
        "metric_args": {k: dict(v) for k, v in s.metric_args.items()},
        "batch_size": s.batch_size,
        **s.model_settings,
        "weights_files": weights_fingerprint(s.model),
    }


def weights_fingerprint(model: str) -> str:
    """A cheap fingerprint of a local diffusers folder's weight files (relative path, size, modification
    time); "" for a hub id. Hashing gigabytes of weights at every start would cost more than the cache
    saves."""
    root = Path(model)
    if not root.is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(root.rglob("*")):
        if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------ metrics


def metric_delta(record: dict[str, Any], metric: str) -> float:
    """The trained model's mean minus the base's on the same prompts and noise (NaN where either is n/a)."""
    a, b = record["metrics"].get(metric), record["base"].get(metric)
    return float("nan") if a is None or b is None else a - b


class MetricsEvaluator(Evaluator):
    """Registry metrics on a held-out prompt suite: the LoRA-off base once, then the model as it is now, each
    prompt ``samples`` times from the same initial noise (seed ``(seed, prompt, sample)``), ODE sampling,
    8-bit images, exactly as :func:`solace.evaluation.metrics_eval.run_metric_eval` (``solace eval``).

    ``starts_at_base``: the LoRA starts as the identity (no ``model.lora.init_from`` kept apart from the
    base), so the model before training *is* the base and its evaluation is not sampled twice.

    ``shards``: each process samples and scores its block of the prompts x samples, all get every score
    (the cached base's too: the main process reads the cache); ``writes``: this process writes the grid
    (``out_dir``) and the cache.
    """

    kind = "metrics"

    def __init__(
        self,
        adapter: Any,
        suite: PromptSuite,
        metrics: dict[str, Callable[..., torch.Tensor]],
        *,
        samples: int,
        steps: int,
        cfg_scale: float,
        seed: int,
        batch_size: int = 8,
        out_dir: Path | None = None,
        grid_prompts: int = 8,
        cache: BaseEvalCache | None = None,
        starts_at_base: bool = True,
        negative_prompt: str = "",
        shards: Shards | None = None,
        writes: bool = True,
    ):
        self.adapter, self.suite, self.metrics = adapter, suite, metrics
        self.negative_prompt = negative_prompt
        self.samples, self.steps, self.cfg_scale, self.seed = samples, steps, cfg_scale, seed
        self.batch_size, self.out_dir, self.grid_prompts = batch_size, out_dir, grid_prompts
        self.cache, self.starts_at_base = cache, starts_at_base
        self.shards, self.writes = shards or Shards(), writes
        self._base: dict[str, Any] | None = None
        self.base_passes = 0  # how often the base was sampled (once a run, none on a cache hit)
        self.settings = {
            "prompts": suite.path,
            "num_prompts": len(suite),
            "samples_per_prompt": samples,
            "num_steps": steps,
            "cfg_scale": cfg_scale,
            "seed": seed,
            "batch_size": batch_size,
            **({"negative_prompt": negative_prompt} if negative_prompt else {}),
        }

    def _pass(self, label: str) -> dict[str, Any]:
        """Sample and score the suite with the model as it is now."""
        res = generate_and_score(
            self.adapter, self.suite, self.metrics, label, None, samples_per_prompt=self.samples,
            num_steps=self.steps, cfg_scale=self.cfg_scale, seed=self.seed, batch_size=self.batch_size,
            grid_rows=self.grid_prompts, grid_samples=min(2, self.samples), progress=self.progress,
            negative_prompt=self.negative_prompt, shards=self.shards,
        )  # fmt: skip
        summary, per_prompt = summarize_scores(res["scores"])
        stats = {"pixel_std": float(res["pixel_std"].mean())}
        return {"summary": summary, "per_prompt": per_prompt, "image_stats": stats, "thumbs": res["thumbs"]}

    def base(self) -> dict[str, Any]:
        """The LoRA-off base's evaluation: sampled once (or read from the cache) and kept."""
        if self._base is None:
            sh = self.shards
            res = sh.from_main(self.cache.get() if sh.is_main else None) if self.cache else None
            if res is None:
                with adapters_disabled(self.adapter.denoiser):
                    res = self._pass("base")
                self.base_passes += 1
                if self.cache:
                    self.cache.put({k: v for k, v in res.items() if k != "thumbs"})
            self._base = res
        return self._base

    @torch.no_grad()
    def evaluate(self, iteration: int) -> dict[str, Any]:
        base = self.base()
        now = base if iteration == 0 and self.starts_at_base else self._pass("current")
        record = {
            "iteration": iteration,
            "evaluator": self.kind,
            "metrics": now["summary"],
            "base": base["summary"],
            "images": now["image_stats"],
            "per_prompt": now["per_prompt"],
            "settings": self.settings,
        }
        grid = self._grid(iteration, base, now)
        if grid:
            record["grid"] = grid
        return record

    def _grid(self, iteration: int, base: dict[str, Any], now: dict[str, Any]) -> str | None:
        """``eval_images/iter_<n>.png``: the first ``grid_prompts`` prompts, base | now (the base's column
        is missing when it came from the cache); the path relative to the output folder (written by the
        process that ``writes``)."""
        if self.out_dir is None or not now.get("thumbs"):
            return None
        cols = {"base": base["thumbs"]} if base.get("thumbs") else {}
        cols[f"iteration {iteration}"] = now["thumbs"]
        rel = f"eval_images/iter_{iteration:06d}.png"
        if self.writes:
            write_grid(self.out_dir / rel, self.suite, cols)
        return rel

    def scalars(self, record: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for m, v in record["metrics"].items():
            out[f"eval/{m}"] = v if v is not None else math.nan
            b = record["base"].get(m)
            out[f"eval_base/{m}"] = b if b is not None else math.nan
        out.update({f"eval/{k}": v for k, v in record.get("images", {}).items()})
        return out

    def progress_line(self, record: dict[str, Any]) -> str:
        parts = [
            f"{PAPER_NAMES.get(m, m)} {format_number(v)} (base {format_number(record['base'].get(m))})"
            for m, v in record["metrics"].items()
        ]
        return f"held-out {', '.join(parts)}"

    def summary(self, evals: list[dict[str, Any]]) -> str:
        recs = [e for e in evals if e.get("evaluator") == self.kind]
        if not recs:
            return ""
        last = recs[-1]
        parts = [
            f"{PAPER_NAMES.get(m, m)} {format_number(last['base'].get(m))} -> {format_number(v)}"
            for m, v in last["metrics"].items()
        ]
        return f"{self.suite.path} (base -> iteration {last['iteration']}): {'; '.join(parts)}"

    def report_lines(self, evals: list[dict[str, Any]]) -> list[str]:
        recs = [e for e in evals if e.get("evaluator") == self.kind]
        if not recs:
            return []
        s = self.settings
        rows = {"base": recs[0]["base"], **{f"iteration {e['iteration']}": e["metrics"] for e in recs}}
        lines = [
            "## Held-out metrics (registry metrics, the same prompts and noise every evaluation)",
            "",
            f"`{s['prompts']}`: {s['num_prompts']} prompts x {s['samples_per_prompt']} sample(s), "
            f"{s['num_steps']} steps, CFG {s['cfg_scale']}, seed {s['seed']}; mean over prompts. The base is "
            "the model with the LoRA off.",
            "",
            format_table(rows, list(recs[-1]["metrics"])),
            "",
        ]
        if recs[-1].get("grid"):
            lines += [f"Last evaluation, base | trained: ![eval grid]({recs[-1]['grid']})", ""]
        return lines

    def plot(self, ax: Any, evals: list[dict[str, Any]]) -> None:
        recs = [e for e in evals if e.get("evaluator") == self.kind]
        if recs:
            its = [e["iteration"] for e in recs]
            for m in recs[-1]["metrics"]:
                ax.plot(its, [metric_delta(e, m) for e in recs], "o-", label=PAPER_NAMES.get(m, m))
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.legend()
        ax.set_title("held-out metrics minus base")
        ax.set_xlabel("iteration")
