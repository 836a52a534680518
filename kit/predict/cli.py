"""`kit predict`: score every subject of bundles, bulk exports or an event store, streaming NDJSON out."""

from __future__ import annotations

import os
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
    workers: int = typer.Option(1, "--workers", "-w", min=0, help="Scoring processes, each with its share of the cores (0: one per core)."),
) -> None:
    """Score every subject with a bundle and write one prediction per subject and task, as the work goes.

    Raw records are ingested first through the bundle's vertical (rejected records go to OUT.quarantine.ndjson with
    their reasons); an event store is read directly. `--format fhir` writes FHIR RiskAssessment resources.

    Example:

      kit predict --bundle kit-runs/demo/clinical.kitbundle examples/data/fhir/bulk-ndjson --out risk.ndjson --format fhir

    With `--workers N` chunks are scored by N processes at once (output order unchanged).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from kit.errors import KitError
    from kit.events import is_event_store, read_subjects
    from kit.fsutil import atomic_file
    from kit.predict.formats import get_format
    from kit.predict.predictor import Predictor, ingest_to_store, relax_gc

    t0 = time.perf_counter()
    if as_of is not None:
        from kit.predict.predictor import _utc

        _utc(as_of, "--as-of")  # a bad time stops here, before any ingest or scoring
    predictor = Predictor.load(bundle, device=device, batch_size=batch_size)
    relax_gc()
    get_format(predictor.bundle.vertical, fmt)  # an unknown --format stops here
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
        n_pred = n_scored = 0
        sink = atomic_file(out, "wb") if out != "-" else _stdout()
        n_workers = max(1, min(workers or (os.cpu_count() or 1), len(ids)))
        if n_workers > 1:  # several chunks per process, so none waits long on the last one
            chunk = min(chunk, max(16, -(-len(ids) // (4 * n_workers))))
        chunks = [ids[start:start + chunk] for start in range(0, len(ids), chunk)]
        n_workers = min(n_workers, len(chunks)) or 1
        job_args = dict(store=str(store), as_of=as_of, tasks=task_list, explain=explain, fmt=fmt)
        with sink as fh, Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("subjects"),
                                  TimeRemainingColumn(), console=console, transient=False) as bar:
            job = bar.add_task("subjects", total=len(ids))
            if n_workers == 1:
                _WORKER["predictor"] = predictor
                results = (score_chunk(part, **job_args) for part in chunks)
                pool = None
            else:
                pool = _pool(n_workers, bundle, device, batch_size)
                results = _in_order(pool, chunks, job_args, window=2 * n_workers)
            try:
                for part, (lines, n_p, n_s) in zip(chunks, results):
                    fh.write(lines)
                    fh.flush()
                    n_pred += n_p
                    n_scored += n_s
                    bar.advance(job, len(part))
            finally:
                _WORKER.clear()
                if pool is not None:
                    pool.shutdown(cancel_futures=True)
    secs = time.perf_counter() - t0
    skipped = len(ids) - n_scored
    console.print(f"[bold green]wrote[/] {n_pred:,} predictions for {n_scored:,} subjects to {out} in {secs:.1f}s"
                  + (f"; {skipped:,} subject(s) had no history before the prediction time" if skipped else ""))


_WORKER: dict = {}  # the scoring process's Predictor


def _init_worker(bundle: str, device: str, batch_size: int, threads: int) -> None:
    import torch

    from kit.predict.predictor import Predictor, relax_gc

    torch.set_num_threads(threads)
    _WORKER["predictor"] = Predictor.load(bundle, device=device, batch_size=batch_size)
    relax_gc()


def score_chunk(ids: list[int], *, store: str, as_of, tasks, explain: bool, fmt: str) -> tuple[bytes, int, int]:
    """One chunk of subjects of an event store scored: (NDJSON lines, predictions, subjects scored)."""
    import orjson
    import polars as pl

    from kit.events import read_subjects, scan_events
    from kit.predict.formats import SubjectData, get_format

    predictor = _WORKER["predictor"]
    part = pl.Series(ids, dtype=pl.Int64).implode()
    sd = SubjectData(events=scan_events(Path(store)).filter(pl.col("subject_id").is_in(part)).collect(),
                     subjects=read_subjects(Path(store)).filter(pl.col("subject_id").is_in(part)))
    preds = predictor.predict_data(sd, as_of=as_of, tasks=tasks, explain=explain)
    wire = get_format(predictor.bundle.vertical, fmt)
    lines = b"".join(orjson.dumps(rec) + b"\n" for rec in wire.records(preds, predictor.info))
    return lines, len(preds), len({p.subject_id for p in preds})


def _pool(n: int, bundle: Path, device: str, batch_size: int):
    """N spawned scoring processes, each with its share of the cores (torch's and polars' pools)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // n)
    before = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = before or str(threads)  # read when a worker imports polars
    try:
        pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                   initargs=(str(bundle), device, batch_size, threads))
        pool.submit(int).result()  # start them now, under the environment above
    finally:
        if before is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
    return pool


def _in_order(pool, chunks: list, job_args: dict, window: int):
    """Results in chunk order, at most `window` chunks in flight (bounded memory)."""
    from collections import deque

    pending: deque = deque()
    for part in chunks:
        pending.append(pool.submit(_score_chunk_safely, part, job_args))
        if len(pending) >= window:
            yield _unwrap(pending.popleft().result())
    while pending:
        yield _unwrap(pending.popleft().result())


def _score_chunk_safely(part: list[int], job_args: dict):
    from kit.errors import KitError

    try:
        return score_chunk(part, **job_args)
    except KitError as err:  # our errors carry extra fields that do not survive pickling: the message crosses
        return KitError(str(err))


def _unwrap(result):
    if isinstance(result, Exception):
        raise result
    return result


class _stdout:
    def __enter__(self):
        return sys.stdout.buffer

    def __exit__(self, *exc) -> None:
        sys.stdout.buffer.flush()


def register(app: typer.Typer) -> None:
    app.command("predict", no_args_is_help=True)(predict_command)
