"""Flow-GRPO and DiffusionNFT side by side at equal wall clock, the same reward (issue 15).

    python bench/equal_wall.py --nft runs/nft_v2 --seeds 0,1,2 --out runs/equal_wall

For each seed, the NFT reward run of ``bench/nft_proof.py`` (``--nft``: its output folder) fixes the budget:
its training wall time (evaluations during training included). A Flow-GRPO run (``--config``, default
``toy_verifiable``: the same verifiable reward, Flow-GRPO's sampler and update) trains with
``train.max_minutes`` set to that time, under the same conditions the NFT run had (``--threads``; run it
beside one other single-thread job when the NFT runs ran two side by side), evaluating on the same
training-distribution set with the same noise (``toy_train_eval``, 8 samples, 20-step ODE, CFG 3) every
``--eval-every`` iterations, then on all 67 held-out prompts x 8 like the NFT run.

Per run the table gives: the change in strict accuracy on both evaluation sets, training samples per second,
the drift from the base as the mean squared velocity difference E||v_lora - v_base||^2 on the same inputs
for both updates (x_t = (1 - t) x0 + t eps, x0 the base's own samples for the training-distribution
prompts, t on the 10-step grid, conditional velocity; Flow-GRPO's logged SDE KL has no NFT counterpart with
an ODE sampler), and the time to +5 points on the training-distribution set (the first evaluation at or above
base + 0.05; its time is the training wall time at that iteration, read from the logged per-iteration
times and scaled to the run's wall time, so evaluations are charged pro rata).
Writes ``OUT/summary.json``, ``OUT/summary.md``.
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
    "data.eval_prompts=toy_train_eval",
    "train.eval_samples_per_prompt=8",
    "sampling.eval_num_steps=20",
    "sampling.eval_cfg_scale=3.0",
]


@torch.no_grad()
def velocity_drift(lora: Path, seed: int, samples: int = 2, steps: int = 10) -> float:
    """E||v_lora(x_t, t, c) - v_base(x_t, t, c)||^2 (mean over elements) on the training-distribution
    prompts, x0 the base's 20-step ODE samples at CFG 3, t each of the ``steps``-step grid's timesteps."""
    from solace.evaluation.toy_eval import eval_records, generate
    from solace.models.base import adapters_disabled
    from solace.models.lora import load_lora
    from solace.models.toy import ToyAdapter

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nft", type=Path, required=True, help="bench/nft_proof.py output folder")
    ap.add_argument("--config", default="toy_verifiable", help="the Flow-GRPO preset")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/equal_wall"))
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summarize-only", action="store_true", help="only tabulate finished runs")
    ap.add_argument("overrides", nargs="*", help="key=value for every Flow-GRPO run")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(x) for x in a.seeds.split(",")]
    rows = []
    for s in seeds:
        nft = json.loads((a.nft / "reward" / f"seed{s}" / "proof.json").read_text())
        nft["samples_per_iteration"] = 64
        cache = a.nft / "base_eval_cache.json"
        held = a.nft / f"heldout_base_seed{s}.json"
        for src in (cache, held):  # the same base evaluations (same noise): copy, don't recompute
            dst = a.out / src.name
            if src.exists() and not dst.exists():
                dst.write_text(src.read_text())
        ns = argparse.Namespace(
            config=a.config, out=a.out, threads=a.threads, samples=8, steps=20, cfg=3.0,
            overrides=[*EVAL, f"train.max_minutes={nft['train_wall_s'] / 60:.3f}", "train.iterations=1000",
                       f"train.eval_every={a.eval_every}", "train.checkpoint_every=25", *a.overrides],
        )  # fmt: skip
        run = a.out / "reward" / f"seed{s}"
        if a.summarize_only and not (run / "proof.json").exists():
            continue
        grpo = one_run(ns, "reward", s)
        grpo["samples_per_iteration"] = 32
        rows.append(row("nft", nft, a.nft / "reward" / f"seed{s}", s))
        rows.append(row("flow_grpo", grpo, run, s))
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
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    (a.out / "summary.json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
