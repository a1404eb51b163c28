"""Flow-GRPO and DiffusionNFT side by side at equal wall clock, the same reward (issue 15).

    python bench/equal_wall.py --update nft --seed 0 --minutes 22 --out runs/equal_wall &
    python bench/equal_wall.py --update flow_grpo --seed 0 --minutes 22 --out runs/equal_wall
    python bench/equal_wall.py --summarize --seed 0 --out runs/equal_wall

The two updates train at the same time, one thread each, so both see the same load, for the same
``train.max_minutes``: NFT with ``toy_nft_verifiable``, Flow-GRPO with ``toy_verifiable`` (the same
verifiable reward; Flow-GRPO's SDE sampler at CFG 7, its update), both evaluated every ``--eval-every``
iterations (inside the budget; the two take about the same time an iteration on this machine) on the same
training-distribution set with the same noise (``toy_train_eval``, 8 samples, 20-step ODE, CFG 3), then on
all 67 held-out prompts x 8 (``bench/nft_proof.py``'s evaluation; ``--base-from`` copies the cached base
evaluations of a proof folder). No image grids in either run.

The table per update: the change in strict accuracy on both evaluation sets, training samples per second,
the drift from the base as the mean squared velocity difference E||v_lora - v_base||^2 on the same inputs
for both updates (x_t = (1 - t) x0 + t eps, x0 the base's own samples for the training-distribution
prompts, t on the 10-step grid, conditional velocity; Flow-GRPO's logged SDE KL has no NFT counterpart with
an ODE sampler), and the time to +5 points on the training-distribution set (the first evaluation at or above
base + 0.05; its time is the training wall time at that iteration, read from the logged per-iteration
times and scaled to the run's wall time, so evaluations are charged pro rata).
Writes ``OUT/summary_seedN.json``, ``OUT/summary_seedN.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from nft_proof import one_run  # noqa: E402

EVAL = [
    "eval.prompts=toy_train_eval",
    "eval.samples_per_prompt=8",
    "eval.num_steps=20",
    "eval.cfg_scale=3.0",
]


@torch.no_grad()
def velocity_drift(lora: Path, seed: int, samples: int = 2, steps: int = 10) -> float:
    """E||v_lora(x_t, t, c) - v_base(x_t, t, c)||^2 (mean over elements) on the training-distribution
    prompts, x0 the base's 20-step ODE samples at CFG 3, t each of the ``steps``-step grid's timesteps."""
    from solace.models.base import adapters_disabled
    from solace.models.lora import load_lora
    from solace.sampling.generate import generate
    from solace.toy.adapter import ToyAdapter
    from solace.toy.evaluate import eval_records

    ad = ToyAdapter()
    load_lora(ad.denoiser, str(lora), trainable=False)
    ad.denoiser.eval()
    prompts = [r.prompt for r in eval_records("toy_train_eval")]
    with adapters_disabled(ad.denoiser):
        # decoded images (clamped to [0, 1]) back to the model's latent range
        x0 = ad.encode_images(generate(ad, prompts, samples, 20, 3.0, seed + 4242, 64, progress=False))
    cond = ad.encode_prompts([p for p in prompts for _ in range(samples)])
    g = torch.Generator().manual_seed(seed + 4243)
    total, n = 0.0, 0
    for t in ad.sigmas(steps)[:-1].tolist():
        eps = torch.randn(x0.shape, generator=g)
        tt = torch.full((x0.shape[0],), t)
        x_t = (1 - t) * x0 + t * eps
        v = ad.velocity(x_t, tt, cond)
        with adapters_disabled(ad.denoiser):
            v0 = ad.velocity(x_t, tt, cond)
        total += float((v - v0).square().mean())
        n += 1
    return total / n


def time_to(rec: dict, run: Path, gain: float = 0.05) -> float | None:
    """Minutes of training until the first training-distribution evaluation >= base + ``gain``."""
    rows = list(csv.DictReader(open(run / "log.csv")))
    it_s = [sum(float(r[k]) for k in ("time/sampling", "time/reward", "time/update")) for r in rows]
    scale = rec["train_wall_s"] / sum(it_s)
    base = rec["evals"][0]["strict"]
    for e in rec["evals"][1:]:
        if e["strict"] >= base + gain:
            return scale * sum(it_s[: e["iteration"]]) / 60
    return None


def row(name: str, rec: dict, run: Path, seed: int) -> dict:
    n_iter = rec["evals"][-1]["iteration"]
    rows = list(csv.DictReader(open(run / "log.csv")))
    return {
        "update": name,
        "seed": seed,
        "iterations": len(rows),
        "train_min": rec["train_wall_s"] / 60,
        "samples": rec["samples_per_iteration"] * len(rows),
        "samples_per_s": rec["samples_per_iteration"] * len(rows) / rec["train_wall_s"],
        "train_dist_base": rec["evals"][0]["strict"],
        "train_dist_final": rec["evals"][-1]["strict"],
        "train_dist_last_eval_iteration": n_iter,
        "heldout_base": rec["heldout_base"]["strict"],
        "heldout_final": rec["heldout_final"]["strict"],
        "velocity_drift": velocity_drift(run / "lora", seed),
        "logged_kl_last": float(rows[-1].get("train/kl") or 0.0),
        "minutes_to_plus5": time_to(rec, run),
    }


PRESETS = {"nft": ("toy_nft_verifiable", 64), "flow_grpo": ("toy_verifiable", 32)}


def train_one(a: argparse.Namespace) -> None:
    """Train and evaluate one update for ``--minutes`` (nft_proof's run record, ``proof.json``)."""
    for name in ("base_eval_cache.json", f"heldout_base_seed{a.seed}.json"):
        src, dst = a.base_from / name, a.out / name
        if src.exists() and not dst.exists():  # the same base evaluations (same noise): copy, don't recompute
            dst.write_text(src.read_text())
    config = PRESETS[a.update][0]
    ns = argparse.Namespace(
        config=config, out=a.out, threads=a.threads, samples=8, steps=20, cfg=3.0,
        overrides=[*EVAL, f"train.max_minutes={a.minutes}", "train.iterations=1000", "eval.image_every=0",
                   f"eval.every={a.eval_every}", "train.checkpoint_every=20", *a.overrides],
    )  # fmt: skip
    one_run(ns, a.update, a.seed)


def summarize(a: argparse.Namespace) -> None:
    rows = []
    for update, (_, per_it) in PRESETS.items():
        run = a.out / update / f"seed{a.seed}"
        rec = json.loads((run / "proof.json").read_text())
        rec["samples_per_iteration"] = per_it
        rows.append(row(update, rec, run, a.seed))
    lines = [
        "| seed | update | iterations | train min | samples/s | train-dist base -> final (Δ) "
        "| held-out base -> final (Δ) | velocity drift E‖Δv‖² | min to +5 (train-dist) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t5 = "not reached" if r["minutes_to_plus5"] is None else f"{r['minutes_to_plus5']:.1f}"
        lines.append(
            f"| {r['seed']} | {r['update']} | {r['iterations']} | {r['train_min']:.1f} | "
            f"{r['samples_per_s']:.2f} | "
            f"{r['train_dist_base']:.3f} -> {r['train_dist_final']:.3f} "
            f"({r['train_dist_final'] - r['train_dist_base']:+.3f}) | {r['heldout_base']:.3f} -> "
            f"{r['heldout_final']:.3f} ({r['heldout_final'] - r['heldout_base']:+.3f}) | "
            f"{r['velocity_drift']:.2e} | {t5} |"
        )
    (a.out / f"summary_seed{a.seed}.md").write_text("\n".join(lines) + "\n")
    (a.out / f"summary_seed{a.seed}.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", choices=tuple(PRESETS), help="train this update (one process each)")
    ap.add_argument("--summarize", action="store_true", help="tabulate the seed's two finished runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=22.0, help="train.max_minutes of both runs")
    ap.add_argument("--out", type=Path, default=Path("runs/equal_wall"))
    ap.add_argument("--base-from", type=Path, default=Path("runs/nft_v2"), help="cached base evaluations")
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*", help="key=value for the run")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.update:
        train_one(a)
    if a.summarize:
        summarize(a)


if __name__ == "__main__":
    main()
