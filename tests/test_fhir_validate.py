"""`--validate full` (every resource through the fhir.resources R4B models) versus the default fast path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import orjson
import pytest

from connectors.fhir.cli import run_ingest
from connectors.fhir.ingest import resource_events
from kit.events import scan_events


@pytest.fixture(scope="module")
def shared_subset(shared_data, tmp_path_factory) -> Path:
    """The whole shared Bulk Data set plus six shared Synthea bundles (every mapped resource type is present)."""
    root = tmp_path_factory.mktemp("subset")
    shutil.copytree(shared_data / "fhir" / "synthea-r4-bulk-ndjson", root / "bulk")
    bundles = sorted((shared_data / "fhir" / "synthea-r4-bundles").glob("*_*.json.gz"))
    (root / "bundles").mkdir()
    for f in bundles[::57][:6]:
        shutil.copy(f, root / "bundles" / f.name)
    return root


def test_full_and_fast_paths_give_identical_events(shared_subset, tmp_path):
    fast = run_ingest([shared_subset], tmp_path / "fast")
    full = run_ingest([shared_subset], tmp_path / "full", validate_full=True)
    assert fast.total("rejected") == full.total("rejected") == 0
    assert fast.events == full.events > 10_000
    for rtype in ("Patient", "Encounter", "Observation", "Claim", "ExplanationOfBenefit", "DocumentReference"):
        assert fast.counts[(rtype, "ingested")] == full.counts[(rtype, "ingested")] > 0
    a = scan_events(tmp_path / "fast").collect()
    b = scan_events(tmp_path / "full").collect()
    assert a.equals(b)
    for name in ("subjects.parquet", "codes.parquet"):
        assert (tmp_path / "fast" / "metadata" / name).read_bytes() == (tmp_path / "full" / "metadata" / name).read_bytes()


def test_full_validation_rejects_an_invalid_unmapped_resource(shared_data):
    line = (shared_data / "fhir" / "synthea-r4-bulk-ndjson" / "Organization.000.ndjson.gz")
    import gzip

    org = orjson.loads(gzip.open(line).readline())
    org["active"] = {"not": "a boolean"}
    # Fast path: a type that makes no events is counted, not validated (documented).
    assert resource_events(org)[0] == "not used"
    outcome, _, reason = resource_events(org, validate_full=True)
    assert outcome == "rejected" and reason.startswith("invalid Organization: active")


def test_fast_path_sends_unknown_elements_to_the_models(shared_data):
    import gzip

    cond = orjson.loads(gzip.open(shared_data / "fhir" / "synthea-r4-bulk-ndjson" / "Condition.000.ndjson.gz").readline())
    cond["onsetDateTim"] = cond["onsetDateTime"]  # a typo R4 does not define
    outcome, _, reason = resource_events(cond)
    assert outcome == "rejected" and "onsetDateTim: extra_forbidden" in reason


def test_shipped_element_table_matches_installed_models():
    """connectors/fhir/r4_elements.json is generated from fhir.resources; regenerate it if this fails."""
    from connectors.fhir import extract, validate

    shipped = json.loads(validate.ELEMENT_TABLE.read_text())
    types = sorted(extract.EXTRACTORS) + ["Organization", "Medication", "Bundle"]
    assert {t: shipped[t] for t in types} == validate.build_r4_element_table(types)
    assert "Resource" not in shipped and "DomainResource" not in shipped and len(shipped) > 140
