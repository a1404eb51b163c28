"""Which noise decides whether a toy sample is correct: the initial noise, or the SDE noise GRPO credits?

    python bench/outcome_variance.py --prompts 24 --inits 8 --draws 8

Flow-GRPO's gradient credits a sample's advantage to the SDE noise of the trained steps only (the suffix
window, the last ceil(rho * T) steps). Whatever part of the correctness is already fixed by the initial
noise (and by earlier steps) reaches the advantage but cannot be credited to any action: it is noise in the
gradient. This script measures that split on the shipped base with the training sampler (SDE a = 0.7, 10
steps, CFG 7). For each held-out prompt (balanced over categories) it draws ``--inits`` starting points and,
from each, ``--draws`` continuations, in two designs:

* ``window``: the initial noise and the SDE noise of the steps before the window are shared by a
  starting point's draws; only the window's SDE noise differs (what the paper's rho = 0.6 credits);
* ``all_sde``: only the initial noise is shared; every step's SDE noise differs (what rho = 1 credits).

Per design it reports the share of the strict-correctness variance (within a prompt) that lies within a
starting point, i.e. that the credited noise can explain: ``sum_i var_j / sum var`` pooled over prompts.
Writes ``bench/results/outcome_variance.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from solace.grpo.window import train_window
from solace.sampling.sampler import sample
from solace.toy.adapter import ToyAdapter
from solace.toy.evaluator import detect, score_detections, to_uint8
from solace.toy.world import balanced_subset, load_heldout


@torch.no_grad()
def outcomes(ad, rec, inits, draws, steps, window, design, cfg, seed):
    """Strict / lenient correctness, shape (inits, draws), of one prompt under one design."""
    shape = ad.latent_shape()
    gen = torch.Generator().manual_seed(seed)
    n = inits * draws
    init = torch.randn(inits, *shape, generator=gen).repeat_interleave(draws, 0)
    shared = torch.randn(inits, steps, *shape, generator=gen).repeat_interleave(draws, 0)
    fresh = torch.randn(n, steps, *shape, generator=gen)
    vary = list(window) if design == "window" else list(range(steps))
    step_noise = shared.clone()
    step_noise[:, vary] = fresh[:, vary]
    sig = ad.sigmas(steps)
    cond = ad.encode_prompts([rec.prompt]).index([0] * n)
    null = ad.encode_prompts([""]).index([0] * n)
    z0 = sample(
        ad,
        cond,
        null,
        sig,
        init,
        cfg_scale=cfg,
        noise_level=0.7,
        keep_trajectory=False,
        step_noise=step_noise,
    ).final
    sc = [score_detections(detect(a), rec) for a in to_uint8(ad.decode(z0))]
    strict = np.array([s["strict"] for s in sc], dtype=float).reshape(inits, draws)
    lenient = np.array([s["lenient"] for s in sc], dtype=float).reshape(inits, draws)
    return strict, lenient


def split(arrs: list[np.ndarray]) -> dict:
    """Pooled within-start share of variance over prompts: sum_p sum_i var_j / sum_p (inits * var),
    unbiased (ddof=1) variances; 1 means the credited noise alone decides, 0 that the start does."""
    within = sum(a.var(1, ddof=1).sum() for a in arrs)
    total = sum(a.shape[0] * a.var(ddof=1) for a in arrs)
    return {
        "within_share": float(within / total) if total > 0 else float("nan"),
        "total_var": float(total / sum(a.shape[0] for a in arrs)),
        "accuracy": float(np.mean([a.mean() for a in arrs])),
        "prompts_with_variance": int(sum(a.var() > 0 for a in arrs)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--inits", type=int, default=8)
    p.add_argument("--draws", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rho", type=float, default=0.6)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/outcome_variance.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ad = ToyAdapter()
    recs = balanced_subset(load_heldout(), a.prompts)
    window = train_window(a.steps, a.rho)
    res: dict = {"args": vars(a), "window": list(window), "designs": {}}
    t0 = time.time()
    for design in ("window", "all_sde"):
        per_cat: dict[str, dict[str, list]] = defaultdict(lambda: {"strict": [], "lenient": []})
        for k, rec in enumerate(recs):
            s, l_ = outcomes(ad, rec, a.inits, a.draws, a.steps, window, design, a.cfg, a.seed + 1000 * k)
            per_cat[rec.tag]["strict"].append(s)
            per_cat[rec.tag]["lenient"].append(l_)
        allp = {m: sum((c[m] for c in per_cat.values()), []) for m in ("strict", "lenient")}
        res["designs"][design] = {
            "strict": split(allp["strict"]),
            "lenient": split(allp["lenient"]),
            "per_category_strict": {c: split(v["strict"]) for c, v in per_cat.items()},
        }
        d = res["designs"][design]
        print(
            f"{design:8s} strict: within-start share {d['strict']['within_share']:.3f} "
            f"(accuracy {d['strict']['accuracy']:.3f}); lenient {d['lenient']['within_share']:.3f}"
            f"  [{time.time() - t0:.0f} s]",
            flush=True,
        )
        for c, v in d["per_category_strict"].items():
            share = "-" if math.isnan(v["within_share"]) else f"{v['within_share']:.3f}"
            print(f"    {c:14s} {share} (accuracy {v['accuracy']:.3f})")
    res["seconds"] = time.time() - t0
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
