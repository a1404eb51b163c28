"""Experiment definitions: ``solace ablate --experiment FILE``, a grid of runs described in one YAML file.

An experiment file names the base config, the seeds, the grid folder, shared overrides and its conditions
(each an ablation condition / preset / YAML of differences, or an inline entry with its own base config and
settings), and what to tabulate beyond ``solace ablate``'s table::

    config: toy_nft_verifiable          # base preset or YAML (a condition may name its own)
    seeds: [0, 1, 2]
    out: runs/nft_proof
    overrides: [train.threads=2]        # key=value, shared by every run (the CLI's come after them)
    conditions:
      - {name: reward}                  # the base config as it is
      - {name: control, from: random_reward}   # an ablation condition / preset / YAML laid over it
      - k4                              # the same, named after it
      - {name: nft, config: toy_nft_verifiable, set: {train.max_minutes: 22}, label: "DiffusionNFT"}
    control: control                    # paired by seed: each condition against this one, seed by seed
    final_eval:                         # after training: the base and the trained model, the same noise
      set: {eval.prompts: toy_heldout, eval.samples_per_prompt: 8}
      seed: 12345                       # the evaluation noise's seed (default: the run's seed + 999)
    run: [reward, control]              # the conditions run when --conditions names none (default: all)
    tables: [per_seed, budget]          # extra tables: seeds as columns; samples/s and time to +gain
    curve: train/strict_acc             # the logged value the paired plot draws, one panel a seed (a list:
                                        # a row of panels each, e.g. [train/strict_acc, premise/paper_auc])
    gain: 0.05                          # the budget table's "time to +gain" on the training evaluation

The runs are ordinary ``solace ablate`` runs (``OUT/<condition>/seed<S>``, kept when finished, resumed when
killed); the final evaluation is stored in each run's ``ablate_run.json`` and its base evaluation shared by
the runs of a seed (``OUT/base_eval_cache.json``). The tables go to ``ablation.md`` / ``ablation.json``
after ``solace ablate``'s own; the paired plot to ``paired_curves.png``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from solace.defaults import cli_default
from solace.errors import ConfigError, check
from solace.evaluation.analysis import pyplot, save_figure
from solace.evaluation.evaluators import EVAL_SEED_OFFSET, make_evaluator
from solace.models.lora import load_lora
from solace.trainer.ablate import (
    IMAGE_STATS,
    Condition,
    _fmt,
    _mean_sd,
    _pct,
    _series,
    aggregate,
    resolve_condition,
    summarize_run,
)
from solace.trainer.config import SolaceConfig, eval_setup, load_config, reject_moved_keys, validate
from solace.trainer.distributed import is_main_process
from solace.trainer.model_setup import load_model, merge_init

TABLES = ("per_seed", "budget")
KEYS = {"name", "description", "config", "seeds", "out", "overrides", "conditions", "control", "final_eval"}
KEYS |= {"run", "tables", "curve", "gain"}
CONDITION_KEYS = {"name", "from", "config", "set", "label"}


@dataclass
class FinalEval:
    """The evaluation after training: ``layer`` laid over each run's config (the evaluation settings), the
    noise's ``seed`` (None: the run's seed + 999, as the evaluator's during training)."""

    layer: Any
    seed: int | None = None

    def config(self, cfg: SolaceConfig) -> SolaceConfig:
        """The run's config with the final evaluation's settings (and the seed that gives its noise)."""
        reject_moved_keys(self.layer, "final_eval.set")
        try:
            out = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cfg), self.layer))
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or ""
            raise ConfigError(f"final_eval.set.{key}".rstrip("."), str(e).splitlines()[0]) from None
        if self.seed is not None:  # the evaluator draws its noise from train.seed + EVAL_SEED_OFFSET
            out.train.seed = self.seed - EVAL_SEED_OFFSET
        validate(out)
        return out


