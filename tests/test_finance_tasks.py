"""Finance vertical: task specs, labelers without leakage, label counts against the raw files, the GBT baseline, and
a tiny `kit finetune --vertical finance` end to end, on small real subsets (tests/data/finance_tasks/SOURCE.md)."""

import csv
import json
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kit import registry
from kit.datasets.build import build_dataset, read_manifest, scan_rows
from kit.datasets.config import load_config
from kit.errors import KitError
from kit.events import read_subjects, scan_events
from kit.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "finance_tasks"
TRAIN = ["device=cpu", "model.size=tiny", "pretrain.steps=3", "pretrain.optim.batch_size=8", "finetune.steps=6",
         "finetune.eval_every=3", "finetune.checkpoint_every=3", "finetune.optim.batch_size=8", "n_bootstrap=0",
         "max_eval_rows=32"]
BUILD = ["tokenizer.max_len=64", "tokenizer.min_count=2"]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """The subsets through the vertical's ingest: tables by the finance connector, the tweets by the text reader."""
    out = tmp_path_factory.mktemp("fin") / "events"
    registry.vertical("finance").ingest([DATA], out)
    return out


@pytest.fixture(scope="module")
def dataset(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finds") / "dataset"
    build_dataset("finance", store, out, load_config(None, BUILD))
    return out


@pytest.fixture(scope="module")
def labeled(store) -> dict[str, pl.DataFrame]:
    """Every task's labeler on the whole store (one chunk), tasks fit on all subjects."""
    v = registry.vertical("finance")
    events = scan_events(store)
    tasks = v.prepare(v.load_tasks(None), events, {})
    ev, subj = events.collect(), read_subjects(store)
    return {t.spec.name: t.label(ev, subj, {}) for t in tasks} | {"_tasks": tasks, "_events": ev}


def test_label_counts_match_the_raw_files(store, labeled):
    nodes = _rows(DATA / "amlsim" / "nodes.csv")
    uci = _rows(DATA / "uci" / "UCI_Credit_Card.csv")
    german = _rows(DATA / "german" / "germancredit.csv")
    news = _rows(DATA / "news" / "sent_train_sample.csv")
    expected = {
        "suspicious_account": (len(nodes), sum(r["isFraud"] == "1" for r in nodes)),
        "credit_default_next_month": (len(uci), sum(r["default.payment.next.month"] == "1" for r in uci)),
        "credit_risk_bad": (len(german), sum(r["creditability"] == "bad" for r in german)),
    }
    for task, (n, pos) in expected.items():
        ok = labeled[task].filter(pl.col("status") == "ok")
        assert ok.height == n, task
        assert int(ok.get_column("label").sum()) == pos, task
    ok = labeled["news_sentiment"].filter(pl.col("status") == "ok")
    got = Counter(int(x) for x in ok.get_column("label"))
    raw = Counter(int(r["label"]) for r in news)
    assert got == raw and sum(got.values()) == len(news)


def test_prediction_times_follow_the_specs(labeled):
    uci = labeled["credit_default_next_month"].get_column("prediction_time").unique().to_list()
    assert uci == [datetime(2005, 10, 1)]  # the label (end of October) less 30 days: after September's statement
    german = labeled["credit_risk_bad"].get_column("prediction_time").unique().to_list()
    assert german == [datetime(1994, 11, 17)]
    ev = labeled["_events"]
    last_transfer = ev.filter(pl.col("source_type") == "amlsim-transfers").get_column("time").max()
    sar = labeled["suspicious_account"].get_column("prediction_time").unique().to_list()
    assert sar == [last_transfer + timedelta(days=1)]  # every transfer is before the cut-off


def test_no_event_at_or_after_the_prediction_time_enters_the_input(dataset):
    m = read_manifest(dataset)
    tok = Tokenizer.load(dataset / "tokenizer.json")
    assert not [t for t in tok.vocab if t.startswith("LABEL/")], "label codes must never be tokens"
    assert "LABEL/" in tok.config.drop_code_prefixes
    for split in ("train", "val", "test"):
        rows = scan_rows(dataset, split).collect()
        late = rows.explode("token_time").filter(pl.col("token_time") >= pl.col("prediction_time"))
        assert late.height == 0, late.select("task", "subject_id", "prediction_time").head()
    # Every task has samples, and the static tables keep their attributes (binned numbers included).
    counts = {n: sum(t["counts"][s]["samples"] for s in ("train", "val", "test")) for n, t in m["tasks"].items()}
    assert all(n > 0 for n in counts.values()), counts
    german = scan_rows(dataset, "train", "credit_risk_bad").collect().row(0, named=True)
    words = tok.decode(german["input_ids"])
    assert any(w.startswith("ATTR/credit_amount#Q") for w in words) and any(w.startswith("ATTR/purpose/") for w in words)
    assert m["tasks"]["credit_risk_bad"]["baselines"] == ["logistic", "gbt"]


def test_next_transaction_category_is_the_first_transaction_at_the_prediction_time(labeled):
    task = next(t for t in labeled["_tasks"] if t.spec.name == "next_transaction_category")
    ev = labeled["_events"].with_row_index("_i")
    ok = labeled["next_transaction_category"].filter(pl.col("status") == "ok")
    assert ok.height > 50 and sorted(task.classes) == ["TXN/CREDIT", "TXN/DEBIT"]  # AMLSim: no MCC, two types
    tx = ev.filter(pl.col("code").str.starts_with("TXN/") & (pl.col("source_type") != "uci-credit-default"))
    for sid, t, label in ok.head(60).select("subject_id", "prediction_time", "label").iter_rows():
        mine = tx.filter(pl.col("subject_id") == sid)
        at = mine.filter(pl.col("time") == t).sort("_i")
        assert task.classes[int(label)] == at.get_column("code")[0]
        assert mine.filter(pl.col("time") < t).height >= 1  # some history before it
    assert ok.group_by("subject_id").len().get_column("len").max() <= 4  # max_samples_per_subject


def test_large_outflow_label_against_a_plain_loop(labeled):
    task = next(t for t in labeled["_tasks"] if t.spec.name == "large_outflow_30d")
    thr = task.thresholds["USD"]
    out = labeled["large_outflow_30d"]
    assert set(out.get_column("status").unique()) <= {"ok", "censored", "excluded:no_history", "excluded:per_subject_cap"}
    end = task.source_end["amlsim-transfers"]
    debits = labeled["_events"].filter((pl.col("code") == "TXN/DEBIT") & (pl.col("source_type") == "amlsim-transfers"))
    by_subject: dict[int, list] = {}
    for sid, t, v in debits.select("subject_id", "time", "numeric_value").iter_rows():
        by_subject.setdefault(sid, []).append((t, v))
    for sid, pt, status, label in out.select("subject_id", "prediction_time", "status", "label").iter_rows():
        hit = any(pt <= t < pt + timedelta(days=30) and -v >= thr for t, v in by_subject.get(sid, []))
        if status in ("ok", "excluded:per_subject_cap"):
            assert label == float(hit), (sid, pt)
        if status == "censored":
            assert not hit and pt + timedelta(days=30) > end


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_time": {"at": "fixed"}}, "prediction_time.date"),
        ({"label": {"rule": "label_event", "code": "TXN/DEBIT"}}, "label.code"),
        ({"type": "multiclass"}, "label.classes"),
        ({"prediction_time": {"at": "label_time", "offset_days": 3}}, "prediction_time.offset_days"),
        ({"label": {"rule": "label_event", "code": "LABEL/SAR", "positive": 1}}, "unknown field `label.positive`"),
        ({"label": {"rule": "large_outflow", "quantile": 0.9}}, "prediction_time.at"),
        ({"label": {"rule": "nope"}}, "unknown label rule"),
    ],
)
def test_spec_errors_name_the_field(change, message):
    from verticals.finance.spec import parse_task_spec

    base = {"name": "t_x", "description": "d", "type": "binary", "prompt": "p",
            "prediction_time": {"at": "label_time"}, "label": {"rule": "label_event", "code": "LABEL/SAR"}}
    with pytest.raises(KitError, match=re.escape(message)):
        parse_task_spec({**base, **change}, "x.yaml")


