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
``-pixel_std`` and ``-foreground``. Issue 18's forms contrast S(c) with the prompt's minimal edits c' (the
toy world's exact single-attribute edits, at most 8 in their fixed order, as the ``edits`` variant trains),
all scored with the group's probes and timesteps: ``edits_mean``, ``edits_max`` and ``edits_lse_<tau>``
(:func:`solace.rewards.self_confidence.edit_contrast`).

    python bench/signal_report.py --variants paper,contrastive,empty_only,edits,-pixel_std,-foreground \
        --out bench/results/signal_edits

``--variants`` picks what is computed (``edits`` stands for every edit form); the samples depend only on
``--seed``, so rows of runs with the same seed compare. ``--categories`` scores only those categories' prompts
(each keeps its index in the full list, so its samples are the full run's); with ``--reuse DIR`` the other
prompts' scores come from an earlier run's ``raw.safetensors`` (same seed, group, CFG and probes; their
samples are drawn again and must give the recorded correctness, and their edits must be unchanged), so a
change that touches one category is re-measured at that category's cost:

    python bench/signal_report.py --variants paper,contrastive,empty_only,edits,-pixel_std,-foreground \
        --categories color_attr --reuse bench/results/signal_edits --out bench/results/signal_edits_cycled
 ``raw.safetensors`` keeps per sample: strict,
lenient, S_t(c), S_t(empty) and S_t of each edit (NaN-padded), for ``bench/edit_gap.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from solace.evaluation.analysis import auc
from solace.rewards.prompt_edits import candidate_edits
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer
from solace.rewards.self_confidence import aggregate, edit_contrast
from solace.sampling.generate import generate_group
from solace.toy.adapter import ToyAdapter
from solace.toy.evaluator import detect, score_detections, segment, to_uint8
from solace.toy.world import CATEGORIES, load_heldout

ALL_VARIANTS = (
    "paper",
    "cfg",
    "contrastive",
    "later_half",
    "empty_only",
    "released",
    "edits",
    "-pixel_std",
    "-foreground",
)
LSE_TAUS = (1.0, 0.1, 0.01)
MAX_EDITS = 8  # the edits variant's default max_edits


def edit_forms(s_c: torch.Tensor, s_e: torch.Tensor, ts: torch.Tensor) -> dict[str, torch.Tensor]:
    """R of every edit form from S_t(c) (G, T) and S_t(c') (G, E, T), uniform weights."""
    out = {f"edits_{m}": aggregate(edit_contrast(s_c, s_e, m), ts) for m in ("mean", "max")}
    for tau in LSE_TAUS:
        out[f"edits_lse_{tau:g}"] = aggregate(edit_contrast(s_c, s_e, "lse", tau), ts)
    return out


def check_batched_variant(ad, z0, cond, null, ts, one_group, seed, econd, s_c, s_e, K) -> None:
    """The trained ``edits`` variant (one batched pass over the edits) equals the forms computed here."""
    sc = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K, edits="mean"))
    got = sc.scores(ad, z0, cond, null, ts, one_group, [seed + 1], [econd])
    want = edit_contrast(s_c, s_e, "mean")
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def draw_group(ad: ToyAdapter, prompt: str, G: int, cfg: float, seed: int):
    """The group's samples (the training sampler: SDE, 10 steps, CFG), their images and exact scores."""
    cond1, null1 = ad.encode_prompts([prompt]), ad.encode_prompts([""])
    z0 = generate_group(ad, cond1, null1, G, 10, cfg, seed, "sde", batch_size=G)
    imgs = to_uint8(ad.decode(z0))
    return z0, imgs, [score_detections(detect(a), REC[prompt]) for a in imgs]


def blind_rewards(z0: torch.Tensor, imgs) -> dict[str, np.ndarray]:
    """The two prompt-blind baselines: less pixel spread, less foreground."""
    return {
        "-pixel_std": -z0.flatten(1).std(1).numpy(),
        "-foreground": -np.array([(segment(a) >= 0).sum() for a in imgs], dtype=float),
    }


