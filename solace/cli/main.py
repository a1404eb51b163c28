"""The ``solace`` command line (typer)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from solace.cli.plugins import COMMANDS
from solace.cli.plugins import fail as _fail
from solace.defaults import cli_default, default
from solace.errors import ConfigError, SolaceError
from solace.evaluation.confidence import run_rationale, run_rerank, run_score
from solace.evaluation.evaluators import EVALUATORS, Judge, find_judge
from solace.evaluation.metrics_eval import (
    build_metrics,
    parse_metric_args,
    parse_metric_list,
    run_metric_eval,
)
from solace.evaluation.suites import SUITES, load_suite
from solace.models.base import FlowModelAdapter
from solace.models.family import load_family_adapter, resolve_family
from solace.models.lora import load_lora, read_lora
from solace.prompts import fixed_prompts
from solace.registry import import_plugin, load_plugins
from solace.rewards.self_confidence import check_num_probes
from solace.sampling.generate import generate
from solace.trainer.ablate import run_grid
from solace.trainer.config import load_config, model_family_of, to_yaml
from solace.trainer.distributed import finish
from solace.trainer.experiment import load_experiment
from solace.trainer.model_setup import embed_prompts
from solace.trainer.signals import RunInterrupted
from solace.trainer.trainer import run_training
from solace.utils.images import save_grid, to_pil
from solace.utils.seeding import check_seed as _check_seed

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Post-train text-to-image flow models with RL on their own self-confidence.",
)


# Options several commands share, declared once.
DEFAULT_MODEL = default("model.name")
_MODEL_HELP = (
    f"{DEFAULT_MODEL} (the embedded world's model), a .safetensors of it, a diffusers folder or hub id."
)
# `solace ablate`'s conditions when neither --conditions nor --experiment names any (Table 2 + collapse)
DEFAULT_ABLATION = ["k4", "k8", "k16", "cfg_in_reward", "offline", "rho1", "no_cfg"]
ModelOpt = Annotated[str, typer.Option("--model", help=_MODEL_HELP)]
FamilyOpt = Annotated[
    str,
    typer.Option(
        "--family",
        help="The model's family: auto (from the pipeline's class name in model_index.json, or the embedded "
        "default) or a registered name (sd3, flux, a plugin's own), for a model under any name.",
    ),
]
PluginOpt = Annotated[
    list[str] | None,
    typer.Option("--plugin", help="Module to import first, e.g. one that registers a model family (repeat)."),
]
LoraOpt = Annotated[str | None, typer.Option("--lora", help="LoRA folder or .safetensors to apply.")]
LoraAlphaOpt = Annotated[
    float | None,
    typer.Option("--lora-alpha", help="The LoRA's alpha, for a file that carries no metadata (solace's do)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda")]
DtypeOpt = Annotated[
    str,
    typer.Option("--dtype", help="SD3/FLUX weights: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32."),
]
ResolutionOpt = Annotated[
    int,
    typer.Option(
        "--resolution",
        help="Square image side in pixels, shorthand for --height = --width (0: the model's own: SD3/FLUX "
        "512; the embedded world's model draws its own size only).",
    ),
]
HeightOpt = Annotated[int, typer.Option("--height", help="Image height in pixels (0: --resolution or 512).")]
WidthOpt = Annotated[int, typer.Option("--width", help="Image width in pixels (0: --resolution or 512).")]
NegativePromptOpt = Annotated[
    str,
    typer.Option(
        "--negative-prompt",
        help="Prompt whose embedding is CFG's null conditioning (default: the empty one).",
    ),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch CPU threads.")]
ProbesOpt = Annotated[int, typer.Option("--probes", help="K antithetic probes (even).")]
EditsOpt = Annotated[
    str,
    typer.Option(
        "--edits",
        help="off (the paper's S) | mean | max | lse: S(c) against the prompt's minimal edits (same probes).",
    ),
]


config_app = typer.Typer(no_args_is_help=True, help="Inspect and check training configs.")
app.add_typer(config_app, name="config")


@app.command("train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    config: str = typer.Option(
        cli_default("config"),
        "--config",
        "-c",
        help="YAML file or preset name (sd35m, flux, ablation/k4, the embedded world's presets ...).",
    ),
    resume: bool = typer.Option(False, help="Continue from the output folder's latest checkpoint."),
    allow_changes: bool = typer.Option(
        False, "--allow-changes", help="With --resume: continue although the config changed (listed)."
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Start a new run in a folder that holds an earlier one, removing that run's files (listed).",
    ),
) -> None:
    """Post-train a model with SOLACE / Flow-GRPO (or DiffusionNFT).

    Extra arguments are overrides, key=value over the preset: grpo.rho=1.0 train.iterations=10.

    Config sections: model, data, sampling, reward, grpo, nft (train.algorithm picks the update), optim,
    train, eval, monitor, lora_ema.

    Every key of a preset with its value: solace config show PRESET.

    A first run of about 3 minutes: solace train --config toy_quick."""
    try:
        if resume and overwrite:
            raise ConfigError("--overwrite", "contradicts --resume: give one (continue or replace)")
        cfg = load_config(config, list(ctx.args))
        res = run_training(cfg, resume=resume, allow_changes=allow_changes, overwrite=overwrite)
    except RunInterrupted as e:
        typer.secho(f"stopped: {e}", fg=typer.colors.YELLOW, err=True)
        finish()
        raise typer.Exit(e.exit_code) from None
    except SolaceError as e:
        _fail(e)
    if res.get("report"):
        typer.echo(f"report: {res['report']}")
    typer.echo(f"collapse monitor: {res['monitor']}")
    if res.get("eval_summary"):  # the evaluator's line: toy accuracy or metrics, base -> trained
        typer.echo(res["eval_summary"])
    finish()


@app.command("ablate", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def ablate(
    ctx: typer.Context,
    config: str | None = typer.Option(
        None,
        "--config",
        "-c",
        help=f"Base YAML file or preset every condition is laid over ({cli_default('config')}).",
    ),
    conditions: str | None = typer.Option(
        None,
        help="Comma list: configs/ablation names (Table 2: k4,k8,k16,cfg_in_reward,offline; collapse: "
        "rho1,no_cfg; variant: later_half), other presets (solace/configs/) or YAML files of differences. "
        "With --experiment: which of its conditions run "
        f"(default: all; without: {','.join(DEFAULT_ABLATION)}).",
    ),
    seeds: str | None = typer.Option(None, help="Comma-separated seeds; every condition runs each (0,1,2)."),
    out: Path | None = typer.Option(
        None, help="Grid folder: OUT/<condition>/seed<S>, ablation.md (runs/ablate)."
    ),
    experiment: Path | None = typer.Option(
        None,
        "--experiment",
        "-e",
        help="An experiment YAML (bench/experiments/*.yaml): base config, conditions, seeds, folder, "
        "overrides, the evaluation after training and the extra tables; the options above override it.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the equivalent `solace train` commands (e.g. for a cluster) and stop."
    ),
    collect_only: bool = typer.Option(
        False, "--collect-only", help="Train nothing: write the table from the runs finished so far."
    ),
) -> None:
    """The paper's ablations, or an experiment file's grid, as `solace train` runs, with one Markdown table
    and plots.

    Extra arguments are overrides shared by every run (train.iterations=10 ...); each condition's own
    settings win over them; with --experiment, final_eval.KEY=VALUE overrides the evaluation after training.
    Finished runs are kept and a killed grid resumes where it stopped."""
    names = [c for c in conditions.split(",") if c.strip()] or [""] if conditions is not None else None
    try:
        exp = load_experiment(experiment) if experiment is not None else None
        seed_list = _seed_list(seeds) if seeds is not None else (exp.seeds if exp else [0, 1, 2])
        out = out or (exp.out if exp else Path("runs/ablate"))
        res = run_grid(
            config or (exp.config if exp else cli_default("config")),
            [*(exp.overrides if exp else []), *(exp.split_overrides(ctx.args) if exp else ctx.args)],
            exp.select(names) if exp else (names or DEFAULT_ABLATION),
            seed_list,
            out,
            dry_run=dry_run,
            echo=typer.echo,
            collect_only=collect_only,
            experiment=exp,
        )
    except SolaceError as e:
        _fail(e)
    if not dry_run and res.get("table"):  # only the main process of a distributed grid writes it
        typer.echo(Path(res["table"]).read_text())
        typer.echo(f"wrote {out}/ablation.md, ablation.json and plots")
    finish()


@config_app.command("check", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_check(
    ctx: typer.Context,
    config: str = typer.Argument(..., help="YAML file or preset name."),
    show: bool = typer.Option(False, help="Print the merged config."),
    paths: bool = typer.Option(False, help="Also require prompt files to exist on this machine."),
) -> None:
    """Validate a config (types, ranges, names) without loading a model; says which model family loads it
    (model.family, or what auto tells from the pipeline's class name)."""
    try:
        cfg = load_config(config, list(ctx.args), check_paths=paths)
        family = model_family_of(cfg.model)[0]
    except SolaceError as e:
        _fail(e)
    if show:
        typer.echo(to_yaml(cfg))
    typer.echo(f"{config}: ok (model family: {family})")


@config_app.command("show", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def config_show(
    ctx: typer.Context, config: str = typer.Argument(..., help="YAML file or preset name.")
) -> None:
    """Print a preset's (or YAML file's) every key with its value, after the overrides given (key=value)."""
    try:
        cfg = load_config(config, list(ctx.args), check_paths=False)
    except SolaceError as e:
        _fail(e)
    typer.echo(to_yaml(cfg))


@app.command("embed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def embed_cmd(
    ctx: typer.Context,
    config: str = typer.Option(..., "--config", "-c", help="YAML file or preset name of an SD3/FLUX run."),
    prompts: str = typer.Option(
        None, "--prompts", help="Prompt file (.txt / .jsonl); default: the config's data.train_prompts."
    ),
    device: DeviceOpt = "auto",
) -> None:
    """Precompute prompt embeddings into model.embedding_cache (one safetensors file a prompt), so that
    training reads them from disk. Extra arguments are overrides (model.embedding_cache=DIR)."""
    try:
        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError("--device", f"use auto, cpu or cuda, not {device!r}")
        cfg = load_config(config, list(ctx.args), check_paths=False)
        res = embed_prompts(cfg, prompts, device)
    except SolaceError as e:
        _fail(e)
    typer.echo(json.dumps(res))


def _import_plugins(modules: list[str] | None) -> None:
    """``--plugin`` modules (e.g. one registering a model family), imported once; errors name the option."""
    load_plugins()
    for module in modules or []:
        import_plugin(module, "--plugin")


def _load(
    model: str,
    lora: str | None,
    device: str,
    lora_alpha: float | None = None,
    family: tuple[str, list[str] | None] = ("auto", None),
    **kwargs: Any,
) -> FlowModelAdapter:
    """The adapter of ``--model`` by its family; ``family`` is ``(--family, --plugin modules)``."""
    import torch

    _import_plugins(family[1])
    dev = (
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    adapter = load_family_adapter(model, family[0], "--family", device=dev, **kwargs)
    if lora:
        load_lora(adapter.denoiser, lora, trainable=False, alpha=lora_alpha)
    return adapter


@app.command("sample")
def sample_cmd(
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt (repeat for several rows)."),
    seeds: str = typer.Option("0,1,2,3", help="Comma-separated seeds: one image per seed and prompt."),
    steps: int = typer.Option(40, help="Sampling steps (10 = training, 40 = evaluation)."),
    cfg: float = typer.Option(7.0, "--cfg", help="Classifier-free guidance scale (1 disables)."),
    model: ModelOpt = DEFAULT_MODEL,
    family: FamilyOpt = "auto",
    plugin: PluginOpt = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    out: Path = typer.Option(Path("samples.png"), help="Output grid PNG."),
    negative_prompt: NegativePromptOpt = "",
    resolution: ResolutionOpt = 0,
    height: HeightOpt = 0,
    width: WidthOpt = 0,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
) -> None:
    """Write an image grid (rows = prompts, columns = seeds) with the ODE sampler, and each image alone in
    the folder named like the grid without its extension (samples.png -> samples/)."""
    import torch

    try:
        seed_list = _seed_list(seeds)
        _check_sampling(steps, 2, cfg, "ode", 1)
        _check_image_path(out)
        kwargs = _model_kwargs(device, dtype, resolution, height, width)
        adapter = _load(model, lora, device, lora_alpha, (family, plugin), **kwargs)
        prompt = list(prompt or adapter.image_prompts())
        if not prompt:
            raise ConfigError("--prompt", "give at least one prompt (repeat --prompt for several rows)")
        rows = [
            generate(adapter, prompt, 1, steps, cfg, seed=sd, progress=False, negative_prompt=negative_prompt)
            for sd in seed_list
        ]
        imgs = torch.stack(rows, 1).reshape(-1, *rows[0].shape[1:])
        labels = [p.removeprefix("a photo of ") for p in prompt]
        path = save_grid(
            out, list(imgs), len(seed_list), row_labels=labels, scale=4 if imgs.shape[-1] <= 64 else 1
        )
        singles = _save_singles(out.with_suffix(""), imgs, prompt, seed_list)
    except SolaceError as e:
        _fail(e)
    typer.echo(f"{path} (grid); {len(singles)} images in {out.with_suffix('')}/")


def _save_singles(folder: Path, imgs: Any, prompts: list[str], seeds: list[int]) -> list[Path]:
    """Each image of a prompt-major (prompt, seed) grid as its own PNG (what `solace score --images` reads):
    ``NN_<prompt words>_seed<S>.png``."""
    import re

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, img in enumerate(imgs):
        i, sd = divmod(k, len(seeds))
        words = re.sub(r"[^a-z0-9]+", "_", prompts[i].lower()).strip("_")[:60]
        paths.append(folder / f"{i:02d}_{words}_seed{seeds[sd]}.png")
        to_pil(img).save(paths[-1])
    return paths


def _check_image_path(out: Path) -> None:
    """``--out`` names an image file to write (not a folder; its folder writable)."""

    if out.is_dir():
        raise ConfigError(
            "--out", f"{out} is a folder; name the image file to write, e.g. {out / 'grid.png'}"
        )
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg"):
        raise ConfigError("--out", f"{out}: give a .png or .jpg file name")
    _check_writable(out.parent, "--out")


def _check_writable(folder: Path, option: str) -> None:
    """The output folder can be created and a file written in it, tried before any work is done."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise ConfigError(option, f"{folder} cannot be written ({e.strerror}); choose another") from None


@app.command("eval")
def eval_cmd(
    suite: str = typer.Option(
        cli_default("suite"),
        help="an embedded world's own suite (its held-out prompts, its exact evaluator) | drawbench | "
        "geneval | ocr | pickscore (these read --prompts).",
    ),
    prompts: Path = typer.Option(
        None, "--prompts", help="Prompt file of the suite: .txt (one a line) or GenEval .jsonl metadata."
    ),
    metrics: str = typer.Option(
        None,
        "--metrics",
        help="Comma-separated metrics (clip_score, pickscore, hps, image_reward, aesthetic, ocr, geneval, "
        "unified_reward, or your own factory package.module:function); default per suite: drawbench "
        "clip_score,pickscore,hps; geneval geneval; ocr ocr; pickscore pickscore.",
    ),
    metric_arg: list[str] = typer.Option(
        None,
        "--metric-arg",
        help="METRIC.KEY=VALUE for a metric's factory, e.g. clip_score.model=/path (repeat).",
    ),
    model: ModelOpt = DEFAULT_MODEL,
    family: FamilyOpt = "auto",
    plugin: PluginOpt = None,
    lora: Annotated[
        str | None, typer.Option("--lora", help="LoRA folder or .safetensors to evaluate against the base.")
    ] = None,
    lora_alpha: LoraAlphaOpt = None,
    samples: int = typer.Option(
        None, help="Samples per prompt (default: an embedded world's suite its own, 16; 1 otherwise)."
    ),
    steps: int = typer.Option(40, help="Sampling steps."),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale."),
    seed: int = typer.Option(0, help="Seed of the initial noise."),
    limit: int = typer.Option(
        0,
        help="An embedded world's suite: the first N held-out prompts per category; other suites: the first "
        "N prompts (0: all).",
    ),
    batch_size: int = typer.Option(8, help="Images per generation batch (file suites)."),
    negative_prompt: NegativePromptOpt = "",
    resolution: ResolutionOpt = 0,
    height: HeightOpt = 0,
    width: WidthOpt = 0,
    dtype: DtypeOpt = "auto",
    out: Path = typer.Option(Path("runs/eval"), help="Output folder (JSON, Markdown, grids)."),
    device: DeviceOpt = "auto",
) -> None:
    """Evaluate a model (and optionally a LoRA) on a prompt suite; prints a table, writes JSON + Markdown."""

    try:
        if samples is not None and samples < 1:
            raise ConfigError("--samples", f"must be >= 1, got {samples}")
        if limit < 0:
            raise ConfigError("--limit", f"must be >= 0 (0: all prompts), got {limit}")
        check_seed(seed, "--seed")
        _check_writable(out, "--out")
        _check_sampling(steps, 2, cfg, "ode", 1)
        model_kwargs = _model_kwargs(device, dtype, resolution, height, width)
        _import_plugins(plugin)  # a plugin may bring its own suite
    except SolaceError as e:
        _fail(e)
    own = EVALUATORS.get(suite) if suite in EVALUATORS else None
    if own is None or not own.suite_samples:
        try:
            _eval_suite(
                suite=suite,
                prompts=prompts,
                metrics=metrics,
                metric_args=metric_arg or [],
                model=model,
                family=(family, plugin),
                lora=lora,
                lora_alpha=lora_alpha,
                samples=1 if samples is None else samples,
                steps=steps,
                cfg=cfg,
                seed=seed,
                limit=limit,
                batch_size=batch_size,
                model_kwargs=model_kwargs,
                negative_prompt=negative_prompt,
                out=out,
                device=device,
            )
        except SolaceError as e:
            _fail(e)
        return
    if prompts is not None or metrics or metric_arg:
        _fail(
            SolaceError(
                f"--suite {suite} scores its own prompts ({own.description}); --prompts, --metrics and "
                "--metric-arg are for the file suites (drawbench, geneval, ocr, pickscore)"
            )
        )
    settings = dict(
        samples=own.suite_samples if samples is None else samples, steps=steps, cfg_scale=cfg, seed=seed,
        limit=limit, negative_prompt=negative_prompt,
    )  # fmt: skip
    try:
        runs = [("base", None)] + ([("lora", lora)] if lora else [])
        results = {}
        for label, lw in runs:
            adapter = _load(model, lw, device, lora_alpha, (family, plugin), **model_kwargs)
            results[label], table = own.run_suite(adapter, out / label, label, **settings)
            typer.echo(table)
            typer.echo("")
    except SolaceError as e:
        _fail(e)
    (out / "summary.json").write_text(json.dumps(results, indent=2))
    typer.echo(f"wrote {out}/")


def _eval_suite(
    *,
    suite: str,
    prompts: Path | None,
    metrics: str | None,
    metric_args: list[str],
    model: str,
    family: tuple[str, list[str] | None],
    lora: str | None,
    lora_alpha: float | None,
    samples: int,
    steps: int,
    cfg: float,
    seed: int,
    limit: int,
    batch_size: int,
    model_kwargs: dict[str, Any],
    negative_prompt: str,
    out: Path,
    device: str,
) -> None:
    """``solace eval`` on a prompt file with registry metrics (see :mod:`solace.evaluation.metrics_eval`)."""
    own = [n for n, p in EVALUATORS.items() if p.suite_samples]
    prompt_suite = load_suite(suite, prompts, limit, own)
    names = parse_metric_list(metrics if metrics else list(SUITES[suite]["metrics"]))
    kwargs = parse_metric_args(metric_args, names)
    if lora:
        read_lora(lora)  # a bad LoRA fails now, not after the base model's pass
    fns = build_metrics(names, kwargs)
    adapter = _load(model, None, device, None, family, **model_kwargs)
    settings = {
        "model": model,
        "metric_args": kwargs,
        "height": adapter.height,
        "width": adapter.width,
        "dtype": model_kwargs["dtype"],
    }
    res = run_metric_eval(
        adapter,
        prompt_suite,
        fns,
        out,
        lora=lora,
        lora_alpha=lora_alpha,
        samples_per_prompt=samples,
        num_steps=steps,
        cfg_scale=cfg,
        seed=seed,
        batch_size=batch_size,
        settings=settings,
        negative_prompt=negative_prompt,
    )
    typer.echo(res["table"])
    typer.echo("")
    typer.echo(f"wrote {out}/ (results.json, results.md, grid.png, index.html, images/)")


# ------------------------------------------------------------------ self-confidence without training

analyze_app = typer.Typer(no_args_is_help=True, help="Analyses of self-confidence without training.")
app.add_typer(analyze_app, name="analyze")

_PROMPTS_HELP = (
    "A prompt set (e.g. an embedded world's held-out prompts, judged by its exact evaluator) or a "
    ".txt/.jsonl file."
)


def _seed_list(text: str) -> list[int]:
    """``--seeds``: comma-separated seeds in [0, 2**32 - 1], or a one-line ConfigError."""
    seeds = _int_list(text, "--seeds", 0)
    for s in seeds:
        check_seed(s, "--seeds")
    return seeds


def check_seed(seed: int, option: str) -> None:
    """A seed option in [0, 2**32 - 1] (:func:`solace.utils.seeding.check_seed`), errors naming ``option``."""
    _check_seed(seed, option)


def _int_list(text: str, option: str, minimum: int) -> list[int]:
    """Comma-separated integers >= ``minimum``, or a one-line ConfigError naming ``option``."""

    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(option, f"expected comma-separated integers, got {text!r}") from None
    if not vals:
        raise ConfigError(option, f"expected at least one integer, got {text!r}")
    bad = [v for v in vals if v < minimum]
    if bad:
        raise ConfigError(option, f"every value must be >= {minimum}, got {bad[0]}")
    return vals


def _check_sampling(steps: int, probes: int, cfg: float, sampler: str, threads: int, limit: int = 0) -> None:

    if steps < 1:
        raise ConfigError("--steps", f"must be >= 1, got {steps}")
    check_num_probes(probes, "--probes")
    if cfg < 1.0:
        raise ConfigError("--cfg", f"must be >= 1 (1 disables guidance), got {cfg}")
    if sampler not in ("sde", "ode"):
        raise ConfigError("--sampler", f"use sde (the training sampler) or ode, not {sampler!r}")
    if threads < 1:
        raise ConfigError("--threads", f"must be >= 1, got {threads}")
    if limit < 0:
        raise ConfigError("--limit", f"must be >= 0 (0: all prompts), got {limit}")


def _prompt_source(
    prompts: str, limit: int, model: str, family: tuple[str, list[str] | None]
) -> tuple[list[str], Judge | None]:
    """The prompts (a prompt set's fixed list or a file's, the first ``limit``) and, where a registered
    evaluator can judge them exactly on this model, its :class:`~solace.evaluation.evaluators.Judge`."""
    _import_plugins(family[1])
    items = fixed_prompts(prompts, limit, "--prompts")
    return [it.text for it in items], find_judge(items, resolve_family(model, family[0], "--family")[0])


def _size_kwargs(resolution: int, height: int, width: int) -> dict[str, int]:
    """``--resolution`` (shorthand for ``--height`` = ``--width``) and ``--height``/``--width`` as the
    adapter's ``height``/``width`` keywords (0: not given, the model's own); negative or conflicting values
    are a ConfigError naming the option."""

    for opt, v in (("--resolution", resolution), ("--height", height), ("--width", width)):
        if v < 0:
            raise ConfigError(opt, f"must be >= 0 pixels (0: the model's own size), got {v}")
    for opt, v in (("--height", height), ("--width", width)):
        if resolution and v and v != resolution:
            raise ConfigError(
                "--resolution",
                f"{resolution} conflicts with {opt} {v}: --resolution sets both height and width; give "
                "--resolution or --height and --width",
            )
    size = {"height": height or resolution, "width": width or resolution}
    return {k: v for k, v in size.items() if v}


def _model_kwargs(
    device: str, dtype: str, resolution: int, height: int = 0, width: int = 0
) -> dict[str, Any]:
    """The adapter's ``dtype`` (auto: bf16 on CUDA, fp32 on CPU) and image size, checked."""
    import torch

    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ConfigError("--dtype", f"use auto, bf16, fp16 or fp32, not {dtype!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("--device", f"use auto, cpu or cuda, not {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda asked for, but torch sees no GPU; use auto or cpu")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    kwargs: dict[str, Any] = {"dtype": ("bf16" if cuda else "fp32") if dtype == "auto" else dtype}
    return {**kwargs, **_size_kwargs(resolution, height, width)}


def _load_scoring_model(
    model: str,
    lora: str | None,
    device: str,
    dtype: str,
    size: tuple[int, int, int],
    threads: int,
    lora_alpha: float | None = None,
    family: tuple[str, list[str] | None] = ("auto", None),
) -> FlowModelAdapter:
    """The adapter of the scoring commands; ``size`` = (--resolution, --height, --width)."""
    import torch

    kwargs = _model_kwargs(device, dtype, *size)
    torch.set_num_threads(threads)
    return _load(model, lora, device, lora_alpha, family, **kwargs)


def _read_images(paths: list[str], size: tuple[int, int]) -> Any:
    """PNG/JPEG files -> (B, 3, H, W) float in [0, 1] with ``size = (H, W)`` (resized bicubically when their
    size differs)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for p in paths:
        if not Path(p).is_file():
            raise ConfigError("--images", f"{p} does not exist")
        try:
            im = Image.open(p).convert("RGB")
        except Exception as e:  # PIL raises several kinds for unreadable files
            raise ConfigError("--images", f"{p} is not a readable image ({type(e).__name__})") from None
        if im.size != (size[1], size[0]):  # PIL sizes are (width, height)
            im = im.resize((size[1], size[0]), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(out)


@app.command("score", context_settings={"allow_extra_args": True})
def score_cmd(
    ctx: typer.Context,
    prompt: list[str] = typer.Option(None, "--prompt", "-p", help="Prompt (repeat for several)."),
    images: list[str] = typer.Option(
        None, "--images", help="Images to score against the prompt: --images a.png b.png ..."
    ),
    generate: int = typer.Option(
        0, help="Instead of --images: generate N samples per prompt and score them."
    ),
    seed: int = typer.Option(0, help="Seed of the generated samples and of the probes."),
    steps: int = typer.Option(10, help="Sampler steps; self-confidence probes their timesteps."),
    cfg: float = typer.Option(
        7.0, "--cfg", help="CFG scale of generation (scoring uses the conditional velocity)."
    ),
    sampler: str = typer.Option("sde", help="sde (the training sampler) | ode."),
    probes: ProbesOpt = 8,
    edits: EditsOpt = "off",
    model: ModelOpt = DEFAULT_MODEL,
    family: FamilyOpt = "auto",
    plugin: PluginOpt = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    out: Path = typer.Option(Path("runs/score"), help="Output folder (score.json, generated images)."),
    negative_prompt: NegativePromptOpt = "",
    resolution: ResolutionOpt = 0,
    height: HeightOpt = 0,
    width: WidthOpt = 0,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = 2,
    device: DeviceOpt = "auto",
) -> None:
    """Self-confidence R (and S_t per timestep) of given images or of generated samples; no training."""
    try:
        paths = list(images or [])
        if ctx.args:
            if not paths:
                raise ConfigError("--images", f"unexpected arguments {ctx.args}; list images after --images")
            paths += list(ctx.args)
        if not prompt:
            raise ConfigError("--prompt", "give the prompt to score against (repeat --prompt for several)")
        if generate < 0:
            raise ConfigError("--generate", f"must be >= 1, got {generate}")
        check_seed(seed, "--seed")
        if bool(paths) == (generate > 0):
            raise ConfigError("--images", "give either --images FILE ... or --generate N (N >= 1), not both")
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise ConfigError("--images", f"{missing[0]} does not exist")
        _check_sampling(steps, probes, cfg, sampler, threads)
        size = (resolution, height, width)
        adapter = _load_scoring_model(model, lora, device, dtype, size, threads, lora_alpha, (family, plugin))
        imgs = _read_images(paths, adapter.image_pixels()) if paths else None
        doc = run_score(
            adapter,
            list(prompt),
            out,
            images=imgs,
            image_names=paths,
            generate=generate,
            seed=seed,
            num_steps=steps,
            cfg_scale=cfg,
            sampler=sampler,
            num_probes=probes,
            edits=edits,
            negative_prompt=negative_prompt,
        )
    except SolaceError as e:
        _fail(e)
    typer.echo(doc["table"])
    typer.echo(f"wrote {out}/score.json")


@app.command("rerank")
def rerank_cmd(
    prompts: str = typer.Option(default("eval.prompts"), "--prompts", help=_PROMPTS_HELP),
    limit: int = typer.Option(0, help="Keep the first N prompts (0: all)."),
    n: str = typer.Option(
        "4,8,16", "--n", help="Comma-separated candidate counts N (nested prefixes of max N)."
    ),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (mean and spread are over seeds)."),
    steps: int = typer.Option(
        10, help="Sampler steps (10 = training); self-confidence probes their timesteps."
    ),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale of generation."),
    sampler: str = typer.Option("sde", help="sde (the training sampler) | ode."),
    probes: ProbesOpt = 8,
    edits: EditsOpt = "off",
    batch_size: int = typer.Option(16, help="Samples per generation batch."),
    model: ModelOpt = DEFAULT_MODEL,
    family: FamilyOpt = "auto",
    plugin: PluginOpt = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    out: Path = typer.Option(Path("runs/rerank"), help="Output folder."),
    negative_prompt: NegativePromptOpt = "",
    resolution: ResolutionOpt = 0,
    height: HeightOpt = 0,
    width: WidthOpt = 0,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = 2,
    device: DeviceOpt = "auto",
) -> None:
    """Best-of-N by self-confidence: keep the most self-confident of N candidates per prompt.

    On prompts a registered evaluator judges exactly (an embedded world's): strict accuracy of best-of-N vs
    a random pick vs the oracle, over seeds (rerank.json, rerank.md, rerank.png). Otherwise: the selected
    images and their scores."""
    try:
        ns = _int_list(n, "--n", 1)
        seed_list = _seed_list(seeds)
        _check_sampling(steps, probes, cfg, sampler, threads, limit)
        if batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
        prompt_list, judge = _prompt_source(prompts, limit, model, (family, plugin))
        size = (resolution, height, width)
        adapter = _load_scoring_model(model, lora, device, dtype, size, threads, lora_alpha, (family, plugin))
        doc = run_rerank(
            adapter,
            prompt_list,
            judge,
            out,
            ns=ns,
            seeds=seed_list,
            num_steps=steps,
            cfg_scale=cfg,
            sampler=sampler,
            num_probes=probes,
            batch_size=batch_size,
            edits=edits,
            negative_prompt=negative_prompt,
        )
    except SolaceError as e:
        _fail(e)
    if "table" in doc:
        typer.echo(doc["table"])
    typer.echo(f"wrote {out}/")


@analyze_app.command("rationale")
def rationale_cmd(
    prompts: str = typer.Option(default("eval.prompts"), "--prompts", help=_PROMPTS_HELP),
    limit: int = typer.Option(0, help="Keep the first N prompts (0: all)."),
    samples: int = typer.Option(8, help="Samples per prompt and regime."),
    steps: int = typer.Option(
        10, help="Regimes: STEPS without CFG, STEPS with CFG, 2 x STEPS with CFG; probes at STEPS' timesteps."
    ),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale of the guided regimes."),
    sampler: str = typer.Option("ode", help="ode (inference) | sde (the training sampler)."),
    probes: ProbesOpt = 8,
    edits: EditsOpt = "off",
    seed: int = typer.Option(0, help="Seed of the initial noise (the same for every regime) and probes."),
    batch_size: int = typer.Option(16, help="Samples per generation batch."),
    model: ModelOpt = DEFAULT_MODEL,
    family: FamilyOpt = "auto",
    plugin: PluginOpt = None,
    lora: LoraOpt = None,
    lora_alpha: LoraAlphaOpt = None,
    out: Path = typer.Option(Path("runs/rationale"), help="Output folder."),
    negative_prompt: NegativePromptOpt = "",
    resolution: ResolutionOpt = 0,
    height: HeightOpt = 0,
    width: WidthOpt = 0,
    dtype: DtypeOpt = "auto",
    threads: ThreadsOpt = 2,
    device: DeviceOpt = "auto",
) -> None:
    """Self-confidence under three inference regimes (rationale.png, rationale.json); on exactly judged
    prompts also its within-group AUC against exact correctness per category and timestep (rationale.md)."""
    try:
        if samples < 1:
            raise ConfigError("--samples", f"must be >= 1, got {samples}")
        if batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {batch_size}")
        check_seed(seed, "--seed")
        _check_sampling(steps, probes, cfg, sampler, threads, limit)
        prompt_list, judge = _prompt_source(prompts, limit, model, (family, plugin))
        size = (resolution, height, width)
        adapter = _load_scoring_model(model, lora, device, dtype, size, threads, lora_alpha, (family, plugin))
        doc = run_rationale(
            adapter,
            prompt_list,
            judge,
            out,
            samples=samples,
            num_steps=steps,
            cfg_scale=cfg,
            sampler=sampler,
            num_probes=probes,
            seed=seed,
            batch_size=batch_size,
            edits=edits,
            negative_prompt=negative_prompt,
        )
    except SolaceError as e:
        _fail(e)
    for label, r in doc["regimes"].items():
        typer.echo(f"{label}: mean R {r['R_mean']:.4f} (std {r['R_std']:.4f})")
    if "table" in doc:
        typer.echo(doc["table"])
    typer.echo(f"wrote {out}/")


def main() -> None:
    """The ``solace`` command (and ``python -m solace``). A standard stream that cannot be written (stdout on
    a full disk or ``/dev/full``) is one line on stderr and exit code 2, not a traceback."""
    import os
    import sys

    try:
        app(prog_name="solace")
    except OSError as e:
        if e.filename is not None:  # a file a command writes: its own errors say which
            raise
        with contextlib.suppress(OSError):
            sys.stderr.write(
                f"error: the output stream cannot be written ({e.strerror}); free space or redirect\n"
            )
            sys.stderr.flush()
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush goes nowhere
        sys.exit(2)


for _name, _app in COMMANDS.items():  # the plugins' command groups (an embedded world's `solace <name> ...`)
    app.add_typer(_app, name=_name)


if __name__ == "__main__":  # pragma: no cover
    main()
