"""A finance bundle through the Predictor, `kit predict` and `kit serve`: JSON in and out (FHIR is clinical only), raw
tables, kit JSON documents and tweets (a `TEXT` event or a `text` CSV) scored exactly like the ingested store."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import polars as pl
import pytest

from kit import Predictor
from kit.events import read_subjects, scan_events
from kit.predict.formats import SubjectData

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "finance_tasks"
TWEETS = DATA / "news" / "sent_train_sample.csv"
UCI_AS_OF = "2005-10-01T00:00:00"  # the task's prediction time: after September's statement
GERMAN_AS_OF = "1994-11-17T00:00:00"


@pytest.fixture(scope="module")
def predictor(tiny_finance_bundle) -> Predictor:
    return Predictor.load(tiny_finance_bundle, device="cpu")


@pytest.fixture(scope="module")
def store(tiny_finance_bundle) -> Path:
    return tiny_finance_bundle.parent / "events"


def _subject(store: Path, key: str) -> SubjectData:
    subj = read_subjects(store).filter(pl.col("source_subject_id") == key)
    assert subj.height == 1, key
    ev = scan_events(store).filter(pl.col("subject_id") == subj["subject_id"][0]).collect()
    return SubjectData(events=ev, subjects=subj)


def _doc(sd: SubjectData, key: str, drop_prefix: str = "LABEL/") -> dict:
    """The subject's events as the kit JSON document a client would send (labels left out)."""
    events = [{"subject_id": key, "time": e["time"].isoformat() if e["time"] else None, "code": e["code"],
               "numeric_value": e["numeric_value"], "text_value": e["text_value"]}
              for e in sd.events.iter_rows(named=True) if not e["code"].startswith(drop_prefix)]
    return {"subjects": [{"subject_id": key}], "events": events}


def _tweets(n: int) -> list[str]:
    with open(TWEETS, newline="", encoding="utf-8") as fh:
        return [r["text"] for r in list(csv.DictReader(fh))[:n]]


def _scores(preds, task: str) -> list:
    return [(p.probability, p.scores) for p in preds if p.task == task]


def test_json_documents_score_like_the_ingested_store(predictor, store):
    """A UCI client and a German applicant sent as JSON get the store's probabilities at the same time; an applicant
    with only timeless attributes needs `as_of` (no event gives a default time)."""
    assert predictor.bundle.vertical == "finance"
    uci = _subject(store, "uci:1")
    from_store = predictor.predict(uci, as_of=UCI_AS_OF, explain=False)
    from_json = predictor.predict(_doc(uci, "client-1"), as_of=UCI_AS_OF, explain=False)
    assert len(from_store) == len(predictor.tasks) and {p.subject for p in from_json} == {"client-1"}
    assert [(p.task, p.probability, p.scores) for p in from_json] == [(p.task, p.probability, p.scores) for p in from_store]
    default = next(p for p in predictor.predict(orjson.dumps(_doc(uci, "c")).decode(), tasks=["credit_default_next_month"])
                   if p.task == "credit_default_next_month")
    assert default.as_of.isoformat() == "2005-09-30T00:00:00"  # the last event (September's statement)
    assert 0.0 <= default.probability <= 1.0 and default.top_events and default.threshold is not None

    german = _subject(store, "german-credit:1")
    doc = _doc(german, "applicant-1")
    assert all(e["time"] is None for e in doc["events"]) and doc["events"]
    assert predictor.predict(doc) == []  # nothing is timed: no default prediction time
    got = predictor.predict(doc, as_of=GERMAN_AS_OF, tasks=["credit_risk_bad"], explain=False)
    want = predictor.predict(german, as_of=GERMAN_AS_OF, tasks=["credit_risk_bad"], explain=False)
    assert len(got) == 1 and got[0].probability == want[0].probability


def test_a_tweet_scores_the_same_as_text_event_text_csv_or_labelled_corpus(predictor, tmp_path):
    texts = _tweets(3)
    labelled = tmp_path / "labelled.csv"
    with open(TWEETS, newline="", encoding="utf-8") as fh:
        labelled.write_text("".join(fh.readlines()[:4]), encoding="utf-8")
    unlabelled = tmp_path / "to_score.csv"
    with open(unlabelled, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([["text"], *[[t] for t in texts]])
    doc = {"subjects": [{"subject_id": f"tweet-{i}"} for i in range(3)],
           "events": [{"subject_id": f"tweet-{i}", "code": "TEXT", "text_value": t} for i, t in enumerate(texts)]}
    task = ["news_sentiment"]
    by_json = predictor.predict(doc, tasks=task, explain=False)
    by_csv = predictor.predict(unlabelled, tasks=task, explain=False)
    by_corpus = predictor.predict(labelled, tasks=task, explain=False)  # the label is a target, never an input

    def in_row_order(preds, prefix):
        return [(p.scores, p.as_of) for p in sorted(preds, key=lambda p: int(p.subject.rsplit(prefix, 1)[1]))]

    assert len(by_json) == 3 and set(by_json[0].scores) == {"bearish", "bullish", "neutral"}
    assert in_row_order(by_json, "tweet-") == [(s, t) for s, t in in_row_order(by_csv, ":")] == in_row_order(by_corpus, ":")
    assert abs(sum(by_json[0].scores.values()) - 1.0) < 1e-6
    assert by_json[0].as_of.isoformat() == "2022-01-02T00:00:00"  # a day after the text, as in training
    from kit.errors import KitError

    with pytest.raises(KitError, match=r"events\[0\]: a TEXT event needs words"):
        predictor.predict({"subjects": [{"subject_id": "t"}], "events": [{"subject_id": "t", "code": "TEXT"}]})


def _kit(*args, timeout=300):
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "kit", *args], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=timeout, check=False)


