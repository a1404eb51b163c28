"""End-of-run report: Markdown with plots (reward, KL, monitor, evaluations) and base-vs-trained image grids;
the evaluations' table and curve come from the run's evaluator (:mod:`solace.evaluation.evaluators`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _plot(history: list[dict[str, float]], evals: list[dict[str, Any]], png: Path, evaluator: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = [h["iteration"] for h in history]
    panels = [
        ("reward/mean", "reward mean"),
        ("train/kl", "KL to reference"),
        ("monitor/texture", "latent texture (std)"),
        ("monitor/foreground", "foreground fraction"),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.4))
    for ax, (key, title) in zip(axes, panels, strict=False):
        ys = [h.get(key) for h in history]
        if any(y is not None for y in ys):
            ax.plot(it, [y if y is not None else float("nan") for y in ys])
        ax.set_title(title)
        ax.set_xlabel("iteration")
    ax = axes[4]
    if evaluator is not None:  # the evaluator draws its records (accuracy, or metrics against the base)
        evaluator.plot(ax, evals)
    else:
        ax.set_title("evaluation (none configured)")
        ax.set_xlabel("iteration")
    tr = [h.get("train/strict_acc") for h in history]
    if any(t is not None for t in tr):
        ax.plot(it, [t if t is not None else float("nan") for t in tr], alpha=0.4, label="train batch strict")
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _iterations(trainer: Any) -> str:
    done, planned = trainer.stopped_at, trainer.cfg.train.iterations
    if done == planned:
        return str(planned)
    return f"{done} of {planned} (stopped by train.max_minutes={trainer.cfg.train.max_minutes:g})"


SIGNALS = (
    "reward/mean",
    "reward/std",
    "train/kl",
    "train/clipfrac",
    "monitor/texture",
    "monitor/foreground",
    "monitor/objects",
    "train/strict_acc",
)


def window_means(history: list[dict[str, float]], key: str, n: int) -> tuple[float, float]:
    """Mean of ``key`` over the first and over the last ``n`` iterations (NaN where it was never logged).
    One iteration's batch statistics swing with the prompts drawn; window means, as the collapse monitor
    uses, compare like with like."""

    def mean(rows: list[dict[str, float]]) -> float:
        vals = [float(h[key]) for h in rows if key in h]
        return sum(vals) / len(vals) if vals else float("nan")

    return mean(history[:n]), mean(history[-n:])


def _signal_table(history: list[dict[str, float]], window: int) -> list[str]:
    n = max(1, min(window, len(history) // 2))
    first, last = history[0]["iteration"], history[-1]["iteration"]
    lines = [
        "## Training signals",
        "",
        f"Means over the first and the last {n} iteration{'s' if n > 1 else ''} (`monitor.window`).",
        "",
        f"| | iterations {first}-{first + n - 1} | iterations {last - n + 1}-{last} |",
        "|---|---|---|",
    ]
    for k in SIGNALS:
        if any(k in h for h in history):
            a, b = window_means(history, k, n)
            lines.append(f"| {k} | {a:.4f} | {b:.4f} |")
    return lines


def _update_line(cfg: Any, window: list[int]) -> str:
    """The settings of the update the run used (``train.algorithm``), never the other's."""
    common = f"lr={cfg.optim.lr}, LoRA r={cfg.model.lora.rank} alpha={cfg.model.lora.alpha}"
    if cfg.train.algorithm == "nft":
        n = cfg.nft
        return (
            f"- update: DiffusionNFT, beta={n.beta}, A_max={n.adv_max}, timesteps {n.timesteps} "
            f"({n.timesteps_per_sample} a sample), old policy EMA {n.ema} (decay {n.ema_decay}), "
            f"KL {n.kl_beta}, {common}"
        )
    g = cfg.grpo
    return f"- update: Flow-GRPO, rho={g.rho} (window {window}), beta={g.beta}, clip {g.clip_range}, {common}"


def write_report(trainer: Any) -> Path:
    out: Path = trainer.out
    cfg = trainer.cfg
    png = out / "report_curves.png"
    evaluator = getattr(trainer, "evaluator", None)
    _plot(trainer.history, trainer.evals, png, evaluator)
    lines = [
        f"# solace run report: {out.name}",
        "",
        f"- model: `{cfg.model.name}`; preset: `{cfg.preset or '-'}`; iterations: {_iterations(trainer)}; "
        f"seed: {cfg.train.seed}",
        "- rewards: " + ", ".join(f"{c.name} x {c.weight}" for c in cfg.reward.components),
        f"- sampling: G={cfg.sampling.group_size}, {cfg.sampling.prompts_per_step} prompts/iteration, "
        f"{cfg.sampling.num_steps} steps (eval {cfg.eval.num_steps}), "
        f"CFG {cfg.sampling.cfg_scale} (eval {trainer.eval_cfg_scale})",
        _update_line(cfg, trainer.ctx.window),
        f"- collapse monitor: **{trainer.monitor.verdict}**; non-finite guard: "
        f"{int(sum(h.get('guard/dropped', 0.0) for h in trainer.history))} samples dropped, "
        f"{trainer.guard.total} bad iterations",
        "",
    ]
    if trainer.monitor.warnings:
        lines += (
            ["Monitor warnings (first 10):", ""] + [f"- {w}" for w in trainer.monitor.warnings[:10]] + [""]
        )
    if trainer.evals and evaluator is not None:
        lines += evaluator.report_lines(trainer.evals)
    if trainer.history:
        lines += _signal_table(trainer.history, trainer.cfg.monitor.window)
        t = {
            k: sum(h.get(f"time/{k}", 0.0) for h in trainer.history) / len(trainer.history)
            for k in ("sampling", "reward", "update")
        }
        lines += [
            "",
            f"Mean seconds per iteration: sampling {t['sampling']:.2f}, reward {t['reward']:.2f}, "
            f"update {t['update']:.2f}.",
            "",
        ]
    lines += ["## Curves", "", f"![curves]({png.name})", ""]
    imgs = sorted((out / "images").glob("iter_*.png")) if (out / "images").exists() else []
    if imgs:
        lines += [
            "## Samples (fixed prompts and seeds)",
            "",
            f"Base (iteration 0): ![base](images/{imgs[0].name})",
            "",
            f"Trained: ![trained](images/{imgs[-1].name})",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
