"""SOLACE's reward forms trained with NFT, read beside the random-reward control.

    python bench/nft_forms.py --out runs/nft_v2 --labels solace_paper \
        --record bench/results/nft_forms

Reads the runs of ``solace ablate --experiment bench/experiments/nft_proof.yaml`` (condition LABEL:
``OUT/LABEL/seedN/ablate_run.json``; or the ``proof.json`` the former ``bench/nft_proof.py --label LABEL``
wrote), beside ``OUT/control/seedN``, the random-reward control of the same settings and seed, and writes,
for every label
and for the seeds where both runs finished:

- overall strict and lenient accuracy on the training-distribution set (64 fresh prompts x 8, the trainer's
  evaluation) and on the 67 held-out prompts x 8 (paired noise), base -> run and the control;
- per category, strict and lenient, on both sets: the run minus the control and minus the base (mean over
  seeds, and each seed);
- the image statistics that show a collapse: foreground fraction, objects found, pixel std (train-distribution
  set; the held-out records have foreground and objects);
- the training-distribution evaluations during training, run against the control at each iteration;
- the training batches (``log.csv``): reward and foreground over the first and last ten iterations, and the
  first iteration whose batch foreground is below ``--blank`` (0.02: blank images);
- ``--vs A:B``: label A against label B directly (e.g. verifiable + self-confidence against verifiable alone);
- ``curves.png``: train-distribution evaluations over training (top) and the training batches' foreground
  fraction (bottom), every label and the control, a column a seed.

``--record DIR`` copies the proof records and writes ``DIR/report.md``, ``DIR/report.json`` and the plot.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path
from statistics import mean

CATS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def load(out: Path, label: str, seeds: list[int]) -> dict[int, dict]:
    """The finished runs of ``label`` by seed: a ``solace ablate`` experiment's records (``ablate_run.json``,
    its evaluation after training on the held-out set) in the shape of the former proof records."""
    recs = {}
    for s in seeds:
        run = out / label / f"seed{s}"
        if (run / "proof.json").exists():
            recs[s] = json.loads((run / "proof.json").read_text())
        elif (run / "ablate_run.json").exists():
            rec = json.loads((run / "ablate_run.json").read_text())
            if len(rec.get("final_evals") or []) == 2:
                base, final = rec["final_evals"]
                recs[s] = {**rec, "heldout_base": flat(base), "heldout_final": flat(final)}
    return recs


def flat(e: dict) -> dict:
    """An evaluation record as flat strict/lenient per category and the image statistics beside them."""
    return {
        "strict": e["strict"],
        "lenient": e["lenient"],
        "categories": {c: e["categories"][c]["strict"] for c in CATS},
        "categories_lenient": {c: e["categories"][c]["lenient"] for c in CATS},
        "images": e.get("images", {}),
        **{k: e.get("images", {}).get(k) for k in ("foreground", "objects")},
    }


def train_dist(rec: dict, which: int) -> dict:
    """The trainer's evaluation (``which`` 0: the base, -1: the end) as flat strict/lenient per category."""
    return flat(rec["evals"][which])


def sets(rec: dict) -> dict[str, tuple[dict, dict]]:
    """(base, final) on both evaluation sets, one shape."""
    return {
        "train-dist": (train_dist(rec, 0), train_dist(rec, -1)),
        "held-out": (rec["heldout_base"], rec["heldout_final"]),
    }


def metric(x: dict, kind: str, cat: str) -> float:
    """One category's ``strict`` or ``lenient`` accuracy of one evaluation."""
    return x["categories" if kind == "strict" else "categories_lenient"][cat]


def fmt(v: float) -> str:
    return f"{100 * v:+.1f}"


