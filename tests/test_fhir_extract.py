"""Per-resource-type mapping on real Synthea records shipped in examples/data (see docs/event-store.md)."""

from __future__ import annotations

import base64
import copy
import gzip
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import polars as pl
import pytest

from connectors.fhir import extract
from connectors.fhir.extract import Unmappable, parse_time
from connectors.fhir.ingest import resource_events
from kit.events import subject_id_for

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"
BULK = REPO / "examples" / "data" / "fhir" / "bulk-ndjson"


def _utc(s: str) -> datetime:
    return datetime.fromisoformat(s).astimezone(timezone.utc).replace(tzinfo=None)


@pytest.fixture(scope="module")
def records() -> dict[str, list[tuple[dict, dict]]]:
    """resourceType -> [(resource, bundle fullUrl map)] from the example bundles."""
    out: dict[str, list] = {}
    for f in sorted(BUNDLES.glob("*.json.gz")):
        entries = orjson.loads(gzip.open(f).read())["entry"]
        refs = {e["fullUrl"]: e["resource"]["id"] for e in entries}
        for e in entries:
            out.setdefault(e["resource"]["resourceType"], []).append((e["resource"], refs))
    return out


@pytest.fixture(scope="module")
def bulk() -> dict[str, list[dict]]:
    out: dict[str, list] = {}
    for f in sorted(BULK.glob("*.ndjson.gz")):
        if f.name.startswith("log."):
            continue
        for line in gzip.open(f).read().splitlines():
            r = orjson.loads(line)
            out.setdefault(r["resourceType"], []).append(r)
    return out


def _events(resource: dict, refs: dict | None = None, **kw) -> pl.DataFrame:
    outcome, events, reason = resource_events(resource, refs=refs, **kw)
    assert outcome == "ingested", reason
    return events


def _subject(ref: str) -> int:
    return subject_id_for(ref.rsplit(":", 1)[-1].rsplit("/", 1)[-1])


def test_patient_birth_death_and_static_codes(records):
    dead = [(r, refs) for r, refs in records["Patient"] if r.get("deceasedDateTime")]
    assert dead, "the example data ships deceased patients"
    p, refs = dead[0]
    ev = _events(p, refs)
    sid = subject_id_for(p["id"])
    assert set(ev["subject_id"]) == {sid}
    by_code = dict(zip(ev["code"], ev["time"]))
    assert by_code["MEDS_BIRTH"] == datetime.fromisoformat(p["birthDate"])
    assert by_code["MEDS_DEATH"] == _utc(p["deceasedDateTime"])
    assert by_code[f"GENDER/{p['gender']}"] is None
    race = [c for c in ev["code"] if c.startswith("RACE/")]
    eth = [c for c in ev["code"] if c.startswith("ETHNICITY/")]
    assert len(race) == 1 and len(eth) == 1 and by_code[race[0]] is None
    # Static events come first in the resource's own rows too.
    assert ev["time"].to_list()[: len(ev) - 2] == [None] * (len(ev) - 2)


@pytest.mark.parametrize(
    ("class_code", "type_code", "expected"),
    [("AMB", "185349003", "WELLNESS"), ("AMB", "185345009", "AMBULATORY"), ("IMP", None, "INPATIENT"),
     ("EMER", None, "EMERGENCY")],
)
def test_encounter_class_start_end_and_type(records, class_code, type_code, expected):
    found = [
        (r, refs) for r, refs in records["Encounter"]
        if r["class"]["code"] == class_code and (type_code is None or r["type"][0]["coding"][0]["code"] == type_code)
    ]
    assert found
    enc, refs = found[0]
    ev = _events(enc, refs)
    start, end = _utc(enc["period"]["start"]), _utc(enc["period"]["end"])
    rows = {c: t for c, t in zip(ev["code"], ev["time"])}
    assert rows[f"ENCOUNTER/{expected}/START"] == start
    assert rows[f"ENCOUNTER/{expected}/END"] == end
    assert rows[f"SNOMED/{enc['type'][0]['coding'][0]['code']}"] == start
    assert set(ev["encounter_id"]) == {enc["id"]}
    assert set(ev["subject_id"]) == {_subject(enc["subject"]["reference"])}


def test_condition_onset_and_resolution(records):
    cond, refs = next((r, refs) for r, refs in records["Condition"] if r.get("abatementDateTime"))
    ev = _events(cond, refs)
    code = f"SNOMED/{cond['code']['coding'][0]['code']}"
    assert ev["code"].to_list() == [code, f"RESOLVED/{code}"]
    assert ev["time"].to_list() == [_utc(cond["onsetDateTime"]), _utc(cond["abatementDateTime"])]
    assert set(ev["encounter_id"]) == {cond["encounter"]["reference"].removeprefix("urn:uuid:")}


