"""Evaluation during training, behind one interface: what the trainer calls before training, every
``eval.every`` iterations and at the end, whatever the model.

* :class:`~solace.evaluation.toy_eval.ToyEvaluator`: the toy world's exact evaluator (held-out strict and
  lenient accuracy, per category, and the images' collapse statistics).
* :class:`MetricsEvaluator`: any model, ``solace eval``'s registry metrics (CLIPScore, PickScore, OCR,
  GenEval, ...: ``eval.metrics``) on the held-out prompt file ``eval.prompts``. The LoRA-off base is
  evaluated once (and cached in ``eval.base_cache`` when set); every evaluation samples the same
  prompts from the same initial noise, so the curves are paired, and equal ``solace eval`` on those prompts,
  that noise and the exported LoRA.

:func:`make_evaluator` picks one from the config (``eval.evaluator``, :func:`evaluator_kind`). An evaluation
is a JSON record (``evals.json``, checkpoints); the evaluator also turns its records into tensorboard scalars,
a progress line, the command's closing line and the report's table and curve.
"""

from __future__ import annotations

import hashlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from solace.errors import ConfigError
from solace.evaluation.sharding import Shards

if TYPE_CHECKING:  # the trainer's config; not imported at run time (the trainer imports evaluation)
    from solace.trainer.config import SolaceConfig

TOY_PROMPT_SETS = ("toy_heldout", "toy_train_eval")
"""``eval.prompts`` values that name the toy world's prompt sets rather than a file."""

EVAL_SEED_OFFSET = 999
"""Evaluations draw their initial noise from ``train.seed + 999``."""


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


# ------------------------------------------------------------------------------------------------ choosing


def evaluator_kind(cfg: SolaceConfig) -> str:
    """``toy``, ``metrics`` or ``none`` for the config: ``eval.evaluator``, or with ``auto`` the metrics when
    ``eval.metrics`` names any, else the toy world's exact evaluator where it can score ``eval.prompts``
    (a toy model and toy prompt sets or GenEval metadata), else none. A forced ``toy`` that cannot score is a
    :class:`ConfigError`."""
    from solace.models import model_family

    e = cfg.eval
    if e.evaluator in ("metrics", "none"):
        return e.evaluator
    if e.evaluator == "auto" and e.metrics:
        return "metrics"
    toy_model = model_family(cfg.model.name, cfg.model.family) == "toy"
    if e.evaluator == "toy" and not toy_model:
        raise ConfigError(
            "eval.evaluator",
            f"toy: the exact evaluator scores the toy world only, not {cfg.model.name!r}; use "
            "eval.metrics=[clip_score,pickscore] (eval.evaluator=auto or metrics)",
        )
    if not toy_model:
        return "none"
    from solace.evaluation.toy_eval import eval_records

    if eval_records(cfg.eval.prompts, cfg.eval.prompts_limit) is not None:
        return "toy"
    if e.evaluator == "toy":
        raise ConfigError(
            "eval.prompts",
            f"eval.evaluator=toy needs GenEval metadata ('include') on every prompt of "
            f"{cfg.eval.prompts!r}: use toy_heldout, toy_train_eval or a GenEval .jsonl file",
        )
    return "none"


def make_evaluator(
    cfg: SolaceConfig,
    adapter: Any,
    out_dir: str | Path,
    cfg_scale: float,
    writes: bool = True,
    shards: Shards | None = None,
) -> Evaluator | None:
    """The evaluator the config asks for (:func:`evaluator_kind`), or None; ``cfg_scale`` is the evaluation
    CFG (``eval.cfg_scale`` or the sampling scale). Metric models load here, before training, on
    every process. ``shards``: this process's part in each evaluation (None: one process).
    ``writes=False``: the same evaluations, but no file written (no grid, no base-evaluation cache): the
    processes other than the main one (which also show no progress bar)."""
    ev = _make_evaluator(cfg, adapter, out_dir, cfg_scale, writes, shards)
    if ev is not None:
        ev.progress = writes
    return ev


def _make_evaluator(
    cfg: SolaceConfig, adapter: Any, out_dir: str | Path, cfg_scale: float, writes: bool, shards: Any
) -> Evaluator | None:
    kind = evaluator_kind(cfg)
    if kind == "none":
        return None
    c = cfg
    common = dict(
        samples=c.eval.samples_per_prompt,
        steps=c.eval.num_steps,
        cfg_scale=cfg_scale,
        seed=c.train.seed + EVAL_SEED_OFFSET,
        negative_prompt=c.sampling.negative_prompt,
    )
    cache_path = c.eval.base_cache
    if kind == "toy":
        from solace.evaluation.toy_eval import BaseEvalCache, ToyEvaluator, eval_records

        recs = eval_records(c.eval.prompts, c.eval.prompts_limit)
        cache = BaseEvalCache(cache_path, base_eval_key(cfg, cfg_scale), writes) if cache_path else None
        return ToyEvaluator(adapter, recs, c.eval.prompts, cache=cache, shards=shards, **common)
    from solace.evaluation.metrics_eval import build_metrics, check_suite_metadata
    from solace.evaluation.toy_eval import BaseEvalCache

    suite = eval_suite(c.eval.prompts, c.eval.prompts_limit)
    check_suite_metadata(suite, c.eval.metrics, "eval.prompts")
    metrics = build_metrics(c.eval.metrics, {m: dict(c.eval.metric_args.get(m, {})) for m in c.eval.metrics})
    key = {**base_eval_key(cfg, cfg_scale), **metrics_key_extra(cfg)}
    lora = c.model.lora
    cache = BaseEvalCache(cache_path, key, writes) if cache_path else None
    return MetricsEvaluator(
        adapter, suite, metrics, batch_size=c.eval.batch_size, out_dir=Path(out_dir), writes=writes,
        grid_prompts=c.eval.metric_grid_rows, cache=cache, shards=shards,
        starts_at_base=not (lora.init_from and not lora.merge_init), **common,
    )  # fmt: skip


