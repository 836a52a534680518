"""Writing the event store: spilled event chunks -> sorted, deduplicated shards plus metadata.

Determinism: shards, subjects and codes depend only on the input records. Rows sort by (subject_id, time,
encounter-start first / end last, file, position, event index), a total order, and Parquet is written with fixed
settings, so the same input gives byte-identical Parquet files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path

import orjson
import polars as pl

from connectors.fhir import extract, sources
from connectors.fhir.extract import EventColumns, PatientRow
from kit.events import (
    CODE_SCHEMA,
    CODES_FILE,
    DATA_DIR,
    DATASET_FILE,
    EVENT_SCHEMA,
    QUARANTINE_FILE,
    SUBJECT_SCHEMA,
    SUBJECTS_FILE,
)
# Types, Parquet settings and the MEDS metadata are the same for every connector: kit.storewrite.
from kit.storewrite import PARQUET_OPTIONS, ROW_GROUP_SIZE, arrow_schemas, dataset_metadata, write_table
from kit.storewrite import vocabulary as _vocabulary

INTERNAL_SCHEMA: dict[str, pl.DataType] = {
    **EVENT_SCHEMA,
    "file_index": pl.Int32(),
    "position": pl.Int64(),
    "seq": pl.Int32(),
    "updated": pl.Int64(),
}
REPORT_FILE = "metadata/ingest_report.json"


def events_frame(cols: EventColumns) -> pl.DataFrame:
    """Event rows (with the internal provenance columns) as a typed frame."""
    return pl.DataFrame(
        cols.columns(),
        schema={**INTERNAL_SCHEMA, "time": pl.Int64()},
        strict=False,
    ).with_columns(pl.col("time").cast(pl.Datetime("us")))


def spill_events(cols: EventColumns, spill_dir: Path, task: int, chunk: int, n_buckets: int) -> list[str]:
    """Write one chunk of events as one Parquet file per subject bucket; returns the paths."""
    df = events_frame(cols)
    paths = []
    if n_buckets == 1:
        parts = {0: df}
    else:
        df = df.with_columns((pl.col("subject_id") % n_buckets).alias("_bucket"))
        parts = {k[0]: v.drop("_bucket") for k, v in df.partition_by("_bucket", as_dict=True).items()}
    for bucket, part in sorted(parts.items()):
        d = spill_dir / f"b{bucket:05d}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"t{task:06d}-{chunk:04d}.parquet"
        part.write_parquet(p, compression="lz4", statistics=False)
        paths.append(str(p))
    return paths


def _dedup(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Keep one copy per (resourceType, id): latest meta.lastUpdated, then latest in input order.

    Returns the kept events and the dropped copies (one row per copy, for the quarantine file).
    """
    keys = ["source_type", "source_id"]
    copies = df.select([*keys, "file_index", "position", "updated"]).unique(
        subset=[*keys, "file_index", "position"], keep="first"
    )
    if copies.height == copies.select(keys).n_unique():
        return df, copies.clear()
    ranked = copies.sort(["updated", "file_index", "position"], nulls_last=False)
    winners = ranked.group_by(keys, maintain_order=True).last()
    kept = df.join(winners.select([*keys, "file_index", "position"]), on=[*keys, "file_index", "position"], how="semi")
    losers = copies.join(
        winners.select([*keys, "file_index", "position"]), on=[*keys, "file_index", "position"], how="anti"
    ).join(winners.select([*keys, pl.col("file_index").alias("kept_file"), pl.col("position").alias("kept_pos")]), on=keys)
    return kept, losers


def _sort_order(df: pl.DataFrame) -> pl.Series:
    """Row order of a bucket: (subject_id, time, encounter start first / end last, file, position, event index)."""
    rank = (
        pl.when((pl.col("source_type") == "Encounter") & pl.col("code").str.ends_with("/START"))
        .then(0)
        .when((pl.col("source_type") == "Encounter") & pl.col("code").str.ends_with("/END"))
        .then(2)
        .otherwise(1)
    )
    keys = df.select("subject_id", "time", rank.alias("_rank"), "file_index", "position", "seq")
    return keys.with_row_index("_row").sort(
        ["subject_id", "time", "_rank", "file_index", "position", "seq"], nulls_last=False
    )["_row"]


