"""``solace toy ...``: the toy world's own commands (mounted by the plugin, :mod:`solace.toy.plugin`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from solace.cli.plugins import fail
from solace.errors import ConfigError, SolaceError
from solace.toy.pretrain import PretrainConfig, pretrain

app = typer.Typer(no_args_is_help=True, help="The toy world: pretrain its base model.")


@app.command("pretrain")
def pretrain_cmd(
    out: Path = typer.Option(Path("runs/toy_pretrain"), help="Run folder (checkpoints, log, final weights)."),
    steps: int = typer.Option(4000, help="Optimizer steps."),
    batch_size: int = typer.Option(64, help="Images per step."),
    lr: float = typer.Option(6e-4, help="Peak AdamW learning rate (warmup, then cosine to 10%)."),
    dataset_size: int = typer.Option(80_000, help="Number of pre-rendered training scenes."),
    seed: int = typer.Option(0, help="Seed for data, init and batch order."),
    threads: int = typer.Option(2, help="torch CPU threads (and render workers)."),
    eval_every: int = typer.Option(500, help="Quick held-out evaluation every N steps."),
    resume: bool = typer.Option(False, help="Continue from the run folder's last checkpoint."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Start anew in a folder that holds an earlier run, removing its files."
    ),
    init: str = typer.Option(
        "", help="Start from another run's checkpoint.safetensors (weights, EMA, Adam moments), new schedule."
    ),
) -> None:
    """Pretrain the toy world's base flow model (rectified flow + caption dropout, EMA, safetensors)."""
    cfg = PretrainConfig(
        out=str(out),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        dataset_size=dataset_size,
        seed=seed,
        threads=threads,
        eval_every=eval_every,
        init=init,
    )
    try:
        if resume and overwrite:
            raise ConfigError("--overwrite", "contradicts --resume: give one (continue or replace)")
        path = pretrain(cfg, resume=resume, overwrite=overwrite)
    except SolaceError as e:
        fail(e)
    typer.echo(json.dumps({"weights": str(path), "learning_curve": str(out / "learning_curve.png")}))
