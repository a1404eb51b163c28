"""``solace ablate``: the paper's Table 2 ablations and collapse analysis as a grid of ``solace train`` runs.

Each *condition* is a small YAML of differences (``configs/ablation/k4.yaml`` ...: its ``defaults:`` and
``train.output_dir`` are ignored) laid over the chosen base config and the user's overrides, so the
condition always wins over the shared budget. Every (condition, seed) pair is one ordinary training run in
``OUT/<condition>/seed<S>``: its own checkpoints, log, report and LoRA. A finished run leaves
``ablate_run.json`` and is skipped when the grid is started again; a killed run resumes from its
checkpoint. Runs that share a seed evaluate the base once (``eval.base_cache``). At the end
``ablation.md`` / ``ablation.json`` hold one row per condition (mean and spread over seeds) and
``ablation_curves.png`` / ``ablation_accuracy.png`` the curves and the accuracy change per seed.

``solace ablate --experiment FILE`` runs the grid an experiment file describes
(:mod:`solace.trainer.experiment`: conditions with their own base config, a control paired by seed, an
evaluation after training, more tables).
"""

from __future__ import annotations

import json
import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from solace.defaults import cli_default
from solace.errors import ConfigError, check
from solace.evaluation.analysis import pyplot, save_figure
from solace.trainer.config import (
    MonitorCfg,
    SolaceConfig,
    load_config,
    presets_dir,
    reject_moved_keys,
    resolve_preset,
)
from solace.trainer.distributed import is_main_process
from solace.trainer.monitor import CollapseMonitor, eval_stats
from solace.trainer.trainer import run_training
from solace.utils.files import write_json_atomic, write_text_atomic

TABLE2 = ["k4", "k8", "k16", "cfg_in_reward", "offline"]
COLLAPSE = ["rho1", "no_cfg"]
DEFAULT_CONDITIONS = [*TABLE2, *COLLAPSE]

LABELS = {
    "k4": "K = 4",
    "k8": "K = 8 (paper)",
    "k16": "K = 16",
    "cfg_in_reward": "CFG inside the reward",
    "offline": "offline reward (frozen base scores)",
    "rho1": "rho = 1.0 (all steps trained)",
    "no_cfg": "sampling without CFG",
    "later_half": "later half of the timesteps probed",
    "random_reward": "control: uninformative random reward",
    **cli_default("ablate_labels"),  # the embedded world's presets
}

# image statistics of the paired evaluation (same prompts and noise before and after): (key, relative change?)
IMAGE_STATS = [("foreground", True), ("objects", False), ("pixel_std", True)]


@dataclass
class Condition:
    name: str
    source: Path
    layer: Any  # an OmegaConf config of differences
    config: str | None = None  # its own base config (an experiment's entry); None: the grid's
    title: str | None = None  # its label in tables (an experiment's entry); None: LABELS or the name

    @property
    def label(self) -> str:
        return self.title or LABELS.get(self.name, self.name)


def resolve_condition(spec: str) -> Condition:
    """A condition: ``ablation/<name>.yaml`` of the bundled presets, another preset name, or a YAML path."""
    spec = spec.strip()
    check(bool(spec), "--conditions", "an empty condition name; give a comma list such as k4,k8,rho1")
    cand = presets_dir() / "ablation" / f"{spec}.yaml"
    path = cand if cand.exists() and not Path(spec).exists() else None
    if path is None:
        try:
            path = resolve_preset(spec)
        except ConfigError:
            names = sorted(p.stem for p in (presets_dir() / "ablation").glob("*.yaml"))
            raise ConfigError(
                "--conditions",
                f"{spec!r} is not an ablation condition, a preset or a YAML file; "
                f"conditions: {', '.join(names)}",
            ) from None
    try:
        raw = OmegaConf.load(path)
    except Exception as e:
        raise ConfigError("--conditions", f"{path}: not valid YAML ({e})") from e
    reject_moved_keys(raw, str(path))
    if "defaults" in raw:
        raw.pop("defaults")
    if "train" in raw and "output_dir" in raw.train:
        raw.train.pop("output_dir")
    name = Path(spec).stem if Path(spec).suffix in (".yaml", ".yml") else spec.replace("/", "_")
    return Condition(name.removeprefix("ablation_"), Path(path), raw)


