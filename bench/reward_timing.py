"""Time of one toy training iteration, split into sampling / reward / update, and the self-confidence reward
pass against the bare batched forwards it needs (goal: reward pass <= 1.10x the bare forwards).

    python bench/reward_timing.py --iterations 4 --repeats 5

1. Runs ``configs/toy.yaml`` (the main job: self-confidence, G = 16, K = 8, 10 steps, 2 prompts per
   iteration) for ``--iterations`` iterations without evaluation and reports the median of each part of the
   iteration (the first iteration is dropped as warm-up).
2. For one iteration's 32 samples, times ``SelfConfidenceScorer.scores`` (probe drawing, re-noising,
   G*K*|T| forwards in chunks of ``max_batch`` rows, MSE, log) against the same number of forwards with
   every input prepared beforehand (only ``adapter.velocity`` on chunks of the same size is timed).
Medians of ``--repeats``; threads set explicitly. Writes ``bench/results/reward_timing.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from solace.rewards.self_confidence import renoise
from solace.trainer.config import load_config
from solace.trainer.trainer import Trainer

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(
            "configs/toy.yaml",
            [f"train.output_dir={d}", f"train.iterations={a.iterations}", "train.report=false",
             "eval.every=0", "eval.image_every=0", f"train.checkpoint_every={a.iterations}",
             f"train.threads={a.threads}"],
        )  # fmt: skip
        tr = Trainer(cfg)
        tr.train()
        hist = tr.history[1:]
        split = {k: statistics.median(h[f"time/{k}"] for h in hist) for k in ("sampling", "reward", "update")}
        split["total"] = sum(split.values())

        # the reward pass of one iteration's samples vs the bare forwards it needs
        ro = tr.sample_rollout(0)
        z0 = ro.z0
        G, sc = cfg.sampling.group_size, cfg.reward.self_confidence
        groups = torch.arange(z0.shape[0]) // G
        seeds = list(range(int(groups.max()) + 1))
        confidence = tr.scoring.rewards.components["self_confidence"]
        t = confidence.timesteps(tr.ctx.sigmas)[1]

        def reward_pass() -> None:
            confidence.scorer.scores(tr.adapter, z0, ro.cond, ro.null, t, groups, seeds)

        K, T, B = sc.num_probes, t.numel(), z0.shape[0]
        n = B * T * K
        idx = torch.arange(B).repeat_interleave(T * K)
        t_flat = t.repeat_interleave(K).repeat(B)
        eps = torch.randn(n, *z0.shape[1:])
        chunks = []
        for s in range(0, n, sc.max_batch):
            e = slice(s, min(s + sc.max_batch, n))
            chunks.append((renoise(z0[idx[e]], t_flat[e], eps[e]), t_flat[e], ro.cond.index(idx[e])))

        def bare() -> None:
            for zt, tt, c in chunks:
                tr.adapter.velocity(zt, tt, c)

        def median_time(fn) -> float:
            times = []
            with torch.no_grad():
                fn()  # warm-up
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
            return statistics.median(times)

        rp, bf = median_time(reward_pass), median_time(bare)
    res = {
        "threads": a.threads,
        "iteration_split_s": split,
        "reward_pass_s": rp,
        "bare_forwards_s": bf,
        "ratio": rp / bf,
        "forwards": n,
        "max_batch": sc.max_batch,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reward_timing.json").write_text(json.dumps(res, indent=1))
    print("| part of one iteration (32 samples) | median s |\n|---|---|")
    for k, v in split.items():
        print(f"| {k} | {v:.2f} |")
    print(f"\nreward pass {rp:.2f} s vs bare forwards {bf:.2f} s ({n} rows in chunks of {sc.max_batch}): "
          f"{rp / bf:.3f}x")  # fmt: skip


if __name__ == "__main__":
    main()
