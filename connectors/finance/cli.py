"""`kit ingest finance`: bank statements and transaction tables into a MEDS event store."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer


class OnError(str, Enum):
    quarantine = "quarantine"
    fail = "fail"


def print_summary(s) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"finance ingest -> {s.out}", title_justify="left")
    for c in ("format / layout", "files", "records", "balances", "rejected", "events"):
        table.add_column(c, justify="left" if c == "format / layout" else "right")
    for fmt, c in s.by_format.items():
        rej = c.get("rejected", 0)
        table.add_row(fmt, f"{c.get('files', 0):,}", f"{c.get('records', 0):,}", f"{c.get('balances', 0):,}",
                      f"[red]{rej:,}[/]" if rej else "0", f"{c.get('events', 0):,}")
    console.print(table)
    console.print(f"{s.files} files -> {s.events:,} events, {s.subjects:,} subjects in {s.seconds:.1f}s")
    for code, n in s.labels.items():
        console.print(f"{code}: {n['positive']:,} positive, {n['negative']:,} negative")
    if s.quarantined:
        console.print(f"[yellow]{s.quarantined:,} records quarantined[/] -> {s.out / 'quarantine.ndjson'}")
    for path, why in s.skipped:
        console.print(f"[dim]skipped {path}: {why}[/]")


def ingest_finance(
    paths: list[Path] = typer.Argument(..., help="OFX/QFX, camt XML, CSV/Parquet files or directories (recursive)."),
    out: Path = typer.Option(..., "--out", "-o", help="Event store directory to write (replaced atomically)."),
    layout: str = typer.Option(
        None, "--layout", help="Force this table layout (shipped, or named in --mapping) instead of detection."
    ),
    mapping: list[Path] = typer.Option(
        None, "--mapping", help="A table layout declared in YAML (repeatable); see docs/finance-event-store.md."
    ),
    on_error: OnError = typer.Option(
        OnError.quarantine,
        "--on-error",
        help="quarantine: write rejected records to DIR/quarantine.ndjson and go on; fail: stop at the first.",
    ),
    name: str = typer.Option(None, "--name", help="Dataset name for metadata/dataset.json (default: DIR's name)."),
) -> None:
    """Ingest bank statements and transaction tables into a MEDS event store.

    Recognises each file by its content: OFX/QFX statements (1.x SGML, 2.x XML), ISO 20022 camt.052/053/054, and
    CSV/Parquet tables by their header (shipped layouts: amlsim-accounts, amlsim-transfers, uci-credit-default,
    german-credit; declare others with --mapping). Codes, units and labels: docs/finance-event-store.md.

    Example:

      kit ingest finance examples/data/finance --out kit-runs/finance-events
    """
    from connectors.finance.ingest import run_ingest

    summary = run_ingest(
        paths, out, layout=layout, mappings=mapping or [], fail_fast=on_error == OnError.fail, name=name
    )
    print_summary(summary)
