"""`kit ingest finance` orchestration: find inputs, recognise each by its content, read, write the event store.

Finance inputs are small next to FHIR exports (a statement is kilobytes; the AMLSim transfer table is 120k rows), so
everything is read in one process and the store is one sorted shard. Tables are mapped column-wise (polars), which
is what keeps the 120k-row AMLSim ingest at about a second.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import time as _time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import polars as pl

from connectors.finance import camt, ofx, tables
from connectors.finance.records import FINANCE_SCHEMA, INTERNAL_SCHEMA, Quarantined, Sink
from kit.errors import KitError

ETL_NAME = "kit ingest finance"
REPORT_FILE = "metadata/ingest_report.json"
# Files in a searched directory that are plainly not inputs (dataset documentation) are skipped silently.
_DOC_NAMES = ("readme", "source", "license", "licence", "sha256sums", "metadata.txt", "notice", "copying")


@dataclass
class InputFile:
    path: Path
    name: str  # as reported: relative to the directory given, or the path given
    kind: str  # "ofx", "camt", "table"
    size: int
    layout: tables.Mapping | None = None


@dataclass
class Discovery:
    files: list[InputFile]
    skipped: list[tuple[str, str]]


@dataclass
class FinanceSummary:
    """What an ingest did; the CLI prints it, tests and the benchmark read it."""

    out: Path
    files: int
    by_format: dict  # format or layout -> {"files", "records", "rejected"}
    events: int
    subjects: int
    quarantined: int
    labels: dict  # label code -> {"positive", "negative"}
    skipped: list[tuple[str, str]]
    seconds: float
    report: dict = field(default_factory=dict)


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read(n)
        with open(path, "rb") as fh:
            return fh.read(n)
    except (OSError, EOFError) as exc:
        raise KitError(f"{path}: cannot read ({type(exc).__name__})") from None


def unknown_layout_error(path: Path, header: list[str], layouts: dict[str, tables.Mapping]) -> KitError:
    known = "; ".join(f"{m.name} ({', '.join(m.header[:4])}{', ...' if len(m.header) > 4 else ''})"
                      for m in layouts.values())
    shown = ", ".join(header[:8]) + (", ..." if len(header) > 8 else "")
    return KitError(
        f"{path}: unknown table layout (columns: {shown}); known layouts: {known}",
        hint="declare the columns in a mapping YAML and pass --mapping FILE (see docs/finance-event-store.md, "
        "'Your own table layout', and connectors/finance/layouts/*.yaml), or force one with --layout NAME",
    )


def classify(path: Path, layouts: dict[str, tables.Mapping], forced: tables.Mapping | None, explicit: bool):
    """(kind, layout) of one file by its content; None for a non-input found in a directory."""
    head = _head(path)
    if ofx.looks_like_ofx(head):
        return "ofx", None
    if camt.message_type(head) is not None:
        return "camt", None
    if tables.is_table(path):
        if forced is not None:
            header = tables.read_header(path, forced.separator)
            missing = [c for c in forced.header if c not in header]
            if missing:
                raise KitError(f"{path}: --layout {forced.name} needs columns it lacks: {', '.join(missing[:8])}")
            return "table", forced
        header = tables.read_header(path)
        layout = tables.match_layout(header, layouts)
        if layout is None:
            raise unknown_layout_error(path, header, layouts)
        return "table", layout
    if explicit:
        raise KitError(
            f"{path}: not a finance input",
            hint="kit ingest finance reads OFX/QFX statements, ISO 20022 camt.052/053/054 XML, and CSV/Parquet tables",
        )
    return None, None


def discover(paths: list[Path], layouts, forced, exclude: Path | None = None) -> Discovery:
    files: list[InputFile] = []
    skipped: list[tuple[str, str]] = []
    excluded = exclude.resolve() if exclude is not None else None
    seen: set[Path] = set()
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise KitError(f"{root}: no such file or directory")
        if root.is_file():
            candidates = [(root, str(root), True)]
        else:
            candidates = []
            for p in sorted(p for p in root.rglob("*") if p.is_file()):
                rel = p.relative_to(root)
                if any(part.startswith(".") for part in rel.parts):
                    continue
                if excluded is not None and (excluded == p.resolve() or excluded in p.resolve().parents):
                    continue
                candidates.append((p, str(root / rel), False))
        for p, name, explicit in candidates:
            if p.resolve() in seen:
                continue
            seen.add(p.resolve())
            if not explicit and p.name.lower().startswith(_DOC_NAMES):
                continue
            kind, layout = classify(p, layouts, forced, explicit)
            if kind is None:
                skipped.append((name, "not OFX/QFX, camt XML or a table"))
                continue
            files.append(InputFile(p, name, kind, p.stat().st_size, layout))
    return Discovery(files, skipped)


def _fingerprint(files: list[InputFile]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{f.size}\n".encode())
    return h.hexdigest()[:16]


def _read_file(f: InputFile, index: int, sink: Sink) -> tuple[pl.DataFrame, dict, str]:
    if f.kind == "table":
        df = tables.read_table(f.path, f.layout)
        events, counts = tables.map_table(df, f.layout, f.name, index, sink)
        return events, counts, f.layout.name
    data = f.path.read_bytes()
    if f.path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError):
            sink.reject(f.name, "file", f.kind, None, "truncated or corrupt gzip stream")
            return pl.DataFrame(schema=INTERNAL_SCHEMA), {"rejected": 1}, f.kind
    reader = ofx.read if f.kind == "ofx" else camt.read
    events, counts = reader(f.path, data, f.name, index, sink)
    return events.frame(), counts, f.kind


def _resolve_at_end(df: pl.DataFrame) -> pl.DataFrame:
    """`at_end` label times: one day after (midnight) the latest dated, non-label event of the same subject namespace
    (`amlsim:` for AMLSim) in this ingest; the same time for every subject of that namespace."""
    if "_at_end" not in df.columns:
        return df
    space = pl.col("subject_key").str.split(":").list.first()
    latest = (
        df.filter(pl.col("time").is_not_null() & ~pl.col("code").str.starts_with("LABEL/"))
        .group_by(space.alias("_space"))
        .agg(pl.col("time").max().dt.truncate("1d").alias("_end"))
        .with_columns(pl.col("_end") + pl.duration(days=1))
    )
    df = df.with_columns(space.alias("_space")).join(latest, on="_space", how="left", maintain_order="left")
    flagged = pl.col("_at_end").is_not_null()
    df = df.with_columns(pl.when(flagged).then(pl.col("_end")).otherwise(pl.col("time")).alias("time"))
    return df.drop("_at_end", "_space", "_end")


def _subject_ids(keys: pl.Series) -> dict[str, int]:
    from kit.events import subject_id_for

    return {k: subject_id_for(k) for k in keys.unique().to_list()}


_FIXED_DESCRIPTIONS = {
    "TXN/DEBIT": "Transaction: debit (money out)",
    "TXN/CREDIT": "Transaction: credit (money in)",
    "TXN/PAYMENT": "Transaction: payment",
    "BAL/OPENING": "Balance: opening",
    "BAL/LEDGER": "Balance: ledger (OFX LEDGERBAL)",
    "BAL/AVAILABLE": "Balance: available (OFX AVAILBAL)",
    "BAL/CASH": "Balance: available cash (OFX investment AVAILCASH)",
    "BILL/STATEMENT": "Bill statement amount of the month",
    "LABEL/SAR": "Label (target only): account flagged suspicious (AMLSim isFraud)",
    "LABEL/DEFAULT": "Label (target only): default payment next month (UCI)",
    "LABEL/CREDIT_RISK": "Label (target only): bad credit risk (German credit)",
}
_CAMT_BALANCES = {
    "OPBD": "opening booked", "CLBD": "closing booked", "ITBD": "interim booked", "OPAV": "opening available",
    "CLAV": "closing available", "ITAV": "interim available", "FWAV": "forward available",
    "PRCD": "previously closed booked",
    "INFO": "information", "XPCD": "expected", "XPCR": "expected credit", "XPDB": "expected debit",
}


def describe(code: str) -> str | None:
    if code in _FIXED_DESCRIPTIONS:
        return _FIXED_DESCRIPTIONS[code]
    head, _, rest = code.partition("/")
    if head == "TXN":
        return f"Transaction: {rest.lower()}"
    if head == "BAL":
        return f"Balance: {_CAMT_BALANCES.get(rest, rest.lower())}"
    if head == "MCC":
        try:
            from ofxparse import mcc

            text = (mcc.codes.get(rest) or {}).get("combined description")
        except Exception:  # noqa: BLE001 - a description is optional
            text = None
        return f"Merchant category {rest}" + (f": {text}" if text else "")
    if head == "BTC":
        return f"Bank transaction code {rest}"
    if head == "INV":
        return f"Investment transaction: {rest.lower()}"
    if head == "PAYSTATUS":
        return (f"Repayment status {rest} (UCI: -2 no consumption, -1 paid duly, 0 revolving credit, "
                "n = payment delayed n months)")
    if head == "ATTR":
        name, _, value = rest.partition("/")
        return f"Attribute {name}" + (f" = {value}" if value else "")
    if head == "LABEL":
        return f"Label (target only): {rest}"
    return None


def _ofx_position(pos: int) -> str:
    stmt, rest = pos >> 24, pos & 0xFFFFFF
    if rest & (1 << 23):
        return f"statement {stmt} balance {rest & 0xFF}"
    return f"statement {stmt} transaction {rest}"


def drop_overlaps(df: pl.DataFrame, names: list[str]) -> tuple[pl.DataFrame, list[Quarantined]]:
    """Overlapping OFX downloads: a transaction (same account, same FITID) or balance (same account, kind and as-of
    time) in several files is kept once, from the file read last (sorted path order); each dropped copy is listed in
    the quarantine."""
    txn = pl.col("source_type") == ofx.SOURCE_TYPE
    keys = ["subject_key", "source_id"]
    copies = df.filter(txn).select(*keys, "file_index", "position").unique()
    if copies.height == copies.select(keys).n_unique():
        return df, []
    winner = copies.group_by(keys).agg(pl.col("file_index").max().alias("_keep"))
    losers = copies.join(winner, on=keys).filter(pl.col("file_index") != pl.col("_keep")).sort("file_index", "position")
    dropped = [
        Quarantined(names[fi], _ofx_position(pos), ofx.SOURCE_TYPE, sid,
                    f"duplicate of a record in {names[keep]} (same account and FITID, or same balance); kept that "
                    "copy (the file read last)")
        for _, sid, fi, pos, keep in losers.iter_rows()
    ]
    marked = df.join(winner, on=keys, how="left")
    keep = ~txn | pl.col("_keep").is_null() | (pl.col("file_index") == pl.col("_keep"))
    return marked.filter(keep).drop("_keep"), dropped


def build_store(frames: list[pl.DataFrame]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(sorted events, subjects, codes) from the readers' frames (overlaps already dropped)."""
    from kit.events import CODE_SCHEMA, SUBJECT_SCHEMA
    from kit.storewrite import vocabulary

    frames = [f for f in frames if f.height]
    if frames:
        df = pl.concat(frames, how="diagonal_relaxed")
    else:
        df = pl.DataFrame(schema=INTERNAL_SCHEMA)
    df = _resolve_at_end(df)
    ids = _subject_ids(df.get_column("subject_key"))
    df = df.with_columns(
        pl.col("subject_key").replace_strict(ids, return_dtype=pl.Int64, default=None).alias("subject_id")
    )
    df = df.sort(["subject_id", "time", "file_index", "position", "seq"], nulls_last=False)
    events = df.select([pl.col(c).cast(t) for c, t in FINANCE_SCHEMA.items()])
    subjects = (
        pl.DataFrame({"source_subject_id": list(ids), "subject_id": list(ids.values())},
                     schema={"source_subject_id": pl.String(), "subject_id": pl.Int64()})
        .sort("subject_id")
        .with_columns(pl.lit(None, pl.Datetime("us")).alias("birth_time"), pl.lit(None, pl.String()).alias("sex"),
                      pl.lit(None, pl.Datetime("us")).alias("death_time"))
        .select([pl.col(c).cast(t) for c, t in SUBJECT_SCHEMA.items()])
    )
    codes_list = sorted(events.get_column("code").unique().to_list())
    codes = pl.DataFrame(
        {"code": codes_list, "description": [describe(c) for c in codes_list],
         "parent_codes": [None] * len(codes_list), "vocabulary": [vocabulary(c) for c in codes_list]},
        schema=CODE_SCHEMA,
    )
    return events, subjects, codes


