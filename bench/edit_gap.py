"""Does the toy base discriminate better than it generates?

Per category, three figures:

* **generation**: the base's strict accuracy on the signal report's samples (held-out prompts x 16, the
  training sampler: SDE, 10 steps, CFG 7);
* **discrimination** on exact ground-truth renders of each prompt's scene (the toy renderer, seeds
  0..N-1, kept only where the evaluator reads them correct) and on the base's own correct samples: how
  often the model's self-confidence R(x | c) (Eqs. 12-14, uniform weights, K probes shared by c and every
  edit, the sampler's 10 timesteps) is higher under the true prompt c than under a minimal edit c'
  (``pairwise``; chance 0.5), and how often c beats *every* edit (``all edits``: the image classified
  right among c and its edits; chance 1 / (1 + E)).

Where discrimination exceeds generation, the model knows more than it draws and self-reward has room.

    python bench/signal_report.py --variants paper,contrastive,empty_only,edits,-pixel_std,-foreground \\
        --out bench/results/signal_edits          # the samples, their S_t under c and each edit
    python bench/edit_gap.py --signal bench/results/signal_edits --out bench/results/edit_gap

The edits are those the ``edits`` reward variant trains against (at most 8 in the fixed order of
:func:`solace.rewards.prompt_edits.candidate_edits`); per-kind rows use :func:`solace.toy.edits.toy_edits`'s
kinds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from solace.rewards.prompt_edits import KINDS
from solace.rewards.scorer import SelfConfidenceCfg, SelfConfidenceScorer
from solace.rewards.self_confidence import aggregate
from solace.sampling.generate import generate_group
from solace.toy.adapter import ToyAdapter
from solace.toy.edits import toy_edits
from solace.toy.evaluator import detect, score_detections
from solace.toy.render import render_prompt
from solace.toy.world import CATEGORIES, PromptRecord, load_heldout


def pair_outcomes(r_c: np.ndarray, r_e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N,) R under c and (N, E) R under each edit (NaN where a prompt has fewer edits) ->
    pairwise wins (N, E) as 1 / 0.5 (tie) / 0 / NaN and all-edits wins (N,) as 1 / 0."""
    valid = ~np.isnan(r_e)
    diff = r_c[:, None] - np.where(valid, r_e, 0.0)
    pw = np.where(diff > 0, 1.0, np.where(diff == 0, 0.5, 0.0))
    pw[~valid] = np.nan
    best_edit = np.where(valid, r_e, -np.inf).max(1)
    return pw, (r_c > best_edit).astype(float)


@torch.no_grad()
def ground_truth_scores(ad: ToyAdapter, rec: PromptRecord, edits: list[str], renders: int, K: int, seed: int):
    """R (n,) under the prompt and (n, E) under each edit of its exact ground-truth renders that the
    evaluator reads correct (seeds 0..renders-1), with one set of probes for the prompt's renders."""
    z0 = gt_latents(ad, rec, renders)
    if z0 is None:
        return None
    r = r_under(ad, z0, [rec.prompt, *edits], K, seed)
    return r[:, 0], r[:, 1:]


def gt_latents(ad: ToyAdapter, rec: PromptRecord, renders: int) -> torch.Tensor | None:
    """Latents of the ground-truth renders (seeds 0..renders-1) the evaluator reads correct; None if none."""
    imgs = [render_prompt(rec, s) for s in range(renders)]
    imgs = [a for a in imgs if score_detections(detect(a), rec)["strict"]]
    if not imgs:
        return None
    return ad.encode_images(torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0)


@torch.no_grad()
def own_samples(ad: ToyAdapter, prompt: str, G: int, seed: int, cfg: float = 7.0) -> torch.Tensor:
    """The signal report's G samples of ``prompt`` again (its sampler call and seed: SDE, 10 steps)."""
    cond, null = ad.encode_prompts([prompt]), ad.encode_prompts([""])
    return generate_group(ad, cond, null, G, 10, cfg, seed, "sde", batch_size=G)


