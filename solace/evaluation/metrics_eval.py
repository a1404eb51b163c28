"""Metric evaluation of a model and a LoRA on a prompt suite (DrawBench, GenEval, OCR, Pick-a-Pic).

The base model and base + LoRA sample every prompt with the same initial noise (seed ``(seed, prompt index,
sample index)``, ODE sampler, CFG), every image is quantised to 8 bits (what is saved is what is scored),
scored by each requested metric of :mod:`solace.rewards.registry`, and written out:

* ``results.json``: settings, the mean of every metric over prompts per model (``summary``), and per prompt
  its scores (mean over its samples) and image files;
* ``results.md``: the paper-style table (rows base / LoRA, one column per metric);
* ``grid.png``: prompts as rows, base samples | LoRA samples as columns;
* ``index.html``: base vs LoRA per prompt with their scores (images referenced from ``images/``);
* ``images/<base|lora>/<prompt>_<sample>.png``: every generated image at full resolution.

Images are generated, scored and saved a batch at a time, so memory does not grow with the suite.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from solace.errors import ConfigError
from solace.evaluation.sharding import Shards
from solace.evaluation.suites import PromptSuite
from solace.models.lora import load_lora
from solace.rewards.components import reward_scores
from solace.rewards.registry import (
    available_rewards,
    build_reward,
    is_user_reward,
    reward_factory,
    reward_parameters,
)
from solace.sampling.generate import generate_jobs
from solace.utils.images import make_grid, to_pil

PAPER_NAMES = {
    "clip_score": "CLIPScore",
    "ocr": "OCR",
    "pickscore": "PickScore",
    "hps": "HPSv2.1",
    "image_reward": "ImageReward",
    "aesthetic": "Aesthetic",
    "geneval": "GenEval",
    "unified_reward": "UnifiedReward",
}
"""Column names of the table: the names the paper's tables use (plugins add their metrics')."""

METADATA_METRICS = {"geneval"}
"""Metrics that need GenEval metadata (``include``) on every prompt (plugins add theirs)."""

EVAL_DEFAULTS: dict[str, dict[str, Any]] = {"pickscore": {"divisor": 1.0}}
"""Metric arguments that differ from the reward defaults: the raw PickScore (~20-23) is the tabulated
metric, the reward divides it by 26. ``--metric-arg pickscore.divisor=26`` restores the reward's scale."""

ROW_LABELS = {"base": "base", "lora": "LoRA"}


# --------------------------------------------------------------------------------------------------------
# metrics: names, arguments, building
# --------------------------------------------------------------------------------------------------------


