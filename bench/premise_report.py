"""Does self-confidence track correctness better as the model improves? The premise logged by the runs of
``solace ablate -e bench/experiments/nft_premise.yaml`` (``premise/<form>_auc`` and ``_groups`` in each
run's ``log.csv``), read by thirds of training.

    python bench/premise_report.py --out runs/nft_premise --record bench/results/nft_premise

For every condition (the verifiable-reward runs and their random-reward controls) and seed, and for each
third of the run's iterations: the training batches' strict accuracy (their mean over the third) and each
logged form's within-group AUC pooled over the third (each iteration's AUC weighted by the number of slice
groups that held both right and wrong samples: a pooled AUC over groups, not a mean of noisy iterations),
with those groups' count. Then, per form, the change of the AUC from the first to the last third in the
reward runs beside the same change in the controls (whose model does not improve): the premise's
conjecture predicts a rise in the reward runs beyond the controls'.

``--record DIR`` writes ``DIR/report.md``, ``DIR/report.json`` and ``DIR/premise.png`` (the pooled AUC and
the batch accuracy per third, every run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from statistics import mean

FORMS = ("paper", "contrastive")


def read_log(path: Path) -> list[dict[str, float]]:
    """A run's ``log.csv`` as numbers (empty cells: NaN)."""
    with open(path) as fh:
        return [
            {k: float(v) if v not in ("", None) else math.nan for k, v in r.items()}
            for r in csv.DictReader(fh)
        ]


def pooled_auc(rows: list[dict[str, float]], form: str) -> tuple[float, int]:
    """The AUC of ``form`` over ``rows``, each iteration weighted by its groups that held both kinds, and the
    number of those groups (NaN, 0 when none did)."""
    auc, groups = f"premise/{form}_auc", f"premise/{form}_groups"
    pairs = [(r[auc], r[groups]) for r in rows if auc in r and math.isfinite(r[auc]) and r.get(groups, 0) > 0]
    n = sum(g for _, g in pairs)
    return (sum(a * g for a, g in pairs) / n if n else math.nan), int(n)


