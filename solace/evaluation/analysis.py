"""Does self-confidence pick the right sample? The math and plots behind ``solace rerank / analyze``.

Scores and correctness come as (P, N) arrays: P prompt groups of N samples each (row = one prompt).

* :func:`auc`: within-group AUC, the probability that a correct sample outscores an incorrect one (ties
  count 1/2); :func:`group_aucs` / :func:`mean_auc` average it over the groups that hold both kinds.
* :func:`best_of_n`, :func:`random_pick`, :func:`oracle`: accuracy of keeping the highest-scoring of the first
  ``n`` samples of each group, of a random pick (its expected value, the group's mean correctness) and of an
  oracle that picks a correct sample whenever one exists. Nested prefixes: best-of-4 uses samples 0..3 of the
  same draws as best-of-16.
* :func:`mean_spread`: mean and sample standard deviation over seeds.
* :func:`plot_selection`, :func:`plot_distributions`: matplotlib (Agg) PNGs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from solace.errors import check


def auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting 1/2; ``None`` without both kinds.

    >>> auc([3, 1, 2], [True, False, False])
    1.0
    """
    s = np.asarray(scores, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=bool).reshape(-1)
    check(s.shape == y.shape, "labels", f"{y.shape[0]} labels for {s.shape[0]} scores")
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def _pair(scores: np.ndarray, correct: np.ndarray, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=float)
    c = np.asarray(correct, dtype=bool)
    check(
        s.ndim == 2 and s.shape == c.shape, "scores", f"scores {s.shape} and correct {c.shape} must be (P, N)"
    )
    n = s.shape[1] if n is None else n
    check(1 <= n <= s.shape[1], "n", f"must lie in 1..{s.shape[1]} (samples per prompt), got {n}")
    return s[:, :n], c[:, :n]


def group_aucs(scores: np.ndarray, correct: np.ndarray) -> list[float | None]:
    """:func:`auc` of every row of (P, N) scores against (P, N) correctness."""
    s, c = _pair(scores, correct, None)
    return [auc(a, b) for a, b in zip(s, c, strict=True)]


def mean_auc(scores: np.ndarray, correct: np.ndarray) -> dict:
    """Mean within-group AUC over the groups with both correct and incorrect samples (``None`` if none)."""
    xs = [x for x in group_aucs(scores, correct) if x is not None]
    return {"auc": float(np.mean(xs)) if xs else None, "groups_with_both": len(xs)}


def best_of_n(scores: np.ndarray, correct: np.ndarray, n: int | None = None) -> float:
    """Accuracy of keeping, per group, the highest-scoring of the first ``n`` samples (first on ties)."""
    s, c = _pair(scores, correct, n)
    return float(c[np.arange(len(s)), s.argmax(1)].mean())


def random_pick(correct: np.ndarray, n: int | None = None) -> float:
    """Expected accuracy of a uniformly random pick among the first ``n``: the mean of group means."""
    c = np.asarray(correct, dtype=bool)
    _, c = _pair(np.zeros(c.shape), c, n)
    return float(c.mean(1).mean())


def oracle(correct: np.ndarray, n: int | None = None) -> float:
    """Accuracy of a perfect picker among the first ``n``: the fraction of groups with any correct sample."""
    c = np.asarray(correct, dtype=bool)
    _, c = _pair(np.zeros(c.shape), c, n)
    return float(c.any(1).mean())


SELECTORS = ("best", "random", "oracle")


def selection(scores: np.ndarray, correct: np.ndarray, ns: Sequence[int]) -> dict[int, dict[str, float]]:
    """``{n: {"best": ..., "random": ..., "oracle": ...}}`` on nested prefixes of one draw."""
    return {
        int(n): {
            "best": best_of_n(scores, correct, n),
            "random": random_pick(correct, n),
            "oracle": oracle(correct, n),
        }
        for n in ns
    }


def mean_spread(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}``; ``std`` is the sample standard deviation (0 for a single value)."""
    v = np.asarray(values, dtype=float)
    check(v.size >= 1, "values", "need at least one value")
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "values": [float(x) for x in v]}


def summarize_selection(per_seed: Sequence[Mapping[int, Mapping[str, float]]]) -> dict[int, dict[str, dict]]:
    """Combine :func:`selection` results of several seeds: ``{n: {selector: mean_spread}}``."""
    ns = list(per_seed[0])
    return {n: {k: mean_spread([r[n][k] for r in per_seed]) for k in SELECTORS} for n in ns}


def selection_markdown(summary: Mapping[int, Mapping[str, Mapping]], title: str = "") -> str:
    """Markdown table: one row per N, columns best-of-N / random / oracle as ``mean ± std``."""
    lines = [f"{title}", ""] if title else []
    lines += [
        "| N | best-of-N (self-confidence) | random pick | oracle |",
        "|---:|---:|---:|---:|",
    ]
    for n, row in summary.items():
        cells = " | ".join(f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in SELECTORS)
        lines.append(f"| {n} | {cells} |")
    return "\n".join(lines)


def pyplot():  # noqa: ANN202 - matplotlib's module
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(plt, fig, path: str | Path, dpi: int = 120) -> Path:
    """Lay out, write the PNG (creating its folder) and close the figure."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_selection(summary: Mapping[int, Mapping[str, Mapping]], path: str | Path, title: str = "") -> Path:
    """Strict accuracy against N: best-of-N by self-confidence, random pick, oracle; std error bars."""
    plt = pyplot()
    ns = list(summary)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    labels = {"best": "best-of-N (self-confidence)", "random": "random pick", "oracle": "oracle"}
    for k in SELECTORS:
        ax.errorbar(
            ns,
            [summary[n][k]["mean"] for n in ns],
            yerr=[summary[n][k]["std"] for n in ns],
            marker="o",
            capsize=3,
            label=labels[k],
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (candidates per prompt)")
    ax.set_ylabel("strict accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(plt, fig, path)


def plot_distributions(
    values: Mapping[str, Sequence[float]], path: str | Path, title: str = "", xlabel: str = "R"
) -> Path:
    """Overlaid histograms (shared bins) of one value per label, e.g. self-confidence per inference regime."""
    plt = pyplot()
    arrays = {k: np.asarray(v, dtype=float) for k, v in values.items()}
    allv = np.concatenate([a for a in arrays.values() if a.size]) if arrays else np.zeros(0)
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.linspace(lo, hi, 31)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, a in arrays.items():
        mean = f"{a.mean():.3f}" if a.size else "-"
        ax.hist(a, bins=bins, alpha=0.45, label=f"{k} (mean {mean}, n={a.size})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(plt, fig, path)