def parse_metric_list(spec: str | Sequence[str]) -> list[str]:
    """``"clip_score, ocr"`` -> ``["clip_score", "ocr"]`` (order kept, duplicates dropped)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not names:
        raise ConfigError("--metrics", "name at least one metric, e.g. --metrics clip_score,pickscore")
    return names


def parse_metric_args(args: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["clip_score.model=/path", "ocr.ocr_params={Det.limit_side_len: 256}"]`` -> per-metric kwargs.

    Values are read as YAML scalars/flow collections (``8`` -> int, ``false`` -> bool, ``/a/b`` -> str).
    """
    out: dict[str, dict[str, Any]] = {m: {} for m in metrics}
    for arg in args:
        key, eq, raw = arg.partition("=")
        name, dot, kw = _split_metric_key(key.strip())
        if not eq or not dot or not name or not kw:
            raise ConfigError(
                "--metric-arg", f"expected METRIC.KEY=VALUE (e.g. clip_score.model=/path), got {arg!r}"
            )
        if name not in out:
            raise ConfigError(
                "--metric-arg", f"{arg!r} is for {name!r}, which is not in --metrics ({', '.join(metrics)})"
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[name][kw.strip()] = value
    return out


def _split_metric_key(key: str) -> tuple[str, str, str]:
    """``clip_score.model`` -> (``clip_score``, ``.``, ``model``); a user metric's dotted module is kept
    whole: ``my_pkg.rewards:sharpness.scale`` -> (``my_pkg.rewards:sharpness``, ``.``, ``scale``)."""
    head, colon, tail = key.partition(":")
    if not colon:
        return key.partition(".")
    fn, dot, kw = tail.partition(".")
    return f"{head}:{fn}", dot, kw


def build_metrics(
    names: Sequence[str], kwargs: dict[str, dict[str, Any]] | None = None
) -> dict[str, Callable[..., torch.Tensor]]:
    """Build every metric through the registry (a name may be a user factory ``package.module:function``);
    unknown names, unimportable modules and bad arguments fail with one line before any model loads."""
    kwargs = kwargs or {}
    known = available_rewards()
    for name in names:
        if is_user_reward(name):
            reward_factory(name, "--metrics")  # imported now: a bad module or function fails here
        elif name not in known:
            raise ConfigError(
                "--metrics",
                f"unknown metric {name!r}; available: {', '.join(known)}, or your own factory as "
                "package.module:function",
            )
    for name in names:  # every name's arguments are checked before the first metric is built
        user = kwargs.get(name, {})
        params = reward_parameters(name)
        bad = [k for k in user if k not in params]
        if bad and "**" not in params:
            raise ConfigError(
                f"--metric-arg {name}.{bad[0]}",
                f"{name} takes no argument {bad[0]!r}; it takes {', '.join(params) or 'none'}",
            )
    return {
        name: build_reward(name, **{**EVAL_DEFAULTS.get(name, {}), **kwargs.get(name, {})}) for name in names
    }


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------------------


def format_number(v: float | None) -> str:
    """Two decimals for values of magnitude 10 and more (CLIPScore, PickScore), else three."""
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.2f}" if abs(v) >= 10 else f"{v:.3f}"