def thirds(rows: list[dict[str, float]]) -> list[list[dict[str, float]]]:
    k = len(rows)
    return [rows[i * k // 3 : (i + 1) * k // 3] for i in range(3)]


def summarize(rows: list[dict[str, float]]) -> list[dict]:
    out = []
    for i, part in enumerate(thirds(rows)):
        acc = [r["train/strict_acc"] for r in part if math.isfinite(r.get("train/strict_acc", math.nan))]
        rec = {
            "third": i + 1,
            "iterations": [int(part[0]["iteration"]), int(part[-1]["iteration"])] if part else [],
            "batch_strict": mean(acc) if acc else math.nan,
        }
        for form in FORMS:
            rec[f"{form}_auc"], rec[f"{form}_groups"] = pooled_auc(part, form)
        out.append(rec)
    return out


def load(out: Path, seeds: list[int]) -> dict[str, dict[int, list[dict]]]:
    runs: dict[str, dict[int, list[dict]]] = {}
    for cond in ("reward", "control"):
        for s in seeds:
            log = out / cond / f"seed{s}" / "log.csv"
            if log.exists():
                runs.setdefault(cond, {})[s] = summarize(read_log(log))
    return runs


def f3(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3f}"


def report(runs: dict[str, dict[int, list[dict]]]) -> tuple[list[str], dict]:
    lines = [
        "### Self-confidence's within-group AUC against the exact evaluator, by thirds of training",
        "",
        "| condition | seed | third (iterations) | batch strict | AUC paper (groups) | "
        "AUC contrastive (groups) |",
        "|---|---|---|---|---|---|",
    ]
    for cond, by_seed in runs.items():
        for s, parts in sorted(by_seed.items()):
            for p in parts:
                it = "-".join(map(str, p["iterations"]))
                cells = [f"{f3(p[f'{f}_auc'])} ({p[f'{f}_groups']})" for f in FORMS]
                lines.append(
                    f"| {cond} | {s} | {p['third']} ({it}) | {f3(p['batch_strict'])} | {' | '.join(cells)} |"
                )
    lines += ["", "Mean over seeds [each seed] per third:", ""]
    lines += ["| condition | third | batch strict | AUC paper | AUC contrastive |", "|---|---|---|---|---|"]
    for cond, by_seed in runs.items():
        per_seed = [parts for _, parts in sorted(by_seed.items())]
        for k in range(min(len(parts) for parts in per_seed)):
            cells = []
            for key in ("batch_strict", *(f"{f}_auc" for f in FORMS)):
                v = [parts[k][key] for parts in per_seed]
                cells.append(f3(mean(v)) if key == "batch_strict" else seeds_cell(v, "{:.3f}"))
            lines.append(f"| {cond} | {k + 1} | {' | '.join(cells)} |")
    change: dict = {}
    tests: dict = {}
    paired = sorted(set(runs.get("reward", {})) & set(runs.get("control", {})))
    title = "AUC, last third minus first third (mean over seeds [each seed]; reward - control over the seeds"
    lines += ["", f"{title} with both runs: {paired}):", ""]
    lines += [
        "| form | reward runs | controls | reward - control (paired) | one-sample t (df), two-sided p |",
        "|---|---|---|---|---|",
    ]
    for form in FORMS:
        d = {
            cond: {
                s: parts[-1][f"{form}_auc"] - parts[0][f"{form}_auc"] for s, parts in sorted(by_seed.items())
            }
            for cond, by_seed in runs.items()
        }
        change[form] = d
        cells = [seeds_cell(list(d.get(c, {}).values())) for c in ("reward", "control")]
        gaps = [d["reward"][s] - d["control"][s] for s in paired]
        t, df, pval = one_sample_t(gaps)
        test = "-" if not math.isfinite(t) else f"{t:.2f} ({df}), {pval:.2f}"
        lines.append(f"| {form} | {cells[0]} | {cells[1]} | {seeds_cell(gaps)} | {test} |")
        tests[form] = {"paired_seeds": paired, "gaps": gaps, "t": t, "df": df, "p": pval}
    return lines, {"runs": runs, "auc_change_last_minus_first_third": change, "paired_test": tests}


def seeds_cell(v: list[float], fmt: str = "{:+.3f}") -> str:
    """``mean [each seed]``; the mean is ``-`` when a seed's value is missing (NaN)."""
    m = mean(v) if v and all(math.isfinite(x) for x in v) else math.nan
    head = "-" if not math.isfinite(m) else fmt.format(m)
    return f"{head} [{', '.join('-' if not math.isfinite(x) else fmt.format(x) for x in v)}]"


def one_sample_t(v: list[float]) -> tuple[float, int, float]:
    """Student's t of the mean of ``v`` against 0, its degrees of freedom and two-sided p (NaN below two
    finite values or with no spread)."""
    from scipy import stats

    v = [x for x in v if math.isfinite(x)]
    if len(v) < 2 or max(v) == min(v):
        return math.nan, max(len(v) - 1, 0), math.nan
    r = stats.ttest_1samp(v, 0.0)
    return float(r.statistic), len(v) - 1, float(r.pvalue)


def plot(runs: dict[str, dict[int, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FORMS) + 1, figsize=(5 * (len(FORMS) + 1), 4))
    colors = {"reward": "tab:blue", "control": "tab:gray"}
    for cond, by_seed in runs.items():
        for s, parts in sorted(by_seed.items()):
            x = [p["third"] for p in parts]
            lab = f"{cond} seed {s}"
            axes[0].plot(
                x, [p["batch_strict"] for p in parts], "o-", color=colors[cond], alpha=0.7, label=lab
            )
            for ax, form in zip(axes[1:], FORMS, strict=True):
                ax.plot(x, [p[f"{form}_auc"] for p in parts], "o-", color=colors[cond], alpha=0.7, label=lab)
    axes[0].set_title("training batches: strict accuracy")
    for ax, form in zip(axes[1:], FORMS, strict=True):
        ax.set_title(f"self-confidence ({form}): within-group AUC")
        ax.axhline(0.5, color="k", lw=0.5, ls=":")
    for ax in axes:
        ax.set_xlabel("third of training")
        ax.set_xticks([1, 2, 3])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/nft_premise"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--record", type=Path, help="write report.md, report.json and premise.png here")
    a = ap.parse_args()
    runs = load(a.out, [int(s) for s in a.seeds.split(",")])
    if not runs:
        ap.error(
            f"--out: no runs with a log.csv under {a.out}/{{reward,control}}/seed*; point it at the grid"
        )
    lines, doc = report(runs)
    print("\n".join(lines))
    if a.record:
        a.record.mkdir(parents=True, exist_ok=True)
        (a.record / "report.md").write_text("\n".join(lines) + "\n")
        (a.record / "report.json").write_text(json.dumps(doc, indent=1))
        plot(runs, a.record / "premise.png")


if __name__ == "__main__":
    main()