def eval_suite(spec: str, limit: int = 0) -> Any:
    """``eval.prompts`` as a :class:`~solace.evaluation.suites.PromptSuite`: a prompt file (its first
    ``limit`` prompts, as ``solace eval --limit``), or a toy prompt set with its GenEval metadata."""
    from solace.evaluation.suites import PromptSuite
    from solace.prompts import Prompt, read_prompt_file

    if spec in TOY_PROMPT_SETS:
        from solace.evaluation.toy_eval import eval_records

        items = [Prompt(r.prompt, r.to_json()) for r in eval_records(spec, limit) or []]
        return PromptSuite(spec, spec, tuple(items))
    items = read_prompt_file(spec, "eval.prompts")
    return PromptSuite(Path(spec).stem, spec, tuple(items[:limit] if limit else items))


def base_eval_key(cfg: SolaceConfig, cfg_scale: float) -> dict[str, Any]:
    """Everything the evaluation before training depends on (the key of ``eval.base_cache``)."""
    from solace.toy.adapter import default_weights_path

    c = cfg
    weights = default_weights_path() if c.model.name == "toy" else Path(c.model.name)
    return {
        "model": c.model.name,
        # the weights themselves, so a changed base (a new shipped toy model) is evaluated anew
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else "",
        "lora_init": c.model.lora.init_from,
        "merge_init": c.model.lora.merge_init,
        "dtype": c.model.dtype,
        "eval_prompts": c.eval.prompts,
        "limit": c.eval.prompts_limit,
        "samples": c.eval.samples_per_prompt,
        "steps": c.eval.num_steps,
        "cfg": cfg_scale,
        "seed": c.train.seed,
        # only when set, so that the caches of runs before these settings existed stay valid
        **({"negative_prompt": c.sampling.negative_prompt} if c.sampling.negative_prompt else {}),
        **({"size": [c.model.height, c.model.width]} if c.model.height or c.model.width else {}),
    }


def metrics_key_extra(cfg: SolaceConfig) -> dict[str, Any]:
    """What a metric evaluation of the base depends on beyond :func:`base_eval_key`: the metrics, their
    arguments, the batching, the diffusers model's settings and a fingerprint of its weight files."""
    m, e = cfg.model, cfg.eval
    return {
        "evaluator": "metrics",
        "metrics": list(e.metrics),
        "metric_args": {k: dict(v) for k, v in e.metric_args.items()},
        "batch_size": e.batch_size,
        "resolution": m.resolution,
        "max_sequence_length": m.max_sequence_length,
        "guidance_scale": m.guidance_scale,
        "text_encoder_3": m.text_encoder_3,
        "weights_files": weights_fingerprint(m.name),
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
        suite: Any,
        metrics: dict[str, Callable[..., torch.Tensor]],
        *,
        samples: int,
        steps: int,
        cfg_scale: float,
        seed: int,
        batch_size: int = 8,
        out_dir: Path | None = None,
        grid_prompts: int = 8,
        cache: Any = None,
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
        from solace.evaluation.metrics_eval import generate_and_score, summarize_scores

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
                from solace.models.base import adapters_disabled

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
        from solace.evaluation.metrics_eval import write_grid

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
        from solace.evaluation.metrics_eval import PAPER_NAMES, format_number

        parts = [
            f"{PAPER_NAMES.get(m, m)} {format_number(v)} (base {format_number(record['base'].get(m))})"
            for m, v in record["metrics"].items()
        ]
        return f"held-out {', '.join(parts)}"

    def summary(self, evals: list[dict[str, Any]]) -> str:
        from solace.evaluation.metrics_eval import PAPER_NAMES, format_number

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
        from solace.evaluation.metrics_eval import format_table

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
        from solace.evaluation.metrics_eval import PAPER_NAMES

        recs = [e for e in evals if e.get("evaluator") == self.kind]
        if recs:
            its = [e["iteration"] for e in recs]
            for m in recs[-1]["metrics"]:
                ax.plot(its, [metric_delta(e, m) for e in recs], "o-", label=PAPER_NAMES.get(m, m))
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.legend()
        ax.set_title("held-out metrics minus base")
        ax.set_xlabel("iteration")
