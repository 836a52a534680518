"""The event store: a MEDS-compatible dataset directory that every connector writes and every vertical reads.

Layout (MEDS 0.4):
    DIR/data/*.parquet               events, sorted by (subject_id, time), sharded by subject
    DIR/metadata/subjects.parquet    source subject key -> subject_id, birth, sex, death
    DIR/metadata/codes.parquet       code, description, parent_codes, vocabulary
    DIR/metadata/dataset.json        MEDS dataset metadata
    DIR/quarantine.ndjson            rejected records with file, position, id and reason

Static events (sex, race, ethnicity) have a null time, as MEDS prescribes; they sort first within a subject.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl

from kit.errors import KitError

DATA_DIR = "data"
SUBJECTS_FILE = "metadata/subjects.parquet"
CODES_FILE = "metadata/codes.parquet"
DATASET_FILE = "metadata/dataset.json"
QUARANTINE_FILE = "quarantine.ndjson"

BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"

# Core MEDS columns first, then our value, modifier and provenance columns.
EVENT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "time": pl.Datetime("us"),
    "code": pl.String(),
    "numeric_value": pl.Float32(),
    "text_value": pl.String(),
    "unit": pl.String(),
    "encounter_id": pl.String(),
    "source_type": pl.String(),
    "source_id": pl.String(),
}
MEDS_CORE_COLUMNS = ("subject_id", "time", "code", "numeric_value")

SUBJECT_SCHEMA: dict[str, pl.DataType] = {
    "subject_id": pl.Int64(),
    "source_subject_id": pl.String(),
    "birth_time": pl.Datetime("us"),
    "sex": pl.String(),
    "death_time": pl.Datetime("us"),
}

CODE_SCHEMA: dict[str, pl.DataType] = {
    "code": pl.String(),
    "description": pl.String(),
    "parent_codes": pl.List(pl.String()),
    "vocabulary": pl.String(),
}


def subject_id_for(source_key: str) -> int:
    """Deterministic int64 subject id for a source key (a FHIR Patient id, an account number).

    A hash rather than a counter, so re-running an ingest, or ingesting a later export, gives every
    subject the same id without reading the earlier output.
    """
    digest = hashlib.sha256(source_key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def empty_events() -> pl.DataFrame:
    return pl.DataFrame(schema=EVENT_SCHEMA)


def conform_events(df: pl.DataFrame) -> pl.DataFrame:
    """Add missing optional columns as nulls and cast every column to the event schema, in schema order."""
    missing = [pl.lit(None, dtype=t).alias(c) for c, t in EVENT_SCHEMA.items() if c not in df.columns]
    if missing:
        df = df.with_columns(missing)
    return df.select([pl.col(c).cast(t) for c, t in EVENT_SCHEMA.items()])


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise KitError(
            f"{path.parent if what == 'event data' else path}: no {what} found; is this an event store written by `kit ingest`?"
        )
    return path


def scan_events(root: Path | str) -> pl.LazyFrame:
    """All events of an event store, lazily, in (subject_id, time) order within each shard."""
    data = _require(Path(root) / DATA_DIR, "event data")
    shards = sorted(data.glob("*.parquet"))
    if not shards:
        raise KitError(f"{data}: no event shards (*.parquet) found")
    return pl.scan_parquet([str(p) for p in shards])


def read_subjects(root: Path | str) -> pl.DataFrame:
    return pl.read_parquet(_require(Path(root) / SUBJECTS_FILE, "subjects table"))


def read_codes(root: Path | str) -> pl.DataFrame:
    return pl.read_parquet(_require(Path(root) / CODES_FILE, "codes table"))


def read_dataset_metadata(root: Path | str) -> dict:
    return json.loads(_require(Path(root) / DATASET_FILE, "dataset metadata").read_text())


def is_event_store(path: Path | str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / DATASET_FILE).exists() and (p / DATA_DIR).is_dir()
