"""Self-confidence without training: score images, rerank candidates, compare inference regimes.

The runners behind ``solace score``, ``solace rerank`` and ``solace analyze rationale``. Self-confidence is
the training reward (:mod:`solace.rewards.self_confidence`: conditional velocity, K antithetic probes shared
by a prompt's group, uniform weights) probed at the sampler's own timesteps ``sigmas(steps)[:-1]``. Generation
uses the training sampler (:func:`solace.sampling.sampler.sample`, SDE with noise level 0.7 or the Euler ODE,
with CFG); the initial noise of sample ``j`` of prompt ``i`` depends only on ``(seed, i, j)``.

When a registered evaluator can judge the prompts exactly (an embedded world's, on its own model and
prompts: a :class:`~solace.evaluation.evaluators.Judge`), every sample is also judged (strict
correctness), and :mod:`solace.evaluation.analysis` turns scores and correctness into best-of-N and
within-group AUC figures.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from solace.errors import check
from solace.evaluation import analysis
from solace.evaluation.evaluators import Judge
from solace.models.base import Conditioning, FlowModelAdapter
from solace.rewards.prompt_edits import candidate_edits
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer
from solace.sampling.generate import generate_group
from solace.utils.images import to_pil
from solace.utils.seeding import prompt_seed


def score_latents(
    adapter: FlowModelAdapter,
    z0: torch.Tensor,
    cond: Conditioning,
    timesteps: torch.Tensor,
    num_probes: int = 8,
    probe_seed: int = 0,
    max_batch: int = 64,
    edits: str = "off",
    edit_cond: Conditioning | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-confidence of one prompt group: ``(R (B,), S (B, T))``, one set of probes for the group from
    ``probe_seed``. ``cond`` holds one row per latent (or a single row, shared by all). The paper's form, or
    with ``edits`` (mean | max | lse) the prompt against its minimal edits ``edit_cond`` (one row each),
    scored with the same probes."""
    scorer = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=num_probes, max_batch=max_batch, edits=edits))
    return scorer.score_group(adapter, z0, cond, timesteps, probe_seed, edit_cond=edit_cond)


EDIT_FORMS = ("off", "mean", "max", "lse")


def check_edits(edits: str) -> None:
    check(edits in EDIT_FORMS, "--edits", f"use one of {', '.join(EDIT_FORMS)}, not {edits!r}")


def edit_conditioning(
    adapter: FlowModelAdapter, prompt: str, meta: dict | None, edits: str, limit: int = 8
) -> Conditioning | None:
    """The encoded minimal edits of ``prompt`` (with metadata an edit provider knows: its exact edits; free
    text: rule edits), or None when ``edits`` is off."""
    if edits == "off":
        return None
    return adapter.encode_prompts(candidate_edits(prompt, meta, limit=limit))


def negative_setting(negative_prompt: str) -> dict[str, str]:
    """The negative prompt as a recorded setting, only when one was given (older records stay alike)."""
    return {"negative_prompt": negative_prompt} if negative_prompt else {}


def probe_timesteps(adapter: FlowModelAdapter, num_steps: int) -> torch.Tensor:
    """The sampler's own timesteps ``sigmas(num_steps)[:-1]`` (all in (0, 1])."""
    return SelfConfidenceScorer().timesteps(adapter.sigmas(num_steps).float())[1]


def judged(adapter: FlowModelAdapter, z0: torch.Tensor, judge: Judge, i: int) -> np.ndarray:
    """Strict correctness (N,) of decoded latents of prompt ``i`` under the exact ``judge``."""
    return judge.correct(adapter.decode(z0).cpu(), i)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# --------------------------------------------------------------------------------------------- score