def scored_forms(s_c: torch.Tensor, s_u: torch.Tensor | None, ts: torch.Tensor) -> dict[str, torch.Tensor]:
    """R of the paper's form, its later half and (given S_t(empty)) the contrastive and empty-prompt forms."""
    half = list(range(len(ts) // 2, len(ts)))
    out = {"paper": aggregate(s_c, ts), "later_half": aggregate(s_c[:, half], ts[half])}
    if s_u is not None:
        out |= {"contrastive": aggregate(s_c - s_u, ts), "empty_only": aggregate(s_u, ts)}
    return out


def kept(rewards: dict, variants) -> dict:
    return {
        k: rewards[k] for k in rewards if k in variants or (k.startswith("edits_") and "edits" in variants)
    }


@torch.no_grad()
def score_group(
    ad: ToyAdapter, prompt: str, G: int, cfg: float, K: int, seed: int, variants, first=False
) -> dict:
    ts = ad.sigmas(10)[:-1]
    cond = ad.encode_prompts([prompt]).index([0] * G)
    null = ad.encode_prompts([""]).index([0] * G)
    z0, imgs, sc = draw_group(ad, prompt, G, cfg, seed)
    one_group = torch.zeros(G, dtype=torch.long)
    paper = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K))
    half = list(range(len(ts) // 2, len(ts)))
    # the same group probes (seed + 1) for the conditional, empty-prompt, CFG-scored and edit forms
    s_c = paper.scores(ad, z0, cond, null, ts, one_group, [seed + 1])
    s_u = s_e = None
    if {"contrastive", "empty_only"} & set(variants):
        s_u = paper.scores(ad, z0, null, null, ts, one_group, [seed + 1])
    rewards = scored_forms(s_c, s_u, ts)
    if "cfg" in variants:
        s_cfg = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K, cfg_in_reward=True), cfg).scores(
            ad, z0, cond, null, ts, one_group, [seed + 1]
        )
        rewards["cfg"] = aggregate(s_cfg, ts)
    if "released" in variants:
        released = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K, probe_mode="per_sample_timestep"))
        s_rel = released.scores(ad, z0, cond, null, ts[half], one_group, [seed + 2])
        rewards["released"] = aggregate(s_rel, ts[half], "t(1-t)", standardize=True)
    edits: list[str] = []
    if "edits" in variants:
        edits = candidate_edits(prompt, REC[prompt].to_json(), limit=MAX_EDITS)
        econd = ad.encode_prompts(edits)
        s_e = torch.stack(
            [
                paper.scores(ad, z0, econd.index([j] * G), null, ts, one_group, [seed + 1])
                for j in range(len(edits))
            ],
            1,
        )
        if first:
            check_batched_variant(ad, z0, cond, null, ts, one_group, seed, econd, s_c, s_e, K)
        rewards |= edit_forms(s_c, s_e, ts)
    rewards = {k: v.numpy() for k, v in rewards.items()} | blind_rewards(z0, imgs)
    return {
        "strict": np.array([s["strict"] for s in sc]),
        "lenient": np.array([s["lenient"] for s in sc]),
        "S_t": s_c.numpy(),
        "S_u": None if s_u is None else s_u.numpy(),
        "S_e": None if s_e is None else s_e.numpy(),
        "edits": edits,
        "rewards": kept(rewards, variants),
    }


REUSABLE = ("paper", "later_half", "contrastive", "empty_only", "edits", "-pixel_std", "-foreground")


class ReuseError(ValueError):
    """An earlier run's scores do not belong to this run's samples."""


