"""End-to-end FHIR ingest on real Synthea data: counts, deaths, MEDS schema, determinism."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import meds
import orjson
import polars as pl
import pyarrow.parquet as pq
import pytest

from connectors.fhir.cli import run_ingest
from kit.events import read_subjects, scan_events, subject_id_for

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FHIR = REPO / "examples" / "data" / "fhir"


@pytest.fixture(scope="session")
def example_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("fhir") / "events"
    summary = run_ingest([EXAMPLE_FHIR], out, workers=1)
    return out, summary


@pytest.fixture(scope="session")
def shared_bundles(shared_data) -> Path:
    return shared_data / "fhir" / "synthea-r4-bundles"


@pytest.fixture(scope="session")
def shared_store(shared_bundles, tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "events"
    summary = run_ingest([shared_bundles], out)
    return out, summary


def _raw_resources(root: Path):
    for f in sorted(root.glob("*.json.gz")):
        for e in orjson.loads(gzip.open(f).read())["entry"]:
            yield e["resource"]


def test_store_validates_against_meds_schemas(example_store):
    out, _ = example_store
    for shard in sorted((out / "data").glob("*.parquet")):
        meds.DataSchema.validate(pq.read_table(shard))
    meds.CodeMetadataSchema.validate(pq.read_table(out / "metadata" / "codes.parquet"))
    meds.DatasetMetadataSchema.validate(json.loads((out / "metadata" / "dataset.json").read_text()))


def test_events_sorted_and_every_code_described(example_store):
    out, _ = example_store
    for shard in sorted((out / "data").glob("*.parquet")):
        df = pl.read_parquet(shard)
        keyed = df.select("subject_id", pl.col("time").fill_null(pl.datetime(1, 1, 1)))
        assert keyed.equals(keyed.sort(["subject_id", "time"], maintain_order=True))
    codes = pl.read_parquet(out / "metadata" / "codes.parquet")
    used = scan_events(out).select(pl.col("code").unique()).collect()["code"]
    assert set(used) == set(codes["code"])


def test_shared_synthea_counts_match_raw_json(shared_store, shared_bundles):
    out, summary = shared_store
    raw = Counter(r["resourceType"] for r in _raw_resources(shared_bundles))
    assert summary.total("rejected") == 0
    assert summary.quarantined == 0
    events = scan_events(out)
    per_type = dict(
        events.group_by("source_type").agg(pl.col("source_id").n_unique()).collect().iter_rows()
    )
    for rtype in ("Patient", "Encounter", "Condition", "Observation"):
        assert summary.counts[(rtype, "ingested")] == raw[rtype]
        assert per_type[rtype] == raw[rtype]
    enc_starts = events.filter(pl.col("code").str.ends_with("/START")).select(pl.len()).collect().item()
    assert enc_starts == raw["Encounter"]


def test_shared_synthea_deaths_match_patients(shared_store, shared_bundles):
    out, _ = shared_store
    expected = {
        subject_id_for(r["id"]) for r in _raw_resources(shared_bundles)
        if r["resourceType"] == "Patient" and r.get("deceasedDateTime")
    }
    subjects = read_subjects(out)
    assert set(subjects.filter(pl.col("death_time").is_not_null())["subject_id"]) == expected
    deaths = scan_events(out).filter(pl.col("code") == "MEDS_DEATH").collect()
    assert set(deaths["subject_id"]) == expected and deaths.height == len(expected)
