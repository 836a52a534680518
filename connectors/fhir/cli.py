"""`kit ingest fhir`."""

from __future__ import annotations

from pathlib import Path

import typer


def ingest_fhir(
    paths: list[Path] = typer.Argument(..., help="Bundle/NDJSON files or directories (recursive)."),
    out: Path = typer.Option(..., "--out", help="Event store directory to write."),
) -> None:
    """Ingest FHIR R4 Bundles and Bulk Data NDJSON into a MEDS event store.

    Example:

      kit ingest fhir examples/data/fhir --out kit-runs/events
    """
    raise NotImplementedError
