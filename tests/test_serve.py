"""`kit serve` on loopback (a real uvicorn server): RiskAssessment Bundles that validate, every bad request answered
with its OperationOutcome and 4xx, schemathesis over the OpenAPI finds no 500, bearer auth, no patient data in logs."""

import gzip
import itertools
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest
import uvicorn

from kit import Predictor
from kit.serve import create_app

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_BUNDLES = REPO / "examples" / "data" / "fhir" / "synthea-bundles"
TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FHIR = {"Content-Type": "application/fhir+json"}
MAX_BYTES = 2 << 20


class LoopbackServer:
    """uvicorn serving an app on 127.0.0.1 and a free port, in a thread."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def predictor(tiny_clinical_bundle) -> Predictor:
    return Predictor.load(tiny_clinical_bundle, device="cpu")


@pytest.fixture(scope="module")
def url(predictor):
    with LoopbackServer(create_app(predictor, token=TOKEN, max_bytes=MAX_BYTES)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def patient_docs() -> list[dict]:
    return [orjson.loads(gzip.decompress(p.read_bytes())) for p in sorted(EXAMPLE_BUNDLES.glob("*.json.gz"))[:3]]


def _patient_id(doc: dict) -> str:
    return next(e["resource"]["id"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient")


def _validate_outcome(resp: httpx.Response, status: int) -> dict:
    from fhir.resources.R4B.operationoutcome import OperationOutcome

    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    assert resp.headers["content-type"].startswith("application/fhir+json")
    body = resp.json()
    OperationOutcome.model_validate(body)
    assert body["issue"][0]["severity"] == "error" and body["issue"][0]["diagnostics"]
    return body


def test_predict_answers_a_bundle_of_risk_assessments(client, patient_docs, predictor, caplog):
    from fhir.resources.R4B.bundle import Bundle
    from fhir.resources.R4B.riskassessment import RiskAssessment

    doc = patient_docs[0]
    with caplog.at_level(logging.INFO, logger="kit.serve"):
        resp = client.post("/predict", content=orjson.dumps(doc), headers={**FHIR, "X-Request-ID": "req-42"})
        deadline = time.monotonic() + 10  # the line is written once the answer is sent: the client may read it first
        while not any("request_id=req-42" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
    assert resp.status_code == 200, resp.text[:500]
    assert resp.headers["x-request-id"] == "req-42" and resp.headers["content-type"].startswith("application/fhir+json")
    body = resp.json()
    Bundle.model_validate(body)
    risks = [e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    assert {r["code"]["coding"][0]["code"] for r in risks} == set(predictor.tasks)
    for r in risks:
        RiskAssessment.model_validate(r)
        assert r["subject"]["reference"] == f"Patient/{_patient_id(doc)}"
    want = {p.task: p for p in predictor.predict(doc)}
    mortality = next(r for r in risks if r["code"]["coding"][0]["code"] == "mortality_1y")
    assert mortality["prediction"][0]["probabilityDecimal"] == round(want["mortality_1y"].probability, 6)
    assert mortality["method"]["coding"][0]["version"] == predictor.version
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "kit.serve")
    assert "request_id=req-42" in logged and "status=200" in logged
    patient = next(e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Patient")
    family = patient["name"][0]["family"]
    assert _patient_id(doc) not in logged and family not in logged  # no patient data in the logs


def test_plain_json_content_type_and_explain_switch(client, patient_docs):
    resp = client.post("/predict?explain=false", content=orjson.dumps(patient_docs[1]), headers={"Content-Type": "application/json"})
    assert resp.status_code == 200
    risks = [e["resource"] for e in resp.json()["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    assert risks and all(r["basis"] == [r["subject"]] and "note" not in r for r in risks)
    body = orjson.dumps(patient_docs[1])
    dated = client.post("/predict?explain=false&as_of=2015-06-01T12:00:00%2B02:00", content=body, headers=FHIR).json()
    times = {e["resource"]["occurrenceDateTime"] for e in dated["entry"] if e["resource"]["resourceType"] == "RiskAssessment"}
    assert times <= {"2015-06-01T10:00:00Z"}  # UTC; no entry at all when the patient has no history before then
    _validate_outcome(client.post("/predict?as_of=yesterday", content=body, headers=FHIR), 422)


def test_batch_scores_each_document_or_says_why(client, patient_docs, predictor):
    docs = [patient_docs[0], {"resourceType": "Observation", "id": "x"}, patient_docs[2]]
    resp = client.post("/predict/batch", content=orjson.dumps(docs), headers=FHIR)
    assert resp.status_code == 200, resp.text[:500]
    body = resp.json()
    assert body["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in body["entry"]]
    assert statuses == ["200", "422", "200"]
    assert body["entry"][1]["response"]["outcome"]["resourceType"] == "OperationOutcome"
    for entry, doc in ((body["entry"][0], patient_docs[0]), (body["entry"][2], patient_docs[2])):
        subjects = {e["resource"]["subject"]["reference"] for e in entry["resource"]["entry"]
                    if e["resource"]["resourceType"] == "RiskAssessment"}
        assert subjects == {f"Patient/{_patient_id(doc)}"}
    single = client.post("/predict", content=orjson.dumps(patient_docs[2]), headers=FHIR).json()

    def probs(b: dict) -> list[float]:
        risks = sorted((e["resource"] for e in b["entry"] if e["resource"]["resourceType"] == "RiskAssessment"),
                       key=lambda r: r["code"]["coding"][0]["code"])
        return [p["probabilityDecimal"] for r in risks for p in r["prediction"]]

    # Batched with others or alone: the same scores (float sums may differ in the last bits between batch shapes).
    assert probs(single) == pytest.approx(probs(body["entry"][2]["resource"]), abs=1e-5)


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        (b'{"resourceType": "Bundle", "entry": [', FHIR, 400, "structure"),
        (b"", FHIR, 400, "structure"),
        (b'"just a string"', FHIR, 400, "structure"),
        (b'{"resourceType": "Observation", "id": "o1"}', FHIR, 422, "not-supported"),
        (b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Condition", "id": "c"}}]}',
         FHIR, 422, "required"),
        (b'{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": {"resourceType": "Patient", "id": "p1", '
         b'"animal": {"species": {"text": "dog"}}}}]}', FHIR, 422, "not-supported"),
        (b'{"resourceType": "Bundle"}', {"Content-Type": "application/fhir+json; fhirVersion=5.0"}, 415, "not-supported"),
        (b'{"resourceType": "Bundle"}', {"Content-Type": "text/plain"}, 415, "not-supported"),
        (b'{"resourceType": "Bundle", "id": "\xff"}', FHIR, 400, "structure"),
        (b"[" * 5000 + b"]" * 5000, FHIR, 400, "structure"),
        (b'{"resourceType": "Bundle"} {}', FHIR, 400, "structure"),
        (b'{"resourceType": "Bundle", "total": 1e400}', FHIR, 400, "structure"),
    ],
    ids=["malformed-json", "empty", "not-an-object", "wrong-resource-type", "no-patient", "stu3-patient",
         "fhir-version-5", "wrong-media-type", "not-utf8", "nested-too-deep", "trailing-data", "number-out-of-range"],
)
def test_bad_requests_get_their_operation_outcome(client, body, headers, status, code):
    outcome = _validate_outcome(client.post("/predict", content=body, headers=headers), status)
    assert outcome["issue"][0]["code"] == code


def test_request_decoder_reads_what_ingest_reads():
    """Requests decode with msgspec, ingest with orjson: the same values from every shipped document, so a served
    patient's events are the ones training read."""
    from kit.predict.formats import decode_json

    files = sorted(EXAMPLE_BUNDLES.glob("*.json.gz"))
    assert files
    for f in files:
        raw = gzip.decompress(f.read_bytes())
        assert decode_json(bytearray(raw), f.name) == orjson.loads(raw), f.name