@torch.no_grad()
def run_score(
    adapter: FlowModelAdapter,
    prompts: Sequence[str],
    out: Path,
    *,
    images: torch.Tensor | None = None,
    image_names: Sequence[str] = (),
    generate: int = 0,
    seed: int = 0,
    num_steps: int = 10,
    cfg_scale: float = 7.0,
    sampler: str = "sde",
    num_probes: int = 8,
    edits: str = "off",
    progress: bool = True,
    negative_prompt: str = "",
) -> dict:
    """Self-confidence of given images (one prompt) or of ``generate`` samples per prompt.

    Writes ``score.json`` (settings, timesteps, per image ``R`` and ``S_t``) and, when generating, the
    images to ``images/``. Returns the document plus ``table`` (text).
    """
    check_edits(edits)
    out.mkdir(parents=True, exist_ok=True)
    ts = probe_timesteps(adapter, num_steps)
    null = adapter.encode_prompts([negative_prompt])  # CFG's null conditioning of generation
    z_given = adapter.encode_images(images).float() if images is not None else None
    rows: list[dict] = []
    bar = tqdm(total=len(prompts), desc="scoring", disable=not progress, dynamic_ncols=True)
    for i, p in enumerate(prompts):
        cond = adapter.encode_prompts([p])
        if z_given is not None:
            z0 = z_given
            names = list(image_names)
        else:
            z0 = generate_group(
                adapter, cond, null, generate, num_steps, cfg_scale, prompt_seed(seed, i), sampler
            )
            (out / "images").mkdir(exist_ok=True)
            names = []
            for j, im in enumerate(adapter.decode(z0).cpu()):
                f = f"images/{i:04d}_{j:02d}.png"
                to_pil(im).save(out / f)
                names.append(f)
        ec = edit_conditioning(adapter, p, None, edits)
        r, s = score_latents(
            adapter, z0, cond, ts, num_probes, prompt_seed(seed, i) + 1, edits=edits, edit_cond=ec
        )
        for j, name in enumerate(names):
            rows.append({"prompt": p, "image": name, "R": float(r[j]), "S_t": [float(x) for x in s[j]]})
        bar.update(1)
    bar.close()
    doc = {
        "settings": {
            "num_steps": num_steps,
            "num_probes": num_probes,
            "edits": edits,
            "seed": seed,
            "source": "images" if images is not None else "generated",
            **(
                {
                    "samples_per_prompt": generate,
                    "cfg_scale": cfg_scale,
                    "sampler": sampler,
                    **negative_setting(negative_prompt),
                }
                if images is None
                else {}
            ),
        },
        "timesteps": [float(t) for t in ts],
        "scores": rows,
    }
    (out / "score.json").write_text(json.dumps(doc, indent=2))
    w = max([8, *(len(r["image"]) for r in rows)])
    pw = min(40, max([6, *(len(r["prompt"]) for r in rows)]))
    t_text = ", ".join(f"{float(t):.2f}" for t in ts)
    lines = [f"{'prompt':<{pw}}  {'image':<{w}}  {'R':>8}  S_t (t = {t_text})"]
    for r in rows:
        s_text = " ".join(f"{x:.3f}" for x in r["S_t"])
        lines.append(f"{r['prompt'][:pw]:<{pw}}  {r['image']:<{w}}  {r['R']:8.4f}  {s_text}")
    doc["table"] = "\n".join(lines)
    return doc


# -------------------------------------------------------------------------------------------- rerank