def overall_table(label: str, runs: dict[int, dict], ctrl: dict[int, dict]) -> tuple[list[str], list[dict]]:
    lines = [
        f"### {label}: overall (points; run - control and run - base)",
        "",
        "| seed | set | strict base -> run / control | run - control | run - base | lenient run - control |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for s in sorted(runs):
        r, c = sets(runs[s]), sets(ctrl[s])
        for name in ("train-dist", "held-out"):
            (b, f), (_, fc) = r[name], c[name]
            row = {
                "seed": s,
                "set": name,
                "base": b["strict"],
                "run": f["strict"],
                "control": fc["strict"],
                "vs_control": f["strict"] - fc["strict"],
                "vs_base": f["strict"] - b["strict"],
                "lenient_vs_control": f["lenient"] - fc["lenient"],
            }
            rows.append(row)
            lines.append(
                f"| {s} | {name} | {b['strict']:.3f} -> {f['strict']:.3f} / {fc['strict']:.3f} | "
                f"{fmt(row['vs_control'])} | {fmt(row['vs_base'])} | {fmt(row['lenient_vs_control'])} |"
            )
    for name in ("train-dist", "held-out"):
        sel = [x for x in rows if x["set"] == name]
        if sel:
            lines.append(
                f"| mean ({len(sel)}) | {name} | | {fmt(mean(x['vs_control'] for x in sel))} | "
                f"{fmt(mean(x['vs_base'] for x in sel))} | "
                f"{fmt(mean(x['lenient_vs_control'] for x in sel))} |"
            )
    return lines, rows


def category_table(label: str, runs: dict[int, dict], ref: dict[int, dict], ref_name: str) -> list[str]:
    """Per category, strict and lenient, run - ref on both sets: the mean over seeds, then each seed."""
    seeds = sorted(runs)
    lines = [
        f"### {label} - {ref_name}, per category (points; mean over seeds [each seed])",
        "",
        "| category | train-dist strict | train-dist lenient | held-out strict | held-out lenient |",
        "|---|---|---|---|---|",
    ]
    for cat in CATS:
        cells = []
        for name in ("train-dist", "held-out"):
            for kind in ("strict", "lenient"):
                d = [
                    metric(sets(runs[s])[name][1], kind, cat) - metric(sets(ref[s])[name][1], kind, cat)
                    for s in seeds
                ]
                cells.append(f"{fmt(mean(d))} [{', '.join(fmt(v) for v in d)}]")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return lines


def image_table(labels: list[str], recs: dict[str, dict[int, dict]]) -> list[str]:
    """Foreground / objects / pixel std: the base, and every label at the end (mean over its seeds)."""
    lines = [
        "### Image statistics (mean over seeds): a collapse shows here",
        "",
        "| run | seeds | train-dist foreground | objects | pixel std | held-out foreground | objects |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name: str, evs: list[tuple[dict, dict]]) -> str:
        td = [e[0]["images"] for e in evs]
        ho = [e[1] for e in evs]
        return (
            f"| {name} | {len(evs)} | {mean(x['foreground'] for x in td):.3f} | "
            f"{mean(x['objects'] for x in td):.2f} | "
            f"{mean(x['pixel_std'] for x in td):.3f} | {mean(x['foreground'] for x in ho):.3f} | "
            f"{mean(x['objects'] for x in ho):.2f} |"
        )

    ctrl = recs["control"]
    lines.append(row("base", [(train_dist(r, 0), r["heldout_base"]) for r in ctrl.values()]))
    for lab in [*labels, "control"]:
        lines.append(row(lab, [(train_dist(r, -1), r["heldout_final"]) for r in recs[lab].values()]))
    return lines


def trajectory_table(labels: list[str], recs: dict[str, dict[int, dict]]) -> list[str]:
    """The training-distribution evaluations during training (every evaluated iteration): strict accuracy of
    the run and of the control at the same iteration, and the run's foreground; a collapse midway shows here
    even when the end of the run is noise."""
    ctrl = recs["control"]
    lines = [
        "### Train-dist strict over training: run / control at each evaluation (run's foreground)",
        "",
        "| run | seed | evaluations |",
        "|---|---|---|",
    ]
    for lab in labels:
        for s, r in sorted(recs[lab].items()):
            if s not in ctrl:
                continue
            c_at = {e["iteration"]: e["strict"] for e in ctrl[s]["evals"]}
            cells = [
                f"{e['iteration']}: {e['strict']:.3f} / {c_at[e['iteration']]:.3f} "
                f"({e.get('images', {}).get('foreground', float('nan')):.2f})"
                for e in r["evals"]
                if e["iteration"] in c_at
            ]
            lines.append(f"| {lab} | {s} | " + "; ".join(cells) + " |")
    return lines


def batch_log(out: Path, label: str, seed: int) -> list[dict]:
    """The run's training batches, one row an iteration (``log.csv``); empty when the run has none yet."""
    log = out / label / f"seed{seed}" / "log.csv"
    if not log.exists():
        return []
    with open(log) as f:
        return list(csv.DictReader(f))


def first_below(values: list[float], threshold: float) -> int | None:
    """The first iteration (1-based) whose value is below ``threshold``, None if none is."""
    return next((i for i, v in enumerate(values, 1) if v < threshold), None)


def batch_table(labels: list[str], recs: dict[str, dict[int, dict]], out: Path, blank: float) -> list[str]:
    """The training batches from each finished run's ``log.csv``: batch reward and foreground, mean of the
    first and of the last ten iterations, and the first blank batch (foreground below ``blank``)."""
    lines = [
        "### Training batches: reward and foreground, iterations 1-10 -> last 10; "
        f"first batch with foreground < {blank}",
        "",
        "| run | seed | iterations | reward mean | batch foreground | first blank batch |",
        "|---|---|---|---|---|---|",
    ]
    for lab in [*labels, "control"]:
        for s in sorted(recs[lab]):
            rows = batch_log(out, lab, s)
            if not rows:
                continue
            rew = [float(r["reward/mean"]) for r in rows]
            fg = [float(r["monitor/foreground"]) for r in rows]
            first = first_below(fg, blank)
            lines.append(
                f"| {lab} | {s} | {len(rows)} | {mean(rew[:10]):.3f} -> {mean(rew[-10:]):.3f} | "
                f"{mean(fg[:10]):.3f} -> {mean(fg[-10:]):.3f} | {first if first is not None else 'none'} |"
            )
    return lines


def plot_evals(ax, rec: dict, color: str, name: str, alpha: float = 1.0) -> None:
    """One run's evaluations on an axis: the training-distribution set over training, held-out base -> end."""
    ev = rec["evals"]
    ax.plot([e["iteration"] for e in ev], [e["strict"] for e in ev], "o-", color=color,
            label=f"{name}: train-distribution eval")  # fmt: skip
    n = ev[-1]["iteration"]
    ax.plot([0, n], [rec["heldout_base"]["strict"], rec["heldout_final"]["strict"]], "s--", color=color,
            alpha=alpha, label=f"{name}: held-out eval")  # fmt: skip


def plot(labels: list[str], recs: dict[str, dict[int, dict]], seeds: list[int], out: Path, png: Path) -> None:
    from solace.evaluation.analysis import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(2, len(seeds), figsize=(5.5 * len(seeds), 7.5), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    for ax, s in zip(axes[1], seeds, strict=True):  # the training batches' foreground: a collapse shows here
        for lab, col in zip([*labels, "control"], [*colors[: len(labels)], "tab:gray"], strict=True):
            fg = [float(r["monitor/foreground"]) for r in batch_log(out, lab, s)]
            if fg:
                ax.plot(range(1, len(fg) + 1), fg, color=col, label=f"{lab}: batch foreground")
        ax.set_xlabel("iteration")
        ax.set_ylabel("foreground fraction (training batch)")
    axes[1][0].legend(fontsize=6)
    for ax, s in zip(axes[0], seeds, strict=True):
        for lab, col in zip([*labels, "control"], [*colors[: len(labels)], "tab:gray"], strict=True):
            r = recs[lab].get(s)
            if r is None:
                continue
            plot_evals(ax, r, col, lab, alpha=0.6)
        ax.set_title(f"seed {s}")
        ax.set_xlabel("iteration")
        ax.set_ylabel("strict accuracy")
    axes[0][0].legend(fontsize=6)
    save_figure(plt, fig, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/nft_v2"))
    ap.add_argument("--labels", default="solace_paper", help="comma-separated run labels (folders under OUT)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--vs", default="", help="A:B[,C:D]: label A against label B directly, per category")
    ap.add_argument("--record", type=Path, help="copy the records and write the report here")
    ap.add_argument("--blank", type=float, default=0.02, help="batch foreground below this: a blank batch")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    labels = [x for x in a.labels.split(",") if x]
    pairs = [tuple(p.split(":")) for p in a.vs.split(",") if p]
    recs = {lab: load(a.out, lab, seeds) for lab in {*labels, "control", *(x for p in pairs for x in p)}}
    lines = [
        "## SOLACE forms with NFT beside the random-reward control",
        "",
        f"Runs: `{a.out}`; seeds with a finished run: "
        + ", ".join(f"{lab} {sorted(recs[lab])}" for lab in labels)
        + ". Strict/lenient accuracy of the toy evaluator; train-dist = 64 fresh prompts of the training "
        "distribution x 8, held-out = 67 prompts x 8, both on the same noise before and after (paired).",
        "",
    ]
    doc: dict = {"labels": labels, "overall": {}}
    for lab in labels:
        runs = {s: r for s, r in recs[lab].items() if s in recs["control"]}
        if not runs:
            continue
        t, rows = overall_table(lab, runs, recs["control"])
        doc["overall"][lab] = rows
        lines += [*t, "", *category_table(lab, runs, recs["control"], "control"), ""]
    for x, y in pairs:
        both = {s: recs[x][s] for s in recs[x] if s in recs[y]}
        if both:
            lines += [*category_table(x, both, recs[y], y), ""]
            for name in ("train-dist", "held-out"):
                d = [
                    sets(both[s])[name][1]["strict"] - sets(recs[y][s])[name][1]["strict"]
                    for s in sorted(both)
                ]
                lines.append(
                    f"- {x} - {y}, {name} strict overall: {fmt(mean(d))} [{', '.join(fmt(v) for v in d)}]"
                )
            lines.append("")
    done = [lab for lab in labels if recs[lab]]
    lines += [*image_table(done, recs), "", *trajectory_table([x for x in done if x != "control"], recs)]
    lines += ["", *batch_table([x for x in done if x != "control"], recs, a.out, a.blank)]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.record:
        a.record.mkdir(parents=True, exist_ok=True)
        for lab, rs in recs.items():
            for s, r in rs.items():
                (a.record / f"{lab}_seed{s}.json").write_text(json.dumps(r, indent=1))
        (a.record / "report.md").write_text(text)
        (a.record / "report.json").write_text(json.dumps(doc, indent=1))
        plot([lab for lab in done if lab != "control"], recs, seeds, a.out, a.record / "curves.png")
        for lab in done:
            for s in recs[lab]:
                grid = a.out / lab / f"seed{s}" / "images"
                last = sorted(grid.glob("iter_*.png"))
                if last:
                    shutil.copy(last[-1], a.record / f"grid_{lab}_seed{s}.png")


if __name__ == "__main__":
    main()