def run_ingest(
    paths: list[Path],
    out: Path,
    *,
    layout: str | None = None,
    mappings: list[Path] = (),
    fail_fast: bool = False,
    name: str | None = None,
) -> FinanceSummary:
    """Ingest `paths` into the event store `out` (written atomically). Raises KitError for user mistakes."""
    import pyarrow as pa

    from kit.events import CODES_FILE, DATA_DIR, DATASET_FILE, QUARANTINE_FILE, SUBJECTS_FILE, is_event_store
    from kit.fsutil import OWNER_FILE, atomic_dir, remove_stale_temporaries
    from kit.storewrite import dataset_metadata, write_events, write_json, write_table

    start = _time.perf_counter()
    out = Path(out)
    layouts = dict(tables.shipped_layouts())
    for mp in mappings:
        m = tables.load_mapping(mp)
        layouts[m.name] = m
    forced = None
    if layout is not None:
        if layout not in layouts:
            raise KitError(f"--layout {layout}: unknown layout; known: {', '.join(sorted(layouts))}",
                           hint="declare a new one with --mapping FILE")
        forced = layouts[layout]
    if out.exists() and not is_event_store(out) and (not out.is_dir() or any(out.iterdir())):
        raise KitError(f"{out}: exists and is not an event store; refusing to replace it", hint="pick a new --out")
    found = discover(paths, layouts, forced, exclude=out)
    if not found.files:
        raise KitError(
            f"no finance input files under {', '.join(map(str, paths))}",
            hint="expected OFX/QFX statements, camt.052/053/054 XML, or CSV/Parquet tables",
        )
    sink = Sink(fail_fast=fail_fast)
    frames = []
    by_format: dict[str, Counter] = {}
    labels: dict[str, Counter] = {}
    inputs = []
    for i, f in enumerate(found.files):
        before = len(sink.records)
        events, counts, fmt = _read_file(f, i, sink)
        frames.append(events)
        c = by_format.setdefault(fmt, Counter())
        c["files"] += 1
        c["records"] += counts.get("rows_ingested", counts.get("transactions", counts.get("entries", 0)))
        c["balances"] += counts.get("balances", 0)
        c["rejected"] += len(sink.records) - before
        c["events"] += events.height
        for code, n in counts.get("labels", {}).items():
            labels.setdefault(code, Counter()).update(n)
        inputs.append({"file": f.name, "bytes": f.size, "format": fmt, "events": events.height,
                       "rejected": len(sink.records) - before})
    merged = pl.concat([f for f in frames if f.height], how="diagonal_relaxed") if any(f.height for f in frames) \
        else pl.DataFrame(schema=INTERNAL_SCHEMA)
    del frames
    merged, dropped = drop_overlaps(merged, [f.name for f in found.files])
    sink.records.extend(dropped)
    events, subjects, codes = build_store([merged])
    report = {
        "inputs": inputs,
        "skipped_files": [{"file": n, "reason": why} for n, why in found.skipped],
        "input_fingerprint": _fingerprint(found.files),
        "by_format": {k: dict(sorted(v.items())) for k, v in sorted(by_format.items())},
        "events": events.height,
        "subjects": subjects.height,
        "quarantined": len(sink.records),
        "duplicate_transactions_dropped": len(dropped),
        "labels": {k: {"positive": v["positive"], "negative": v["negative"]} for k, v in sorted(labels.items())},
    }
    remove_stale_temporaries(out)
    with atomic_dir(out) as tmp:
        (tmp / OWNER_FILE).write_text(str(os.getpid()))
        (tmp / DATA_DIR).mkdir()
        (tmp / "metadata").mkdir()
        write_events(events, tmp / DATA_DIR / "shard-00000.parquet",
                     extra={"amount": pa.string(), "counterparty": pa.string()})
        write_table(subjects, tmp / SUBJECTS_FILE, "subjects")
        write_table(codes, tmp / CODES_FILE, "codes")
        write_quarantine(tmp / QUARANTINE_FILE, sink.records)
        write_json(tmp / DATASET_FILE, dataset_metadata(name or out.name, ETL_NAME, report["input_fingerprint"]))
        write_json(tmp / REPORT_FILE, report, sort_keys=True)
        (tmp / OWNER_FILE).unlink()
    return FinanceSummary(
        out=out, files=len(found.files), by_format=report["by_format"], events=events.height,
        subjects=subjects.height, quarantined=len(sink.records), labels=report["labels"], skipped=found.skipped,
        seconds=_time.perf_counter() - start, report=report,
    )


def write_quarantine(path: Path, records: list[Quarantined]) -> None:
    with open(path, "wb") as fh:
        for r in records:
            fh.write(orjson.dumps(r.as_dict()) + b"\n")