def test_size_limit_auth_and_routes(client, url):
    big = b'{"resourceType": "Bundle", "entry": [' + b'{"resource": {}},' * (MAX_BYTES // 16) + b"{}]}"
    assert "too-long" in str(_validate_outcome(client.post("/predict", content=big, headers=FHIR), 413))
    chunks = (big[i:i + 65536] for i in range(0, len(big), 65536))  # no Content-Length: counted as it arrives
    _validate_outcome(client.post("/predict", content=chunks, headers=FHIR), 413)
    with httpx.Client(base_url=url, timeout=30) as anon:
        body = _validate_outcome(anon.post("/predict", content=b"{}", headers=FHIR), 401)
        assert body["issue"][0]["code"] == "login"
        wrong = anon.get("/metadata", headers={"Authorization": "Bearer not-the-token"})
        _validate_outcome(wrong, 401)
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        assert anon.get("/health").status_code == 200  # liveness needs no token
    _validate_outcome(client.get("/nowhere"), 404)
    _validate_outcome(client.get("/predict"), 405)
    _validate_outcome(client.post("/predict?explain=maybe", content=b"{}", headers=FHIR), 422)


def test_metadata_and_openapi(client, predictor):
    meta = client.get("/metadata").json()
    assert meta["version"] == predictor.version and meta["kit_version"] and "Model card" in meta["model_card"]
    assert set(meta["tasks"]) == set(predictor.tasks)
    assert "threshold" in meta["tasks"]["mortality_1y"]["calibration"]
    spec = client.get("/openapi.json").json()
    assert {"/predict", "/predict/batch", "/health", "/metadata"} <= set(spec["paths"])
    assert "application/fhir+json" in spec["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_schemathesis_finds_no_server_error(url):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 4
    # Valid and invalid bodies and parameters (GET /health and /metadata take none, so nothing invalid to send).
    cases = [(op, mode) for op, mode in itertools.product(operations, list(GenerationMode))
             if op.method.upper() == "POST" or mode == GenerationMode.POSITIVE]
    for op, mode in cases:
        @settings(max_examples=15, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def check(case):
            resp = case.call(base_url=url, headers=AUTH, timeout=30)
            case.validate_response(resp, checks=[not_a_server_error])

        check()


def test_kit_serve_command_token_file_and_bad_bundle(tiny_clinical_bundle, tmp_path, patient_docs, kit_serve):
    env = {**os.environ, "COLUMNS": "200"}
    bad = tmp_path / "bad"
    shutil.copytree(tiny_clinical_bundle, bad)
    (bad / "model.safetensors").write_bytes(b"not weights")
    proc = subprocess.run([sys.executable, "-m", "kit", "serve", "--bundle", str(bad), "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    server = kit_serve("--bundle", str(tiny_clinical_bundle), "--token-file", str(token_file))
    base = server.url
    assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
    doc = orjson.dumps(patient_docs[0])
    assert httpx.post(f"{base}/predict", content=doc, headers={**FHIR, "Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    ok = httpx.post(f"{base}/predict", content=doc, headers={**FHIR, **AUTH}, timeout=60)
    assert ok.status_code == 200 and ok.headers["x-request-id"]
    server.stop()
    log = server.log()
    assert "status=401" in log and "status=200" in log
    assert _patient_id(patient_docs[0]) not in log


def test_json_format_serves_any_vertical(predictor, patient_docs):
    """MEDS-style JSON in, prediction objects out (the format every vertical gets): same numbers as the Predictor."""
    from kit.predict.formats import get_format

    sd = get_format("clinical", "fhir").parse(patient_docs[1])
    key = sd.subjects["source_subject_id"][0]
    body = {
        "subjects": [{"subject_id": key, "birth_time": sd.subjects["birth_time"][0].isoformat(), "sex": sd.subjects["sex"][0]}],
        "events": [{"subject_id": key, "time": e["time"].isoformat() if e["time"] else None, "code": e["code"],
                    "numeric_value": e["numeric_value"], "text_value": e["text_value"], "encounter_id": e["encounter_id"]}
                   for e in sd.events.iter_rows(named=True)],
    }
    with LoopbackServer(create_app(predictor, fmt="json")) as base, httpx.Client(base_url=base, timeout=60) as c:
        resp = c.post("/predict?explain=false", json=body)
        assert resp.status_code == 200, resp.text[:500]
        got = {(p["task"], p["probability"], str(p["scores"])) for p in resp.json()["predictions"]}
        want = {(p.task, p.probability, str(p.scores)) for p in predictor.predict(sd, explain=False)}
        assert got == want and resp.json()["bundle"]["version"] == predictor.version
        err = c.post("/predict", json={"subjects": []})
        assert err.status_code == 422 and err.json()["error"]["code"] == "required"
        assert c.post("/predict", content=b"{", headers={"Content-Type": "application/json"}).json()["error"]["status"] == 400


def test_concurrent_requests_scored_together_answer_as_alone(url, patient_docs, predictor):
    """Concurrent /predict requests (the same patient twice among them) are scored in shared passes by the
    server's batcher; each answer is the one that request gets alone, for its own patient."""
    from concurrent.futures import ThreadPoolExecutor

    from kit.predict.formats import get_format
    from kit.serve.batcher import RequestBatcher

    docs = [patient_docs[i % len(patient_docs)] for i in range(8)]

    def probabilities(body: dict) -> dict:
        return {(r["subject"]["reference"], r["code"]["coding"][0]["code"]): r["prediction"][0].get("probabilityDecimal")
                for r in (e["resource"] for e in body["entry"]) if r["resourceType"] == "RiskAssessment"}

    with httpx.Client(base_url=url, headers=AUTH, timeout=60) as c:
        alone = [probabilities(c.post("/predict", content=orjson.dumps(d), headers=FHIR).json()) for d in patient_docs]
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda d: c.post("/predict", content=orjson.dumps(d), headers=FHIR), docs))
    for i, resp in enumerate(together):
        assert resp.status_code == 200
        assert probabilities(resp.json()) == alone[i % len(patient_docs)]

    # The batcher itself: merged passes really happen, with duplicate patients, and give the same predictions.
    wire = get_format("clinical")
    data = [wire.parse(d) for d in docs]
    batcher = RequestBatcher(predictor)
    calls = []
    real = predictor.predict_data

    def counting(sd, **kw):
        calls.append(sd.subjects.height)
        return real(sd, **kw)

    batcher.predictor = type("Counting", (), {"predict_data": staticmethod(counting)})()
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda sd: batcher.predict(sd, explain=False), data))
    assert sum(calls) == len(docs) and max(calls) > 1  # every request scored once, some of them together
    for sd, preds in zip(data, got, strict=True):
        want = real(sd, explain=False)
        assert [(p.subject_id, p.task, p.probability, p.scores) for p in preds] == \
               [(p.subject_id, p.task, p.probability, p.scores) for p in want]


def test_tasks_parameter_scores_a_subset(client, patient_docs):
    resp = client.post("/predict?tasks=mortality_1y&explain=false", content=orjson.dumps(patient_docs[0]), headers=FHIR)
    assert resp.status_code == 200
    codes = {e["resource"]["code"]["coding"][0]["code"] for e in resp.json()["entry"]
             if e["resource"]["resourceType"] == "RiskAssessment"}
    assert codes == {"mortality_1y"}
    outcome = _validate_outcome(client.post("/predict?tasks=no_such_task", content=orjson.dumps(patient_docs[0]),
                                            headers=FHIR), 422)
    assert "mortality_1y" in orjson.dumps(outcome).decode()  # the message lists what the bundle predicts


def test_a_subject_with_nothing_to_score_is_said_not_dropped(client, patient_docs, predictor):
    """A patient with no event before as_of gets no RiskAssessment, and the answer says so (an OperationOutcome
    warning); with the JSON format, a `not_used` entry naming the subject."""
    from fhir.resources.R4B.bundle import Bundle

    body = client.post("/predict?explain=false&as_of=1800-01-01T00:00:00Z", content=orjson.dumps(patient_docs[0]),
                       headers=FHIR).json()
    Bundle.model_validate(body)
    kinds = [e["resource"]["resourceType"] for e in body["entry"]]
    assert "RiskAssessment" not in kinds and kinds.count("OperationOutcome") == 1
    outcome = next(e["resource"] for e in body["entry"] if e["resource"]["resourceType"] == "OperationOutcome")
    assert any("no event before the prediction time" in i["diagnostics"] for i in outcome["issue"])

    app = create_app(predictor, fmt="json")
    with LoopbackServer(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        doc = {"subjects": [{"subject_id": "a", "birth_time": "1950-01-01T00:00:00"},
                            {"subject_id": "b", "birth_time": "1960-01-01T00:00:00"}],
               "events": [{"subject_id": "a", "time": "2010-05-01T00:00:00", "code": "SNOMED/38341003"}]}
        out = c.post("/predict?explain=false", content=orjson.dumps(doc), headers={"Content-Type": "application/json"}).json()
    assert {p["subject"] for p in out["predictions"]} == {"a"}
    assert [n["id"] for n in out["not_used"]] == ["b"]


def test_workers_share_connections_and_stop_cleanly(tiny_clinical_bundle, patient_docs, predictor, kit_serve):
    """`kit serve --workers 2`: connections opened together are spread over both workers (each answers as the
    Predictor does); a stop ends every worker; a worker that dies stops the server with status 1."""
    import re
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from kit.predict.formats import get_format

    server = kit_serve("--bundle", str(tiny_clinical_bundle), "--workers", "2", "--no-explain")
    doc = patient_docs[0]

    def probabilities(body: dict) -> list:
        return sorted((r["code"]["coding"][0]["code"], p.get("outcome", {}).get("text"), p.get("probabilityDecimal"))
                      for r in (e["resource"] for e in body["entry"]) if r["resourceType"] == "RiskAssessment"
                      for p in r["prediction"])

    want = probabilities(get_format("clinical").render(predictor.predict(doc, explain=False), predictor.info, []))

    def post(_):
        with httpx.Client(base_url=server.url, timeout=60) as c:  # its own connection
            resp = c.post("/predict", content=orjson.dumps(doc), headers=FHIR)
            assert resp.status_code == 200, resp.text[:300]
            return probabilities(resp.json())

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(post, range(4)))
    assert all(g == got[0] for g in got)
    assert [g[:2] for g in got[0]] == [w[:2] for w in want]
    assert [g[2] for g in got[0]] == pytest.approx([w[2] for w in want], abs=2e-6)  # 6 digits; its own thread count
    server.stop()
    served = re.findall(r"\[(\d+)\] request_id=\S+ POST /predict status=200", server.log())
    assert len(served) == 4 and len(set(served)) == 2, served
    assert server.proc.returncode == 0 and server.log().count("Finished server process") == 2

    server = kit_serve("--bundle", str(tiny_clinical_bundle), "--workers", "2")
    pid = int(re.search(r"Started server process \[(\d+)\]", server.log()).group(1))
    os.kill(pid, signal.SIGKILL)
    assert server.proc.wait(60) == 1
    server.stop()
    assert "stopping the others" in server.log() and "Traceback" not in server.log()



def test_batcher_waits_for_requests_still_arriving(predictor, patient_docs):
    """Requests whose bodies are still being read or parsed join the pass the first one starts; when the clients it
    expects do not come back, a lone request is scored after at most max_wait_s, and the next one at once."""
    from concurrent.futures import ThreadPoolExecutor

    from kit.predict.formats import get_format
    from kit.serve.batcher import RequestBatcher

    data = [get_format("clinical").parse(d) for d in patient_docs]
    calls = []
    real = predictor.predict_data

    def counting(sd, **kw):
        calls.append(sd.subjects.height)
        return real(sd, **kw)

    batcher = RequestBatcher(type("Counting", (), {"predict_data": staticmethod(counting)})(), max_wait_s=2.0)

    started = threading.Barrier(3)

    def request(i: int, together: bool = True):
        with batcher.arriving() as ticket:
            if together:
                started.wait(30)  # all three are arriving before the first is queued
            time.sleep(0.05 * i)  # reading and parsing
            return batcher.predict(data[i], explain=False, ticket=ticket)

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(request, range(3)))
    assert calls == [3]  # one pass, though the first was queued 100 ms before the last
    assert [len(g) for g in got] == [len(real(sd, explain=False)) for sd in data]
    calls.clear()
    batcher.max_wait_s = 0.5
    t0 = time.monotonic()
    request(0, False)  # the worker held 3 at once: it waits for the other two, in vain, 0.5 s at most
    t1 = time.monotonic()
    request(1, False)  # nothing more is expected now: scored at once (after its 50 ms of "parsing")
    t2 = time.monotonic()
    assert calls == [1, 1] and 0.5 <= t1 - t0 < 1.5 and t2 - t1 < 0.45
