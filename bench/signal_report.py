"""Signal report: does self-confidence track exact correctness on the shipped toy base (before any tuning)?

For held-out prompts x G samples drawn with the *training* sampler (SDE, 10 steps, CFG), it scores every
sample with the paper's reward and each variant, and reports

* within-group AUC against strict (and lenient) correctness: per group, the probability that a correct
  sample outscores an incorrect one (ties count 1/2), averaged over groups with both kinds; per category
  and, for the paper's reward, per timestep (which timesteps carry the signal);
* best-of-G accuracy (keep the highest-reward sample of each group) against a random pick and the oracle.

    python bench/signal_report.py --prompts 67 --group 16 --out bench/results/signal

Variants: ``paper`` (conditional velocity, uniform weights, probes shared by the group), ``cfg`` (scored with
the CFG velocity), ``later_half`` (the paper's form on the later half of the timesteps only),
``contrastive`` (S(c) - S(empty)), ``empty_only`` (S(empty): prompt-blind), ``released`` (the authors' code:
standardised S_t, t(1-t) weights, per-sample probes, later half), and two prompt-blind baselines,
``-pixel_std`` and ``-foreground``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from solace.evaluation.analysis import auc
from solace.models.toy import ToyAdapter
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer
from solace.rewards.self_confidence import aggregate
from solace.sampling.sampler import sample
from solace.toy.evaluator import detect, score_detections, segment, to_uint8
from solace.toy.world import CATEGORIES, load_heldout


@torch.no_grad()
def score_group(ad: ToyAdapter, prompt: str, G: int, cfg: float, K: int, seed: int) -> dict:
    sig = ad.sigmas(10)
    ts = sig[:-1]
    cond = ad.encode_prompts([prompt]).index([0] * G)
    null = ad.encode_prompts([""]).index([0] * G)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(G, *ad.latent_shape(), generator=gen)
    z0 = sample(
        ad, cond, null, sig, noise, cfg_scale=cfg, noise_level=0.7, generator=gen, keep_trajectory=False
    ).final
    one_group = torch.zeros(G, dtype=torch.long)
    paper = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K))
    # the same group probes (seed + 1) for the conditional, empty-prompt and CFG-scored forms
    s_c = paper.scores(ad, z0, cond, null, ts, one_group, [seed + 1])
    s_u = paper.scores(ad, z0, null, null, ts, one_group, [seed + 1])
    s_cfg = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K, cfg_in_reward=True), cfg).scores(
        ad, z0, cond, null, ts, one_group, [seed + 1]
    )
    half = list(range(len(ts) // 2, len(ts)))
    released = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K, probe_mode="per_sample_timestep"))
    s_rel = released.scores(ad, z0, cond, null, ts[half], one_group, [seed + 2])
    imgs = to_uint8(ad.decode(z0))
    sc = [score_detections(detect(a), REC[prompt]) for a in imgs]
    return {
        "strict": np.array([s["strict"] for s in sc]),
        "lenient": np.array([s["lenient"] for s in sc]),
        "S_t": s_c.numpy(),
        "rewards": {
            "paper": aggregate(s_c, ts).numpy(),
            "cfg": aggregate(s_cfg, ts).numpy(),
            "contrastive": aggregate(s_c - s_u, ts).numpy(),
            "later_half": aggregate(s_c[:, half], ts[half]).numpy(),
            "empty_only": aggregate(s_u, ts).numpy(),
            "released": aggregate(s_rel, ts[half], "t(1-t)", standardize=True).numpy(),
            "-pixel_std": -z0.flatten(1).std(1).numpy(),
            "-foreground": -np.array([(segment(a) >= 0).sum() for a in imgs], dtype=float),
        },
    }


REC: dict = {}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=67)
    p.add_argument("--group", type=int, default=16)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/signal")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    ad = ToyAdapter()
    held = list(load_heldout())
    recs = [held[i] for i in np.linspace(0, len(held) - 1, min(a.prompts, len(held))).round().astype(int)]
    REC.update({r.prompt: r for r in recs})
    t0 = time.perf_counter()
    groups = []
    for i, r in enumerate(recs):
        g = score_group(ad, r.prompt, a.group, a.cfg, a.probes, a.seed * 100_003 + i)
        g["tag"] = r.tag
        groups.append(g)
        print(f"[{i + 1}/{len(recs)}] {r.prompt}: strict {g['strict'].mean():.2f}", flush=True)
    names = list(groups[0]["rewards"])
    res: dict = {"settings": vars(a), "seconds": time.perf_counter() - t0, "variants": {}}
    for name in names:
        per_cat: dict[str, list[float]] = defaultdict(list)
        aucs, aucs_len, best, rand, oracle = [], [], [], [], []
        for g in groups:
            r = g["rewards"][name]
            x = auc(r, g["strict"].astype(bool))
            if x is not None:
                aucs.append(x)
                per_cat[g["tag"]].append(x)
            y = auc(r, g["lenient"].astype(bool))
            if y is not None:
                aucs_len.append(y)
            best.append(float(g["strict"][int(np.argmax(r))]))
            rand.append(float(g["strict"].mean()))
            oracle.append(float(g["strict"].any()))
        res["variants"][name] = {
            "auc_strict": float(np.mean(aucs)) if aucs else None,
            "auc_lenient": float(np.mean(aucs_len)) if aucs_len else None,
            "groups_with_both": len(aucs),
            "auc_strict_per_category": {c: float(np.mean(per_cat[c])) for c in CATEGORIES if per_cat[c]},
            "best_of_group_strict": float(np.mean(best)),
            "random_pick_strict": float(np.mean(rand)),
            "oracle_strict": float(np.mean(oracle)),
        }
    per_t = []
    for j in range(groups[0]["S_t"].shape[1]):
        xs = [auc(g["S_t"][:, j], g["strict"].astype(bool)) for g in groups]
        xs = [x for x in xs if x is not None]
        per_t.append(float(np.mean(xs)) if xs else None)
    res["paper_auc_strict_per_timestep"] = per_t
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "signal.json").write_text(json.dumps(res, indent=2))
    lines = [
        "| reward | AUC strict | AUC lenient | best-of-G strict | random pick | oracle |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in res["variants"].items():
        lines.append(
            f"| {name} | {v['auc_strict']:.3f} | {v['auc_lenient']:.3f} | {v['best_of_group_strict']:.3f} | "
            f"{v['random_pick_strict']:.3f} | {v['oracle_strict']:.3f} |"
        )
    cats = [c for c in CATEGORIES if any(c in v["auc_strict_per_category"] for v in res["variants"].values())]
    lines += ["", "Within-group AUC against strict correctness, per category:", ""]
    lines += ["| reward | " + " | ".join(cats) + " |", "|---" * (len(cats) + 1) + "|"]
    for name, v in res["variants"].items():
        pc = v["auc_strict_per_category"]
        lines.append(f"| {name} | " + " | ".join(f"{pc[c]:.3f}" if c in pc else "-" for c in cats) + " |")
    ts_row = [f"{float(t):.3f}" for t in ad.sigmas(10)[:-1]]
    lines += ["", "Paper reward, within-group AUC (strict) of S_t alone, per probed timestep t:", ""]
    lines += ["| t | " + " | ".join(ts_row) + " |", "|---" * (len(ts_row) + 1) + "|"]
    lines.append("| AUC | " + " | ".join("-" if x is None else f"{x:.3f}" for x in per_t) + " |")
    (out / "signal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("paper AUC per timestep:", [None if x is None else round(x, 3) for x in per_t])


if __name__ == "__main__":
    main()