@torch.no_grad()
def r_under(ad: ToyAdapter, z0: torch.Tensor, prompts: list[str], K: int, seed: int) -> np.ndarray:
    """R (n, len(prompts)) of ``z0`` under each prompt, one set of group probes from ``seed`` (group-mode
    probes do not depend on the number of rows, so a subset of a group's rows gets the group's probes)."""
    ts = ad.sigmas(10)[:-1]
    n = z0.shape[0]
    one = torch.zeros(n, dtype=torch.long)
    sc = SelfConfidenceScorer(SelfConfidenceCfg(num_probes=K))
    conds = ad.encode_prompts(prompts)
    r = [
        aggregate(sc.scores(ad, z0, conds.index([j] * n), None, ts, one, [seed]), ts)
        for j in range(len(prompts))
    ]
    return torch.stack(r, 1).numpy()


def extra_pass(
    ad: ToyAdapter, raw: dict, groups: list[dict], held: dict, renders: int, K: int, sig_seed: int
):
    """The edits the shipped variant's first-``max_edits`` order leaves out (on the toy world: the binding
    swap and the shape edits of ``color_attr``), on the same GT renders / probes and on the base's own correct
    samples (regenerated; their R(c) is checked against the signal report's). Returns per-kind pairwise wins
    and, per category, all-edits wins against every edit."""
    ts = ad.sigmas(10)[:-1]
    out: dict = {"gt": defaultdict(list), "own": defaultdict(list), "gt_all": defaultdict(list)}
    out["own_all"] = defaultdict(list)
    for gi, g in enumerate(groups):
        rec = held[g["prompt"]]
        kinds = edit_kinds(rec)
        extras = [e for e in kinds if e not in g["edits"]]
        if not extras:
            continue
        z_gt = gt_latents(ad, rec, renders)
        m = raw["group"] == gi
        strict = raw["strict"][m].astype(bool)
        sets = []
        if z_gt is not None:
            sets.append(("gt", z_gt, 1_000_003 + gi, None))
        if strict.any():
            z0 = own_samples(ad, rec.prompt, len(strict), sig_seed * 100_003 + gi)[torch.from_numpy(strict)]
            r_c = aggregate(torch.from_numpy(raw["S_c"][m][strict]), ts).numpy()
            sets.append(("own", z0, sig_seed * 100_003 + gi + 1, r_c))
        for name, z0, seed, want in sets:
            r_first = r_under(ad, z0, [rec.prompt, *g["edits"]], K, seed) if name == "gt" else None
            r = r_under(ad, z0, [rec.prompt, *extras], K, seed)
            if want is not None:  # the same samples and probes as the signal report
                assert np.allclose(r[:, 0], want, atol=1e-4), float(np.abs(r[:, 0] - want).max())
                e8 = raw["S_e"][m][strict][:, : len(g["edits"])].mean(-1)
                r_first = np.concatenate([want[:, None], e8], 1)
            pw, _ = pair_outcomes(r[:, 0], r[:, 1:])
            for j, e in enumerate(extras):
                out[name][kinds[e]].extend(pw[:, j].tolist())
            every = np.concatenate([r_first[:, 1:], r[:, 1:]], 1)
            out[f"{name}_all"][rec.tag].extend((r[:, 0] > every.max(1)).astype(float).tolist())
        print(f"[extra {gi + 1}/{len(groups)}] {rec.prompt}: {len(extras)} more edits", flush=True)
    return {
        k: {c: {"rate": float(np.mean(v)), "n": len(v)} for c, v in d.items() if v} for k, d in out.items()
    }


def signal_samples(sig: Path) -> tuple[dict, list[dict]]:
    """The signal report's per-sample arrays and per-group prompt/edits."""
    raw = load_file(str(sig / "raw.safetensors"))
    return raw, json.loads((sig / "raw_groups.json").read_text())


def edit_kinds(rec: PromptRecord) -> dict[str, str]:
    return {e.prompt: e.kind for e in toy_edits(rec)}