# Below this many rows, deduplicating and sorting in Python beats polars' fixed cost per query (a request's patient).
SMALL_ROWS = 20_000
_ROW_KEYS = itemgetter(7, 8)  # (source_type, source_id) of an EventColumns row
# Below every time parse_time gives (year 1 is -62135596800000000 us): a null time sorts first, as in polars.
_NULL_TIME = -(1 << 63)


def _row_order(row: tuple) -> tuple:
    """`_sort_order`'s key for one EventColumns row."""
    t = row[1]
    rank = 1
    if row[7] == "Encounter":
        code = row[2]
        if code.endswith("/START"):
            rank = 0
        elif code.endswith("/END"):
            rank = 2
    return (row[0], _NULL_TIME if t is None else t, rank, row[9], row[10], row[11])


def store_events(cols: EventColumns) -> pl.DataFrame:
    """The events of one in-memory run as the event store holds them: deduplicated (`_dedup`), in store row order
    (`_sort_order`), EVENT_SCHEMA columns. A request-sized run with no repeated resource is sorted and typed in
    Python, with no polars query (they cost milliseconds each at this size); the rest takes the store's own path."""
    rows = cols.rows
    if not rows:
        return pl.DataFrame(schema=EVENT_SCHEMA)
    # A resource's rows start at seq 0, one run per input record: (type, id) twice among them is a repeated resource.
    firsts = [row for row in rows if row[11] == 0] if len(rows) <= SMALL_ROWS else ()
    if len(rows) > SMALL_ROWS or len(set(map(_ROW_KEYS, firsts))) != len(firsts):
        df, _ = _dedup(events_frame(cols))
        return df[_sort_order(df)].select(list(EVENT_SCHEMA))
    data = list(zip(*sorted(rows, key=_row_order)))
    return pl.DataFrame(
        [
            pl.Series("subject_id", data[0], pl.Int64()),
            pl.Series("time", data[1], pl.Int64()).cast(pl.Datetime("us")),
            *(pl.Series(name, data[i], dtype, strict=False) for i, (name, dtype) in enumerate(EVENT_SCHEMA.items()) if i > 1),
        ]
    )


def write_sorted(df: pl.DataFrame, path: Path, order: pl.Series) -> None:
    """Write `df` in `order` one row group at a time, so sorting never holds a second full copy (notes are big)."""
    import pyarrow.parquet as pq

    schema = arrow_schemas()["events"]
    with pq.ParquetWriter(path, schema, **PARQUET_OPTIONS) as out:
        for start in range(0, len(order), ROW_GROUP_SIZE):
            part = df[order[start : start + ROW_GROUP_SIZE]].select(list(EVENT_SCHEMA))
            out.write_table(part.to_arrow().cast(schema), row_group_size=ROW_GROUP_SIZE)


