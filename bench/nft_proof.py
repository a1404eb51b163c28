"""The loop proven on a CPU (issue 15): a reward run beside its random-reward control, per seed.

    python bench/nft_proof.py --config toy_nft_verifiable --seeds 0,1,2 --out runs/nft_proof

For each seed, two ``solace train`` runs with identical settings, prompts and noise: the preset's reward,
and the uninformative ``random`` reward (the control: what the budget moves by itself). Each run evaluates
64 fresh prompts of the training distribution (``toy_train_eval``, 8 samples each, the preset's evaluation
steps and CFG) before, during and after training; afterwards the final LoRA and the base are evaluated on
all 67 held-out prompts x 8 with the same noise (paired). A run folder that finished is kept and one
killed part-way continues from its checkpoint (``--resume``; its record then says ``resumed`` and times
only the continuation), so a killed proof resumes. Writes ``OUT/summary.json``, ``OUT/summary.md``
(per seed: the change over the base of both runs on both sets and their difference) and
``OUT/curves.png`` (train-batch strict accuracy and both evaluations, both runs, one panel a seed).

Another reward beside the same controls: ``--config toy_nft --label solace_paper [overrides]`` writes
``OUT/solace_paper/seedN`` and ``summary_solace_paper.md``, and reuses ``OUT/control/seedN`` when it is there
(the control's reward is ``random`` whatever the preset's, so it is the same run when every other setting
is: pass the same overrides). ``--only reward|control`` runs one of the two, for two processes side by side.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from toy_training import evaluate, run_trainer  # noqa: E402

CONTROL = "reward.components=[{name: random, weight: 1.0}]"


def train(cfg: str, seed: int, run: Path, out: Path, threads: int, extra: list[str], resume: bool) -> float:
    """One ``solace train`` run; ``resume``: continue a run killed part-way from its checkpoint."""
    cmd = [
        sys.executable, "-m", "solace", "train", "--config", cfg, f"train.seed={seed}",
        f"train.output_dir={run}", f"eval.base_cache={out / 'base_eval_cache.json'}",
        f"train.threads={threads}", *(["--resume"] if resume else []), *extra,
    ]  # fmt: skip
    t0 = time.time()
    run_trainer(cmd, run)
    return time.time() - t0


def one_run(a: argparse.Namespace, cond: str, seed: int) -> dict:
    run = a.out / cond / f"seed{seed}"
    rec_path = run / "proof.json"
    if rec_path.exists():
        return json.loads(rec_path.read_text())
    extra = [*a.overrides, *([CONTROL] if cond == "control" else [])]
    resumed = (run / "checkpoints" / "latest").exists()  # then the wall times count this invocation only
    t0 = time.time()
    wall = train(a.config, seed, run, a.out, a.threads, extra, resumed)
    # the base's held-out evaluation, shared by a seed's runs; other evaluation settings, another file
    tag = "" if (a.samples, a.steps, a.cfg) == (8, 20, 3.0) else f"_n{a.samples}_s{a.steps}_c{a.cfg:g}"
    base_path = a.out / f"heldout_base_seed{seed}{tag}.json"
    if not base_path.exists():
        base_path.write_text(json.dumps(evaluate(None, a.samples, a.steps, a.cfg, seed + 999)))
    rec = {
        "condition": cond,
        "seed": seed,
        "resumed": resumed,
        "train_wall_s": wall,
        "evals": json.loads((run / "evals.json").read_text()),
        "heldout_base": json.loads(base_path.read_text()),
        "heldout_final": evaluate(str(run / "lora"), a.samples, a.steps, a.cfg, seed + 999),
        "train_strict": [float(r["train/strict_acc"]) for r in csv.DictReader(open(run / "log.csv"))],
    }
    rec["total_wall_s"] = time.time() - t0
    rec_path.write_text(json.dumps(rec, indent=1))
    return rec


def summarize(recs: dict[tuple[str, int], dict], seeds: list[int], out: Path, label: str = "reward") -> dict:
    rows = []
    for s in seeds:
        r, c = recs[(label, s)], recs[("control", s)]

        def d_train(x: dict) -> float:
            return x["evals"][-1]["strict"] - x["evals"][0]["strict"]

        def d_held(x: dict) -> float:
            return x["heldout_final"]["strict"] - x["heldout_base"]["strict"]

        rows.append(
            {
                "seed": s,
                "train_dist_base": r["evals"][0]["strict"],
                "train_dist_reward": r["evals"][-1]["strict"],
                "train_dist_control": c["evals"][-1]["strict"],
                "train_dist_gain": d_train(r),
                "train_dist_gain_control": d_train(c),
                "heldout_base": r["heldout_base"]["strict"],
                "heldout_reward": r["heldout_final"]["strict"],
                "heldout_control": c["heldout_final"]["strict"],
                "heldout_gain": d_held(r),
                "heldout_gain_control": d_held(c),
                "wall_s_reward": r["total_wall_s"],
                "wall_s_control": c["total_wall_s"],
                "heldout_categories": {
                    k: (
                        r["heldout_base"]["categories"][k],
                        r["heldout_final"]["categories"][k],
                        c["heldout_final"]["categories"][k],
                    )
                    for k in r["heldout_base"]["categories"]
                },  # fmt: skip
            }
        )
    lines = [
        "| seed | train-dist base | reward | control | reward - control | held-out base | reward | control "
        "| reward - control | wall (min) reward / control |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['seed']} | {x['train_dist_base']:.3f} | {x['train_dist_reward']:.3f} | "
            f"{x['train_dist_control']:.3f} | {x['train_dist_reward'] - x['train_dist_control']:+.3f} | "
            f"{x['heldout_base']:.3f} | {x['heldout_reward']:.3f} | {x['heldout_control']:.3f} | "
            f"{x['heldout_reward'] - x['heldout_control']:+.3f} | "
            f"{x['wall_s_reward'] / 60:.1f} / {x['wall_s_control'] / 60:.1f} |"
        )
    tag = "" if label == "reward" else f"_{label}"
    (out / f"summary{tag}.md").write_text("\n".join(lines) + "\n")
    doc = {"label": label, "rows": rows}
    (out / f"summary{tag}.json").write_text(json.dumps(doc, indent=1))
    plot(recs, seeds, out / f"curves{tag}.png", label)
    print("\n".join(lines))
    return doc


def plot(recs: dict[tuple[str, int], dict], seeds: list[int], png: Path, label: str = "reward") -> None:
    from solace.evaluation.analysis import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(seeds), figsize=(5.5 * len(seeds), 4), squeeze=False)
    for ax, s in zip(axes[0], seeds, strict=True):
        for cond, color in ((label, "tab:blue"), ("control", "tab:gray")):
            r = recs[(cond, s)]
            ts = r["train_strict"]
            k = 10
            smooth = [
                sum(ts[max(0, i - k + 1) : i + 1]) / len(ts[max(0, i - k + 1) : i + 1])
                for i in range(len(ts))
            ]
            ax.plot(
                range(1, len(ts) + 1),
                smooth,
                color=color,
                alpha=0.5,
                label=f"{cond}: train batch (10-it mean)",
            )
            plot_evals(ax, r, color, cond)
        ax.set_title(f"seed {s}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("strict accuracy")
    axes[0][0].legend(fontsize=7)
    save_figure(plt, fig, png)


def plot_evals(ax, rec: dict, color: str, name: str, alpha: float = 1.0) -> None:
    """One run's evaluations on an axis: the training-distribution set over training, held-out base -> end."""
    ev = rec["evals"]
    ax.plot([e["iteration"] for e in ev], [e["strict"] for e in ev], "o-", color=color,
            label=f"{name}: train-distribution eval")  # fmt: skip
    n = ev[-1]["iteration"]
    ax.plot([0, n], [rec["heldout_base"]["strict"], rec["heldout_final"]["strict"]], "s--", color=color,
            alpha=alpha, label=f"{name}: held-out eval")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="toy_nft_verifiable")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", type=Path, default=Path("runs/nft_proof"))
    ap.add_argument("--samples", type=int, default=8, help="held-out samples per prompt")
    ap.add_argument("--steps", type=int, default=20, help="held-out sampling steps (ODE)")
    ap.add_argument("--cfg", type=float, default=3.0, help="held-out CFG")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--label", default="reward",
        help="folder name of the reward run (another preset beside the same controls: e.g. --config toy_nft "
        "--label solace_paper; summary_LABEL.md and curves_LABEL.png)",
    )  # fmt: skip
    ap.add_argument("--only", choices=("reward", "control"), help="run one of the two (another process runs "
                    "the other); the summary is written when both are there")  # fmt: skip
    ap.add_argument("overrides", nargs="*", help="key=value for every run")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    seeds = [int(x) for x in a.seeds.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    conds = {"reward": a.label, "control": "control"}
    todo = [conds[a.only]] if a.only else list(conds.values())
    recs = {(c, s): one_run(a, c, s) for s in seeds for c in todo}
    if all((a.out / c / f"seed{s}" / "proof.json").exists() for s in seeds for c in conds.values()):
        recs = {(c, s): one_run(a, c, s) for s in seeds for c in conds.values()}  # read back, nothing reruns
        summarize(recs, seeds, a.out, a.label)


if __name__ == "__main__":
    main()