@dataclass
class Experiment:
    path: Path
    config: str
    seeds: list[int]
    out: Path
    overrides: list[str]
    conditions: list[Condition]
    control: str | None = None
    final_eval: FinalEval | None = None
    extra_tables: list[str] = field(default_factory=list)
    curve: list[str] = field(default_factory=lambda: ["reward/mean"])
    gain: float = 0.05
    description: str = ""
    run: list[str] = field(default_factory=list)  # the conditions run by default (empty: all)
    final_overrides: list[str] = field(default_factory=list)  # the command line's final_eval.key=value

    def select(self, names: list[str] | None) -> list[Condition]:
        """The conditions named (default: the file's ``run``, else all), in the file's order; an unknown name
        is a ConfigError."""
        known = [c.name for c in self.conditions]
        for n in names or []:
            check(n in known, "--conditions", f"{n!r} is not a condition of {self.path}: {', '.join(known)}")
        names = names or self.run
        return [c for c in self.conditions if not names or c.name in names]

    def split_overrides(self, overrides: list[str]) -> list[str]:
        """``final_eval.<key>=value`` of the command line go to the evaluation after training (e.g. a smaller
        one for a quick check; ``final_eval.seed=N`` its noise); the others, returned, to the runs."""
        self.final_overrides = [o for o in overrides if o.startswith("final_eval.")]
        mine = [o.removeprefix("final_eval.") for o in self.final_overrides]
        if mine:
            fe = self.final_eval
            check(fe is not None, self.final_overrides[0], f"{self.path} has no final_eval to override")
            for o in mine:
                check("=" in o, "final_eval", f"final_eval.{o!r} is not of the form final_eval.key=value")
            seeds = [o.split("=", 1)[1] for o in mine if o.startswith("seed=")]
            if seeds:
                ok = seeds[-1].isdigit() and int(seeds[-1]) >= EVAL_SEED_OFFSET
                check(ok, "final_eval.seed", f"an integer >= {EVAL_SEED_OFFSET}, got {seeds[-1]!r}")
                fe.seed = int(seeds[-1])
            layer = OmegaConf.from_dotlist([o for o in mine if not o.startswith("seed=")])
            fe.layer = OmegaConf.merge(fe.layer, layer)
            fe.config(load_config())  # checked before any run trains
        return [o for o in overrides if not o.startswith("final_eval.")]

    def after_run(self, cfg: SolaceConfig, record: dict[str, Any]) -> dict[str, Any]:
        return after_run(self, cfg, len(record.get("history") or []))

    def tables(
        self, raw: list[dict[str, Any]], conds: list[Condition], out: Path
    ) -> tuple[list[str], dict[str, Any], list[Path]]:
        return experiment_tables(self, raw, conds, out)