def test_observation_quantity_components_and_coded_value(records):
    obs = records["Observation"]
    q, refs = next((r, refs) for r, refs in obs if "valueQuantity" in r)
    ev = _events(q, refs)
    assert ev["code"].to_list() == [f"LOINC/{q['code']['coding'][0]['code']}"]
    assert ev["numeric_value"][0] == pytest.approx(q["valueQuantity"]["value"], rel=1e-6)
    assert ev["unit"][0] == q["valueQuantity"]["code"]

    bp, refs = next((r, refs) for r, refs in obs if "component" in r)
    ev = _events(bp, refs)
    assert ev["code"].to_list() == [f"LOINC/{c['code']['coding'][0]['code']}" for c in bp["component"]]
    assert ev["numeric_value"].to_list() == pytest.approx([c["valueQuantity"]["value"] for c in bp["component"]])

    cc, refs = next((r, refs) for r, refs in obs if "valueCodeableConcept" in r)
    ev = _events(cc, refs)
    value = cc["valueCodeableConcept"]["coding"][0]
    assert ev["text_value"][0] == f"SNOMED/{value['code']}" and ev["numeric_value"][0] is None


def test_medication_request_codeable_and_references(records, bulk):
    mr, refs = records["MedicationRequest"][0]
    coding = mr["medicationCodeableConcept"]["coding"][0]
    assert _events(mr, refs)["code"].to_list() == [f"RXNORM/{coding['code']}"]
    assert _events(bulk["MedicationRequest"][0])["code"][0].startswith("RXNORM/")

    medication = {"resourceType": "Medication", "id": "med-1", "code": mr["medicationCodeableConcept"]}
    by_ref = copy.deepcopy(mr)
    del by_ref["medicationCodeableConcept"]
    by_ref["medicationReference"] = {"reference": "Medication/med-1"}
    # A Medication of the export (Bulk Data), resolved by id...
    meds = {"Medication/med-1": extract.medication_entry(medication)}
    assert _events(by_ref, refs, medications=meds)["code"].to_list() == [f"RXNORM/{coding['code']}"]
    # ...a contained Medication...
    contained = copy.deepcopy(by_ref)
    contained["contained"] = [medication]
    contained["medicationReference"] = {"reference": "#med-1"}
    assert _events(contained, refs)["code"].to_list() == [f"RXNORM/{coding['code']}"]
    # ...and one that resolves nowhere is rejected with the reason.
    outcome, _, reason = resource_events(by_ref, refs=refs)
    assert outcome == "rejected" and "medicationReference" in reason


@pytest.mark.parametrize(
    ("rtype", "code_field", "time_field", "prefix"),
    [
        ("Procedure", "code", ("performedPeriod", "start"), "SNOMED/"),
        ("Immunization", "vaccineCode", ("occurrenceDateTime",), "CVX/"),
        ("AllergyIntolerance", "code", ("recordedDate",), "SNOMED/"),
        ("DiagnosticReport", "code", ("effectiveDateTime",), "LOINC/"),
    ],
)
def test_single_event_types(records, rtype, code_field, time_field, prefix):
    r, refs = records[rtype][0]
    ev = _events(r, refs)
    t = r
    for k in time_field:
        t = t[k]
    assert ev["code"].to_list() == [prefix + r[code_field]["coding"][0]["code"]]
    assert ev["time"][0] == _utc(t)
    assert ev["source_type"][0] == rtype and ev["source_id"][0] == r["id"]


def test_document_reference_note_decoded(bulk):
    doc = bulk["DocumentReference"][0]
    ev = _events(doc)
    att = doc["content"][0]["attachment"]
    assert ev["text_value"][0] == base64.b64decode(att["data"]).decode("utf-8")
    assert ev["code"][0] == f"LOINC/{doc['type']['coding'][0]['code']}"
    assert ev["time"][0] == _utc(doc["date"])
    assert ev["encounter_id"][0] == doc["context"]["encounter"][0]["reference"].split("/")[-1]


def test_claim_and_eob_amounts_and_outcome(records):
    claim, refs = records["Claim"][0]
    ev = _events(claim, refs)
    assert ev["code"].to_list() == ["CLAIM/TOTAL"]
    assert ev["numeric_value"][0] == pytest.approx(claim["total"]["value"])
    assert ev["unit"][0] == claim["total"]["currency"]
    eob, refs = records["ExplanationOfBenefit"][0]
    ev = _events(eob, refs)
    assert ev["code"].to_list() == ["EOB/TOTAL", "EOB/PAYMENT", f"EOB/OUTCOME/{eob['outcome']}"]
    assert ev["numeric_value"][0] == pytest.approx(eob["total"][0]["amount"]["value"])
    assert ev["encounter_id"][0] is not None


