"""`kit ingest fhir`: FHIR R4 Bundles and Bulk Data NDJSON into a MEDS event store."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import typer

# The killed-run cleanup is shared with the other connectors.
from kit.fsutil import OWNER_FILE
from kit.fsutil import remove_stale_temporaries as _remove_stale_temporaries


class ValidateMode(str, Enum):
    fast = "fast"
    full = "full"


class OnError(str, Enum):
    quarantine = "quarantine"
    fail = "fail"


@dataclass
class IngestSummary:
    """What an ingest did; `kit ingest fhir` prints it, tests and the benchmark read it."""

    out: Path
    files: int
    skipped_files: list[tuple[str, str]]
    counts: Counter  # (resource type, outcome) -> records
    events: int
    subjects: int
    shards: int
    quarantined: int
    duplicates: int
    subjects_without_patient: int
    events_without_patient: int
    json_bytes: int
    seconds: float
    other_versions: dict = field(default_factory=dict)  # FHIR version -> records rejected as that version
    report: dict = field(default_factory=dict)

    def by_type(self) -> list[tuple[str, int, int, int]]:
        from connectors.fhir.ingest import INGESTED, NOT_USED, REJECTED

        types = sorted({t for t, _ in self.counts})
        return [(t, self.counts[(t, INGESTED)], self.counts[(t, REJECTED)], self.counts[(t, NOT_USED)]) for t in types]

    def total(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.counts.items() if o == outcome)


def _fingerprint(names: list[str], files) -> str:
    h = hashlib.sha256()
    for n, f in zip(names, files):
        h.update(f"{n}\0{f.size}\n".encode())
    return h.hexdigest()[:16]


def run_ingest(
    paths: list[Path],
    out: Path,
    *,
    validate_full: bool = False,
    fail_fast: bool = False,
    workers: int = 0,
    name: str | None = None,
    show_progress: bool = False,
    shard_mb: int | None = None,
    append: bool = False,
) -> IngestSummary:
    """Ingest `paths` into the event store `out` (written atomically). Raises KitError for user mistakes."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from connectors.fhir import ingest, sources, writer
    from kit.errors import KitError
    from kit.events import is_event_store
    from kit.fsutil import atomic_dir

    start = time.perf_counter()
    found = sources.discover(paths, exclude=Path(out))
    if not found.files:
        raise KitError(
            f"no FHIR input files under {', '.join(map(str, paths))}",
            hint="expected .json, .json.gz (Bundles or single resources) or .ndjson, .ndjson.gz (Bulk Data)",
        )
    out = Path(out)
    if out.exists() and not is_event_store(out) and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out}: exists and is not an event store; refusing to replace it", hint="pick a new --out")
    previous = None
    if append:
        if not is_event_store(out):
            raise KitError(f"{out}: --append needs an existing event store there", hint="run once without --append")
        previous = out
    from kit.events import DATA_DIR, read_codes, read_dataset_metadata
    files = found.files
    names = ingest.display_names(files, paths)
    kinds = [f.kind for f in files]
    opts = ingest.IngestOptions(
        validate_full=validate_full,
        fail_fast=fail_fast,
        workers=workers,
        shard_json_bytes=(shard_mb << 20) if shard_mb else ingest.JSON_BYTES_PER_SHARD,
    )

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
        disable=not show_progress,
    )
    _remove_stale_temporaries(out)
    with progress, atomic_dir(out) as tmp:
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
        spill = tmp / ".spill"
        spill.mkdir()
        read_task = progress.add_task(f"reading {len(files)} files", total=sum(f.size for f in files))
        results, n_buckets = ingest.parse_inputs(
            files,
            names,
            spill,
            opts,
            progress=lambda n: progress.advance(read_task, n),
            min_buckets=len(list((out / DATA_DIR).glob("*.parquet"))) if previous else 1,
        )
        progress.remove_task(read_task)

        counts: Counter = Counter()
        patients = []
        descriptions: dict[str, str] = {}
        carried = 0
        if previous is not None:
            carried = writer.spill_previous_store(previous, spill, n_buckets)
            patients.extend(writer.previous_patients(previous))
            for code, text in read_codes(previous).select("code", "description").iter_rows():
                if text is not None:
                    descriptions[code] = text
        json_bytes = 0
        versions: Counter = Counter()
        for r in results:
            versions.update(r.versions)
            counts.update(r.counts)
            patients.extend(r.patients)
            for code, text in r.descriptions.items():
                descriptions.setdefault(code, text)
            json_bytes += r.json_bytes
        ingested_total = sum(n for (_, o), n in counts.items() if o == ingest.INGESTED)
        if ingested_total == 0 and versions:
            # Nothing is R4: one clear error naming the version beats an empty store and a quarantine file.
            first = _first_quarantine_reason(results, ingest.VERSION_PREFIX)
            raise KitError(f"no R4 resources ingested: {first}", hint="kit reads FHIR R4 (and R4B)")

        subjects, _ = writer.subjects_table(patients)
        shard_task = progress.add_task("writing shards", total=n_buckets)
        code_counts, dropped, stats = writer.write_shards(
            tmp, spill, n_buckets, subjects["subject_id"], on_bucket=lambda: progress.advance(shard_task)
        )
        codes = writer.codes_table(code_counts, descriptions)
        quarantined = writer.write_quarantine(
            tmp, [r.quarantine for r in results], dropped, kinds, names, previous=previous
        )
        shutil.rmtree(spill, ignore_errors=True)
        duplicates = dropped.height
        report = {
            "inputs": [{"file": n, "bytes": f.size} for n, f in zip(names, files)],
            "skipped_files": [{"file": str(p), "reason": why} for p, why in found.skipped],
            "input_fingerprint": _fingerprint(names, files),
            "validate": "full" if validate_full else "fast",
            "records": {f"{t}|{o}": n for (t, o), n in sorted(counts.items())},
            "events": stats["events"],
            "subjects": subjects.height,
            "shards": stats["shards"],
            "quarantined": quarantined,
            "duplicate_copies_dropped": duplicates,
            "subjects_without_patient": stats["subjects_without_patient"],
            "events_without_patient": stats["events_without_patient"],
            "rejected_as_other_fhir_version": dict(sorted(versions.items())),
        }
        if previous is not None:
            report["appended_to"] = {
                "dataset_version": read_dataset_metadata(previous).get("dataset_version"),
                "events_carried_over": carried,
            }
        writer.write_metadata(tmp, name or out.name, subjects, codes, report)
        (tmp / OWNER_FILE).unlink()
    return IngestSummary(
        out=out,
        files=len(files),
        skipped_files=[(str(p), why) for p, why in found.skipped],
        counts=counts,
        events=stats["events"],
        subjects=subjects.height,
        shards=stats["shards"],
        quarantined=quarantined,
        duplicates=duplicates,
        subjects_without_patient=stats["subjects_without_patient"],
        events_without_patient=stats["events_without_patient"],
        json_bytes=json_bytes,
        seconds=time.perf_counter() - start,
        other_versions=dict(sorted(versions.items())),
        report=report,
    )


