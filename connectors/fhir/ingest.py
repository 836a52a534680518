"""Ingest orchestration: input files -> parsing tasks on a process pool -> spill files -> the event store.

Each task parses a run of input files (or byte ranges of a big plain NDJSON file) and spills its events as Parquet,
bucketed by subject, so that no process ever holds the whole dataset; `writer.write_shards` then turns every bucket
into one sorted shard. Results are merged in task order, never completion order, so the output does not depend on
scheduling or on the number of workers.
"""

from __future__ import annotations

import gc
import math
import os
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import orjson

from connectors.fhir import extract, sources, validate
from connectors.fhir.extract import EventColumns, ResourceContext, Unmappable
from kit.errors import KitError

SPILL_ROWS = 250_000
SPILL_TEXT_BYTES = 64 << 20
# One output shard per this much JSON (estimated for gzip); keeps each shard's sort well inside memory.
JSON_BYTES_PER_SHARD = 1 << 30
GZIP_RATIO_ESTIMATE = 8
# Below this much input, a process pool costs more (interpreter start-up) than it saves.
POOL_MIN_BYTES = 16 << 20
# Plain NDJSON files larger than this are parsed as several byte ranges, so one big Bulk Data file uses every core.
SPLIT_NDJSON_BYTES = 64 << 20

INGESTED, REJECTED, NOT_USED = "ingested", "rejected", "not used"
VERSION_PREFIX = "unsupported FHIR version "


