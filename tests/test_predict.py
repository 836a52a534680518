"""The Predictor and `kit predict`: the same rows and the same probabilities as `kit evaluate`, from an event store,
a FHIR Bundle (dict, JSON string, path), a resource list or a MEDS event frame; RiskAssessment output that validates."""

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orjson
import polars as pl
import pytest
import torch

from kit import Predictor
from kit.bundle import open_bundle
from kit.errors import KitError
from kit.eval.calibration import apply_task_calibration, brier_score
from kit.eval.scoring import targets_array, task_logits
from kit.events import read_subjects, scan_events
from kit.predict.formats import BadInput, SubjectData
from kit.train.data import load_dataset

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_BUNDLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"


@pytest.fixture(scope="module")
def predictor(tiny_clinical_bundle) -> Predictor:
    return Predictor.load(tiny_clinical_bundle, device="cpu")


@pytest.fixture(scope="module")
def workdir(tiny_clinical_bundle) -> Path:
    return tiny_clinical_bundle.parent


@pytest.fixture(scope="module")
def dataset(workdir):
    return load_dataset(workdir / "dataset", splits=("test",))


def _store_data(events_dir: Path, subject_ids) -> SubjectData:
    ids = pl.Series(list(subject_ids), dtype=pl.Int64).implode()
    return SubjectData(events=scan_events(events_dir).filter(pl.col("subject_id").is_in(ids)).collect(),
                       subjects=read_subjects(events_dir).filter(pl.col("subject_id").is_in(ids)))


@pytest.fixture(scope="module")
def example_docs() -> dict[str, tuple[Path, dict]]:
    """The shipped example Bundles by Patient id."""
    out = {}
    for path in sorted(EXAMPLE_BUNDLES.glob("*.json.gz")):
        doc = orjson.loads(gzip.decompress(path.read_bytes()))
        pid = next((e["resource"]["id"] for e in doc.get("entry", []) if e["resource"]["resourceType"] == "Patient"), None)
        if pid:
            out[pid] = (path, doc)
    return out


def test_probabilities_equal_what_kit_evaluate_computed(predictor, dataset, tiny_clinical_bundle, workdir):
    """Test-split samples: the Predictor builds the same rows from the event store and reports the same calibrated
    probabilities (exactly) as evaluation, whose Brier score is the one in the bundle's metrics.json."""
    bundle = open_bundle(tiny_clinical_bundle)
    model = bundle.load_model().eval()
    metrics = bundle.read_json("metrics.json")
    checked = 0
    for name in predictor.tasks:
        tr = dataset.splits["test"][name]
        if not tr.rows:
            continue
        samples = pl.DataFrame({"subject_id": tr.subject_ids, "prediction_time": tr.prediction_times})
        sd = _store_data(workdir / "events", set(tr.subject_ids.tolist()))
        got = predictor.predict_data(sd, as_of=samples, tasks=[name], explain=False)
        assert [(p.subject_id, np.datetime64(p.as_of, "us")) for p in got] == list(zip(tr.subject_ids.tolist(), tr.prediction_times.astype("datetime64[us]")))
        # Evaluation's path: the head's logits on the dataset rows, then the bundle's calibration.
        logits = task_logits(model, tr.rows, name, torch.device("cpu"), bf16=False)
        want = apply_task_calibration(bundle.calibration["tasks"][name], logits)
        if tr.type == "binary":
            mine = np.array([p.probability for p in got])
            assert all(p.decision == (p.probability >= p.threshold) for p in got)
        else:
            mine = np.array([list(p.scores.values()) for p in got])
        assert np.array_equal(mine, want), name  # the same numbers, not close ones
        brier = brier_score(targets_array(tr.type, tr.rows), mine)
        assert brier == metrics["tasks"][name]["model"]["brier"]["value"], name
        checked += 1
    assert checked >= 2


