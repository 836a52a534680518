"""`kit inspect DIR`: what is in an event store."""

from __future__ import annotations

from pathlib import Path

import typer


def inspect_command(
    path: Path = typer.Argument(..., help="An event store directory written by `kit ingest`."),
) -> None:
    """Summarize an event store: subjects, events, vocabularies, time span, top codes.

    Example:

      kit inspect kit-runs/events
    """
    raise NotImplementedError


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)
