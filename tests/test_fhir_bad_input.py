"""Broken and awkward inputs each get their documented outcome (docs/event-store.md, "Bad input")."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import polars as pl
import pytest

from connectors.fhir.cli import run_ingest
from kit.errors import KitError
from kit.events import read_subjects, scan_events, subject_id_for

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"
BULK = REPO / "examples" / "data" / "fhir" / "bulk-ndjson"


def _lines(name: str) -> list[bytes]:
    return gzip.open(BULK / name).read().splitlines()


def _quarantine(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "quarantine.ndjson").read_text().splitlines()]


def _small_bundle() -> Path:
    return min(BUNDLES.glob("*.json.gz"), key=lambda p: p.stat().st_size)


def test_truncated_gzip_ndjson_keeps_lines_before_the_damage(tmp_path):
    raw = gzip.compress(b"\n".join(_lines("Condition.000.ndjson.gz")) + b"\n")
    src = tmp_path / "in" / "Condition.000.ndjson.gz"
    src.parent.mkdir()
    src.write_bytes(raw[: len(raw) // 2])
    s = run_ingest([src.parent], tmp_path / "out")
    ingested = s.counts[("Condition", "ingested")]
    assert 0 < ingested < 555
    q = _quarantine(tmp_path / "out")
    assert len(q) == 1 and "truncated gzip" in q[0]["reason"]
    assert q[0]["position"].startswith("line ") and q[0]["file"].endswith("Condition.000.ndjson.gz")


def test_truncated_gzip_bundle_is_quarantined_as_a_file(tmp_path):
    good = _small_bundle()
    (tmp_path / "in").mkdir()
    shutil.copy(good, tmp_path / "in" / "good.json.gz")
    raw = good.read_bytes()
    (tmp_path / "in" / "cut.json.gz").write_bytes(raw[: len(raw) - 100])
    s = run_ingest([tmp_path / "in"], tmp_path / "out")
    assert s.counts[("Patient", "ingested")] == 1
    q = _quarantine(tmp_path / "out")
    assert [(x["file"], x["position"]) for x in q] == [("in/cut.json.gz", "file")]
    assert "truncated gzip" in q[0]["reason"]


def test_garbage_ndjson_line_is_quarantined_with_its_line_number(tmp_path):
    lines = _lines("Patient.000.ndjson.gz")
    lines.insert(4, b"this is not json {")
    lines.insert(7, b'{"hello": "world"}')
    (tmp_path / "Patient.000.ndjson").write_bytes(b"\n".join(lines) + b"\n")
    s = run_ingest([tmp_path / "Patient.000.ndjson"], tmp_path / "out")
    assert s.counts[("Patient", "ingested")] == 13
    q = _quarantine(tmp_path / "out")
    assert [x["position"] for x in q] == ["line 5", "line 8"]
    assert q[0]["reason"].startswith("malformed JSON") and "not a FHIR resource" in q[1]["reason"]
    assert "hello" not in json.dumps(q) and "world" not in json.dumps(q)  # reasons carry no content


def test_r5_only_field_is_quarantined_naming_the_version(tmp_path):
    encounters = [orjson.loads(x) for x in _lines("Encounter.000.ndjson.gz")[:5]]
    encounters[2]["actualPeriod"] = encounters[2].pop("period")  # R5 renamed Encounter.period
    (tmp_path / "Encounter.ndjson").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in encounters))
    s = run_ingest([tmp_path / "Encounter.ndjson"], tmp_path / "out")
    assert s.counts[("Encounter", "ingested")] == 4
    (q,) = _quarantine(tmp_path / "out")
    assert q["position"] == "line 3" and q["resource_id"] == encounters[2]["id"]
    assert q["reason"].startswith("unsupported FHIR version R5") and "actualPeriod" in q["reason"]
    assert s.other_versions == {"R5": 1}
    from kit.inspect import summarize

    assert summarize(tmp_path / "out").quarantine_reasons == [("unsupported FHIR version R5 (kit reads R4/R4B)", 1)]


def test_all_r5_input_fails_with_the_version_and_writes_nothing(tmp_path):
    enc = orjson.loads(_lines("Encounter.000.ndjson.gz")[0])
    enc["actualPeriod"] = enc.pop("period")
    enc["class"] = [{"coding": [enc["class"]]}]
    (tmp_path / "enc.json").write_bytes(orjson.dumps(enc))
    with pytest.raises(KitError, match="unsupported FHIR version R5"):
        run_ingest([tmp_path / "enc.json"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_stu3_resource_is_named(tmp_path):
    cond = orjson.loads(_lines("Condition.000.ndjson.gz")[0])
    cond["clinicalStatus"], cond["verificationStatus"] = "active", "confirmed"  # STU3 plain codes
    cond["assertedDate"] = cond.pop("recordedDate")
    (tmp_path / "c.json").write_bytes(orjson.dumps(cond))
    with pytest.raises(KitError, match="unsupported FHIR version STU3"):
        run_ingest([tmp_path / "c.json"], tmp_path / "out")


def test_bundle_without_patient_keeps_events_under_the_referenced_subject(tmp_path):
    bundle = orjson.loads(gzip.open(_small_bundle()).read())
    patient = next(e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    bundle["entry"] = [e for e in bundle["entry"] if e["resource"]["resourceType"] != "Patient"]
    (tmp_path / "b.json").write_bytes(orjson.dumps(bundle))
    s = run_ingest([tmp_path / "b.json"], tmp_path / "out")
    assert s.total("rejected") == 0 and s.subjects == 0
    assert s.subjects_without_patient == 1 and s.events_without_patient == s.events > 0
    assert read_subjects(tmp_path / "out").height == 0
    ids = scan_events(tmp_path / "out").select(pl.col("subject_id").unique()).collect()["subject_id"]
    assert ids.to_list() == [subject_id_for(patient["id"])]


def test_duplicate_bundles_dedup_to_one_copy(tmp_path):
    src = _small_bundle()
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        shutil.copy(src, tmp_path / d / "p.json.gz")
    once = run_ingest([tmp_path / "a"], tmp_path / "once")
    twice = run_ingest([tmp_path / "a", tmp_path / "b"], tmp_path / "twice")
    assert twice.duplicates == once.total("ingested")
    assert scan_events(tmp_path / "once").collect().equals(scan_events(tmp_path / "twice").collect())
    q = _quarantine(tmp_path / "twice")
    assert len(q) == twice.duplicates and all(x["file"] == "a/p.json.gz" for x in q)
    assert all("kept the copy at b/p.json.gz" in x["reason"] for x in q)


def test_duplicate_with_later_last_updated_wins(tmp_path):
    obs = {
        "resourceType": "Observation", "id": "o1", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
        "subject": {"reference": "Patient/p1"}, "effectiveDateTime": "2020-01-01T00:00:00Z",
    }
    newer = dict(obs, meta={"lastUpdated": "2021-01-01T00:00:00Z"}, valueQuantity={"value": 2.0, "code": "cm"})
    older = dict(obs, meta={"lastUpdated": "2020-06-01T00:00:00Z"}, valueQuantity={"value": 1.0, "code": "cm"})
    (tmp_path / "o.ndjson").write_bytes(orjson.dumps(newer) + b"\n" + orjson.dumps(older) + b"\n")
    s = run_ingest([tmp_path / "o.ndjson"], tmp_path / "out")
    assert s.duplicates == 1
    ev = scan_events(tmp_path / "out").collect()
    assert ev["numeric_value"].to_list() == [2.0]
    assert _quarantine(tmp_path / "out")[0]["position"] == "line 2"


def test_unknown_resource_type_and_missing_subject(tmp_path):
    cond = orjson.loads(_lines("Condition.000.ndjson.gz")[0])
    no_subject = {k: v for k, v in cond.items() if k != "subject"}
    lines = [{"resourceType": "Spaceship", "id": "x1"}, no_subject, cond]
    (tmp_path / "x.ndjson").write_bytes(b"".join(orjson.dumps(x) + b"\n" for x in lines))
    run_ingest([tmp_path / "x.ndjson"], tmp_path / "out")
    q = _quarantine(tmp_path / "out")
    assert "'Spaceship' is not defined by FHIR R4" in q[0]["reason"]
    assert q[1]["reason"].startswith("missing subject reference") and q[1]["resource_id"] == cond["id"]


def test_single_resource_file_and_not_used_counts(tmp_path):
    org = orjson.loads(_lines("Organization.000.ndjson.gz")[0])
    cond = orjson.loads(_lines("Condition.000.ndjson.gz")[0])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "org.json").write_bytes(orjson.dumps(org))
    (tmp_path / "in" / "cond.json").write_bytes(orjson.dumps(cond))
    s = run_ingest([tmp_path / "in"], tmp_path / "out")
    assert s.counts[("Organization", "not used")] == 1 and s.counts[("Condition", "ingested")] == 1


def test_on_error_fail_stops_with_file_and_record_and_leaves_old_store(tmp_path):
    good = run_ingest([_small_bundle()], tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out" / "data").glob("*.parquet")}
    lines = _lines("Patient.000.ndjson.gz")
    lines.insert(2, b"{broken")
    (tmp_path / "p.ndjson").write_bytes(b"\n".join(lines))
    with pytest.raises(KitError, match=r"p\.ndjson, line 3: malformed JSON"):
        run_ingest([tmp_path / "p.ndjson"], tmp_path / "out", fail_fast=True)
    after = {p.name: p.read_bytes() for p in (tmp_path / "out" / "data").glob("*.parquet")}
    assert before == after and good.events > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no temporary left behind


def test_refuses_to_replace_a_directory_that_is_not_an_event_store(tmp_path):
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(KitError, match="not an event store"):
        run_ingest([_small_bundle()], tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_same_input_gives_byte_identical_parquet(tmp_path):
    src = [BUNDLES, BULK]
    run_ingest(src, tmp_path / "one", workers=1)
    run_ingest(src, tmp_path / "two", workers=2)
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.parquet"))
    assert len(files) >= 3
    for rel in files:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel
    assert (tmp_path / "one" / "quarantine.ndjson").read_bytes() == (tmp_path / "two" / "quarantine.ndjson").read_bytes()


def _kit(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, cwd=REPO)
    # rich wraps long lines to the console width; compare words, not layout.
    proc.stderr = " ".join(proc.stderr.split())
    return proc


def test_cli_missing_path_is_a_clear_error(tmp_path):
    proc = _kit("ingest", "fhir", str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "no such file or directory" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_cli_on_error_fail_exit_code_and_message(tmp_path):
    (tmp_path / "x.ndjson").write_text('{"resourceType": "Patient", "id": "p1", "birthDate": "not-a-date"}\n')
    proc = _kit("ingest", "fhir", str(tmp_path / "x.ndjson"), "--out", str(tmp_path / "out"), "--on-error", "fail")
    assert proc.returncode == 2, proc.stderr
    assert "x.ndjson, line 1" in proc.stderr and "birthDate" in proc.stderr
    assert "not-a-date" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_ingest_and_inspect_summary(tmp_path):
    proc = _kit("ingest", "fhir", str(BULK), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "DocumentReference" in proc.stdout and "not used" in proc.stdout and "log.ndjson.gz" in proc.stdout
    proc = _kit("inspect", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "subjects" in proc.stdout and "Top codes" in proc.stdout and "LOINC" in proc.stdout


def test_killed_ingest_leaves_no_dataset_and_a_rerun_cleans_up(tmp_path):
    import os
    import signal
    import time

    out = tmp_path / "events"
    cmd = [sys.executable, "-m", "kit", "ingest", "fhir", str(BUNDLES), str(BULK), "--out", str(out), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".events.tmp-*/.spill")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".events.tmp-*"))  # the half-built temporary is all that is left
    run_ingest([_small_bundle()], out)
    assert (out / "metadata" / "dataset.json").exists()
    assert not list(tmp_path.glob(".events.tmp-*")) and not (out / ".kit-ingest-pid").exists()


def test_bundle_of_bundles_and_searchset(tmp_path):
    """A collection Bundle holding patient Bundles is expanded; a searchset's OperationOutcome is 'not used'."""
    inner = orjson.loads(gzip.open(_small_bundle()).read())
    outer = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": inner}]}
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "collection.json").write_bytes(orjson.dumps(outer))
    cond = orjson.loads(_lines("Condition.000.ndjson.gz")[0])
    search = {
        "resourceType": "Bundle", "type": "searchset",
        "entry": [
            {"fullUrl": "Condition/" + cond["id"], "resource": cond, "search": {"mode": "match"}},
            {"resource": {"resourceType": "OperationOutcome", "issue": [{"severity": "information", "code": "informational"}]},
             "search": {"mode": "outcome"}},
            {"request": {"method": "DELETE", "url": "Condition/gone"}},
        ],
    }
    (tmp_path / "in" / "search.json").write_bytes(orjson.dumps(search))
    s = run_ingest([tmp_path / "in"], tmp_path / "out")
    direct = run_ingest([_small_bundle()], tmp_path / "direct")
    assert s.counts[("Patient", "ingested")] == 1 and s.counts[("Condition", "ingested")] >= 1
    assert s.counts[("OperationOutcome", "not used")] == 1
    assert s.events == direct.events + 1
    (q,) = _quarantine(tmp_path / "out")
    assert (q["file"], q["position"], q["reason"]) == ("in/search.json", "entry 2", "Bundle entry has no resource")