def test_rows_are_the_dataset_rows(predictor, dataset, workdir):
    """No train/serve skew in the inputs: token ids, time deltas, ages, types and visits match the dataset's rows."""
    from kit.predict.predictor import _NO_LABELS
    from kit.tokenizer import windows
    from kit.train.data import rows_from_frame

    name = "mortality_1y"
    tr = dataset.splits["test"][name]
    sd = _store_data(workdir / "events", set(tr.subject_ids.tolist()))
    samples = predictor.samples(sd, pl.DataFrame({"subject_id": tr.subject_ids, "prediction_time": tr.prediction_times}))
    win = windows(predictor.tokenizer.encode(sd.events, sd.subjects), samples, predictor.max_len)
    frame = win.with_columns(pl.lit(predictor.tasks[name]["task_token_id"], dtype=pl.Int32).alias("task_token_id"),
                             *_NO_LABELS)
    rows, _ = rows_from_frame(frame, name, "binary", 1)
    assert len(rows) == len(tr.rows) > 0
    for a, b in zip(rows, tr.rows):
        for field in ("input_ids", "time", "age", "token_type", "visit"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_fhir_inputs_give_the_event_store_predictions(predictor, dataset, workdir, example_docs):
    """A Patient's Bundle as dict, JSON string, path and resource list reads exactly as the ingested store does."""
    subjects = read_subjects(workdir / "events")
    tr = dataset.splits["test"]["mortality_1y"]
    sid = int(tr.subject_ids[0])
    patient = subjects.filter(pl.col("subject_id") == sid)["source_subject_id"][0]
    path, doc = example_docs[patient]
    when = tr.prediction_times[0]
    as_of = {patient: when.astype("datetime64[us]").astype(object)}
    want = predictor.predict_data(_store_data(workdir / "events", [sid]), as_of=as_of)
    assert want and {p.subject for p in want} == {patient}
    for data in (doc, json.dumps(doc), path, [e["resource"] for e in doc["entry"]]):
        got = predictor.predict(data, as_of=as_of)
        assert got == want
    # Default time: the last event; only events strictly before it are read.
    last = predictor.predict(doc)
    assert {p.task for p in last} == set(predictor.tasks) and all(p.as_of >= when.astype(object) for p in last)
    first = last[0]
    assert first.bundle == predictor.name and first.version == predictor.version and len(first.version) == 12
    assert first.top_events and all({"token", "time", "weight", "source"} <= set(e) for e in first.top_events)
    assert any(e["source"] for e in first.top_events)
    weights = [abs(e["weight"]) for e in first.top_events]
    assert weights == sorted(weights, reverse=True)
    assert all(p.top_events is None for p in predictor.predict(doc, explain=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_predictor_agrees_with_cpu(tiny_clinical_bundle, predictor, example_docs):
    """device="cuda": the Triton scan and the GPU step give the CPU's probabilities (to float rounding) and the
    same strongest attribution."""
    gpu = Predictor.load(tiny_clinical_bundle, device="cuda")
    docs = [doc for _, doc in list(example_docs.values())[:4]]
    for doc in docs:
        want, got = predictor.predict(doc), gpu.predict(doc)
        assert [(p.subject, p.task) for p in got] == [(p.subject, p.task) for p in want]
        for a, b in zip(got, want, strict=True):
            if a.probability is not None:
                assert a.probability == pytest.approx(b.probability, abs=1e-4)
            else:
                assert a.scores == pytest.approx(b.scores, abs=1e-4)
            # near ties may swap places: the strongest weight agrees, not necessarily which event carries it
            assert a.top_events and a.top_events[0]["weight"] == pytest.approx(b.top_events[0]["weight"], rel=1e-3, abs=1e-6)


def test_meds_event_frame_and_errors(predictor, workdir):
    sd = _store_data(workdir / "events", read_subjects(workdir / "events")["subject_id"].head(3).to_list())
    from_frame = predictor.predict(sd.events, subjects=sd.subjects, explain=False)
    assert from_frame == predictor.predict_data(sd, explain=False) and len(from_frame) == 3 * len(predictor.tasks)
    bare = predictor.predict(sd.events, explain=False)  # birth from MEDS_BIRTH events, no subjects table
    assert {p.subject_id for p in bare} == {p.subject_id for p in from_frame}
    with pytest.raises(BadInput, match="no Patient"):
        predictor.predict({"resourceType": "Bundle", "type": "collection", "entry": []})
    with pytest.raises(BadInput, match="not accepted"):
        predictor.predict({"resourceType": "Observation", "id": "x"})
    with pytest.raises(KitError, match="unknown task"):
        predictor.predict_data(sd, tasks=["nope"])
    with pytest.raises(KitError, match="no such file"):
        predictor.predict(workdir / "missing.json")


def test_thread_safe(predictor):
    docs = [orjson.loads(gzip.decompress(p.read_bytes())) for p in sorted(EXAMPLE_BUNDLES.glob("*.json.gz"))[:3]]
    want = [predictor.predict(d) for d in docs]
    got: dict[int, list] = {}
    errors: list = []

    def work(i: int) -> None:
        try:
            got[i] = predictor.predict(docs[i % 3])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(got[i] == want[i % 3] for i in range(6))


def _kit(*args, cwd=REPO, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=timeout, check=False)


def test_kit_predict_writes_risk_assessments_that_validate(tiny_clinical_bundle, predictor, tmp_path):
    from fhir.resources.R4B.riskassessment import RiskAssessment

    inputs = sorted(EXAMPLE_BUNDLES.glob("*.json.gz"))[:2]
    bad = tmp_path / "broken.json"
    bad.write_text('{"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Condition"}}]')
    out = tmp_path / "risk.ndjson"
    packed = tiny_clinical_bundle.parent / "clinical.kitbundle"
    proc = _kit("predict", "--bundle", str(packed), *map(str, inputs), str(bad), "--out", str(out), "--format", "fhir")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = out.read_bytes().splitlines()
    resources = [orjson.loads(line) for line in lines]
    assert len(resources) == 2 * len(predictor.tasks)
    for r in resources:
        RiskAssessment.model_validate(r)  # raises on any invalid element
        assert r["subject"]["reference"].startswith("Patient/") and r["basis"][0] == r["subject"]
        assert r["method"]["coding"][0]["code"].startswith("kit-clinical")
        assert all(0.0 <= p["probabilityDecimal"] <= 1.0 for p in r["prediction"])
    assert "rejected" in proc.stderr and (tmp_path / "risk.ndjson.quarantine.ndjson").is_file()
    # An event store, json lines, one task, no explanations (the command's function in process: no second start-up).
    from kit.predict.cli import predict_command

    json_out = tmp_path / "p.ndjson"
    predict_command(inputs=[tiny_clinical_bundle.parent / "events"], bundle=tiny_clinical_bundle, out=str(json_out),
                    fmt="json", as_of=None, tasks="mortality_1y", explain=False, chunk=3, batch_size=64, device="cpu",
                    workers=1)
    rows = [orjson.loads(line) for line in json_out.read_bytes().splitlines()]
    assert rows and {r["task"] for r in rows} == {"mortality_1y"} and all(r["top_events"] is None for r in rows)
    assert len({r["subject_id"] for r in rows}) == len(rows)
    # Two scoring processes: the same lines, byte for byte, in the same order.
    par_out = tmp_path / "p2.ndjson"
    predict_command(inputs=[tiny_clinical_bundle.parent / "events"], bundle=tiny_clinical_bundle, out=str(par_out),
                    fmt="json", as_of=None, tasks="mortality_1y", explain=False, chunk=3, batch_size=64, device="cpu",
                    workers=2)
    assert par_out.read_bytes() == json_out.read_bytes()


def test_a_tampered_bundle_is_refused(tiny_clinical_bundle, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_clinical_bundle, copy)
    (copy / "calibration.json").write_text("{}")
    with pytest.raises(KitError, match=r"calibration\.json (does not match its SHA-256|is \d+ bytes but)"):
        Predictor.load(copy)  # `kit predict` and `kit serve` load through here (kit serve's exit is tested in test_serve)
