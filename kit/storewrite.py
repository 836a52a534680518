"""Writing event-store files with fixed Arrow types and Parquet settings, shared by every connector.

MEDS 0.4 checks exact Arrow types (meds.DataSchema / CodeMetadataSchema); polars alone writes large_string. Equal
frames give byte-identical files. Connectors may add their own event columns after the core ones (finance adds the
exact `amount` and the `counterparty`); MEDS readers ignore extra columns.
"""

from __future__ import annotations

import datetime as dt
import json
from functools import cache
from pathlib import Path

import polars as pl

PARQUET_OPTIONS = {"compression": "zstd", "compression_level": 3, "write_statistics": True}
ROW_GROUP_SIZE = 128_000


@cache
def arrow_schemas() -> dict:
    """Built lazily: parsing workers import connector modules but never need pyarrow."""
    import pyarrow as pa

    return {
        "events": pa.schema(
            [
                ("subject_id", pa.int64()),
                ("time", pa.timestamp("us")),
                ("code", pa.string()),
                ("numeric_value", pa.float32()),
                ("text_value", pa.large_string()),
                ("unit", pa.string()),
                ("encounter_id", pa.string()),
                ("source_type", pa.string()),
                ("source_id", pa.string()),
            ]
        ),
        "subjects": pa.schema(
            [
                ("subject_id", pa.int64()),
                ("source_subject_id", pa.string()),
                ("birth_time", pa.timestamp("us")),
                ("sex", pa.string()),
                ("death_time", pa.timestamp("us")),
            ]
        ),
        "codes": pa.schema(
            [
                ("code", pa.string()),
                ("description", pa.string()),
                ("parent_codes", pa.list_(pa.string())),
                ("vocabulary", pa.string()),
            ]
        ),
    }


def events_schema(extra: dict | None = None):
    """The events Arrow schema, with a connector's extra columns (name -> pyarrow type) appended."""
    import pyarrow as pa

    base = arrow_schemas()["events"]
    if not extra:
        return base
    return pa.schema(list(base) + [pa.field(k, v) for k, v in extra.items()])


def write_table(df: pl.DataFrame, path: Path, schema_name: str) -> None:
    """Parquet with fixed types and settings, so equal frames give byte-identical files."""
    import pyarrow.parquet as pq

    schema = arrow_schemas()[schema_name]
    pq.write_table(df.to_arrow().cast(schema), path, row_group_size=ROW_GROUP_SIZE, **PARQUET_OPTIONS)


def write_events(df: pl.DataFrame, path: Path, extra: dict | None = None) -> None:
    """An already sorted event frame, columns in schema order, one row group at a time."""
    import pyarrow.parquet as pq

    schema = events_schema(extra)
    with pq.ParquetWriter(path, schema, **PARQUET_OPTIONS) as out:
        for start in range(0, max(df.height, 1), ROW_GROUP_SIZE):
            part = df.slice(start, ROW_GROUP_SIZE).select(schema.names)
            out.write_table(part.to_arrow().cast(schema), row_group_size=ROW_GROUP_SIZE)


def vocabulary(code: str) -> str:
    """The part of a code before the first '/', or the system URL of a FHIR token-form code."""
    if "|" in code:
        return code.split("|", 1)[0]  # token form keeps the system URL; "UNKNOWN" when there was none
    return code.split("/", 1)[0]


def dataset_metadata(name: str, etl_name: str, version: str | None) -> dict:
    """meds.DatasetMetadataSchema fields for metadata/dataset.json."""
    import meds

    from kit import __version__

    return {
        "dataset_name": name,
        "dataset_version": version,
        "etl_name": etl_name,
        "etl_version": __version__,
        "meds_version": meds.__version__,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(tzinfo=None).isoformat(),
        "raw_source_id_columns": ["source_type", "source_id", "encounter_id"],
        "code_modifier_columns": ["unit"],
    }


def write_json(path: Path, obj: dict, sort_keys: bool = False) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")