def test_unmapped_types_are_not_used(records):
    for rtype in ("Organization", "Practitioner", "CarePlan", "Goal"):
        outcome, ev, reason = resource_events(records[rtype][0][0])
        assert (outcome, ev.height, reason) == ("not used", 0, None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2019-05-03T10:00:00+02:00", datetime(2019, 5, 3, 8, 0)),
        ("2019-05-03T10:00:00Z", datetime(2019, 5, 3, 10, 0)),
        ("2019-05-03T10:00:00", datetime(2019, 5, 3, 10, 0)),  # no zone: taken as UTC
        ("2019-05-03T10:00:00.1234567-05:00", datetime(2019, 5, 3, 15, 0, 0, 123456)),
        ("2019-05-03", datetime(2019, 5, 3)),
        ("2019-05", datetime(2019, 5, 1)),  # partial date: first day of the month
        ("2019", datetime(2019, 1, 1)),
    ],
)
def test_date_rules(text, expected):
    assert parse_time(text, "x") == (expected - datetime(1970, 1, 1)) // timedelta(microseconds=1)


@pytest.mark.parametrize("bad", ["05/03/2019", "2019-13-01", "2019-02-30", "20190503", "", "2019-05-03T25:00:00Z"])
def test_unparseable_dates(bad):
    with pytest.raises(Unmappable, match="unparseable date"):
        parse_time(bad, "Observation.effectiveDateTime")


def test_partial_date_in_a_real_record(records):
    obs, refs = records["Observation"][0]
    partial = dict(obs, effectiveDateTime="2019-05")
    assert _events(partial, refs)["time"][0] == datetime(2019, 5, 1)


def test_code_vocabulary_rules():
    ctx = extract.ResourceContext(0, 0, {}, {}, {})
    known_second = {"coding": [{"system": "http://example.org/local", "code": "A1"},
                               {"system": "http://loinc.org", "code": "8302-2", "display": "Body Height"}]}
    assert extract.concept_code(known_second, "x", ctx) == "LOINC/8302-2"
    assert ctx.descriptions["LOINC/8302-2"] == "Body Height"
    unknown = {"coding": [{"system": "http://example.org/local", "code": "A1"}]}
    assert extract.concept_code(unknown, "x", ctx) == "http://example.org/local|A1"
    assert extract.concept_code({"coding": [{"code": "Z9"}]}, "x", ctx) == "UNKNOWN|Z9"
    with pytest.raises(Unmappable):
        extract.concept_code({"text": "free text only"}, "x", ctx)


def test_medication_administration_from_a_real_request(records):
    """Synthea's R4 export has no MedicationAdministration; build a valid one from a real MedicationRequest."""
    from connectors.fhir.validate import validation_error

    mr, refs = records["MedicationRequest"][0]
    admin = {
        "resourceType": "MedicationAdministration", "id": "ma-1", "status": "completed",
        "medicationCodeableConcept": mr["medicationCodeableConcept"], "subject": mr["subject"],
        "context": mr["encounter"], "effectiveDateTime": mr["authoredOn"],
    }
    assert validation_error(admin) is None
    ev = _events(admin, refs)
    assert ev["code"].to_list() == [f"RXNORM/{mr['medicationCodeableConcept']['coding'][0]['code']}"]
    assert ev["time"][0] == _utc(mr["authoredOn"])
    assert ev["encounter_id"][0] == mr["encounter"]["reference"].removeprefix("urn:uuid:")


def test_diagnostic_report_presented_form_is_decoded(records):
    report, refs = records["DiagnosticReport"][0]
    text = "Impression: no acute findings."
    with_form = dict(report, presentedForm=[
        {"contentType": "application/pdf", "data": base64.b64encode(b"%PDF-1.4").decode()},
        {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()},
    ])
    assert _events(with_form, refs)["text_value"].to_list() == [text]


def test_icd10cm_and_cpt_prefixes():
    ctx = extract.ResourceContext(0, 0, {}, {}, {})
    icd = {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9"}]}
    cpt = {"coding": [{"system": "http://www.ama-assn.org/go/cpt", "code": "99213"}]}
    assert extract.concept_code(icd, "x", ctx) == "ICD10CM/E11.9"
    assert extract.concept_code(cpt, "x", ctx) == "CPT/99213"