def _first_quarantine_reason(results, prefix: str) -> str | None:
    import orjson

    for r in results:
        if r.quarantine:
            with open(r.quarantine, "rb") as fh:
                for line in fh:
                    rec = orjson.loads(line)
                    if rec["reason"].startswith(prefix):
                        return f"{rec['file']}, {rec['position']}: {rec['reason']}"
    return None


def print_summary(s: IngestSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"FHIR ingest -> {s.out}", title_justify="left")
    table.add_column("resource type")
    for c in ("ingested", "rejected", "not used"):
        table.add_column(c, justify="right")
    for t, ing, rej, unused in s.by_type():
        table.add_row(t, f"{ing:,}", f"[red]{rej:,}[/]" if rej else "0", f"{unused:,}")
    table.add_section()
    from connectors.fhir.ingest import INGESTED, NOT_USED, REJECTED

    table.add_row("[bold]total", *(f"[bold]{s.total(o):,}" for o in (INGESTED, REJECTED, NOT_USED)))
    console.print(table)
    mb = s.json_bytes / 1e6
    console.print(
        f"{s.files} files ({mb:,.1f} MB of JSON) -> {s.events:,} events, {s.subjects:,} subjects, "
        f"{s.shards} shard(s) in {s.seconds:.1f}s ({mb / max(s.seconds, 1e-9):,.1f} MB/s)"
    )
    if s.quarantined:
        console.print(f"[yellow]{s.quarantined:,} records quarantined[/] -> {s.out / 'quarantine.ndjson'}")
    for version, n in s.other_versions.items():
        console.print(
            f"[bold red]{n:,} records read as FHIR {version}[/], not R4: kit reads R4/R4B; they are in quarantine.ndjson"
        )
    if s.duplicates:
        console.print(f"[yellow]{s.duplicates:,} duplicate resource copies dropped[/] (listed in quarantine.ndjson)")
    if s.subjects_without_patient:
        console.print(
            f"[yellow]{s.events_without_patient:,} events of {s.subjects_without_patient:,} subjects "
            "have no Patient resource in the input[/] (kept; see docs/event-store.md)"
        )
    for path, why in s.skipped_files:
        console.print(f"[dim]skipped {path}: {why}[/]")


def ingest_fhir(
    paths: list[Path] = typer.Argument(..., help="Bundle/NDJSON files or directories (searched recursively)."),
    out: Path = typer.Option(..., "--out", "-o", help="Event store directory to write (replaced atomically)."),
    validate: ValidateMode = typer.Option(
        ValidateMode.fast,
        "--validate",
        help="fast: read the fields the mapping needs and validate what it cannot map; "
        "full: check every resource against the FHIR R4 models (about 10x slower).",
    ),
    on_error: OnError = typer.Option(
        OnError.quarantine,
        "--on-error",
        help="quarantine: write rejected records to DIR/quarantine.ndjson and go on; fail: stop at the first.",
    ),
    workers: int = typer.Option(0, "--workers", help="Parsing processes (0: one per CPU core)."),
    name: str = typer.Option(None, "--name", help="Dataset name for metadata/dataset.json (default: DIR's name)."),
    shard_mb: int = typer.Option(
        1024, "--shard-mb", help="About this many MB of input JSON per output shard (gzip counted as 8x its size)."
    ),
    append: bool = typer.Option(
        False,
        "--append",
        help="Add a new export to the existing store DIR: its resources replace stored copies with the same id.",
    ),
) -> None:
    """Ingest FHIR R4 Bundles and Bulk Data NDJSON into a MEDS event store.

    Reads .json/.json.gz Bundles (any type) or single resources and .ndjson/.ndjson.gz Bulk Data files,
    and writes DIR/data/*.parquet (sorted by subject_id, time), DIR/metadata/{subjects,codes}.parquet,
    DIR/metadata/dataset.json and DIR/quarantine.ndjson. The mapping is in docs/event-store.md.

    Example:

      kit ingest fhir examples/data/fhir --out kit-runs/events
    """
    summary = run_ingest(
        paths,
        out,
        validate_full=validate == ValidateMode.full,
        fail_fast=on_error == OnError.fail,
        workers=workers,
        name=name,
        show_progress=True,
        shard_mb=shard_mb,
        append=append,
    )
    print_summary(summary)