def _run_settings(cond: Condition, seed: int, out: Path) -> dict[str, dict[str, Any]]:
    """What every run of the grid sets last: its seed, folder and the shared base evaluation."""
    return {
        "train": {"seed": seed, "output_dir": str(out / cond.name / f"seed{seed}")},
        "eval": {"base_cache": str(out / "base_eval_cache.json")},
    }


def run_config(
    base: str, overrides: list[str], cond: Condition, seed: int, out: Path, check_paths: bool = True
) -> SolaceConfig:
    """The config of one run: base (the condition's own, if it names one) <- overrides <- condition <- (seed,
    output folder, shared base eval)."""
    base = cond.config or base
    fixed = OmegaConf.create(_run_settings(cond, seed, out))
    cfg = load_config(base, overrides, check_paths=check_paths, layers_after=[cond.layer, fixed])
    cfg.preset = f"{base} + {cond.source.name}"
    return cfg


def train_command(base: str, overrides: list[str], cond: Condition, seed: int, out: Path) -> str:
    """The equivalent ``solace train`` command line of one run (to launch the grid elsewhere)."""
    flat = _flatten(OmegaConf.to_container(cond.layer))
    fixed = [f"{s}.{k}={v}" for s, kv in _run_settings(cond, seed, out).items() for k, v in kv.items()]
    return "solace train --config " + shlex.join([cond.config or base, *overrides, *flat, *fixed])