@torch.no_grad()
def run_rerank(
    adapter: FlowModelAdapter,
    prompts: Sequence[str],
    judge: Judge | None,
    out: Path,
    *,
    ns: Sequence[int],
    seeds: Sequence[int],
    num_steps: int = 10,
    cfg_scale: float = 7.0,
    sampler: str = "sde",
    num_probes: int = 8,
    batch_size: int = 16,
    edits: str = "off",
    progress: bool = True,
    negative_prompt: str = "",
) -> dict:
    """Best-of-N by self-confidence. Generates max(N) candidates per prompt and seed once; smaller N use
    prefixes. With a ``judge`` (an exact evaluator of the prompts) it reports best-of-N / random / oracle
    strict accuracy over seeds (``rerank.json``, ``rerank.md``, ``rerank.png``); otherwise it writes each
    N's selected image."""
    ns = sorted(set(int(n) for n in ns))
    nmax = ns[-1]
    check_edits(edits)
    out.mkdir(parents=True, exist_ok=True)
    ts = probe_timesteps(adapter, num_steps)
    null = adapter.encode_prompts([negative_prompt])  # CFG's null conditioning of generation
    enc = adapter.encode_prompts(list(prompts))
    per_seed: list[dict] = []
    per_prompt: list[dict] = []
    bar = tqdm(
        total=len(seeds) * len(prompts) * nmax, desc="rerank", disable=not progress, dynamic_ncols=True
    )
    for seed in seeds:
        scores = np.zeros((len(prompts), nmax))
        correct = np.zeros((len(prompts), nmax), dtype=bool)
        for i, p in enumerate(prompts):
            cond = enc.index([i])
            z0 = generate_group(
                adapter, cond, null, nmax, num_steps, cfg_scale, prompt_seed(seed, i), sampler, batch_size
            )
            ec = edit_conditioning(adapter, p, judge.metas[i] if judge else None, edits)
            r, _ = score_latents(
                adapter, z0, cond, ts, num_probes, prompt_seed(seed, i) + 1, edits=edits, edit_cond=ec
            )
            scores[i] = r.numpy()
            row: dict = {"seed": seed, "prompt": p, "R": [float(x) for x in r]}
            picks = {n: int(np.argmax(scores[i, :n])) for n in ns}
            row["selected"] = {str(n): k for n, k in picks.items()}
            if judge is not None:
                correct[i] = judged(adapter, z0, judge, i)
                row["tag"] = judge.tags[i]
                row["strict"] = [bool(x) for x in correct[i]]
            else:
                imgs = adapter.decode(z0).cpu()
                row["images"] = {}
                for n, k in picks.items():
                    f = f"images/seed{seed}/{i:04d}_best_of_{n}.png"
                    (out / f).parent.mkdir(parents=True, exist_ok=True)
                    to_pil(imgs[k]).save(out / f)
                    row["images"][str(n)] = f
            per_prompt.append(row)
            bar.update(nmax)
        if judge is not None:
            per_seed.append(analysis.selection(scores, correct, ns))
    bar.close()
    settings = {
        "ns": ns,
        "seeds": list(seeds),
        "num_prompts": len(prompts),
        "num_steps": num_steps,
        "cfg_scale": cfg_scale,
        "sampler": sampler,
        "num_probes": num_probes,
        "edits": edits,
        **negative_setting(negative_prompt),
    }
    doc: dict = {"settings": settings, "timesteps": [float(t) for t in ts]}
    if judge is not None:
        summary = analysis.summarize_selection(per_seed)
        doc["summary"] = {str(n): v for n, v in summary.items()}
        doc["per_seed"] = [{str(n): v for n, v in r.items()} for r in per_seed]
        title = (
            f"Best-of-N by self-confidence, strict accuracy: {len(prompts)} prompts, {len(seeds)} seeds, "
            f"{num_steps} steps {sampler.upper()}, CFG {cfg_scale}, K={num_probes} (mean ± std over seeds)"
        )
        table = analysis.selection_markdown(summary, title)
        (out / "rerank.md").write_text(table + "\n")
        analysis.plot_selection(
            summary, out / "rerank.png", title=f"{len(prompts)} prompts x {len(seeds)} seeds"
        )
        doc["table"] = table
    doc["per_prompt"] = per_prompt
    (out / "rerank.json").write_text(json.dumps({k: v for k, v in doc.items() if k != "table"}, indent=2))
    return doc


# ----------------------------------------------------------------------------------------- rationale


def regimes(num_steps: int, cfg_scale: float) -> list[tuple[str, int, float]]:
    """The three inference regimes: ``num_steps`` without CFG, with CFG, and ``2 * num_steps`` with CFG."""
    return [
        (f"{num_steps} steps, no CFG", num_steps, 1.0),
        (f"{num_steps} steps, CFG {cfg_scale:g}", num_steps, cfg_scale),
        (f"{2 * num_steps} steps, CFG {cfg_scale:g}", 2 * num_steps, cfg_scale),
    ]


def _auc_block(r: np.ndarray, s: np.ndarray, c: np.ndarray, tags: Sequence[str]) -> dict:
    per_cat: dict[str, list[float]] = {}
    for row_r, row_c, tag in zip(r, c, tags, strict=True):
        x = analysis.auc(row_r, row_c)
        if x is not None:
            per_cat.setdefault(tag, []).append(x)
    per_t = [analysis.mean_auc(s[:, :, j], c)["auc"] for j in range(s.shape[2])]
    return {
        **analysis.mean_auc(r, c),
        "auc_per_category": {k: float(np.mean(v)) for k, v in per_cat.items()},
        "auc_per_timestep": per_t,
        "strict_accuracy": float(c.mean()),
    }