def tally(rows: list[tuple[str, list[str], np.ndarray, np.ndarray]]) -> dict:
    """Per category and per kind: pairwise and all-edits win rates with counts and the all-edits chance.
    ``rows``: (category, edit kinds, pairwise (n, E), all-edits (n,)) per prompt."""
    cat: dict = defaultdict(lambda: {"pw": [], "all": [], "chance": []})
    kind: dict = defaultdict(list)
    for tag, kinds, pw, al in rows:
        E = len(kinds)
        cat[tag]["pw"].extend(pw[:, :E].ravel().tolist())
        cat[tag]["all"].extend(al.tolist())
        cat[tag]["chance"].extend([1.0 / (1 + E)] * len(al))
        for j, k in enumerate(kinds):
            kind[k].extend(pw[:, j].tolist())
    out = {"categories": {}, "kinds": {}}
    for c in CATEGORIES:
        if cat[c]["all"]:
            out["categories"][c] = {
                "pairwise": float(np.mean(cat[c]["pw"])),
                "all_edits": float(np.mean(cat[c]["all"])),
                "all_edits_chance": float(np.mean(cat[c]["chance"])),
                "images": len(cat[c]["all"]),
                "pairs": len(cat[c]["pw"]),
            }
    for k in KINDS:
        if kind[k]:
            out["kinds"][k] = {"pairwise": float(np.mean(kind[k])), "pairs": len(kind[k])}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--signal", default="bench/results/signal_edits")
    p.add_argument("--renders", type=int, default=4, help="ground-truth renders per prompt (seeds 0..N-1)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="bench/results/edit_gap")
    p.add_argument(
        "--extra-only", action="store_true", help="add the extra-edits pass to an existing gap.json"
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    sig = Path(a.signal)
    raw, groups = signal_samples(sig)
    held = {r.prompt: r for r in load_heldout()}
    ad = ToyAdapter()
    ts = ad.sigmas(10)[:-1]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    sig_seed = json.loads((sig / "signal.json").read_text())["settings"]["seed"]
    if a.extra_only:
        res = json.loads((out / "gap.json").read_text())
        res["beyond_max_edits"] = extra_pass(ad, raw, groups, held, a.renders, a.probes, sig_seed)
        return write(res, out)
    t0 = time.perf_counter()
    gen_rows: dict = defaultdict(list)
    gt_rows, own_rows = [], []
    for gi, g in enumerate(groups):
        rec, edits = held[g["prompt"]], g["edits"]
        kinds = [edit_kinds(rec).get(e, "?") for e in edits]
        m = raw["group"] == gi
        strict = raw["strict"][m].astype(bool)
        gen_rows[rec.tag].extend(strict.tolist())
        E = len(edits)
        r_c = aggregate(torch.from_numpy(raw["S_c"][m]), ts).numpy()
        r_e = torch.from_numpy(raw["S_e"][m][:, :E]).mean(-1).numpy()  # uniform weights: the mean over t
        if strict.any():
            own_rows.append((rec.tag, kinds, *pair_outcomes(r_c[strict], r_e[strict])))
        gt = ground_truth_scores(ad, rec, edits, a.renders, a.probes, 1_000_003 + gi)
        if gt is not None:
            gt_rows.append((rec.tag, kinds, *pair_outcomes(*gt)))
        print(
            f"[{gi + 1}/{len(groups)}] {rec.prompt}: {E} edits, {int(strict.sum())} correct samples",
            flush=True,
        )
    res = {
        "settings": vars(a),
        "seconds": time.perf_counter() - t0,
        "generation": {c: {"strict": float(np.mean(v)), "samples": len(v)} for c, v in gen_rows.items()},
        "ground_truth": tally(gt_rows),
        "correct_samples": tally(own_rows),
    }
    res["beyond_max_edits"] = extra_pass(ad, raw, groups, held, a.renders, a.probes, sig_seed)
    write(res, out)


def write(res: dict, out: Path) -> None:
    (out / "gap.json").write_text(json.dumps(res, indent=2))
    md = table(res)
    (out / "gap.md").write_text(md)
    plot(res, out / "gap.png")
    print(md)


def _fmt(d: dict | None, key: str) -> str:
    return "-" if d is None else f"{d[key]:.3f}"


def _cells(g: dict | None, o: dict | None) -> str:
    return f"{_fmt(g, 'rate')} | {g['n'] if g else 0} | {_fmt(o, 'rate')} | {o['n'] if o else 0}"


def table(res: dict) -> str:
    gt, own = res["ground_truth"], res["correct_samples"]
    lines = [
        "| category | generation (strict) | GT pairwise | GT all edits (chance) | own correct: pairwise | "
        "own correct: all edits (chance) | GT images / own correct |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CATEGORIES:
        if c not in res["generation"]:
            continue
        g, o = gt["categories"].get(c), own["categories"].get(c)
        lines.append(
            f"| {c} | {res['generation'][c]['strict']:.3f} | {_fmt(g, 'pairwise')} | {_fmt(g, 'all_edits')} "
            f"({_fmt(g, 'all_edits_chance')}) | {_fmt(o, 'pairwise')} | {_fmt(o, 'all_edits')} "
            f"({_fmt(o, 'all_edits_chance')}) | {g['images'] if g else 0} / {o['images'] if o else 0} |"
        )
    lines += ["", "Pairwise discrimination (true prompt above the edit) per edit kind:", ""]
    lines += ["| edit kind | GT renders | pairs | own correct samples | pairs |", "|---|---|---|---|---|"]
    for k in KINDS:
        g, o = gt["kinds"].get(k), own["kinds"].get(k)
        if g or o:
            lines.append(
                f"| {k} | {_fmt(g, 'pairwise')} | {g['pairs'] if g else 0} | {_fmt(o, 'pairwise')} | "
                f"{o['pairs'] if o else 0} |"
            )
    extra = res.get("beyond_max_edits")
    if extra:
        lines += [
            "",
            "Beyond the variant's first 8 edits (every edit of the prompt; on the toy world the binding swap",
            "and shape edits of color_attr): pairwise per kind, and all-edits against every edit:",
            "",
        ]
        lines += ["| | GT renders | n | own correct samples | n |", "|---|---|---|---|---|"]
        for k in KINDS:
            g, o = extra["gt"].get(k), extra["own"].get(k)
            if g or o:
                lines.append(f"| {k} (pairwise) | {_cells(g, o)} |")
        for c in CATEGORIES:
            g, o = extra["gt_all"].get(c), extra["own_all"].get(c)
            if g or o:
                lines.append(f"| {c}: all edits | {_cells(g, o)} |")
    return "\n".join(lines) + "\n"


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c in CATEGORIES if c in res["generation"]]
    bars = {
        "generation: strict accuracy": [res["generation"][c]["strict"] for c in cats],
        "discrimination, GT renders: all edits": [
            res["ground_truth"]["categories"].get(c, {}).get("all_edits", np.nan) for c in cats
        ],
        "discrimination, own correct samples: all edits": [
            res["correct_samples"]["categories"].get(c, {}).get("all_edits", np.nan) for c in cats
        ],
        "discrimination, GT renders: pairwise": [
            res["ground_truth"]["categories"].get(c, {}).get("pairwise", np.nan) for c in cats
        ],
    }
    chance = [res["ground_truth"]["categories"].get(c, {}).get("all_edits_chance", np.nan) for c in cats]
    fig, ax = plt.subplots(figsize=(10, 5.2))
    x = np.arange(len(cats))
    w = 0.2
    for i, (name, vals) in enumerate(bars.items()):
        ax.bar(x + (i - 1.5) * w, vals, w, label=name)
    ax.scatter(x - 0.5 * w, chance, marker="_", s=300, color="k", label="all-edits chance 1/(1+E)", zorder=3)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="pairwise chance 0.5")
    ax.set_xticks(x, cats)
    ax.set_ylim(0, 1)
    ax.set_title(
        "Toy base: does it discriminate (self-confidence vs minimal edits) better than it generates?"
    )
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


if __name__ == "__main__":
    main()