def _flatten(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [x for k, v in d.items() for x in _flatten(v, f"{prefix}{k}.")]
    value = json.dumps(d) if isinstance(d, list) else d
    return [f"{prefix[:-1]}={value}"]


def _series(history: list[dict[str, float]], key: str) -> list[float]:
    return [float(h[key]) if key in h and h[key] is not None else math.nan for h in history]


def _edge_mean(xs: list[float], first: bool, n: int = 2) -> float:
    vals = [x for x in (xs[:n] if first else xs[-n:]) if math.isfinite(x)]
    return sum(vals) / len(vals) if vals else math.nan


def summarize_run(res: dict[str, Any]) -> dict[str, Any]:
    """Per-run numbers of the table: evaluation before/after (accuracy and image statistics, paired), the
    batch reward of the first two vs the last two iterations, the last KL."""
    out: dict[str, Any] = {
        "condition": res["condition"],
        "seed": res["seed"],
        "monitor": replay_monitor(res).verdict,
        "monitor_at_run": res["monitor"],
    }
    evals = [e for e in res.get("evals") or [] if "strict" in e]  # the toy world's exact evaluations
    if len(evals) >= 2:
        b, a = evals[0], evals[-1]
        out.update(
            strict_base=b["strict"],
            strict_trained=a["strict"],
            lenient_base=b["lenient"],
            lenient_trained=a["lenient"],
            categories={
                c: {"base": b["categories"][c]["strict"], "trained": a["categories"][c]["strict"]}
                for c in b["categories"]
            },
        )
        for key, _ in IMAGE_STATS:
            out[f"{key}_base"] = b.get("images", {}).get(key, math.nan)
            out[f"{key}_trained"] = a.get("images", {}).get(key, math.nan)
    hist = res.get("history") or []
    reward = _series(hist, "reward/mean")
    out["reward_first"], out["reward_last"] = _edge_mean(reward, True), _edge_mean(reward, False)
    kl = _series(hist, "train/kl")
    out["kl_last"] = kl[-1] if kl else math.nan
    out["wall_s"] = res.get("wall_s", math.nan)
    return out


def replay_monitor(res: dict[str, Any]) -> CollapseMonitor:
    """The collapse monitor (default thresholds) fed a finished run's logged statistics and evaluations, so
    a table judges every run by the same, current rule."""
    mc = MonitorCfg()
    m = CollapseMonitor(mc.std_drop, mc.foreground_drop, mc.reward_spike_z, mc.window, mc.accuracy_drop)
    keys = {
        "texture": "monitor/texture",
        "foreground": "monitor/foreground",
        "reward_mean": "reward/mean",
        "reward_std": "reward/std",
    }
    for h in res.get("history") or []:
        m.update(int(h.get("iteration", 0)), {k: float(h[v]) for k, v in keys.items() if v in h})
    evals = res.get("evals") or []
    for ev in evals[1:]:
        m.update_eval(ev["iteration"], eval_stats(evals[0]), eval_stats(ev))
    return m


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def _fmt(m: float, sd: float, digits: int = 3, signed: bool = False) -> str:
    if not math.isfinite(m):
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f.format(m) + (f" ± {sd:.{digits}f}" if math.isfinite(sd) and sd > 0 else "")


def aggregate(runs: list[dict[str, Any]], conditions: list[Condition]) -> list[dict[str, Any]]:
    rows = []
    for c in conditions:
        rs = [r for r in runs if r["condition"] == c.name]
        if not rs:
            continue
        row: dict[str, Any] = {"condition": c.name, "label": c.label, "seeds": [r["seed"] for r in rs]}
        row["tripped"] = sum(1 for r in rs if r["monitor"] != "no collapse signal")
        for key in ("strict", "lenient"):
            row[f"{key}_base"] = _mean_sd([r.get(f"{key}_base", math.nan) for r in rs])
            row[f"{key}_trained"] = _mean_sd([r.get(f"{key}_trained", math.nan) for r in rs])
            row[f"{key}_delta"] = _mean_sd(
                [r.get(f"{key}_trained", math.nan) - r.get(f"{key}_base", math.nan) for r in rs]
            )
        for key, relative in IMAGE_STATS:
            pairs = [(r.get(f"{key}_base", math.nan), r.get(f"{key}_trained", math.nan)) for r in rs]
            row[f"{key}_change"] = _mean_sd([_rel(x, y) if relative else y - x for x, y in pairs])
        row["reward_change"] = _mean_sd([r["reward_last"] - r["reward_first"] for r in rs])
        row["kl_last"] = _mean_sd([r["kl_last"] for r in rs])
        row["minutes"] = _mean_sd([r["wall_s"] / 60 for r in rs])
        cats = sorted({k for r in rs for k in r.get("categories", {})})
        row["categories"] = {
            k: _mean_sd(
                [
                    r["categories"][k]["trained"] - r["categories"][k]["base"]
                    for r in rs
                    if k in r.get("categories", {})
                ]
            )
            for k in cats
        }
        rows.append(row)
    return rows


def _rel(first: float, last: float) -> float:
    return last / first - 1.0 if math.isfinite(first) and first != 0 else math.nan


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [
        header,
        "",
        "Mean ± sample standard deviation over seeds. Everything but the reward and KL comes from the "
        "held-out evaluation before and after training, on the same prompts with the same noise: strict / "
        "lenient accuracy (the embedded world's exact evaluator), and what a collapse toward blank, "
        "textureless images flattens: foreground fraction and pixel std (relative change) and detected "
        "objects per image (change). Δ reward: batch reward mean of the last two iterations minus the "
        "first two (each condition's own reward; iteration i draws the same prompts in every condition of "
        "a seed). Monitor: runs whose collapse monitor trips, replayed with the current monitor on each "
        "run's logged statistics and evaluations.",
        "",
        "| condition | seeds | strict base | strict trained | Δ strict | Δ lenient | foreground | objects | "
        "pixel std | Δ reward | KL (last) | monitor | min/run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {len(r['seeds'])} | {_fmt(*r['strict_base'])} | "
            f"{_fmt(*r['strict_trained'])} | "
            f"{_fmt(*r['strict_delta'], signed=True)} | {_fmt(*r['lenient_delta'], signed=True)} | "
            f"{_pct(*r['foreground_change'])} | {_fmt(*r['objects_change'], digits=2, signed=True)} | "
            f"{_pct(*r['pixel_std_change'])} | {_fmt(*r['reward_change'], signed=True)} | "
            f"{_fmt(r['kl_last'][0], math.nan, 6)} | "
            f"{r['tripped']}/{len(r['seeds'])} tripped | {_fmt(*r['minutes'], digits=1)} |"
        )
    cats = sorted({k for r in rows for k in r["categories"]})
    if cats:
        lines += [
            "",
            "Change of held-out strict accuracy per category (trained - base, mean ± sd over seeds):",
            "",
            "| condition | " + " | ".join(cats) + " |",
            "|---|" + "---|" * len(cats),
        ]
        for r in rows:
            lines.append(
                f"| {r['label']} | "
                + " | ".join(_fmt(*r["categories"].get(c, (math.nan, math.nan)), signed=True) for c in cats)
                + " |"
            )
    return "\n".join(lines) + "\n"


def _pct(m: float, sd: float) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:+.0%}" + (f" ± {sd:.0%}" if math.isfinite(sd) and sd > 0 else "")


