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


def _report(out: Path) -> dict:
    return json.loads((out / "metadata" / "ingest_report.json").read_text())


@pytest.fixture(scope="session")
def raw_synthea(synthea_bundles) -> tuple[Counter, set[int]]:
    """Resource counts and deceased subjects, taken straight from the JSON (independent of the connector)."""
    counts: Counter = Counter()
    deceased = set()
    for f in sorted(synthea_bundles.glob("*.json.gz")):
        for e in orjson.loads(gzip.open(f).read())["entry"]:
            r = e["resource"]
            counts[r["resourceType"]] += 1
            if r["resourceType"] == "Patient" and r.get("deceasedDateTime"):
                deceased.add(subject_id_for(r["id"]))
    return counts, deceased


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


def test_shared_synthea_counts_match_raw_json(synthea_events, raw_synthea):
    """`synthea_events` (tests/conftest.py) is the whole shared set through the real `kit ingest fhir` command."""
    out = synthea_events
    report = _report(out)
    raw = raw_synthea[0]
    assert not [k for k in report["records"] if k.endswith("|rejected")]
    assert report["quarantined"] == 0 and (out / "quarantine.ndjson").read_bytes() == b""
    events = scan_events(out)
    per_type = dict(
        events.group_by("source_type").agg(pl.col("source_id").n_unique()).collect().iter_rows()
    )
    for rtype in ("Patient", "Encounter", "Condition", "Observation"):
        assert report["records"][f"{rtype}|ingested"] == raw[rtype]
        assert per_type[rtype] == raw[rtype]
    enc_starts = events.filter(pl.col("code").str.ends_with("/START")).select(pl.len()).collect().item()
    assert enc_starts == raw["Encounter"]


def test_shared_synthea_deaths_match_patients(synthea_events, raw_synthea):
    out = synthea_events
    expected = raw_synthea[1]
    subjects = read_subjects(out)
    assert set(subjects.filter(pl.col("death_time").is_not_null())["subject_id"]) == expected
    deaths = scan_events(out).filter(pl.col("code") == "MEDS_DEATH").collect()
    assert set(deaths["subject_id"]) == expected and deaths.height == len(expected)


def test_every_raw_record_accounted_for(synthea_events, raw_synthea):
    report = _report(synthea_events)
    raw = raw_synthea[0]
    seen = Counter()
    for key, n in report["records"].items():
        seen[key.split("|")[0]] += n
    assert seen == raw


def test_bulk_ndjson_set_ingests(shared_data, tmp_path):
    bulk = shared_data / "fhir" / "synthea-r4-bulk-ndjson"
    s = run_ingest([bulk], tmp_path / "events")
    assert s.total("rejected") == 0 and s.subjects == 13
    expected = {"Patient": 13, "Condition": 555, "Encounter": 1215, "DocumentReference": 1215,
                "MedicationRequest": 1745, "Procedure": 2056, "Immunization": 161, "AllergyIntolerance": 11}
    for rtype, n in expected.items():
        assert s.counts[(rtype, "ingested")] == n
    for rtype in ("Organization", "Practitioner", "PractitionerRole", "Location", "Device"):
        assert s.counts[(rtype, "not used")] > 0
    assert [p for p, _ in s.skipped_files if p.endswith("log.ndjson.gz")]
    assert s.subjects_without_patient == 0
    deaths = read_subjects(tmp_path / "events").filter(pl.col("death_time").is_not_null()).height
    assert deaths == 3
    notes = scan_events(tmp_path / "events").filter(pl.col("source_type") == "DocumentReference").collect()
    assert notes["text_value"].null_count() == 0 and notes["encounter_id"].null_count() == 0


def test_sharded_output_keeps_each_subject_in_one_shard(example_store, tmp_path):
    single, _ = example_store
    s = run_ingest([EXAMPLE_FHIR], tmp_path / "sharded", workers=1, shard_mb=4)
    shards = sorted((tmp_path / "sharded" / "data").glob("*.parquet"))
    assert s.shards == len(shards) >= 3
    seen: dict[int, str] = {}
    for shard in shards:
        df = pl.read_parquet(shard)
        keyed = df.select("subject_id", pl.col("time").fill_null(pl.datetime(1, 1, 1)))
        assert keyed.equals(keyed.sort(["subject_id", "time"], maintain_order=True))
        for sid in df["subject_id"].unique():
            assert seen.setdefault(sid, shard.name) == shard.name
    order = ["subject_id", "time", "code", "source_id", "numeric_value", "text_value"]
    a = scan_events(single).collect().sort(order, nulls_last=False)
    b = scan_events(tmp_path / "sharded").collect().sort(order, nulls_last=False)
    assert a.equals(b)


def test_inspect_summary_matches_the_ingest(example_store):
    from kit.inspect import summarize

    out, summary = example_store
    s = summarize(out)
    assert (s.subjects, s.events, s.shards) == (summary.subjects, summary.events, summary.shards)
    assert s.deaths == 8 + 3  # deceased patients among the shipped bundles plus the Bulk Data set
    assert s.static_events == 3 * summary.subjects  # gender, race, ethnicity per Synthea patient
    assert sum(n for _, _, n in s.vocabularies) == s.events
    assert s.top_codes[0][2] >= s.top_codes[-1][2]


def test_store_with_no_events_is_still_readable(tmp_path):
    import gzip as gz

    org = gz.open(EXAMPLE_FHIR / "bulk-ndjson" / "Organization.000.ndjson.gz").read()
    (tmp_path / "Organization.ndjson").write_bytes(org)
    s = run_ingest([tmp_path / "Organization.ndjson"], tmp_path / "out")
    assert s.events == 0 and s.total("not used") == 43
    from kit.inspect import summarize

    assert summarize(tmp_path / "out").events == 0
    meds.DataSchema.validate(pq.read_table(tmp_path / "out" / "data" / "shard-00000.parquet"))