def write_shards(
    out: Path,
    spill_dir: Path,
    n_buckets: int,
    known_subjects: pl.Series,
    on_bucket: Callable[[], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Merge each bucket's spills into data/shard-NNNNN.parquet. Returns code counts, dropped duplicates, stats."""
    data = out / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    code_counts = []
    dropped = []
    stats = {"events": 0, "shards": 0, "subjects_with_events": 0, "subjects_without_patient": 0,
             "events_without_patient": 0}
    for bucket in range(n_buckets):
        files = sorted((spill_dir / f"b{bucket:05d}").glob("*.parquet"))
        if on_bucket:
            on_bucket()
        if not files:
            continue
        df = pl.read_parquet(files, schema=None)
        df, losers = _dedup(df)
        if losers.height:
            dropped.append(losers)
        write_sorted(df, data / f"shard-{stats['shards']:05d}.parquet", _sort_order(df))
        events = df.select("subject_id", "code")
        code_counts.append(events.group_by("code").len())
        stats["events"] += events.height
        stats["subjects_with_events"] += events.select(pl.col("subject_id").n_unique()).item()
        orphan = ~events["subject_id"].is_in(known_subjects.implode())
        stats["events_without_patient"] += int(orphan.sum())
        stats["subjects_without_patient"] += events.filter(orphan)["subject_id"].n_unique()
        stats["shards"] += 1
        del df, events
        shutil.rmtree(spill_dir / f"b{bucket:05d}", ignore_errors=True)
    if stats["shards"] == 0:
        # No events at all (say, only Organizations): still a valid, empty MEDS dataset that readers can open.
        write_sorted(pl.DataFrame(schema=INTERNAL_SCHEMA), data / "shard-00000.parquet", pl.Series([], dtype=pl.UInt32))
        stats["shards"] = 1
    counts = (
        pl.concat(code_counts).group_by("code").agg(pl.col("len").sum().alias("events"))
        if code_counts
        else pl.DataFrame(schema={"code": pl.String(), "events": pl.UInt32()})
    )
    dropped_df = pl.concat(dropped) if dropped else pl.DataFrame()
    return counts, dropped_df, stats


def previous_patients(store: Path) -> list[PatientRow]:
    """The subjects of an existing store as the earliest Patient copies (any new copy replaces them)."""
    from kit.events import read_subjects

    df = read_subjects(store).with_columns(
        pl.col("birth_time").cast(pl.Int64()), pl.col("death_time").cast(pl.Int64())
    )
    return [
        PatientRow(r["source_subject_id"], r["birth_time"], r["sex"], r["death_time"], None, PREVIOUS_STORE, i)
        for i, r in enumerate(df.iter_rows(named=True))
    ]


def subjects_table(patients: list[PatientRow]) -> tuple[pl.DataFrame, int]:
    """One row per Patient id, duplicates resolved by the same rule as events. Returns (table, copies dropped)."""
    best: dict[str, PatientRow] = {}
    dropped = 0
    for p in patients:
        cur = best.get(p.source_subject_id)
        if cur is None:
            best[p.source_subject_id] = p
            continue
        dropped += 1
        rank_new = (p.updated is not None, p.updated or 0, p.file_index, p.position)
        rank_cur = (cur.updated is not None, cur.updated or 0, cur.file_index, cur.position)
        if rank_new > rank_cur:
            best[p.source_subject_id] = p
    from kit.events import subject_id_for

    rows = sorted(((subject_id_for(p.source_subject_id), p) for p in best.values()), key=itemgetter(0))
    df = pl.DataFrame(  # built column by column: a single request's patient should not pay for a polars query
        [
            pl.Series("subject_id", [sid for sid, _ in rows], SUBJECT_SCHEMA["subject_id"]),
            pl.Series("source_subject_id", [p.source_subject_id for _, p in rows], SUBJECT_SCHEMA["source_subject_id"]),
            pl.Series("birth_time", [p.birth_time for _, p in rows], pl.Int64()).cast(SUBJECT_SCHEMA["birth_time"]),
            pl.Series("sex", [p.sex for _, p in rows], SUBJECT_SCHEMA["sex"]),
            pl.Series("death_time", [p.death_time for _, p in rows], pl.Int64()).cast(SUBJECT_SCHEMA["death_time"]),
        ]
    )
    return df, dropped


def _coined_description(code: str, described: dict[str, str]) -> str | None:
    if code in extract.SYNTHETIC_DESCRIPTIONS:
        return extract.SYNTHETIC_DESCRIPTIONS[code]
    parts = code.split("/")
    if parts[0] == "ENCOUNTER" and len(parts) == 3:
        return f"Encounter {parts[2].lower()} ({parts[1].lower()})"
    if parts[0] == "RESOLVED":
        inner = code.split("/", 1)[1]
        return f"Resolved: {described.get(inner, inner)}"
    if parts[0] == "EOB" and len(parts) == 3 and parts[1] == "OUTCOME":
        return f"Explanation of benefit outcome: {parts[2]}"
    if parts[0] == "GENDER":
        return f"Administrative gender: {parts[1]}"
    return None


def codes_table(code_counts: pl.DataFrame, descriptions: dict[str, str]) -> pl.DataFrame:
    codes = sorted(code_counts["code"].to_list())
    desc = [descriptions.get(c) or _coined_description(c, descriptions) for c in codes]
    return pl.DataFrame(
        {
            "code": codes,
            "description": desc,
            "parent_codes": [None] * len(codes),
            "vocabulary": [_vocabulary(c) for c in codes],
        },
        schema=CODE_SCHEMA,
    )


PREVIOUS_STORE = -1  # file_index of events carried over from the store an --append run extends
PREVIOUS_STORE_NAME = "(event store before --append)"


def spill_previous_store(store: Path, spill_dir: Path, n_buckets: int) -> int:
    """Bucket the events of an existing store like freshly parsed ones, as the earliest input.

    Every stored resource becomes one copy at file index -1; a copy of it in the new input is later in input
    order and so replaces it. Returns the number of events carried over.
    """
    shards = sorted((store / DATA_DIR).glob("*.parquet"))
    n = 0
    for i, shard in enumerate(shards):
        df = pl.read_parquet(shard)
        rid = pl.struct("source_type", "source_id")
        df = df.with_columns(
            pl.lit(PREVIOUS_STORE, pl.Int32()).alias("file_index"),
            (rid.rank("dense").cast(pl.Int64()) + (i << 40)).alias("position"),
            pl.int_range(pl.len()).over(rid).cast(pl.Int32()).alias("seq"),
            pl.lit(None, pl.Int64()).alias("updated"),
        ).select([pl.col(c).cast(t) for c, t in INTERNAL_SCHEMA.items()])
        if n_buckets > 1:
            df = df.with_columns((pl.col("subject_id") % n_buckets).alias("_bucket"))
            parts = {k[0]: v.drop("_bucket") for k, v in df.partition_by("_bucket", as_dict=True).items()}
        else:
            parts = {0: df}
        for bucket, part in parts.items():
            d = spill_dir / f"b{bucket:05d}"
            d.mkdir(parents=True, exist_ok=True)
            part.write_parquet(d / f"p{i:06d}.parquet", compression="lz4", statistics=False)
            n += part.height
    return n


def _where(names, kinds, file_index: int, position: int) -> tuple[str, str]:
    if file_index == PREVIOUS_STORE:
        return PREVIOUS_STORE_NAME, "stored events"
    return names[file_index], sources.position_label(kinds[file_index], position)


def write_quarantine(
    out: Path, task_files: list[str | None], dropped: pl.DataFrame, kinds, names, previous: Path | None = None
) -> int:
    """The previous store's quarantine (with --append), the tasks' quarantine files in task order, then the
    dropped duplicate copies."""
    n = 0
    with open(out / QUARANTINE_FILE, "wb") as fh:
        if previous is not None and (previous / QUARANTINE_FILE).exists():
            with open(previous / QUARANTINE_FILE, "rb") as src:
                for line in src:
                    fh.write(line)
                    n += 1
        for q in task_files:
            if q is None:
                continue
            with open(q, "rb") as src:
                for line in src:
                    fh.write(line)
                    n += 1
        if dropped.height:
            dropped = dropped.sort(["file_index", "position", "source_type", "source_id"])
            for row in dropped.iter_rows(named=True):
                file, position = _where(names, kinds, row["file_index"], row["position"])
                kept_at = ", ".join(_where(names, kinds, row["kept_file"], row["kept_pos"]))
                rec = {
                    "file": file,
                    "position": position,
                    "resource_type": row["source_type"],
                    "resource_id": row["source_id"],
                    "reason": f"duplicate resource id; kept the copy at {kept_at} (latest meta.lastUpdated, "
                    "then last in input order)",
                }
                fh.write(orjson.dumps(rec) + b"\n")
                n += 1
    return n


def write_metadata(out: Path, name: str, subjects: pl.DataFrame, codes: pl.DataFrame, report: dict) -> None:
    (out / "metadata").mkdir(parents=True, exist_ok=True)
    write_table(subjects, out / SUBJECTS_FILE, "subjects")
    write_table(codes, out / CODES_FILE, "codes")
    dataset = dataset_metadata(name, "kit ingest fhir", report.get("input_fingerprint"))
    (out / DATASET_FILE).write_text(json.dumps(dataset, indent=2) + "\n")
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