def test_big_plain_ndjson_split_across_workers_gives_identical_output(tmp_path, monkeypatch):
    from connectors.fhir import ingest

    (tmp_path / "in").mkdir()
    for name in ("Encounter.000.ndjson.gz", "Patient.000.ndjson.gz"):
        (tmp_path / "in" / name.removesuffix(".gz")).write_bytes(gzip.open(BULK / name).read())
    run_ingest([tmp_path / "in"], tmp_path / "whole", workers=1)
    monkeypatch.setattr(ingest, "SPLIT_NDJSON_BYTES", 200_000)
    monkeypatch.setattr(ingest, "POOL_MIN_BYTES", 0)
    units = ingest.work_units(sorted(ingest.sources.discover([tmp_path / "in"]).files, key=lambda f: str(f.path)), 2)
    assert len(units) > 5  # the Encounter file really is split
    run_ingest([tmp_path / "in"], tmp_path / "split", workers=2)
    for rel in ("data/shard-00000.parquet", "metadata/subjects.parquet", "metadata/codes.parquet"):
        assert (tmp_path / "whole" / rel).read_bytes() == (tmp_path / "split" / rel).read_bytes()


def test_append_adds_a_new_export_and_new_copies_replace_stored_ones(tmp_path):
    bundles = sorted(BUNDLES.glob("*.json.gz"))[:3]
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    for f in bundles[:2]:
        shutil.copy(f, tmp_path / "first" / f.name)
    shutil.copy(bundles[2], tmp_path / "second" / bundles[2].name)
    # The second export also re-sends one Observation of the first, with a corrected value.
    first = orjson.loads(gzip.open(bundles[0]).read())
    obs = next(e["resource"] for e in first["entry"] if e["resource"]["resourceType"] == "Observation"
               and "valueQuantity" in e["resource"])
    corrected = dict(obs, valueQuantity=dict(obs["valueQuantity"], value=12345.0))
    (tmp_path / "second" / "fix.ndjson").write_bytes(orjson.dumps(corrected) + b"\n")

    run_ingest([tmp_path / "first"], tmp_path / "store")
    s = run_ingest([tmp_path / "second"], tmp_path / "store", append=True)
    everything = run_ingest([tmp_path / "first", tmp_path / "second"], tmp_path / "all")
    assert s.subjects == 3 and s.duplicates == 1
    ev = scan_events(tmp_path / "store").collect()
    assert ev.filter(pl.col("source_id") == obs["id"])["numeric_value"].to_list() == [12345.0]
    cols = ["subject_id", "time", "code", "numeric_value", "text_value", "source_id"]
    assert ev.select(cols).sort(cols, nulls_last=False).equals(
        scan_events(tmp_path / "all").collect().select(cols).sort(cols, nulls_last=False)
    )
    assert read_subjects(tmp_path / "store").equals(read_subjects(tmp_path / "all"))
    (q,) = _quarantine(tmp_path / "store")
    assert q["file"] == "(event store before --append)" and "second/fix.ndjson, line 1" in q["reason"]


def test_append_needs_an_event_store(tmp_path):
    with pytest.raises(KitError, match="--append needs an existing event store"):
        run_ingest([_small_bundle()], tmp_path / "nothing-here", append=True)


def test_cli_help_shows_an_example():
    for args in (("ingest", "fhir", "--help"), ("inspect", "--help")):
        proc = _kit(*args)
        assert proc.returncode == 0 and "Example" in proc.stdout and "kit " in proc.stdout


def test_output_inside_the_input_directory_is_not_read_back(tmp_path):
    (tmp_path / "export").mkdir()
    shutil.copy(_small_bundle(), tmp_path / "export" / "p.json.gz")
    first = run_ingest([tmp_path / "export"], tmp_path / "export" / "events")
    again = run_ingest([tmp_path / "export"], tmp_path / "export" / "events")
    assert again.files == first.files == 1 and again.quarantined == 0