def test_kit_predict_reads_tables_json_documents_and_texts(tiny_finance_bundle, predictor, store, tmp_path):
    uci = _subject(store, "uci:1")
    (tmp_path / "client.json").write_bytes(orjson.dumps(_doc(uci, "client-1")))
    (tmp_path / "broken.json").write_text('{"subjects": [{"subject_id": "x"}], "events": [{"subject_id": "y", "code": "A"}]}')
    texts = tmp_path / "texts.csv"
    texts.write_text("text\n$AAPL beats estimates, shares jump\n", encoding="utf-8")
    table = tmp_path / "uci.csv"  # the first 20 clients of the shipped subset, as a bank's export
    table.write_text("".join(open(DATA / "uci" / "UCI_Credit_Card.csv").readlines()[:21]))
    out = tmp_path / "p.ndjson"
    packed = tiny_finance_bundle.parent / "finance.kitbundle"
    proc = _kit("predict", "--bundle", str(packed), str(table), str(tmp_path / "client.json"),
                str(tmp_path / "broken.json"), str(texts), "--as-of", UCI_AS_OF, "--tasks",
                "credit_default_next_month,news_sentiment", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    # The tweet's words are dated 2022: at the 2005 --as-of it has no history and is skipped (and said so).
    assert len(rows) == 2 * (20 + 1) and "1 subject(s) had no history" in proc.stderr
    mine = {r["task"]: r for r in rows if r["subject"] == "client-1"}
    want = {p.task: p for p in predictor.predict(uci, as_of=UCI_AS_OF, tasks=list(mine), explain=True)}
    # Equal up to float noise: the command scores the client in a batch of 64 rows, the Predictor alone.
    assert mine["credit_default_next_month"]["probability"] == pytest.approx(want["credit_default_next_month"].probability, abs=1e-5)
    assert mine["news_sentiment"]["scores"] == pytest.approx(want["news_sentiment"].scores, abs=1e-5)
    assert mine["credit_default_next_month"]["top_events"][0]["source"].startswith("event/client.json:events[")
    assert all(r["as_of"] == UCI_AS_OF + "Z" and r["bundle"] == "kit-finance" for r in rows)
    quarantine = (tmp_path / "p.ndjson.quarantine.ndjson").read_bytes().splitlines()
    assert len(quarantine) == 1 and b"broken.json" in quarantine[0] and b"not one of the request's subjects" in quarantine[0]
    # FHIR is the clinical vertical's format only (the command's function in process: no second start-up).
    from kit.errors import KitError
    from kit.predict.cli import predict_command

    with pytest.raises(KitError, match="format 'fhir' is not offered for the finance vertical; choose one of: json"):
        predict_command(inputs=[texts], bundle=tiny_finance_bundle, out=str(tmp_path / "f.ndjson"), fmt="fhir", as_of=None,
                        tasks=None, explain=False, chunk=8, batch_size=8, device="cpu")


def test_kit_serve_answers_json_predictions_and_json_errors(tiny_finance_bundle, predictor, store, kit_serve):
    uci = _subject(store, "uci:1")
    doc = _doc(uci, "client-2")
    doc["subjects"].append({"subject_id": "tweet-1"})
    doc["events"].append({"subject_id": "tweet-1", "time": "2024-05-01T09:30:00Z", "code": "TEXT",
                          "text_value": "Shares of $XYZ tumble after profit warning"})
    server = kit_serve("--bundle", str(tiny_finance_bundle))
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").json()["bundle"] == "kit-finance"
        meta = c.get("/metadata").json()
        assert meta["vertical"] == "finance" and meta["tasks"]["news_sentiment"]["classes"] == ["bearish", "bullish", "neutral"]
        resp = c.post("/predict", params={"explain": "false"}, json=doc)
        assert resp.status_code == 200 and resp.headers["content-type"] == "application/json", resp.text[:500]
        body = resp.json()
        assert body["bundle"]["vertical"] == "finance"
        got = {(p["subject"], p["task"]): p for p in body["predictions"]}
        want = {(p.subject, p.task): p for p in predictor.predict(doc, explain=False)}
        assert got.keys() == want.keys() and len(got) == 2 * len(predictor.tasks)
        for key, p in want.items():  # the same numbers up to float noise (another process, its own kernels)
            assert got[key]["as_of"] == p.as_of.isoformat() + "Z", key
            assert got[key]["probability"] == pytest.approx(p.probability, abs=1e-5), key
            assert got[key]["scores"] == pytest.approx(p.scores, abs=1e-5), key
        assert got[("tweet-1", "news_sentiment")]["as_of"] == "2024-05-02T09:30:00Z"
        batch = c.post("/predict/batch", json=[doc, {"subjects": []}]).json()
        assert [r["status"] for r in batch["results"]] == [200, 422] and len(batch["results"][0]["predictions"]) == len(got)
        bad = c.post("/predict", json={"subjects": [{"subject_id": "a"}], "events": [{"subject_id": "a", "code": "TEXT"}]})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid" and "TEXT" in bad.json()["error"]["message"]
        assert c.post("/predict", content=b"{", headers={"Content-Type": "application/json"}).json()["error"]["status"] == 400
        ofx = c.post("/predict", content=b"OFXHEADER:100", headers={"Content-Type": "application/x-ofx"})
        assert ofx.status_code == 415 and ofx.json()["error"]["code"] == "not-supported"
    server.stop()
    log = server.log()
    assert "status=200" in log and "status=422" in log and "client-2" not in log and "tumble" not in log
