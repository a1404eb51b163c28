"""Command groups that plugins add to the ``solace`` command line (``solace <name> ...``), and the one way a
command reports a :class:`~solace.errors.SolaceError` (one red line, exit code 2)."""

from __future__ import annotations

import typer

from solace.registry import Registry

COMMANDS: Registry[typer.Typer] = Registry("command group", "command")
"""Typer apps by name, mounted as ``solace <name>`` (an embedded world's own commands)."""


def fail(e: Exception) -> None:
    """Report ``e`` in one red line on stderr and exit with code 2."""
    typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)
