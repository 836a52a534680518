"""The `kit` command line. Heavy libraries are imported inside commands so `kit --help` stays fast."""

from __future__ import annotations

import importlib
import sys

import typer
from rich.console import Console

from kit import __version__, registry
from kit.errors import KitError

err_console = Console(stderr=True, soft_wrap=True)  # never hard-wrap a path in a log

app = typer.Typer(
    name="kit",
    help=(
        "Domain-vertical fine-tuning kit: records in, a calibrated predictor bundle out.\n\n"
        "Example:\n\n"
        "  kit ingest fhir examples/data/fhir --out kit-runs/events\n\n"
        "  kit inspect kit-runs/events"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)

ingest_app = typer.Typer(
    help=(
        "Read source records into a MEDS event store.\n\n"
        "Example:\n\n  kit ingest fhir path/to/bundles --out events/"
    ),
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(ingest_app, name="ingest")

# Modules that add commands to `app` through a `register(app)` function, in help order.
COMMAND_MODULES = [
    "kit.inspect",
    "kit.datasets.cli",
    "kit.train.cli",
    "kit.bundle_cli",
    "kit.eval.cli",
    "kit.predict.cli",
    "kit.serve.cli",
]


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the kit version and exit."),
) -> None:
    if version:
        typer.echo(__version__)
        raise typer.Exit()


def _register_all() -> None:
    for name in registry.available(registry.CONNECTORS_GROUP):
        ingest_app.command(name)(registry.connector(name))
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(app)


def main() -> None:
    try:
        _register_all()
        app()
    except KitError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        if exc.hint:
            err_console.print(f"[yellow]hint:[/] {exc.hint}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