def test_gbt_baseline_learns_an_interaction_logistic_regression_cannot():
    from scipy import sparse

    from kit.eval.baseline import count_features, fit_named_baseline
    from kit.eval.metrics import metric_fn

    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 2, 600), rng.integers(0, 2, 600)
    seqs = [[2 + x, 4 + y] for x, y in zip(a, b)]
    y = (a ^ b).astype(float)  # xor: no linear rule separates it
    x = count_features(seqs, 8)
    assert isinstance(x, sparse.csr_matrix)
    auroc = metric_fn("binary", "auroc")
    gbt = fit_named_baseline("gbt", "binary", x[:400], y[:400]).predict_scores(x[400:])
    lr = fit_named_baseline("logistic", "binary", x[:400], y[:400]).predict_scores(x[400:])
    assert auroc(y[400:], gbt) > 0.95 and auroc(y[400:], lr) < 0.7
    multi = fit_named_baseline("gbt", "multiclass", x[:400], (a + b)[:400].astype(float)).predict_scores(x[400:])
    assert multi.shape == (200, 3) and np.allclose(multi.sum(1), 1)


def test_finance_finetune_end_to_end(tmp_path):
    """The real CLI from raw files: ingest (connector + text corpus), dataset, pretrain, finetune, bundle, reports."""
    wd = tmp_path / "run"
    args = [sys.executable, "-m", "kit", "finetune", "--vertical", "finance", "--data", str(DATA), "--workdir", str(wd)]
    for s in TRAIN:
        args += ["--set", s]
    for s in BUILD:
        args += ["--dataset-set", s]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    metrics = json.loads((wd / "bundle" / "metrics.json").read_text())
    vertical = registry.vertical("finance")
    assert set(metrics["tasks"]) == set(vertical.task_names())
    for name, t in metrics["tasks"].items():
        assert t["n"] > 0 and "auroc" in t["model"] and "baseline" in t, name
        spec = next(s for s in vertical.load_tasks(None) if s.name == name)
        assert ("baseline_gbt" in t) == ("gbt" in spec.baselines), name
    assert "forgetting" in metrics and (wd / "finance.kitbundle").is_file()
    assert (wd / "bundle" / "calibration.json").is_file()
    assert "suspicious_account" in proc.stdout