class RecordRejected(Exception):
    """Raised in `--on-error fail` mode at the first rejected record; the message names file, record, reason."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message, reason)
        self.message, self.reason = message, reason

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class IngestOptions:
    validate_full: bool = False
    fail_fast: bool = False
    workers: int = 0  # 0: one per CPU core
    shard_json_bytes: int = JSON_BYTES_PER_SHARD


@dataclass
class TaskResult:
    index: int
    counts: Counter = field(default_factory=Counter)  # (resource type, outcome) -> records
    events: int = 0
    json_bytes: int = 0
    spills: list[str] = field(default_factory=list)
    quarantine: str | None = None
    patients: list = field(default_factory=list)
    descriptions: dict[str, str] = field(default_factory=dict)
    versions: Counter = field(default_factory=Counter)  # records rejected as another FHIR version, by version


@dataclass(frozen=True)
class Task:
    index: int
    # (file index, path, kind, display name, byte start, byte end or None, newlines before start)
    files: tuple[tuple[int, str, str, str, int, int | None, int], ...]
    spill_dir: str
    n_buckets: int
    medications: dict
    validate_full: bool
    fail_fast: bool


def _updated(r: dict) -> int | None:
    meta = r.get("meta")
    lu = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if lu is None:
        return None
    try:
        return extract.parse_time(lu, "meta.lastUpdated")
    except Unmappable:
        return None


class _TaskRun:
    """Parses the files of one task; state lives here so the per-record path stays a plain method call."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.result = TaskResult(task.index)
        self.cols = EventColumns()
        self.chunk = 0
        self.qpath = Path(task.spill_dir) / f"q-{task.index:06d}.ndjson"
        self.qfh = None
        self.medications = dict(task.medications)
        self.rejected = 0
        # Records ingested by resource type: a plain dict on the per-record path (a Counter keyed by tuples cost a
        # few percent of parsing), added to result.counts when the task finishes.
        self.ingested: dict[str, int] = {}
        self.elements = validate.element_table()

    def reject(self, name: str, kind: str, pos: int, rtype: object, rid: object, reason: str) -> None:
        rtype = rtype if isinstance(rtype, str) else None
        rid = rid if isinstance(rid, str) else None
        where = sources.position_label(kind, pos)
        if self.task.fail_fast:
            raise RecordRejected(f"{name}, {where}: {reason}" + (f" ({rtype}/{rid})" if rid else ""), reason)
        self.result.counts[(rtype or "(not a resource)", REJECTED)] += 1
        self.rejected += 1
        if reason.startswith(VERSION_PREFIX):
            self.result.versions[reason[len(VERSION_PREFIX) :].split(" ", 1)[0]] += 1
        if self.rejected % 10_000 == 0:
            gc.collect()  # validation errors can leave reference cycles behind
        if self.qfh is None:
            self.qfh = open(self.qpath, "wb")
        rec = {"file": name, "position": where, "resource_type": rtype, "resource_id": rid, "reason": reason}
        self.qfh.write(orjson.dumps(rec) + b"\n")

    def resource(self, r: object, ctx: ResourceContext, name: str, kind: str) -> None:
        pos = ctx.position
        if not isinstance(r, dict):
            self.reject(name, kind, pos, None, None, "not a JSON object")
            return
        rtype = r.get("resourceType")
        rid = r.get("id")
        if not isinstance(rtype, str):
            self.reject(name, kind, pos, None, rid, "not a FHIR resource (no resourceType)")
            return
        allowed = self.elements.get(rtype)
        if allowed is None:
            base = f"resourceType {rtype!r} is not defined by FHIR R4"
            self.reject(name, kind, pos, rtype, rid, validate.version_reason(r, base))
            return
        full = self.task.validate_full
        if full:
            err = validate.validation_error(r)
            if err is not None:
                self.reject(name, kind, pos, rtype, rid, validate.version_reason(r, err))
                return
        extractor = extract.EXTRACTORS.get(rtype)
        if extractor is None:
            self.result.counts[(rtype, NOT_USED)] += 1
            return
        if not isinstance(rid, str) or not rid:
            self.reject(name, kind, pos, rtype, None, "missing resource id")
            return
        if not full and not allowed.issuperset(r):
            unknown = validate.unknown_elements(r, rtype)
            reason = validate.validation_error(r) or f"elements not defined by R4: {', '.join(unknown)}"
            self.reject(name, kind, pos, rtype, rid, validate.version_reason(r, reason))
            return
        meta = r.get("meta")  # most resources have no meta.lastUpdated: no call for them
        updated = _updated(r) if isinstance(meta, dict) and meta.get("lastUpdated") is not None else None
        emit = extract.Emitter(self.cols, rtype, rid, ctx, updated)
        try:
            out = extractor(r, emit, ctx)
        except Unmappable as exc:
            emit.rollback()
            self.reject(name, kind, pos, rtype, rid, validate.version_reason(r, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 - bad input must never crash the run
            # The fast path met a shape it does not expect: let the models say what is wrong.
            emit.rollback()
            reason = validate.validation_error(r) or f"could not map {rtype} ({type(exc).__name__})"
            self.reject(name, kind, pos, rtype, rid, validate.version_reason(r, reason))
            return
        if out is not None:  # a Patient
            self.result.patients.append(out)
        ingested = self.ingested
        ingested[rtype] = ingested.get(rtype, 0) + 1
        if len(self.cols.rows) >= SPILL_ROWS or self.cols.text_bytes >= SPILL_TEXT_BYTES:
            self.spill()

    def run_file(
        self, file_index: int, path: str, kind: str, name: str, start: int = 0, end: int | None = None, lines: int = 0
    ) -> None:
        f = sources.InputFile(Path(path), kind, 0)
        nbytes = [0]
        records = sources.read_range(f, nbytes, start, end, lines)
        # Bundles are read whole, so their Medication entries can resolve medicationReference in one pass.
        if kind == "json":
            records = list(records)
            for rec in records:
                r = rec.resource
                if isinstance(r, dict) and r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
                    med = extract.medication_entry(r)
                    if med is not None:
                        self.medications[f"Medication/{r['id']}"] = med
                        for url, rid in (rec.refs or {}).items():
                            if rid == r["id"]:
                                self.medications[url] = med
        for rec in records:
            if rec.error is not None:
                self.reject(name, kind, rec.position, None, rec.resource_id, rec.error)
                continue
            ctx = ResourceContext(file_index, rec.position, rec.refs or {}, self.medications, self.result.descriptions)
            self.resource(rec.resource, ctx, name, kind)
        self.result.json_bytes += nbytes[0]

    def spill(self) -> None:
        if not len(self.cols):
            return
        from connectors.fhir.writer import spill_events

        self.result.spills.extend(
            spill_events(self.cols, Path(self.task.spill_dir), self.task.index, self.chunk, self.task.n_buckets)
        )
        self.result.events += len(self.cols)
        self.chunk += 1
        self.cols = EventColumns()

    def finish(self) -> TaskResult:
        self.spill()
        for rtype, n in self.ingested.items():
            self.result.counts[(rtype, INGESTED)] += n
        self.ingested = {}
        if self.qfh is not None:
            self.qfh.close()
            self.result.quarantine = str(self.qpath)
        return self.result


def run_task(task: Task) -> TaskResult:
    # Parsed JSON is millions of small containers; the cyclic GC would rescan them over and over (measured: it
    # halves parse speed). Our objects form no cycles, so collect only between files and after many rejections.
    gc_enabled = gc.isenabled()
    gc.disable()
    run = _TaskRun(task)
    try:
        for unit in task.files:
            run.run_file(*unit)
            gc.collect(1)
    finally:
        if run.qfh is not None and not run.qfh.closed:
            run.qfh.close()
        if gc_enabled:
            gc.enable()
    return run.finish()


def resource_events(
    resource: object,
    *,
    refs: dict[str, str] | None = None,
    medications: dict | None = None,
    validate_full: bool = False,
):
    """One resource through exactly the ingest path: (outcome, events frame, rejection reason).

    `outcome` is "ingested", "rejected" or "not used"; for tests and for checking a single record by hand.
    """
    import tempfile

    from connectors.fhir.writer import events_frame
    from kit.events import EVENT_SCHEMA

    with tempfile.TemporaryDirectory() as d:
        run = _TaskRun(Task(0, (), d, 1, medications or {}, validate_full, True))
        ctx = ResourceContext(0, 0, refs or {}, run.medications, run.result.descriptions)
        try:
            run.resource(resource, ctx, "<resource>", "json")
        except RecordRejected as exc:
            return REJECTED, events_frame(EventColumns()).select(list(EVENT_SCHEMA)), exc.reason
        outcome = INGESTED if run.ingested else NOT_USED
        return outcome, events_frame(run.cols).select(list(EVENT_SCHEMA)), None


def _worker_init() -> None:
    # Each worker is one core's worth of parsing; polars' own thread pool would only oversubscribe.
    os.environ["POLARS_MAX_THREADS"] = "1"


def bulk_medications(files: list[sources.InputFile]) -> dict:
    """Medication resources of a Bulk Data export (Medication.ndjson), read first so any file can resolve them."""
    meds: dict = {}
    for f in files:
        if f.kind != "ndjson" or not f.path.name.startswith("Medication."):
            continue
        for rec in sources.iter_records(f):
            r = rec.resource
            if isinstance(r, dict) and r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
                med = extract.medication_entry(r)
                if med is not None:
                    meds[f"Medication/{r['id']}"] = med
    return meds


def _estimated_json_bytes(files: list[sources.InputFile]) -> int:
    return sum(f.size * (GZIP_RATIO_ESTIMATE if f.gzipped else 1) for f in files)


def plan_tasks(units: list[tuple[int, int, int | None, int, int]], workers: int) -> list[list[int]]:
    """Contiguous runs of units (whole files, or ranges of a big NDJSON file), several per worker so the pool
    stays balanced as tasks finish. A unit is (file index, start, end, newlines before, bytes)."""
    total = sum(u[4] for u in units)
    target = max(1 << 20, min(64 << 20, total // max(1, 4 * workers)))
    tasks, current, size = [], [], 0
    for i, u in enumerate(units):
        current.append(i)
        size += u[4]
        if size >= target:
            tasks.append(current)
            current, size = [], 0
    if current:
        tasks.append(current)
    return tasks


def work_units(files: list[sources.InputFile], workers: int) -> list[tuple[int, int, int | None, int, int]]:
    """Every file as one unit, except plain NDJSON files big enough to be worth splitting across workers."""
    units = []
    split = SPLIT_NDJSON_BYTES if workers > 1 else 1 << 62
    for i, f in enumerate(files):
        for start, end, lines in sources.ndjson_ranges(f, split):
            units.append((i, start, end, lines, (end if end is not None else f.size) - start))
    return units


def display_names(files: list[sources.InputFile], roots: list[Path]) -> list[str]:
    """File names as the user gave them (relative to the input they named), for quarantine and errors."""
    out = []
    for f in files:
        name = str(f.path)
        for root in roots:
            if root.is_dir():
                try:
                    name = str(Path(root.name) / f.path.relative_to(root))
                    break
                except ValueError:
                    continue
        out.append(name)
    return out


def _run_pool(tasks: list[Task], workers: int, results: list, sizes: list[int], progress) -> None:
    ctx = get_context("spawn")  # forking a process that runs polars threads can deadlock
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futures = {pool.submit(run_task, t): t.index for t in tasks}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION, timeout=0.5)
            for fut in done:
                exc = fut.exception()
                if exc is not None:
                    for p in pending:
                        p.cancel()
                    raise exc
                results[futures[fut]] = fut.result()
                if progress:
                    progress(sizes[futures[fut]])


def parse_inputs(
    files: list[sources.InputFile],
    names: list[str],
    spill_dir: Path,
    opts: IngestOptions,
    progress: Callable[[int], None] | None = None,
    min_buckets: int = 1,
) -> tuple[list[TaskResult], int]:
    """Run every parsing task; returns the task results in task order and the number of buckets."""
    json_bytes = _estimated_json_bytes(files)
    n_buckets = max(min_buckets, math.ceil(json_bytes / opts.shard_json_bytes))
    cpus = os.cpu_count() or 1
    workers = opts.workers or cpus
    if json_bytes < POOL_MIN_BYTES:
        workers = 1
    units = work_units(files, workers)
    groups = plan_tasks(units, workers)
    meds = bulk_medications(files)
    tasks = [
        Task(
            i,
            tuple(
                (units[j][0], str(files[units[j][0]].path), files[units[j][0]].kind, names[units[j][0]], *units[j][1:4])
                for j in group
            ),
            str(spill_dir),
            n_buckets,
            meds,
            opts.validate_full,
            opts.fail_fast,
        )
        for i, group in enumerate(groups)
    ]
    sizes = [sum(units[j][4] for j in g) for g in groups]
    results: list[TaskResult | None] = [None] * len(tasks)

    def run_here(pending_tasks) -> None:
        for t in pending_tasks:
            results[t.index] = run_task(t)
            if progress:
                progress(sizes[t.index])

    try:
        if workers <= 1 or len(tasks) == 1:
            run_here(tasks)
        else:
            try:
                _run_pool(tasks, min(workers, len(tasks)), results, sizes, progress)
            except BrokenProcessPool:
                # Workers died at start-up (typically: run_ingest called from a script without an
                # `if __name__ == "__main__":` guard, which spawned processes re-import). Finish in this process;
                # a task rerun rewrites the same spill and quarantine files, so nothing is counted twice.
                import sys

                print("kit: the parsing process pool broke; continuing in a single process", file=sys.stderr)
                run_here([t for t in tasks if results[t.index] is None])
    except RecordRejected as exc:
        raise KitError(f"rejected record: {exc}", hint="drop --on-error fail to quarantine such records") from None
    return [r for r in results if r is not None], n_buckets
