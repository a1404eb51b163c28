"""Benchmarks of the shipped toy base model: held-out accuracy, timings, reward/foreground correlation.

    python bench/toy_base.py accuracy --steps 40 --cfg 7.0 --samples 16
    python bench/toy_base.py cfg-scan --scales 1.5,3,5,7 --steps 40 --samples 8 --per-category 2
    python bench/toy_base.py timing
    python bench/toy_base.py foreground --prompts 24 --samples 16
    python bench/toy_base.py evaluator --scenes 4000
    python bench/toy_base.py failures --steps 40 --cfg 7.0 --samples 8   (why strict fails, per category)

``--weights FILE`` measures other toy weights than the shipped base.

Each writes a JSON file under bench/results/ and prints a Markdown table. Threads are set explicitly
(``--threads``, default 2); timings are medians of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from solace.rewards.scorer import SelfConfidenceScorer
from solace.sampling.generate import generate
from solace.sampling.sampler import sample
from solace.toy.adapter import ToyAdapter
from solace.toy.evaluate import evaluate_records
from solace.toy.evaluator import detect, expected_objects, format_table, score_detections, segment, to_uint8
from solace.toy.world import CATEGORIES, load_heldout

RESULTS = Path(__file__).parent / "results"


def _subset(per_category: int):
    held = load_heldout()
    if not per_category:
        return list(held)
    return [r for c in CATEGORIES for r in [x for x in held if x.tag == c][:per_category]]


def cmd_accuracy(a) -> dict:
    ad = ToyAdapter(weights=a.weights or None)
    recs = _subset(a.per_category)
    t0 = time.perf_counter()
    res = evaluate_records(ad, recs, a.samples, a.steps, a.cfg, seed=a.seed, batch_size=64)
    out = {
        "steps": a.steps,
        "cfg": a.cfg,
        "samples_per_prompt": a.samples,
        "prompts": len(recs),
        "seed": a.seed,
        "summary": res["summary"],
        "seconds": time.perf_counter() - t0,
    }
    print(format_table(res["summary"], f"toy base, {a.steps} steps, CFG {a.cfg}, {a.samples} x {len(recs)}"))
    return out


def cmd_cfg_scan(a) -> dict:
    ad = ToyAdapter(weights=a.weights or None)
    recs = _subset(a.per_category)
    rows = {}
    for s in [float(x) for x in a.scales.split(",")]:
        res = evaluate_records(ad, recs, a.samples, a.steps, s, seed=a.seed, progress=False)
        rows[s] = res["summary"]
        cats = " ".join(f"{c}={v['strict']:.2f}" for c, v in res["summary"]["categories"].items())
        print(
            f"CFG {s}: strict {res['summary']['overall']['strict']:.3f} "
            f"lenient {res['summary']['overall']['lenient']:.3f}  {cats}"
        )
    return {"steps": a.steps, "samples_per_prompt": a.samples, "prompts": len(recs), "scan": rows}


def _median_time(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


@torch.no_grad()
def cmd_timing(a) -> dict:
    ad = ToyAdapter(weights=a.weights or None)
    cond = ad.encode_prompts(["a photo of a red circle and a blue square"] * 128)
    out = {}
    for b in (16, 128):
        z = torch.randn(b, *ad.latent_shape())
        t = torch.rand(b)
        c = cond.index(slice(0, b))
        out[f"forward_b{b}_s"] = _median_time(lambda z=z, t=t, c=c: ad.velocity(z, t, c), a.repeats)
    null = ad.encode_prompts([""]).index([0] * 16)
    c16 = cond.index(slice(0, 16))
    sig = ad.sigmas(10)
    noise = torch.randn(16, *ad.latent_shape())
    out["sample_group16_10steps_cfg_s"] = _median_time(
        lambda: sample(ad, c16, null, sig, noise, cfg_scale=7.0, noise_level=0.7), a.repeats
    )
    for k, v in out.items():
        print(f"| {k} | {v * 1000:.1f} ms |")
    return out


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


@torch.no_grad()
def cmd_foreground(a) -> dict:
    """Spearman correlation between the paper's self-confidence reward and the foreground pixel count."""
    ad = ToyAdapter(weights=a.weights or None)
    held = list(load_heldout())
    recs = [held[i] for i in np.linspace(0, len(held) - 1, a.prompts).round().astype(int)]
    sig = ad.sigmas(10)
    probe_t = sig[:-1]
    scorer = SelfConfidenceScorer()  # the paper's form: K = 8, conditional velocity, uniform weights
    rewards, fg, nobj, within = [], [], [], []
    for i, r in enumerate(recs):
        imgs = generate(
            ad, [r.prompt], a.samples, 10, a.cfg, seed=a.seed + i, noise_level=0.7, progress=False
        )
        z0 = ad.encode_images(imgs)
        cond = ad.encode_prompts([r.prompt]).index([0] * a.samples)
        # K = 8 antithetic probes shared by the group, seeded per prompt
        R, _ = scorer.score_group(ad, z0, cond, probe_t, a.seed + i)
        f = np.array([(segment(x) >= 0).sum() for x in to_uint8(imgs)], dtype=float)
        rewards.append(R.numpy())
        fg.append(f)
        nobj.append([len(detect(x)) for x in to_uint8(imgs)])
        if f.std() > 0:
            within.append(_spearman(R.numpy(), f))
    R, F = np.concatenate(rewards), np.concatenate(fg)
    out = {
        "prompts": len(recs),
        "samples_per_prompt": a.samples,
        "cfg": a.cfg,
        "steps": 10,
        "sde_noise": 0.7,
        "spearman_pooled": _spearman(R, F),
        "spearman_within_group_mean": float(np.mean(within)),
        "spearman_reward_vs_objects_pooled": _spearman(R, np.concatenate(nobj).astype(float)),
        "mean_foreground_px": float(F.mean()),
    }
    print(json.dumps(out, indent=2))
    return out