@torch.no_grad()
def run_rationale(
    adapter: FlowModelAdapter,
    prompts: Sequence[str],
    judge: Judge | None,
    out: Path,
    *,
    samples: int = 8,
    num_steps: int = 10,
    cfg_scale: float = 7.0,
    sampler: str = "ode",
    num_probes: int = 8,
    seed: int = 0,
    batch_size: int = 16,
    edits: str = "off",
    progress: bool = True,
    negative_prompt: str = "",
) -> dict:
    """Self-confidence R of ``samples`` per prompt under the three :func:`regimes`, all probed at the same
    timesteps (``sigmas(num_steps)[:-1]``) with the same probes, so that only the images differ. Writes
    ``rationale.json`` and ``rationale.png`` (overlaid histograms); with a ``judge`` (exact) also the
    within-group AUC of R (and of each S_t) against strict correctness, per category (``rationale.md``)."""
    check_edits(edits)
    out.mkdir(parents=True, exist_ok=True)
    ts = probe_timesteps(adapter, num_steps)
    null = adapter.encode_prompts([negative_prompt])  # CFG's null conditioning of generation
    enc = adapter.encode_prompts(list(prompts))
    regs = regimes(num_steps, cfg_scale)
    results: dict[str, dict] = {}
    dists: dict[str, list[float]] = {}
    bar = tqdm(
        total=len(regs) * len(prompts) * samples, desc="rationale", disable=not progress, dynamic_ncols=True
    )
    for label, steps, cfg in regs:
        r_all = np.zeros((len(prompts), samples))
        s_all = np.zeros((len(prompts), samples, ts.numel()))
        c_all = np.zeros((len(prompts), samples), dtype=bool)
        for i in range(len(prompts)):
            cond = enc.index([i])
            z0 = generate_group(
                adapter, cond, null, samples, steps, cfg, prompt_seed(seed, i), sampler, batch_size
            )
            ec = edit_conditioning(adapter, prompts[i], judge.metas[i] if judge else None, edits)
            r, s = score_latents(
                adapter, z0, cond, ts, num_probes, prompt_seed(seed, i) + 1, edits=edits, edit_cond=ec
            )
            r_all[i], s_all[i] = r.numpy(), s.numpy()
            if judge is not None:
                c_all[i] = judged(adapter, z0, judge, i)
            bar.update(samples)
        dists[label] = [float(x) for x in r_all.reshape(-1)]
        res: dict = {
            "num_steps": steps,
            "cfg_scale": cfg,
            "R_mean": float(r_all.mean()),
            "R_std": float(r_all.std()),
            "R": r_all.tolist(),
            "S_t_mean": [float(x) for x in s_all.mean((0, 1))],
        }
        if judge is not None:
            res.update(_auc_block(r_all, s_all, c_all, list(judge.tags)))
            res["strict"] = c_all.tolist()
        results[label] = res
    bar.close()
    settings = {
        "samples_per_prompt": samples,
        "num_prompts": len(prompts),
        "probe_steps": num_steps,
        "sampler": sampler,
        "num_probes": num_probes,
        "edits": edits,
        "seed": seed,
        **negative_setting(negative_prompt),
    }
    doc: dict = {
        "settings": settings,
        "timesteps": [float(t) for t in ts],
        "prompts": list(prompts),
        "regimes": results,
    }
    (out / "rationale.json").write_text(json.dumps(doc, indent=2))
    analysis.plot_distributions(
        dists,
        out / "rationale.png",
        title=f"self-confidence R, {len(prompts)} prompts x {samples} samples ({sampler.upper()})",
    )
    if judge is not None:
        doc["table"] = _rationale_markdown(results, ts)
        (out / "rationale.md").write_text(doc["table"] + "\n")
    return doc


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _rationale_markdown(results: dict[str, dict], ts: torch.Tensor) -> str:
    lines = [
        "Within-group AUC of self-confidence R against strict correctness (0.5 = chance):",
        "",
        "| regime | mean R | strict accuracy | AUC | groups with both |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        lines.append(
            f"| {label} | {r['R_mean']:.3f} | {r['strict_accuracy']:.3f} | {_fmt(r['auc'])} | "
            f"{r['groups_with_both']} |"
        )
    cats = list(dict.fromkeys(c for r in results.values() for c in r["auc_per_category"]))
    if cats:
        lines += ["", "Per category:", "", "| regime | " + " | ".join(cats) + " |"]
        lines.append("|---" + "|---:" * len(cats) + "|")
        for label, r in results.items():
            pc = r["auc_per_category"]
            lines.append(f"| {label} | " + " | ".join(_fmt(pc.get(c)) for c in cats) + " |")
    lines += ["", "AUC of S_t alone, per probed timestep t:", ""]
    lines.append("| regime | " + " | ".join(f"t={float(t):.3f}" for t in ts) + " |")
    lines.append("|---" + "|---:" * ts.numel() + "|")
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(_fmt(x) for x in r["auc_per_timestep"]) + " |")
    return "\n".join(lines)
