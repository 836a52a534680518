"""`kit predict`: score every subject of bundles, bulk exports or an event store, streaming NDJSON out."""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)


def predict_command(
    inputs: list[Path] = typer.Argument(..., help="FHIR Bundles (.json/.json.gz), Bulk NDJSON exports, folders of them, or an event store."),
    bundle: Path = typer.Option(..., "--bundle", "-b", help="A bundle directory or .kitbundle (verified on load)."),
    out: str = typer.Option("predictions.ndjson", "--out", "-o", help="Output NDJSON file ('-' streams to stdout)."),
    fmt: str = typer.Option("json", "--format", "-f", help="json (one prediction per line) or fhir (RiskAssessment resources)."),
    as_of: str = typer.Option(None, "--as-of", help="Prediction time for every subject (ISO 8601); default: each subject's last event."),
    tasks: str = typer.Option(None, "--tasks", help="Comma-separated task names (default: every task of the bundle)."),
    explain: bool = typer.Option(True, "--explain/--no-explain", help="Name each prediction's most influential input events."),
    chunk: int = typer.Option(256, "--subjects-per-chunk", min=1, help="Subjects scored together (bounds memory)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Rows per model batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
) -> None:
    """Score every subject with a bundle and write one prediction per subject and task, as the work goes.

    Raw records are ingested first through the bundle's vertical (rejected records go to OUT.quarantine.ndjson with
    their reasons); an event store is read directly. `--format fhir` writes FHIR RiskAssessment resources.

    Example:

      kit predict --bundle kit-runs/demo/clinical.kitbundle examples/data/fhir/bulk-ndjson --out risk.ndjson --format fhir
    """
    import orjson
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kit.errors import KitError
    from kit.events import is_event_store, read_subjects, scan_events
    from kit.fsutil import atomic_file
    from kit.predict.formats import SubjectData, get_format
    from kit.predict.predictor import Predictor, ingest_to_store, relax_gc

    t0 = time.perf_counter()
    if as_of is not None:
        from kit.predict.predictor import _utc

        _utc(as_of, "--as-of")  # a bad time stops here, before any ingest or scoring
    predictor = Predictor.load(bundle, device=device, batch_size=batch_size)
    relax_gc()
    wire = get_format(predictor.bundle.vertical, fmt)
    task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    console.print(f"bundle verified: {bundle} ({predictor.name} {predictor.version}, tasks: {', '.join(predictor.tasks)})")
    for p in inputs:
        if not p.exists():
            raise KitError(f"{p}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="kit-predict-") as tmp:
        if len(inputs) == 1 and is_event_store(inputs[0]):
            store = inputs[0]
        else:
            console.print(f"ingesting {len(inputs)} input(s) through the {predictor.bundle.vertical} vertical")
            store = ingest_to_store(predictor.bundle.vertical, list(inputs), Path(tmp) / "events")
            quarantine = store / "quarantine.ndjson"
            if out != "-" and quarantine.is_file() and quarantine.stat().st_size:
                dest = Path(out + ".quarantine.ndjson")
                shutil.copyfile(quarantine, dest)
                n = sum(1 for _ in quarantine.open("rb"))
                console.print(f"[yellow]{n} record(s) rejected[/]: reasons in {dest}")
        subjects = read_subjects(store)
        ids = subjects.get_column("subject_id").sort().to_list()
        events = scan_events(store)
        n_pred = n_scored = 0
        sink = atomic_file(out, "wb") if out != "-" else _stdout()
        with sink as fh, Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("subjects"),
                                  TimeRemainingColumn(), console=console, transient=False) as bar:
            job = bar.add_task("subjects", total=len(ids))
            import polars as pl

            for start in range(0, len(ids), chunk):
                part = pl.Series(ids[start:start + chunk], dtype=pl.Int64)
                sd = SubjectData(events=events.filter(pl.col("subject_id").is_in(part.implode())).collect(),
                                 subjects=subjects.filter(pl.col("subject_id").is_in(part.implode())))
                preds = predictor.predict_data(sd, as_of=as_of, tasks=task_list, explain=explain)
                for rec in wire.records(preds, predictor.info):
                    fh.write(orjson.dumps(rec) + b"\n")
                fh.flush()
                n_pred += len(preds)
                n_scored += len({p.subject_id for p in preds})
                bar.advance(job, len(part))
    secs = time.perf_counter() - t0
    skipped = len(ids) - n_scored
    console.print(f"[bold green]wrote[/] {n_pred:,} predictions for {n_scored:,} subjects to {out} in {secs:.1f}s"
                  + (f"; {skipped:,} subject(s) had no history before the prediction time" if skipped else ""))


class _stdout:
    def __enter__(self):
        return sys.stdout.buffer

    def __exit__(self, *exc) -> None:
        sys.stdout.buffer.flush()


def register(app: typer.Typer) -> None:
    app.command("predict", no_args_is_help=True)(predict_command)