def format_table(
    summary: dict[str, dict[str, float]], metrics: Sequence[str], title: str | None = None
) -> str:
    """Markdown table in the paper's layout: one row per model (``base``, ``LoRA``), one column per metric
    (the mean over prompts), named as in the paper."""
    cols = [PAPER_NAMES.get(m, m) for m in metrics]
    lines = [f"{title}", ""] if title else []
    lines.append("| model | " + " | ".join(cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    for label, row in summary.items():
        cells = [format_number(row.get(m)) for m in metrics]
        lines.append(f"| {ROW_LABELS.get(label, label)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# generation + scoring
# --------------------------------------------------------------------------------------------------------


def _quantize(images: torch.Tensor) -> torch.Tensor:
    return (images.float().clamp(0, 1) * 255).round() / 255


def _thumb(images: torch.Tensor, size: int) -> torch.Tensor:
    """Downscale (antialiased) so that the longer side is at most ``size``; uint8."""
    h, w = images.shape[-2:]
    if max(h, w) > size:
        s = size / max(h, w)
        images = F.interpolate(images, size=(round(h * s), round(w * s)), mode="bilinear", antialias=True)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def generate_and_score(
    adapter: Any,
    suite: PromptSuite,
    metrics: dict[str, Callable[..., torch.Tensor]],
    label: str,
    out_dir: Path | None,
    samples_per_prompt: int = 1,
    num_steps: int = 40,
    cfg_scale: float = 7.0,
    seed: int = 0,
    batch_size: int = 8,
    grid_rows: int = 32,
    grid_samples: int = 2,
    thumb_size: int = 256,
    progress: bool = True,
    negative_prompt: str = "",
    shards: Shards | None = None,
) -> dict[str, Any]:
    """Sample every prompt ``samples_per_prompt`` times (CFG's null: ``negative_prompt``), score with every
    metric, save the PNGs under ``out_dir`` (none saved when it is None: the evaluations during training).
    With ``shards`` every process samples and scores its block of the samples (prompt-major) and all
    receive every sample's results (:mod:`solace.evaluation.sharding`); the result is the same on every
    process.

    Returns ``scores`` ({metric: (P, S) tensor}), ``pixel_std`` ((P, S): each 8-bit image's pixel standard
    deviation, what a collapse toward flat images lowers), ``files`` (P lists of S relative paths),
    ``thumbs`` (uint8 thumbnails of the first ``grid_samples`` samples of the first ``grid_rows`` prompts)
    and ``image_size`` ([H, W]).
    """
    from tqdm.auto import tqdm

    shards = shards or Shards()
    P, S = len(suite), samples_per_prompt
    texts = [item.text for item in suite.items]
    jobs = [(i, j) for i in range(P) for j in range(S)]
    mine, real = shards.share(len(jobs), "eval")
    step = max(1, batch_size // S) * S  # whole prompts a batch, as far as the block allows
    if out_dir is not None:
        (out_dir / "images" / label).mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=len(mine),
        desc=f"{ROW_LABELS.get(label, label)}: sampling",
        disable=not progress,
        dynamic_ncols=True,
    )
    pairs: list[tuple[int, dict[str, Any]]] = []
    for start in range(0, len(mine), step):
        block = mine[start : start + step]
        batch = [jobs[k] for k in block]
        images = generate_jobs(
            adapter, texts, batch, num_steps, cfg_scale, seed=seed, batch_size=len(batch), progress=False,
            negative_prompt=negative_prompt,
        )  # fmt: skip
        n = max(0, min(len(block), real - start))  # the block's own samples (the rest pad FSDP's forwards)
        pairs += _score_batch(images[:n], block[:n], batch[:n], suite, metrics, label, out_dir,
                              grid_rows, grid_samples, thumb_size)  # fmt: skip
        bar.update(len(block))
    bar.close()
    results = shards.gather(pairs, len(jobs))
    scores = {
        m: torch.tensor([r["scores"][m] for r in results], dtype=torch.float32).reshape(P, S) for m in metrics
    }
    pixel_std = torch.tensor([r["pixel_std"] for r in results], dtype=torch.float32).reshape(P, S)
    files = [[results[i * S + j]["file"] for j in range(S) if results[i * S + j]["file"]] for i in range(P)]
    thumbs = {
        i: torch.stack([torch.from_numpy(results[i * S + j]["thumb"]) for j in range(min(S, grid_samples))])
        for i in range(min(P, grid_rows))
    }
    size = list(results[0]["size"]) if results else []
    return {"scores": scores, "pixel_std": pixel_std, "files": files, "thumbs": thumbs, "image_size": size}


def _score_batch(
    images: torch.Tensor,
    block: list[int],
    batch: list[tuple[int, int]],
    suite: PromptSuite,
    metrics: dict[str, Callable[..., torch.Tensor]],
    label: str,
    out_dir: Path | None,
    grid_rows: int,
    grid_samples: int,
    thumb_size: int,
) -> list[tuple[int, dict[str, Any]]]:
    """One batch of samples (``block``: their indices, ``batch``: their (prompt, sample)), quantised to 8 bits
    and scored: ``(index, result)`` pairs of plain numbers and uint8 arrays, what :meth:`Shards.gather`
    sends between processes."""
    if not block:
        return []
    images = _quantize(images)
    prompts = [suite.items[i].text for i, _ in batch]
    metas = [suite.items[i].meta for i, _ in batch]
    scores = {}
    for m, fn in metrics.items():
        with torch.no_grad():
            scores[m] = reward_scores(m, fn(images, prompts, metas), len(prompts)).float().cpu()
    pixel_std = images.float().flatten(1).std(-1).cpu()
    out = []
    for k, (idx, (i, j)) in enumerate(zip(block, batch, strict=True)):
        rel = ""
        if out_dir is not None:
            rel = f"images/{label}/{i:04d}_{j}.png"
            to_pil(images[k]).save(out_dir / rel)
        thumb = None
        if i < grid_rows and j < grid_samples:
            thumb = _thumb(images[k : k + 1], thumb_size)[0].numpy()
        result = {
            "scores": {m: float(v[k]) for m, v in scores.items()},
            "pixel_std": float(pixel_std[k]),
            "file": rel,
            "thumb": thumb,
            "size": list(images.shape[-2:]),
        }
        out.append((idx, result))
    return out


def summarize_scores(
    scores: dict[str, torch.Tensor],
) -> tuple[dict[str, float | None], dict[str, list[float | None]]]:
    """``({metric: mean over prompts of the per-prompt means}, {metric: [per-prompt mean over its samples]})``
    of ``scores`` ({metric: (P, S)}); a non-finite value becomes None (JSON). The numbers of ``solace eval``'s
    tables and of the evaluations during training."""
    per_prompt = {m: v.mean(1) for m, v in scores.items()}
    summary = {m: _finite(float(v.mean())) for m, v in per_prompt.items()}
    return summary, {m: [_finite(float(x)) for x in v] for m, v in per_prompt.items()}


def check_suite_metadata(suite: PromptSuite, metrics: Sequence[str], field: str) -> None:
    """GenEval-style metrics need GenEval metadata (``include``) on every prompt."""
    if METADATA_METRICS & set(metrics) and any("include" not in m for m in suite.metadata):
        raise ConfigError(
            field,
            f"the GenEval metric needs GenEval metadata per prompt ('include', 'tag'): pass a .jsonl file in "
            f"GenEval's format (e.g. geneval_test_metadata.jsonl), not {Path(suite.path).name}",
        )


def write_grid(path: Path, suite: PromptSuite, thumbs: dict[str, dict[int, torch.Tensor]]) -> Path:
    """Prompts as rows; for each label (``base``, ``lora``, ...) its thumbnails side by side, headed by the
    label."""
    from PIL import Image, ImageDraw, ImageFont

    labels = list(thumbs)
    rows = sorted(thumbs[labels[0]])
    k = thumbs[labels[0]][rows[0]].shape[0]
    images = [im for i in rows for lb in labels for im in thumbs[lb][i]]
    side = max(images[0].shape[-2:])
    scale = max(1, 128 // side)
    names = [suite.items[i].text for i in rows]
    names = [n if len(n) <= 60 else n[:57] + "..." for n in names]
    label_width = min(420, 8 + 6 * max(len(n) for n in names))
    body = make_grid(
        [im.permute(1, 2, 0).numpy() for im in images], k * len(labels), row_labels=names, scale=scale,
        label_width=label_width,
    )  # fmt: skip
    head = 16
    grid = Image.new("RGB", (body.width, body.height + head), (255, 255, 255))
    grid.paste(body, (0, head))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    col_w = (body.width - label_width - 2) / (k * len(labels))
    for n, lb in enumerate(labels):
        draw.text((label_width + 2 + n * k * col_w + 4, 2), ROW_LABELS.get(lb, lb), fill=(0, 0, 0), font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def _write_html(path: Path, doc: dict) -> Path:
    metrics = doc["metrics"]
    labels = list(doc["summary"])
    esc = html.escape
    small = max(doc["settings"]["image_size"]) <= 128
    style = "width:192px;image-rendering:pixelated" if small else "max-width:256px"
    head = "".join(f"<th>{esc(PAPER_NAMES.get(m, m))}</th>" for m in metrics)
    summary_rows = "".join(
        f"<tr><td>{esc(ROW_LABELS.get(lb, lb))}</td>"
        + "".join(f"<td>{format_number(doc['summary'][lb].get(m))}</td>" for m in metrics)
        + "</tr>"
        for lb in labels
    )
    rows = []
    for i, rec in enumerate(doc["per_prompt"]):
        cells = []
        for lb in labels:
            imgs = "".join(f'<img src="{esc(f)}" style="{style}" alt="{esc(lb)}">' for f in rec["images"][lb])
            sc = "<br>".join(
                f"{esc(PAPER_NAMES.get(m, m))}: {format_number(rec['scores'][lb].get(m))}" for m in metrics
            )
            cells.append(f"<td>{imgs}<div class=s>{sc}</div></td>")
        rows.append(f"<tr><td>{i}</td><td class=p>{esc(rec['prompt'])}</td>{''.join(cells)}</tr>")
    col_heads = "".join(f"<th>{esc(ROW_LABELS.get(lb, lb))}</th>" for lb in labels)
    s = doc["settings"]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>solace eval: {esc(doc["suite"])}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }} table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
td.p {{ max-width: 28em; }} .s {{ font-size: 85%; color: #333; margin-top: 4px; }} img {{ margin: 2px; }}
</style></head><body>
<h1>{esc(doc["suite"])}: base vs LoRA</h1>
<p>model {esc(str(s["model"]))}, LoRA {esc(str(s["lora"]))};
{s["num_prompts"]} prompts x {s["samples_per_prompt"]} sample(s), {s["num_steps"]} steps,
CFG {s["cfg_scale"]}, seed {s["seed"]} (the same initial noise for both)</p>
<table><tr><th>model</th>{head}</tr>{summary_rows}</table>
<h2>Per prompt (mean over its samples)</h2>
<table><tr><th>#</th><th>prompt</th>{col_heads}</tr>
{chr(10).join(rows)}
</table>
</body></html>
"""
    path.write_text(page, encoding="utf-8")
    return path


def run_metric_eval(
    adapter: Any,
    suite: PromptSuite,
    metrics: dict[str, Callable[..., torch.Tensor]],
    out_dir: str | Path,
    lora: str | None = None,
    lora_alpha: float | None = None,
    samples_per_prompt: int = 1,
    num_steps: int = 40,
    cfg_scale: float = 7.0,
    seed: int = 0,
    batch_size: int = 8,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    negative_prompt: str = "",
) -> dict[str, Any]:
    """Evaluate ``adapter`` and, when ``lora`` is given, ``adapter`` + that LoRA (attached to ``adapter``
    after the base pass) on ``suite`` with every metric; writes the files listed in the module docstring.
    Returns the ``results.json`` document plus ``table`` (Markdown) and ``paths``."""
    if samples_per_prompt < 1:
        raise ConfigError("--samples", f"must be >= 1, got {samples_per_prompt}")
    if num_steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {num_steps}")
    if batch_size < 1:
        raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
    check_suite_metadata(suite, list(metrics), "--prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kw = dict(
        samples_per_prompt=samples_per_prompt, num_steps=num_steps, cfg_scale=cfg_scale, seed=seed,
        batch_size=batch_size, progress=progress, negative_prompt=negative_prompt,
    )  # fmt: skip
    runs = {"base": generate_and_score(adapter, suite, metrics, "base", out, **kw)}
    if lora:
        load_lora(adapter.denoiser, lora, trainable=False, alpha=lora_alpha)
        runs["lora"] = generate_and_score(adapter, suite, metrics, "lora", out, **kw)

    names = list(metrics)
    summarized = {lb: summarize_scores(r["scores"]) for lb, r in runs.items()}
    summary = {lb: v[0] for lb, v in summarized.items()}
    per_prompt = []
    for i, item in enumerate(suite.items):
        rec: dict[str, Any] = {"index": i, "prompt": item.text}
        if item.meta:
            rec["metadata"] = item.meta
        rec["scores"] = {lb: {m: v[1][m][i] for m in names} for lb, v in summarized.items()}
        rec["images"] = {lb: r["files"][i] for lb, r in runs.items()}
        per_prompt.append(rec)
    s = {
        "suite": suite.name,
        "prompts_file": suite.path,
        "num_prompts": len(suite),
        "samples_per_prompt": samples_per_prompt,
        "num_steps": num_steps,
        "cfg_scale": cfg_scale,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "sampler": "ODE (Euler), same initial noise for base and LoRA",
        "lora": lora,
        "image_size": runs["base"]["image_size"],
        **(settings or {}),
    }
    s.setdefault("model", None)
    doc = {
        "suite": suite.name,
        "metrics": names,
        "metric_names": {m: PAPER_NAMES.get(m, m) for m in names},
        "settings": s,
        "summary": summary,
        "per_prompt": per_prompt,
    }
    title = (
        f"**{suite.name}** ({len(suite)} prompts x {samples_per_prompt} sample(s), {num_steps} steps, "
        f"CFG {cfg_scale}, seed {seed}; mean over prompts)"
    )
    table = format_table(summary, names, title)
    paths = {
        "json": out / "results.json",
        "markdown": out / "results.md",
        "grid": out / "grid.png",
        "html": out / "index.html",
    }
    paths["json"].write_text(json.dumps(doc, indent=2))
    paths["markdown"].write_text(table + "\n")
    write_grid(paths["grid"], suite, {lb: r["thumbs"] for lb, r in runs.items()})
    _write_html(paths["html"], doc)
    return {**doc, "table": table, "paths": {k: str(v) for k, v in paths.items()}}