def failure_reason(dets, rec) -> str:
    """Why a sample fails the strict rule, in the order the evaluator checks it."""
    expected = expected_objects(rec)
    if any(d.shape == "unknown" for d in dets):
        return "unknown blob"
    if len(dets) < expected:
        return "empty" if not dets else "too few objects"
    if len(dets) > expected:
        return "too many objects"
    if sorted(d.shape for d in dets) != sorted(
        x["class"] for x in rec.include for _ in range(int(x["count"]))
    ):
        return "wrong shape"
    if "color" in rec.include[0]:
        colors = sorted(x["color"] for x in rec.include)
        return (
            "wrong colours"
            if sorted(d.color for d in dets) != colors
            else "colours bound to the wrong shapes"
        )
    return "wrong relation"


def cmd_failures(a) -> dict:
    """Count the strict failures on the held-out set by reason, per category."""
    ad = ToyAdapter(weights=a.weights or None)
    recs = _subset(a.per_category)
    imgs = to_uint8(generate(ad, [r.prompt for r in recs], a.samples, a.steps, a.cfg, a.seed, 64))
    out: dict[str, dict[str, int]] = {c: {} for c in CATEGORIES}
    for i, img in enumerate(imgs):
        rec = recs[i // a.samples]
        dets = detect(img)
        why = "correct" if score_detections(dets, rec)["strict"] else failure_reason(dets, rec)
        out[rec.tag][why] = out[rec.tag].get(why, 0) + 1
    for c, v in out.items():
        print(f"{c}: " + ", ".join(f"{k} {n}" for k, n in sorted(v.items(), key=lambda kv: -kv[1])))
    return {"steps": a.steps, "cfg": a.cfg, "samples_per_prompt": a.samples, "reasons": out}


def cmd_evaluator(a) -> dict:
    """Exact evaluator on freshly rendered ground-truth scenes (every prompt of the toy world in turn)."""
    import random
    from collections import Counter

    from solace.toy.evaluator import score_image
    from solace.toy.render import render, scene_for
    from solace.toy.world import all_prompts

    ps = all_prompts()
    ok, tot = Counter(), Counter()
    for i in range(a.scenes):
        r = ps[(i * 7) % len(ps)]
        s = score_image(render(scene_for(r, random.Random(10_000 + i))), r)
        tot[r.tag] += 1
        ok[r.tag] += s["strict"]
    out = {
        "scenes": a.scenes,
        "strict": sum(ok.values()) / a.scenes,
        "per_category": {c: ok[c] / tot[c] for c in CATEGORIES if tot[c]},
    }
    print(json.dumps(out, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["accuracy", "cfg-scan", "timing", "foreground", "evaluator", "failures"])
    p.add_argument("--scenes", type=int, default=4000)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--scales", default="1.5,3,5,7")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--per-category", type=int, default=0)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="")
    p.add_argument("--weights", default="", help="toy weights to measure (default: the shipped base)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    fn = {
        "accuracy": cmd_accuracy,
        "cfg-scan": cmd_cfg_scan,
        "timing": cmd_timing,
        "evaluator": cmd_evaluator,
        "foreground": cmd_foreground,
        "failures": cmd_failures,
    }
    out = fn[a.what](a)
    out["threads"] = a.threads
    out["weights"] = a.weights or "shipped"
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = (
        a.what
        + (f"_{a.tag}" if a.tag else "")
        + (f"_s{a.steps}_cfg{a.cfg}" if a.what in ("accuracy", "failures") else "")
    )
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
