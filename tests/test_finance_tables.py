"""kit ingest finance on tables: the shipped layouts (AMLSim, UCI credit default, German credit) with labels and
amounts checked against the raw files, layout detection and YAML mappings, bad rows, the CLI and kit inspect."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
import subprocess
import sys
from collections import Counter
from decimal import Decimal
from pathlib import Path

import meds
import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.finance.ingest import run_ingest
from kit.errors import KitError
from kit.events import read_codes, read_subjects, scan_events

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "data" / "finance"


def _rows(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        return list(csv.DictReader(fh))


def _events(store: Path) -> pl.DataFrame:
    subjects = read_subjects(store).select("subject_id", "source_subject_id")
    return scan_events(store).collect().join(subjects, on="subject_id", how="left")


@pytest.fixture(scope="module")
def example_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fin") / "store"
    run_ingest([EXAMPLES], out)
    return out


def test_examples_ingest_every_format(example_store):
    report = json.loads((example_store / "metadata" / "ingest_report.json").read_text())
    assert set(report["by_format"]) == {"ofx", "camt", "amlsim-accounts", "amlsim-transfers", "uci-credit-default",
                                        "german-credit"}
    assert report["quarantined"] == 0
    ev = _events(example_store)
    # the contract's columns, in order, with exact amounts beside float32 values
    assert ev.columns[:11] == ["subject_id", "time", "code", "numeric_value", "text_value", "unit", "encounter_id",
                               "source_type", "source_id", "amount", "counterparty"]
    money = ev.filter(pl.col("amount").is_not_null())
    assert (money["amount"].cast(pl.Float64).cast(pl.Float32) == money["numeric_value"]).all()
    # events sorted by (subject_id, time nulls first)
    keys = ev.select("subject_id", pl.col("time").fill_null(dt.datetime(1, 1, 1)))
    assert keys.equals(keys.sort("subject_id", "time"))
    codes = read_codes(example_store)
    assert set(codes["code"]) == set(ev["code"])
    # a MEDS 0.4 dataset: the extra finance columns are allowed beside the core ones
    meds.DataSchema.validate(pq.read_table(example_store / "data" / "shard-00000.parquet"))
    meds.CodeMetadataSchema.validate(pq.read_table(example_store / "metadata" / "codes.parquet"))
    meds.DatasetMetadataSchema.validate(json.loads((example_store / "metadata" / "dataset.json").read_text()))
    assert codes.filter(pl.col("code") == "LABEL/SAR")["description"].item().startswith("Label (target only)")


def test_amlsim_labels_and_transfers_match_raw(example_store):
    nodes = _rows(EXAMPLES / "amlsim" / "nodes.csv")
    transfers = _rows(EXAMPLES / "amlsim" / "transactions.csv")
    ev = _events(example_store).filter(pl.col("source_subject_id").str.starts_with("amlsim:"))
    sar = ev.filter(pl.col("code") == "LABEL/SAR")
    raw = Counter(r["isFraud"] for r in nodes)
    assert sar.height == len(nodes)
    assert int(sar["numeric_value"].sum()) == raw["1"] == 186
    flagged = {f"amlsim:{r['nodeid']}" for r in nodes if r["isFraud"] == "1"}
    assert set(sar.filter(pl.col("numeric_value") == 1)["source_subject_id"]) == flagged
    # one label time for every account: the day after the last transfer step (no leakage through the time)
    last_step = max(int(r["time"]) for r in transfers)
    assert set(sar["time"]) == {dt.datetime(2017, 1, 1) + dt.timedelta(days=last_step + 1)}
    assert ev.filter(pl.col("time") >= sar["time"][0]).height == sar.height
    debits = ev.filter(pl.col("code") == "TXN/DEBIT")
    credits = ev.filter(pl.col("code") == "TXN/CREDIT")
    assert debits.height == credits.height == len(transfers)
    # exact decimals: the sum of the stored amount strings equals the raw sum, to the cent
    raw_sum = sum(Decimal(r["value"]) for r in transfers)
    assert sum(Decimal(a) for a in credits["amount"]) == raw_sum
    assert sum(Decimal(a) for a in debits["amount"]) == -raw_sum
    first = transfers[0]
    row = debits.filter(pl.col("source_id") == "transactions.csv:1").row(0, named=True)
    assert row["source_subject_id"] == f"amlsim:{first['sourceNodeId']}"
    assert row["counterparty"] == f"amlsim:{first['targetNodeId']}"
    assert row["time"] == dt.datetime(2017, 1, 1) + dt.timedelta(days=int(first["time"]))
    assert row["unit"] == "USD"


def test_uci_monthly_history_and_default_labels(example_store):
    raw = _rows(EXAMPLES / "uci-credit" / "UCI_Credit_Card.sample.csv")
    ev = _events(example_store).filter(pl.col("source_type") == "uci-credit-default")
    labels = ev.filter(pl.col("code") == "LABEL/DEFAULT")
    assert labels.height == len(raw)
    assert int(labels["numeric_value"].sum()) == sum(r["default.payment.next.month"] == "1" for r in raw) == 70
    assert set(labels["time"]) == {dt.datetime(2005, 10, 31)}
    client = raw[2]  # ID 7: LIMIT_BAL written as 5e+05
    mine = ev.filter(pl.col("source_subject_id") == f"uci:{client['ID']}")
    assert mine.filter(pl.col("code") == "ATTR/LIMIT_BAL")["amount"].item() == "500000"
    months = {0: dt.datetime(2005, 9, 30), 2: dt.datetime(2005, 8, 31), 6: dt.datetime(2005, 4, 30)}
    for pay, when in months.items():
        status = mine.filter(pl.col("code").str.starts_with("PAYSTATUS/") & (pl.col("time") == when))
        assert status["code"].item() == f"PAYSTATUS/{client[f'PAY_{pay}']}"
    bills = mine.filter(pl.col("code") == "BILL/STATEMENT").sort("time", descending=True)
    assert bills["amount"].to_list() == [client[f"BILL_AMT{i}"] for i in range(1, 7)]
    # all history strictly before the label; static attributes have a null time
    assert mine.filter(pl.col("time").is_not_null() & (pl.col("code") != "LABEL/DEFAULT"))["time"].max() < \
        labels["time"][0]
    assert set(mine.filter(pl.col("time").is_null())["code"]) == {
        "ATTR/LIMIT_BAL", f"ATTR/SEX/{client['SEX']}", f"ATTR/EDUCATION/{client['EDUCATION']}",
        f"ATTR/MARRIAGE/{client['MARRIAGE']}", "ATTR/AGE"}


def test_german_credit_static_attributes(example_store):
    raw = _rows(EXAMPLES / "german-credit" / "germancredit.sample.csv")
    ev = _events(example_store).filter(pl.col("source_type") == "german-credit")
    assert ev["time"].null_count() == ev.height
    labels = ev.filter(pl.col("code") == "LABEL/CREDIT_RISK")
    assert labels.height == len(raw)
    assert int(labels["numeric_value"].sum()) == sum(r["creditability"] == "bad" for r in raw) == 57
    first = ev.filter(pl.col("source_subject_id") == "german-credit:1")
    assert f"ATTR/purpose/{raw[0]['purpose']}" in first["code"].to_list()
    amt = first.filter(pl.col("code") == "ATTR/credit_amount").row(0, named=True)
    assert (amt["amount"], amt["unit"]) == (raw[0]["credit_amount"], "DEM")


def test_shared_data_label_counts_survive_exactly(shared_data, tmp_path):
    """The full shared tables: every AMLSim flag, UCI default and German-credit label, counted against the raw files."""
    fin = shared_data / "finance"
    nodes = fin / "aml-transactions-amlsim" / "20K_fanin200cycle200" / "nodes.csv.gz"
    uci = fin / "credit-default-uci-taiwan" / "UCI_Credit_Card.dev.csv.gz"
    german = fin / "german-credit-statlog" / "germancredit.csv"
    summary = run_ingest([nodes, uci, german], tmp_path / "store")
    assert summary.quarantined == 0
    expected = {
        "LABEL/SAR": Counter(r["isFraud"] for r in _rows(nodes)),
        "LABEL/DEFAULT": Counter(r["default.payment.next.month"] for r in _rows(uci)),
        "LABEL/CREDIT_RISK": Counter(r["creditability"] for r in _rows(german)),
    }
    positive = {"LABEL/SAR": "1", "LABEL/DEFAULT": "1", "LABEL/CREDIT_RISK": "bad"}
    ev = scan_events(tmp_path / "store").filter(pl.col("code").str.starts_with("LABEL/")).collect()
    for code, raw in expected.items():
        mine = ev.filter(pl.col("code") == code)
        assert Counter(mine["text_value"].to_list()) == raw, code
        assert int(mine["numeric_value"].sum()) == raw[positive[code]], code
        n_pos = raw[positive[code]]
        assert summary.labels[code] == {"positive": n_pos, "negative": sum(raw.values()) - n_pos}
    assert expected["LABEL/SAR"]["1"] == 1804 and expected["LABEL/CREDIT_RISK"]["bad"] == 300


def test_unknown_layout_is_a_clear_error_and_a_mapping_fixes_it(tmp_path):
    table = tmp_path / "export.csv"
    table.write_text("acct,booked,amt,ccy,kind,mcc,fraud\n"
                     "A1,2024-03-01,-12.50,EUR,debit,5411,0\n"
                     "A1,2024-03-02,1000.00,EUR,credit,,0\n"
                     "B2,2024-03-02,$12,EUR,debit,5812,1\n"
                     "B2,,3.00,EUR,debit,5812,1\n"
                     "B2,2024-03-04,7.5,eur,debit,5812,1\n")
    with pytest.raises(KitError) as err:
        run_ingest([table], tmp_path / "out")
    msg = str(err.value)
    assert "unknown table layout" in msg and "amlsim-transfers" in msg and "uci-credit-default" in msg
    assert "--mapping" in err.value.hint
    mapping = tmp_path / "mine.yaml"
    mapping.write_text(
        "name: my-bank\n"
        "header: [acct, booked, amt, ccy, kind, mcc, fraud]\n"
        "subject: {column: acct, prefix: mybank}\n"
        "time: {column: booked, format: '%Y-%m-%d'}\n"
        "currency: {column: ccy}\n"
        "events:\n"
        "  - {code: 'TXN/{kind}', amount: amt}\n"
        "  - {code: 'MCC/{mcc}', when: mcc}\n"
        "labels:\n"
        "  - {column: fraud, code: LABEL/FRAUD, positive: ['1'], negative: ['0'], time: {at_end: true}}\n"
    )
    s = run_ingest([table], tmp_path / "out", mappings=[mapping])
    ev = _events(tmp_path / "out")
    txn = ev.filter(pl.col("code").str.starts_with("TXN/")).select("source_subject_id", "code", "amount", "unit")
    assert txn.rows() == [("mybank:A1", "TXN/DEBIT", "-12.50", "EUR"), ("mybank:A1", "TXN/CREDIT", "1000.00", "EUR")]
    assert ev.filter(pl.col("code").str.starts_with("MCC/"))["code"].to_list() == ["MCC/5411"]
    assert set(ev.filter(pl.col("code") == "LABEL/FRAUD")["time"]) == {dt.datetime(2024, 3, 3)}
    q = [json.loads(x) for x in (tmp_path / "out" / "quarantine.ndjson").read_text().splitlines()]
    assert [(r["position"], r["reason"]) for r in q] == [
        ("row 3", "unparseable amount in amt (not a plain decimal)"),
        ("row 4", "missing time (booked)"),
        ("row 5", "missing or invalid currency in ccy (ISO 4217 code)"),
    ]
    assert s.quarantined == 3 and s.labels == {"LABEL/FRAUD": {"positive": 0, "negative": 2}}
    # --layout forces a layout; one that does not fit the header says which columns are missing
    with pytest.raises(KitError, match="needs columns it lacks: sourceNodeId"):
        run_ingest([table], tmp_path / "out2", layout="amlsim-transfers")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nheader: [a]\nsubject: {column: a, prefix: x}\n"
                   "events: [{code: X, amount: b, colour: red}]\n")
    with pytest.raises(KitError, match="unknown field `events.0.colour`"):
        run_ingest([table], tmp_path / "out3", mappings=[bad])


def test_refuses_to_replace_other_directories_and_unknown_files(tmp_path):
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(KitError, match="not an event store"):
        run_ingest([EXAMPLES / "ofx"], other)
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    with pytest.raises(KitError, match="not a finance input"):
        run_ingest([stray], tmp_path / "out")


def test_cli_ingest_then_inspect(tmp_path):
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "kit", "ingest", "finance", str(EXAMPLES / "camt"), str(EXAMPLES / "ofx"),
           "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "events" in run.stdout and "subjects" in run.stdout
    # what `kit inspect` prints, in process (a third interpreter start costs more than the check)
    from kit.inspect import print_summary, summarize

    summary = summarize(out)
    assert summary.events == scan_events(out).collect().height > 0 and summary.quarantined == 0
    assert {v for v, _, _ in summary.vocabularies} >= {"TXN", "BAL", "BTC"}
    print_summary(out, summary)
    bad = subprocess.run([sys.executable, "-m", "kit", "ingest", "finance", str(tmp_path / "nope"), "--out",
                          str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such file" in bad.stderr and "Traceback" not in bad.stderr


def test_parquet_table_detected_by_schema(tmp_path):
    """A Parquet table is recognised by its schema; a float column's amounts are its values' shortest decimal text."""
    src = EXAMPLES / "amlsim" / "transactions.csv"
    pl.read_csv(src).write_parquet(tmp_path / "transfers.parquet")
    s = run_ingest([tmp_path / "transfers.parquet"], tmp_path / "store")
    assert s.by_format["amlsim-transfers"]["records"] == len(_rows(src))
    ev = scan_events(tmp_path / "store").filter(pl.col("code") == "TXN/CREDIT").collect()
    assert sum(Decimal(a) for a in ev["amount"]) == sum(Decimal(r["value"]) for r in _rows(src))


def test_table_on_error_fail_names_file_row_and_reason(tmp_path):
    table = tmp_path / "transactions.csv"
    table.write_text("sourceNodeId,targetNodeId,value,time\n1,2,10.00,1\n3,4,1O.5,2\n")
    with pytest.raises(KitError, match=r"rejected record: .*transactions\.csv, row 2: unparseable amount in value"):
        run_ingest([table], tmp_path / "out", fail_fast=True)
    assert not (tmp_path / "out").exists()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6).flatmap(lambda places: st.decimals(
           allow_nan=False, allow_infinity=False, places=places, min_value=-10**12, max_value=10**12)),
       st.sampled_from(["", "+"]))
def test_table_amounts_are_exact_decimals(value, plus):
    """Any plain decimal a table holds comes back digit for digit (the float32 numeric_value may not)."""
    from connectors.finance import tables
    from connectors.finance.records import Sink

    text = format(value, "f")
    if plus and not text.startswith("-"):
        text = "+" + text
    df = pl.DataFrame({"sourceNodeId": ["1"], "targetNodeId": ["2"], "value": [text], "time": ["1"]})
    layout = tables.shipped_layouts()["amlsim-transfers"]
    events, counts = tables.map_table(df, layout, "t.csv", 0, Sink())
    credit = events.filter(pl.col("code") == "TXN/CREDIT")["amount"].item()
    debit = events.filter(pl.col("code") == "TXN/DEBIT")["amount"].item()
    assert Decimal(credit) == value and Decimal(debit) == -value
    assert credit.lstrip("-") == text.lstrip("+-")


def test_a_killed_ingests_temporary_is_removed_by_the_next_run(tmp_path):
    """A run killed while writing leaves only `.DIR.tmp-*` (its pid inside); the next run deletes it."""
    from kit.fsutil import OWNER_FILE

    stale = tmp_path / ".store.tmp-killed"
    (stale / "data").mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (stale / OWNER_FILE).write_text(dead.stdout.strip())
    run_ingest([EXAMPLES / "camt"], tmp_path / "store")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not (tmp_path / "store" / OWNER_FILE).exists()