def plot(
    runs_raw: list[dict[str, Any]], rows: list[dict[str, Any]], conditions: list[Condition], out: Path
) -> list[Path]:
    import numpy as np

    plt = pyplot()

    paths = []
    fig, axes = plt.subplots(1, 5, figsize=(24, 3.8), gridspec_kw={"width_ratios": [1, 1, 1, 1, 0.8]})
    panels = [
        ("reward/mean", "batch reward mean"),
        ("monitor/foreground", "foreground fraction"),
        ("monitor/texture", "latent texture (std)"),
        ("train/kl", "KL to reference"),
    ]
    for ci, c in enumerate(conditions):
        rs = [r for r in runs_raw if r["condition"] == c.name]
        if not rs:
            continue
        color = plt.get_cmap("tab20")(ci % 20)
        for ax, (key, title) in zip(axes[:4], panels, strict=True):
            ys = [np.array(_series(r.get("history") or [], key)) for r in rs]
            n = min(len(y) for y in ys)
            if n == 0 or all(np.isnan(y[:n]).all() for y in ys):
                continue
            stack = np.stack([y[:n] for y in ys])
            x = np.arange(1, n + 1)
            ax.plot(x, np.nanmean(stack, 0), color=color, label=c.label)
            if len(rs) > 1:
                ax.fill_between(x, np.nanmin(stack, 0), np.nanmax(stack, 0), color=color, alpha=0.15)
            ax.set_title(title)
            ax.set_xlabel("iteration")
    axes[4].axis("off")
    axes[4].legend(*axes[0].get_legend_handles_labels(), loc="center", fontsize=8)
    fig.suptitle("solace ablate: mean over seeds, band = min..max")
    paths.append(save_figure(plt, fig, out / "ablation_curves.png", dpi=110))
    with_acc = [r for r in rows if math.isfinite(r["strict_delta"][0])]
    if with_acc:
        fig, ax = plt.subplots(figsize=(1.3 * len(with_acc) + 3, 4))
        for i, r in enumerate(with_acc):
            ds = [
                x["strict_trained"] - x["strict_base"]
                for x in (summarize_run(q) for q in runs_raw if q["condition"] == r["condition"])
                if "strict_base" in x
            ]
            ax.bar(i, r["strict_delta"][0], color=plt.get_cmap("tab20")(i % 20), alpha=0.6)
            ax.scatter([i] * len(ds), ds, color="k", s=14, zorder=3)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(
            range(len(with_acc)), [r["label"] for r in with_acc], rotation=25, ha="right", fontsize=8
        )
        ax.set_ylabel("held-out strict accuracy: trained - base")
        ax.set_title("accuracy change per condition (bar: mean, dots: seeds)")
        paths.append(save_figure(plt, fig, out / "ablation_accuracy.png", dpi=110))
    return paths


def run_grid(
    base: str,
    overrides: list[str],
    conditions: list[str] | list[Condition],
    seeds: list[int],
    out: Path,
    dry_run: bool = False,
    echo: Any = print,
    collect_only: bool = False,
    experiment: Any = None,
) -> dict[str, Any]:
    """Run (or, with ``dry_run``, print) every (condition, seed) training run, then write the table.
    ``collect_only`` trains nothing: the table holds the runs finished so far (a grid still running).
    ``experiment`` (:class:`~solace.trainer.experiment.Experiment`): what each run adds to its record after
    training (its final evaluation) and the tables written after the grid's own."""
    check(len(seeds) >= 1, "--seeds", "give at least one seed, e.g. 0,1,2")
    check(not Path(out).is_file(), "--out", f"{out} is a file; name the grid's folder")
    conds = [c if isinstance(c, Condition) else resolve_condition(c) for c in conditions]
    names = [c.name for c in conds]
    check(len(set(names)) == len(names), "--conditions", f"a condition is named twice: {', '.join(names)}")
    cfgs = {
        (c.name, s): run_config(base, overrides, c, s, out, check_paths=not dry_run)
        for c in conds
        for s in seeds
    }
    if dry_run:
        for c in conds:
            for s in seeds:
                echo(train_command(base, overrides, c, s, out))
        return {"commands": len(cfgs)}
    out.mkdir(parents=True, exist_ok=True)
    raw: list[dict[str, Any]] = []
    total = len(cfgs)
    for i, (c, s) in enumerate(((c, s) for s in seeds for c in conds), 1):
        cfg = cfgs[(c.name, s)]
        run_dir = Path(cfg.train.output_dir)
        done = run_dir / "ablate_run.json"
        if done.exists():
            echo(f"[{i}/{total}] {c.name} seed {s}: done before, kept ({run_dir})")
            raw.append(json.loads(done.read_text()))
            continue
        if collect_only:
            echo(f"[{i}/{total}] {c.name} seed {s}: not finished, left out")
            continue
        raw.append(_train_one(cfg, c, s, f"[{i}/{total}]", echo, experiment))
    check(bool(raw), "--collect-only", f"no finished run under {out}; run the grid without --collect-only")
    if not is_main_process():
        return {"table": None, "rows": [], "plots": []}
    return write_table(raw, conds, out, base, overrides, seeds, experiment)