def load_reuse(path: Path, a: argparse.Namespace) -> dict[str, dict]:
    """An earlier run's per-sample scores by prompt (``raw.safetensors`` + ``raw_groups.json``), after
    checking that it drew its samples with this run's seed, group size, CFG and probe count."""
    files = [path / "signal.json", path / "raw.safetensors", path / "raw_groups.json"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ReuseError(f"--reuse: {', '.join(missing)} not found; point it at a signal_report --out folder")
    settings = json.loads(files[0].read_text())["settings"]
    for key in ("seed", "group", "cfg", "probes"):
        if settings[key] != getattr(a, key):
            raise ReuseError(
                f"--reuse: {path} was run with --{key} {settings[key]}, this run has {getattr(a, key)}; "
                f"use the same --{key} (the reused scores belong to its samples)"
            )
    raw = load_file(str(files[1]))
    out = {}
    for j, g in enumerate(json.loads(files[2].read_text())):
        rows = raw["group"] == j
        n_edits = len(g["edits"]) if np.isfinite(raw["S_e"][rows][:, : len(g["edits"])]).all() else 0
        out[g["prompt"]] = {
            "tag": g["tag"],
            "edits": g["edits"] if n_edits else [],
            "strict": raw["strict"][rows].astype(np.float64),
            "lenient": raw["lenient"][rows].astype(np.float64),
            "S_t": raw["S_c"][rows],
            "S_u": None if np.isnan(raw["S_u"][rows]).all() else raw["S_u"][rows],
            "S_e": raw["S_e"][rows][:, :n_edits] if n_edits else None,
        }
    return out


@torch.no_grad()
def reuse_group(ad: ToyAdapter, prompt: str, G: int, cfg: float, seed: int, variants, stored: dict) -> dict:
    """A group's rewards from an earlier run's scores: its samples are drawn again (cheap: no scoring) for
    the exact correctness, which must match the recorded one, and the prompt-blind baselines."""
    z0, imgs, sc = draw_group(ad, prompt, G, cfg, seed)
    strict = np.array([s["strict"] for s in sc], dtype=np.float64)
    if not np.array_equal(strict, stored["strict"]):
        raise ReuseError(
            f"--reuse: {prompt!r} draws other samples than the reused run recorded (strict {strict.tolist()} "
            f"vs {stored['strict'].tolist()}); rescore it (add its category to --categories)"
        )
    ts = ad.sigmas(10)[:-1]
    s_c = torch.from_numpy(stored["S_t"])
    s_u = None
    if {"contrastive", "empty_only"} & set(variants):
        if stored["S_u"] is None:
            raise ReuseError(
                f"--reuse: the reused run has no S(empty) for {prompt!r}; drop contrastive/empty_only"
            )
        s_u = torch.from_numpy(stored["S_u"])
    rewards = scored_forms(s_c, s_u, ts)
    if "edits" in variants:
        now = candidate_edits(prompt, REC[prompt].to_json(), limit=MAX_EDITS)
        if stored["S_e"] is None or sorted(now) != sorted(stored["edits"]):
            raise ReuseError(
                f"--reuse: {prompt!r}'s edits are not the reused run's ({len(now)} now); "
                "rescore it (add its category to --categories)"
            )
        rewards |= edit_forms(s_c, torch.from_numpy(stored["S_e"]), ts)
    rewards = {k: v.numpy() for k, v in rewards.items()} | blind_rewards(z0, imgs)
    return {
        "strict": strict,
        "lenient": np.array([s["lenient"] for s in sc], dtype=np.float64),
        "S_t": stored["S_t"],
        "S_u": stored["S_u"],
        "S_e": stored["S_e"],
        "edits": stored["edits"],
        "rewards": kept(rewards, variants),
        "reused": True,
    }


def save_raw(groups: list[dict], out: Path) -> None:
    """Per-sample arrays of every group (S_e NaN-padded to MAX_EDITS) and the edit prompts (edit_gap.py)."""
    n = sum(len(g["strict"]) for g in groups)
    T = groups[0]["S_t"].shape[1]
    s_e = np.full((n, MAX_EDITS, T), np.nan, dtype=np.float32)
    s_u = np.full((n, T), np.nan, dtype=np.float32)
    i = 0
    for g in groups:
        G = len(g["strict"])
        if g["S_e"] is not None:
            s_e[i : i + G, : g["S_e"].shape[1]] = g["S_e"]
        if g["S_u"] is not None:
            s_u[i : i + G] = g["S_u"]
        i += G
    arrays = {
        "group": np.concatenate([np.full(len(g["strict"]), j) for j, g in enumerate(groups)]).astype(
            np.int64
        ),
        "strict": np.concatenate([g["strict"] for g in groups]).astype(np.float32),
        "lenient": np.concatenate([g["lenient"] for g in groups]).astype(np.float32),
        "S_c": np.concatenate([g["S_t"] for g in groups]).astype(np.float32),
        "S_u": s_u,
        "S_e": s_e,
    }
    save_file(arrays, str(out / "raw.safetensors"))
    meta = [{"prompt": g["prompt"], "tag": g["tag"], "edits": g["edits"]} for g in groups]
    (out / "raw_groups.json").write_text(json.dumps(meta, indent=1))


def _edit_form(g: dict, mode: str) -> np.ndarray:
    return edit_contrast(torch.from_numpy(g["S_t"]), torch.from_numpy(g["S_e"]), mode).numpy()


def per_timestep_auc(groups: list[dict], key: str, fn=None) -> list[float | None]:
    """Within-group AUC (strict) of one timestep's score alone, per probed timestep."""
    out = []
    for j in range(groups[0]["S_t"].shape[1]):
        xs = [auc((fn(g) if fn else g[key])[:, j], g["strict"].astype(bool)) for g in groups]
        xs = [x for x in xs if x is not None]
        out.append(float(np.mean(xs)) if xs else None)
    return out


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
    p.add_argument(
        "--variants", default=",".join(ALL_VARIANTS), help="comma list of " + ",".join(ALL_VARIANTS)
    )
    p.add_argument("--categories", default="", help="score only these categories' prompts (comma list)")
    p.add_argument(
        "--reuse", default="", help="take the other prompts' scores from this earlier --out folder"
    )
    a = p.parse_args()
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ALL_VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from {','.join(ALL_VARIANTS)}")
    scored = [c.strip() for c in a.categories.split(",") if c.strip()] or list(CATEGORIES)
    bad = [c for c in scored if c not in CATEGORIES]
    if bad:
        p.error(f"--categories: unknown {bad}; choose from {','.join(CATEGORIES)}")
    not_stored = [v for v in variants if v not in REUSABLE]
    if a.reuse and not_stored:
        p.error(f"--reuse: {not_stored} are not kept in raw.safetensors; drop them from --variants")
    torch.set_num_threads(a.threads)
    try:
        stored = load_reuse(Path(a.reuse), a) if a.reuse else {}
    except ReuseError as e:
        p.error(str(e))
    ad = ToyAdapter()
    held = list(load_heldout())
    recs = [held[i] for i in np.linspace(0, len(held) - 1, min(a.prompts, len(held))).round().astype(int)]
    REC.update({r.prompt: r for r in recs})
    t0 = time.perf_counter()
    groups = []
    first = True
    for i, r in enumerate(recs):
        seed = a.seed * 100_003 + i  # the prompt's index in the full list: the same samples with --categories
        try:
            if r.tag in scored:
                g = score_group(ad, r.prompt, a.group, a.cfg, a.probes, seed, variants, first=first)
                first = False
            elif r.prompt in stored:
                g = reuse_group(ad, r.prompt, a.group, a.cfg, seed, variants, stored[r.prompt])
            else:
                continue
        except ReuseError as e:
            p.error(str(e))
        g["tag"], g["prompt"] = r.tag, r.prompt
        groups.append(g)
        how = "reused" if g.get("reused") else "scored"
        print(f"[{i + 1}/{len(recs)}] {r.prompt}: strict {g['strict'].mean():.2f} ({how})", flush=True)
    if not groups:
        p.error(
            f"--categories: none of the {len(recs)} prompts is in {scored}; pick categories the prompts hold"
        )
    names = list(groups[0]["rewards"])
    res: dict = {
        "settings": vars(a),
        "seconds": time.perf_counter() - t0,
        "groups_scored": sum(not g.get("reused") for g in groups),
        "groups_reused": sum(bool(g.get("reused")) for g in groups),
        "variants": {},
    }
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
    per_t = per_timestep_auc(groups, "S_t")
    res["paper_auc_strict_per_timestep"] = per_t
    timestep_rows = {"paper": per_t}
    if "edits" in variants:
        for m in ("mean", "max"):
            timestep_rows[f"edits_{m}"] = per_timestep_auc(groups, "", partial(_edit_form, mode=m))
    if "contrastive" in variants:
        timestep_rows["contrastive"] = per_timestep_auc(groups, "", lambda g: g["S_t"] - g["S_u"])
    res["auc_strict_per_timestep"] = timestep_rows
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_raw(groups, out)
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
    lines += ["", "Within-group AUC (strict) of one timestep's score alone, per probed timestep t:", ""]
    lines += ["| form \\ t | " + " | ".join(ts_row) + " |", "|---" * (len(ts_row) + 1) + "|"]
    for name, row in timestep_rows.items():
        lines.append(f"| {name} | " + " | ".join("-" if x is None else f"{x:.3f}" for x in row) + " |")
    (out / "signal.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print("paper AUC per timestep:", [None if x is None else round(x, 3) for x in per_t])


if __name__ == "__main__":
    main()