def _layer(mapping: Any, where: str) -> Any:
    """A config layer from a mapping whose keys may be dotted (``eval.prompts: x``) or nested."""
    check(isinstance(mapping, dict | DictConfig), where, f"must be a mapping of settings, got {mapping!r}")
    layer = OmegaConf.create({})
    flat = OmegaConf.to_container(OmegaConf.create(mapping)) if mapping else {}

    def put(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and (value or not prefix):
            for k, v in value.items():
                put(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            OmegaConf.update(layer, prefix, value, force_add=True)

    put("", flat)
    return layer


def _condition(entry: Any, i: int) -> Condition:
    """One entry of ``conditions``: an ablation condition / preset / YAML of differences (``--conditions``'s),
    or a mapping of ``name``, ``from`` (such a condition), ``config`` (its own base), ``set`` (settings laid
    over both), ``label``; a mapping of a name alone runs the base config as it is."""
    where = f"conditions[{i}]"
    if isinstance(entry, str):
        return resolve_condition(entry)
    check(isinstance(entry, dict | DictConfig), where, f"a name or a mapping, got {entry!r}")
    entry = dict(entry)
    unknown = sorted(set(entry) - CONDITION_KEYS)
    check(not unknown, where, f"unknown keys {unknown}; known: {', '.join(sorted(CONDITION_KEYS))}")
    name = entry.get("name")
    check(isinstance(name, str) and bool(name), f"{where}.name", "every condition needs a name")
    base = resolve_condition(entry["from"]) if entry.get("from") else None
    layer = OmegaConf.merge(base.layer if base else {}, _layer(entry.get("set") or {}, f"{where}.set"))
    reject_moved_keys(layer, f"{where}.set")
    source = base.source if base else Path(entry.get("config") or entry["name"])
    return Condition(entry["name"], source, layer, config=entry.get("config"), title=entry.get("label"))


def _seeds(raw: Any) -> list[int]:
    seeds = [raw] if isinstance(raw, int) else list(raw or [])
    check(all(isinstance(s, int) and s >= 0 for s in seeds) and seeds, "seeds", f"a list of seeds, got {raw}")
    return seeds


def _curves(raw: Any) -> list[str]:
    """``curve``: one logged key or a list of them (default ``reward/mean``)."""
    keys = [raw] if isinstance(raw, str) else list(raw or ["reward/mean"])
    check(
        all(isinstance(k, str) and k for k in keys), "curve", f"a logged key or a list of them, got {raw!r}"
    )
    return keys


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file (see the module docstring); errors name the key and the fix."""
    p = Path(path)
    check(
        p.is_file(), "--experiment", f"{p} is not a file; give an experiment YAML (bench/experiments/*.yaml)"
    )
    try:
        raw = OmegaConf.to_container(OmegaConf.load(p))
    except Exception as e:
        raise ConfigError("--experiment", f"{p}: not valid YAML ({e})") from e
    check(isinstance(raw, dict), "--experiment", f"{p}: a mapping of {', '.join(sorted(KEYS))}")
    unknown = sorted(set(raw) - KEYS)
    check(not unknown, "--experiment", f"{p}: unknown keys {unknown}; known: {', '.join(sorted(KEYS))}")
    check(bool(raw.get("conditions")), "conditions", f"{p}: list at least one condition")
    conds = [_condition(c, i) for i, c in enumerate(raw["conditions"])]
    names = [c.name for c in conds]
    check(len(set(names)) == len(names), "conditions", f"{p}: a condition is named twice: {', '.join(names)}")
    run = [str(n) for n in raw.get("run") or []]
    check(set(run) <= set(names), "run", f"{run}: every name must be a condition of {p}: {names}")
    control = raw.get("control")
    check(control is None or control in names, "control", f"{control!r} is not a condition: {names}")
    tables = list(raw.get("tables") or [])
    check(set(tables) <= set(TABLES), "tables", f"{tables}: known tables {', '.join(TABLES)}")
    fe = raw.get("final_eval")
    final = None
    if fe is not None:
        check(isinstance(fe, dict) and set(fe) <= {"set", "seed"}, "final_eval", "a mapping of set, seed")
        seed = fe.get("seed")
        ok = seed is None or (isinstance(seed, int) and seed >= EVAL_SEED_OFFSET)
        check(
            ok,
            "final_eval.seed",
            f"an integer >= {EVAL_SEED_OFFSET} (none: the run's seed + 999), got {seed!r}",
        )
        final = FinalEval(_layer(fe.get("set") or {}, "final_eval.set"), seed)
        final.config(load_config())  # its keys and values checked now, not after the first run's training
    overrides = raw.get("overrides") or []
    check(isinstance(overrides, list | ListConfig), "overrides", "a list of key=value strings")
    return Experiment(
        path=p, config=str(raw.get("config") or cli_default("config")), seeds=_seeds(raw.get("seeds", [0])),
        out=Path(raw.get("out") or f"runs/{p.stem}"), overrides=[str(o) for o in overrides],
        conditions=conds, control=control, final_eval=final, extra_tables=tables,
        curve=_curves(raw.get("curve")), gain=float(raw.get("gain", 0.05)),
        description=str(raw.get("description") or ""), run=run,
    )  # fmt: skip


# ------------------------------------------------------------------------------------ after each run


def _device(cfg: SolaceConfig) -> torch.device:
    want = cfg.train.device
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


@torch.no_grad()
def final_evaluation(cfg: SolaceConfig, final: FinalEval, iteration: int) -> list[dict[str, Any]]:
    """The run's evaluator with the final evaluation's settings, on the base model (no LoRA, or
    ``model.lora.init_from`` folded in under ``model.lora.merge_init``, as in training; the base
    evaluation read from / written to ``eval.base_cache``, so a seed's runs share it) and then with the
    run's exported LoRA (``OUT/lora``), the same prompts and noise: ``[base record, trained record]``.
    Under several processes each evaluates the whole set (the same records); the main one writes the cache."""
    ecfg = final.config(cfg)
    run_dir = Path(cfg.train.output_dir)
    adapter = load_model(ecfg.model, _device(ecfg))
    merge_init(ecfg.model, adapter.denoiser)  # a run on top of a merged LoRA: that model is its base
    ev = make_evaluator(eval_setup(ecfg), adapter, run_dir / "final_eval", writes=is_main_process())
    check(ev is not None, "final_eval.set", "no evaluator can score these prompts; set eval.prompts")
    ev.progress = False
    base = ev.evaluate(0)
    load_lora(adapter.denoiser, run_dir / "lora", trainable=False)
    adapter.denoiser.eval()
    return [base, ev.evaluate(iteration)]


def after_run(exp: Experiment, cfg: SolaceConfig, iterations: int) -> dict[str, Any]:
    """What the experiment adds to a finished run's record: the samples an iteration draws (the budget
    table's samples/s) and the final evaluation (its record labelled with the ``iterations`` trained)."""
    s = cfg.sampling
    rec: dict[str, Any] = {"samples_per_iteration": s.prompts_per_step * s.group_size}
    if exp.final_eval is not None:
        rec["final_evals"] = final_evaluation(cfg, exp.final_eval, iterations)
    return rec


# ------------------------------------------------------------------------------------------------- tables


def minutes_to_gain(history: list[dict[str, float]], evals: list[dict[str, Any]], wall_s: float,
                    gain: float) -> float | None:  # fmt: skip
    """Minutes of training until the first evaluation at or above the first one + ``gain`` (strict
    accuracy): the logged sampling + reward + update time of the iterations before it, scaled to the run's
    wall time (so evaluations and checkpoints are charged pro rata). None: never reached."""
    it_s = [sum(h.get(k, 0.0) for k in ("time/sampling", "time/reward", "time/update")) for h in history]
    if not evals or sum(it_s) <= 0:
        return None
    scale = wall_s / sum(it_s)
    for e in evals[1:]:
        if e["strict"] >= evals[0]["strict"] + gain:
            return scale * sum(it_s[: e["iteration"]]) / 60
    return None


def _strict_pair(evals: list[dict[str, Any]] | None) -> tuple[float, float]:
    ev = [e for e in evals or [] if "strict" in e]
    return (ev[0]["strict"], ev[-1]["strict"]) if len(ev) >= 2 else (math.nan, math.nan)


def paired_rows(raw: list[dict[str, Any]], control: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Per seed and condition, strict accuracy of the condition and of the control after training, on the
    training evaluation and on the final one, from the same base (the paired control of a reward run)."""
    runs = {(r["condition"], r["seed"]): r for r in raw}
    rows = []
    for (name, seed), r in runs.items():
        c = runs.get((control, seed))
        if name == control or c is None or seed not in seeds:
            continue
        (tb, tr), (_, tc) = _strict_pair(r.get("evals")), _strict_pair(c.get("evals"))
        (fb, fr), (_, fc) = _strict_pair(r.get("final_evals")), _strict_pair(c.get("final_evals"))
        rows.append(
            {
                "condition": name, "seed": seed, "train_eval_base": tb, "train_eval": tr,
                "train_eval_control": tc, "final_base": fb, "final": fr, "final_control": fc,
                "minutes": r.get("wall_s", math.nan) / 60, "minutes_control": c.get("wall_s", math.nan) / 60,
            }
        )  # fmt: skip
    return sorted(rows, key=lambda x: (x["seed"], x["condition"]))


def paired_markdown(rows: list[dict[str, Any]], control: str) -> list[str]:
    lines = [
        f"Against the control `{control}`, seed by seed (same prompts and noise; strict accuracy on the "
        "training evaluation and on the final one, base -> after training):",
        "",
        "| seed | condition | train-eval base | condition | control | condition - control | final base | "
        "condition | control | condition - control | minutes condition / control |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        cells = [x[k] for k in ("train_eval_base", "train_eval", "train_eval_control")]
        cells += [x["train_eval"] - x["train_eval_control"], x["final_base"], x["final"], x["final_control"]]
        cells += [x["final"] - x["final_control"]]
        text = " | ".join(_fmt(v, 0, signed=i in (3, 7)) for i, v in enumerate(cells))
        mins = f"{_fmt(x['minutes'], 0, 1)} / {_fmt(x['minutes_control'], 0, 1)}"
        lines.append(f"| {x['seed']} | {x['condition']} | {text} | {mins} |")
    return lines


def final_markdown(raw: list[dict[str, Any]], conds: list[Condition]) -> list[str]:
    """The final evaluation per condition (mean ± sd over seeds): base, trained, the changes, the images."""
    finals = [{**r, "evals": r["final_evals"], "history": []} for r in raw if r.get("final_evals")]
    rows = aggregate([summarize_run(r) for r in finals], conds)
    lines = [
        "Final evaluation (the experiment's `final_eval` settings), base and trained model on the same "
        "prompts and noise, mean ± sd over seeds:",
        "",
        "| condition | seeds | strict base | strict trained | Δ strict | Δ lenient | foreground | objects | "
        "pixel std |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {len(r['seeds'])} | {_fmt(*r['strict_base'])} | "
            f"{_fmt(*r['strict_trained'])} | "
            f"{_fmt(*r['strict_delta'], signed=True)} | {_fmt(*r['lenient_delta'], signed=True)} | "
            f"{_pct(*r['foreground_change'])} | {_fmt(*r['objects_change'], 2, True)} | "
            f"{_pct(*r['pixel_std_change'])} |"
        )  # fmt: skip
    return lines


def per_seed_markdown(raw: list[dict[str, Any]], cond: Condition) -> list[str]:
    """One condition, seeds as columns (the final evaluation when there is one, else the training's):
    strict accuracy per category, overall strict / lenient, foreground and objects per image, wall time;
    ``base`` the mean of the seeds' base evaluations, the last column the mean change over them."""
    runs = sorted((r for r in raw if r["condition"] == cond.name), key=lambda r: r["seed"])
    evals = [[e for e in (r.get("final_evals") or r.get("evals") or []) if "strict" in e] for r in runs]
    kept = [(r, (ev[0], ev[-1])) for r, ev in zip(runs, evals, strict=True) if len(ev) >= 2]
    if not kept:
        return []
    runs, pairs = [r for r, _ in kept], [p for _, p in kept]
    getters = [(c, lambda e, c=c: e["categories"][c]["strict"]) for c in pairs[0][0].get("categories", {})]
    getters += [("**overall strict**", lambda e: e["strict"]), ("overall lenient", lambda e: e["lenient"])]
    getters += [
        (f"{k} (images)", lambda e, k=k: e.get("images", {}).get(k, math.nan)) for k, _ in IMAGE_STATS
    ]
    lines = [
        f"{cond.label}, seed by seed:",
        "",
        "| | base | " + " | ".join(f"seed {r['seed']}" for r in runs) + " | mean change |",
        "|---" * (len(runs) + 3) + "|",
    ]
    for label, get in getters:
        base = [get(b) for b, _ in pairs]
        after = [get(a) for _, a in pairs]
        change = _mean_sd([y - x for x, y in zip(base, after, strict=True)])[0]
        lines.append(
            f"| {label} | {_fmt(_mean_sd(base)[0], 0)} | " + " | ".join(_fmt(v, 0) for v in after)
            + f" | {_fmt(change, 0, signed=True)} |"
        )  # fmt: skip
    lines.append("| training wall time (s) | | " + " | ".join(f"{r['wall_s']:.0f}" for r in runs) + " | |")
    return lines


def budget_rows(raw: list[dict[str, Any]], gain: float) -> list[dict[str, Any]]:
    """Per run: iterations, minutes, samples per second, strict accuracy base -> after on both
    evaluations, the last logged KL, minutes to ``gain`` on the training evaluation."""
    rows = []
    for r in sorted(raw, key=lambda r: (r["seed"], r["condition"])):
        hist, wall = r.get("history") or [], r.get("wall_s", math.nan)
        evals = [e for e in r.get("evals") or [] if "strict" in e]
        kl = _series(hist, "train/kl")
        rows.append(
            {
                "condition": r["condition"], "seed": r["seed"], "iterations": len(hist), "minutes": wall / 60,
                "samples_per_s": r.get("samples_per_iteration", math.nan) * len(hist) / wall,
                "train_eval": _strict_pair(evals), "final": _strict_pair(r.get("final_evals")),
                "kl_last": kl[-1] if kl else math.nan,
                "minutes_to_gain": minutes_to_gain(hist, evals, wall, gain),
            }
        )  # fmt: skip
    return rows


def budget_markdown(rows: list[dict[str, Any]], gain: float) -> list[str]:
    def arrow(p: tuple[float, float]) -> str:
        return f"{_fmt(p[0], 0)} -> {_fmt(p[1], 0)} ({_fmt(p[1] - p[0], 0, signed=True)})"

    lines = [
        f"Budget: samples per second of training, strict accuracy base -> after (training and final "
        f"evaluations), minutes of training to +{gain:g} on the training evaluation (logged iteration times "
        "scaled to the run's wall time):",
        "",
        "| seed | condition | iterations | train min | samples/s | train-eval base -> final (Δ) | "
        f"final-eval base -> final (Δ) | KL (last) | min to +{gain:g} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = "not reached" if r["minutes_to_gain"] is None else f"{r['minutes_to_gain']:.1f}"
        lines.append(
            f"| {r['seed']} | {r['condition']} | {r['iterations']} | {r['minutes']:.1f} | "
            f"{r['samples_per_s']:.2f} | {arrow(r['train_eval'])} | {arrow(r['final'])} | "
            f"{_fmt(r['kl_last'], 0, 6)} | {t} |"
        )
    return lines


def paired_plot(raw: list[dict[str, Any]], exp: Experiment, conds: list[Condition], out: Path) -> Path | None:
    """One column a seed, one row a ``curve`` key: each condition's logged value (10-iteration running mean
    of its finite values); the first row also its training evaluations (strict accuracy) and the final
    evaluation base -> after (dashed). The control in gray."""
    seeds = sorted({r["seed"] for r in raw})
    if not seeds:
        return None
    plt = pyplot()
    rows = len(exp.curve)
    fig, axes = plt.subplots(rows, len(seeds), figsize=(5.5 * len(seeds), 4 * rows), squeeze=False)
    runs = {(r["condition"], r["seed"]): r for r in raw}
    for col, seed in enumerate(seeds):
        for i, c in enumerate(conds):
            r = runs.get((c.name, seed))
            if r is None:
                continue
            color = "tab:gray" if c.name == exp.control else plt.get_cmap("tab10")(i % 10)
            for row, key in enumerate(exp.curve):
                _draw_series(axes[row][col], r, c.name, color, key)
            _draw_evals(axes[0][col], r, c.name, color)
        axes[0][col].set_title(f"seed {seed}")
        axes[-1][col].set_xlabel("iteration")
        for row, key in enumerate(exp.curve):
            axes[row][col].set_ylabel("strict accuracy" if row == 0 else key)
    for row in range(rows):
        axes[row][0].legend(fontsize=7)
    return save_figure(plt, fig, out / "paired_curves.png", dpi=110)


def _draw_series(ax: Any, r: dict[str, Any], name: str, color: Any, key: str, k: int = 10) -> None:
    """The logged ``key`` of a run by iteration, as the running mean of its last ``k`` finite values."""
    ys = _series(r.get("history") or [], key)
    xs, smooth = [], []
    for i in range(len(ys)):
        window = [y for y in ys[max(0, i - k + 1) : i + 1] if math.isfinite(y)]
        if window and math.isfinite(ys[i]):
            xs.append(i + 1)
            smooth.append(sum(window) / len(window))
    if smooth:
        ax.plot(xs, smooth, color=color, alpha=0.5, label=f"{name}: {key} ({k}-it mean)")


def _draw_evals(ax: Any, r: dict[str, Any], name: str, color: Any) -> None:
    """A run's training evaluations (strict accuracy) and its final evaluation, base -> after (dashed)."""
    ev = [e for e in r.get("evals") or [] if "strict" in e]
    if ev:
        ax.plot([e["iteration"] for e in ev], [e["strict"] for e in ev], "o-", color=color,
                label=f"{name}: training eval")  # fmt: skip
    fb, fa = _strict_pair(r.get("final_evals"))
    if math.isfinite(fb):
        n = ev[-1]["iteration"] if ev else len(r.get("history") or [])
        ax.plot([0, n], [fb, fa], "s--", color=color, label=f"{name}: final eval")


def experiment_tables(
    exp: Experiment, raw: list[dict[str, Any]], conds: list[Condition], out: Path
) -> tuple[list[str], dict[str, Any], list[Path]]:
    """The experiment's tables after ``solace ablate``'s (Markdown lines), their rows (for the JSON) and
    plots: the final evaluation, the control seed by seed, the per-seed and budget tables asked for."""
    lines: list[str] = [f"Experiment `{exp.path}`" + (f": {exp.description}" if exp.description else "")]
    doc: dict[str, Any] = {"experiment": str(exp.path)}
    pngs: list[Path] = []
    if any(r.get("final_evals") for r in raw):
        lines += ["", *final_markdown(raw, conds)]
    if exp.control:
        doc["paired"] = paired_rows(raw, exp.control, exp.seeds)
        lines += ["", *paired_markdown(doc["paired"], exp.control)]
        png = paired_plot(raw, exp, conds, out)
        pngs += [png] if png else []
    if "per_seed" in exp.extra_tables:
        for c in conds:
            block = per_seed_markdown(raw, c)
            lines += ["", *block] if block else []
    if "budget" in exp.extra_tables:
        doc["budget"] = budget_rows(raw, exp.gain)
        lines += ["", *budget_markdown(doc["budget"], exp.gain)]
    return lines, doc, pngs