def _train_one(cfg: Any, c: Any, seed: int, tag: str, echo: Any, experiment: Any = None) -> dict[str, Any]:
    """Train (or resume) one run of the grid; its record (evaluations, monitor, history, wall time, and
    what the ``experiment`` adds) is written next to it by the main process."""
    run_dir = Path(cfg.train.output_dir)
    resume = (run_dir / "checkpoints" / "latest").exists()
    echo(f"{tag} {c.name} seed {seed}: {'resuming' if resume else 'training'} in {run_dir}")
    # the grid's own folder: a run killed before its first checkpoint starts again
    res = run_training(cfg, resume=resume, overwrite=not resume)
    mon = run_dir / "monitor.json"
    rec = {
        "condition": c.name,
        "label": c.label,
        "seed": seed,
        "evals": res.get("evals", []),
        "monitor": res.get("monitor", ""),
        "warnings": json.loads(mon.read_text()).get("warnings", []) if mon.exists() else [],
        "history": _read_log(run_dir / "log.csv"),
        "wall_s": res["wall_s"],  # over every process that trained it, when resumed
    }
    if experiment is not None:
        echo(f"{tag} {c.name} seed {seed}: the experiment's evaluation after training")
        rec.update(experiment.after_run(cfg, rec))
    if is_main_process():  # one writer; every process trains every run
        write_json_atomic(run_dir / "ablate_run.json", rec)
    return rec


def _read_log(path: Path) -> list[dict[str, float]]:
    import csv

    if not path.exists():
        return []
    rows = []
    for row in csv.DictReader(open(path)):
        rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
    return rows


def write_table(
    raw: list[dict[str, Any]],
    conds: list[Condition],
    out: Path,
    base: str,
    overrides: list[str],
    seeds: list[int],
    experiment: Any = None,
) -> dict[str, Any]:
    rows = aggregate([summarize_run(r) for r in raw], conds)
    what = ["--config", base]
    if experiment is not None:  # the command line's overrides: the experiment's own come from its file
        what = ["--experiment", str(experiment.path)]
        overrides = [*overrides[len(experiment.overrides) :], *experiment.final_overrides]
    cmd = "solace ablate " + shlex.join(
        [
            *what,
            "--conditions",
            ",".join(c.name for c in conds),
            "--seeds",
            ",".join(map(str, seeds)),
            "--out",
            str(out),
            *overrides,
        ]
    )
    header = f"# solace ablate\n\n```bash\n{cmd}\n```"
    md = markdown(rows, header)
    pngs = plot(raw, rows, conds, out)
    doc = {"command": cmd, "rows": rows, "runs": [summarize_run(r) for r in raw]}
    if experiment is not None:
        lines, extra, more = experiment.tables(raw, conds, out)
        md += "\n" + "\n".join(lines) + "\n"
        doc.update(extra)
        pngs += more
    md += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in pngs) + "\n"
    write_text_atomic(out / "ablation.md", md)
    write_json_atomic(out / "ablation.json", doc)
    return {"table": str(out / "ablation.md"), "rows": rows, "plots": [str(p) for p in pngs]}