def test_text_corpus_alone_becomes_an_event_store_and_bad_rows_are_quarantined(tmp_path):
    from kit.events import is_event_store
    from verticals.finance.text import words

    corpus = tmp_path / "news.csv"
    corpus.write_text('text,label\n"$TSLA up 5% on deliveries https://t.co/x",1\nFed holds rates,2\nbad row,7\n,0\n')
    out = tmp_path / "events"
    registry.vertical("finance").ingest([corpus], out)
    assert is_event_store(out)
    subjects = read_subjects(out)
    assert subjects.get_column("source_subject_id").to_list() == ["news:news.csv:1", "news:news.csv:2"]
    ev = scan_events(out).collect()
    first = ev.filter(pl.col("subject_id") == subjects.get_column("subject_id")[0]).sort("time")
    assert first.get_column("code").to_list() == ["TEXT/$tsla", "TEXT/up", "TEXT/<num>", "TEXT/on", "TEXT/deliveries",
                                                   "TEXT/<url>", "LABEL/SENTIMENT"]
    assert first.get_column("text_value")[-1] == "1"
    quarantine = [json.loads(line) for line in (out / "quarantine.ndjson").read_text().splitlines()]
    assert [(q["position"], q["reason"]) for q in quarantine] == [
        ("row 3", "label '7' is not one of 0, 1, 2"), ("row 4", "no words in text")]
    assert "bad row" not in (out / "quarantine.ndjson").read_text()  # reasons, never the text
    assert words("J.P. Morgan cuts $AAPL to 150.5") == ["j.p", ".", "morgan", "cuts", "$aapl", "to", "<num>"]
