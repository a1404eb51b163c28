"""The ``solace`` command line (typer)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from solace.errors import SolaceError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Post-train text-to-image flow models with RL on their own self-confidence.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: pretrain its base model.")
app.add_typer(toy_app, name="toy")


def _fail(e: Exception) -> None:
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@toy_app.command("pretrain")
def toy_pretrain(
    out: Path = typer.Option(Path("runs/toy_pretrain"), help="Run folder (checkpoints, log, final weights)."),
    steps: int = typer.Option(4000, help="Optimizer steps."),
    batch_size: int = typer.Option(64, help="Images per step."),
    lr: float = typer.Option(6e-4, help="Peak AdamW learning rate (warmup, then cosine to 10%)."),
    dataset_size: int = typer.Option(80_000, help="Number of pre-rendered training scenes."),
    seed: int = typer.Option(0, help="Seed for data, init and batch order."),
    threads: int = typer.Option(2, help="torch CPU threads (and render workers)."),
    eval_every: int = typer.Option(500, help="Quick held-out evaluation every N steps."),
    resume: bool = typer.Option(False, help="Continue from the run folder's last checkpoint."),
) -> None:
    """Pretrain the toy world's base flow model (rectified flow + caption dropout, EMA, safetensors)."""
    from solace.toy.pretrain import PretrainConfig, pretrain

    cfg = PretrainConfig(out=str(out), steps=steps, batch_size=batch_size, lr=lr, dataset_size=dataset_size,
                         seed=seed, threads=threads, eval_every=eval_every)
    try:
        path = pretrain(cfg, resume=resume)
    except SolaceError as e:
        _fail(e)
    typer.echo(json.dumps({"weights": str(path), "learning_curve": str(out / "learning_curve.png")}))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
