"""No train/serve skew in the events: a request's FHIR document (`document_events`, what `kit serve` and the Predictor
read) gives exactly the events, subjects and rejections that `kit ingest` writes for the same document."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import orjson
import polars as pl
import pytest

from connectors.fhir.cli import run_ingest
from connectors.fhir.predict import document_events
from connectors.fhir.sources import position_label
from kit.events import read_subjects, scan_events

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return [orjson.loads(gzip.decompress(p.read_bytes())) for p in sorted(BUNDLES.glob("*.json.gz"))]


def _of_type(bundle: dict, rtype: str) -> list[dict]:
    return [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == rtype]


def _awkward(doc: dict) -> dict:
    """A real patient's Bundle with broken entries, repeated resources, a Medication reference and a second patient."""
    b = copy.deepcopy(doc)
    obs, enc = _of_type(b, "Observation"), _of_type(b, "Encounter")
    patient, claim, eob = _of_type(b, "Patient")[0], _of_type(b, "Claim")[0], _of_type(b, "ExplanationOfBenefit")[0]
    obs[0]["effectiveDateTime"] = "yesterday"  # unmappable
    del obs[1]["id"]
    obs[2]["spaceship"] = 1  # an element R4 does not have: the models name it
    obs[3]["code"] = "oops"
    eob["total"] = [{"category": "x", "amount": {"value": 1}}]  # the fast path fails; validation says why
    claim["total"] = [1, 2]
    stu3 = dict(_of_type(b, "Condition")[0], id="stu3", clinicalStatus="active", verificationStatus="confirmed")
    stu3["assertedDate"] = stu3.pop("recordedDate", "2019-01-01")
    newer = dict(copy.deepcopy(obs[5]), meta={"lastUpdated": "2030-01-01T00:00:00Z"}, valueQuantity={"value": 1.5})
    older = dict(copy.deepcopy(obs[6]), meta={"lastUpdated": "2000-01-01T00:00:00Z"})
    reborn = dict(copy.deepcopy(patient), birthDate="1950-02-03", meta={"lastUpdated": "2030-01-01T00:00:00Z"})
    med = {"resourceType": "Medication", "id": "med1", "code": {"coding": [{"system": RXNORM, "code": "1", "display": "Pill"}]}}
    b["entry"].insert(2, {"fullUrl": "urn:uuid:med-url", "resource": med})
    b["entry"] += [
        "not an object", {"fullUrl": "urn:uuid:gone"}, {"resource": ["a list"]}, {"resource": {"id": "x"}},
        {"resource": {"resourceType": "Spaceship", "id": "s1"}}, {"resource": {"resourceType": "Organization", "id": "o"}},
        {"resource": stu3}, {"resource": newer}, {"resource": older}, {"resource": copy.deepcopy(enc[1])}, {"resource": reborn},
        *({"resource": {"resourceType": "MedicationRequest", "id": f"mr{i}", "status": "active", "intent": "order",
                        "subject": {"reference": f"Patient/{patient['id']}"}, "authoredOn": "2015-03-04T05:06:07+02:00",
                        "medicationReference": {"reference": ref}}}
          for i, ref in enumerate(("urn:uuid:med-url", "Medication/med1", "Medication/nope"))),
        {"resource": {"resourceType": "Patient", "id": "second", "gender": "female", "birthDate": "1980"}},
        {"resource": {"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/second"},
                      "code": {"coding": [{"system": "http://snomed.info/sct", "code": "1"}]}, "onsetDateTime": "1990-05"}},
    ]
    return b


def _ingested(docs: list[dict], tmp: Path) -> Path:
    (tmp / "in").mkdir(parents=True)
    for i, d in enumerate(docs):
        (tmp / "in" / f"{i:03d}.json").write_bytes(orjson.dumps(d))
    run_ingest([tmp / "in"], tmp / "store", workers=1)
    return tmp / "store"


def _assert_reads_as_ingested(doc: dict, store: Path, quarantine: list[dict] | None = None) -> None:
    got = document_events(doc)
    ids = pl.Series(got.events["subject_id"].unique().to_list() + got.subjects["subject_id"].to_list()).implode()
    events = scan_events(store).filter(pl.col("subject_id").is_in(ids)).collect()
    subjects = read_subjects(store).filter(pl.col("subject_id").is_in(ids))
    assert got.events.schema == events.schema and got.events.equals(events)  # same rows, same order, same types
    assert got.subjects.schema == subjects.schema and got.subjects.equals(subjects)
    if quarantine is not None:  # ingest also lists the repeated copies it dropped; a request drops them silently
        want = [(q["position"], q["resource_type"], q["resource_id"], q["reason"]) for q in quarantine
                if not q["reason"].startswith("duplicate resource id")]
        assert [(position_label("json", r["position"]), r["resource_type"], r["resource_id"], r["reason"])
                for r in got.rejected] == want


def test_example_patients_read_as_ingested(docs, tmp_path):
    store = _ingested(docs, tmp_path)
    for doc in docs:
        _assert_reads_as_ingested(doc, store, quarantine=[])


def _resources_only(doc: dict) -> dict:
    """The awkward Bundle without its entries that hold no resource object: the request fast path reads it."""
    from connectors.fhir.predict import _plain_bundle

    out = dict(doc, entry=[e for e in doc["entry"] if isinstance(e, dict) and isinstance(e.get("resource"), dict)])
    assert _plain_bundle(out) is not None and _plain_bundle(doc) is None
    return out


@pytest.mark.parametrize("case", ["awkward", "awkward, every entry a resource", "bundle of bundles", "same bundle twice"])
def test_awkward_documents_read_as_ingested(docs, tmp_path, case):
    doc = {
        "awkward": lambda: _awkward(min(docs, key=lambda d: len(d["entry"]))),
        "awkward, every entry a resource": lambda: _resources_only(_awkward(min(docs, key=lambda d: len(d["entry"])))),
        "bundle of bundles": lambda: {"resourceType": "Bundle", "type": "collection", "entry": [
            {"resource": docs[0]}, {"resource": {"resourceType": "Patient", "id": "top"}}, {"resource": docs[1]}]},
        "same bundle twice": lambda: {"resourceType": "Bundle", "entry": [{"resource": docs[2]}, {"resource": docs[2]}]},
    }[case]()
    store = _ingested([doc], tmp_path)
    quarantine = [json.loads(x) for x in (store / "quarantine.ndjson").read_text().splitlines()]
    _assert_reads_as_ingested(doc, store, quarantine)
    if case == "awkward":
        assert len(document_events(doc).rejected) == 13 and document_events(doc).subjects.height == 2


def test_resource_list_reads_as_its_bundle(docs):
    bundle = docs[3]
    as_list = document_events([e["resource"] for e in bundle["entry"]] + [42])
    as_bundle = document_events(bundle)
    assert as_list.events.equals(as_bundle.events) and as_list.subjects.equals(as_bundle.subjects)
    assert as_list.rejected == [{"position": len(bundle["entry"]), "resource_type": None, "resource_id": None,
                                 "reason": "not a JSON object"}]
