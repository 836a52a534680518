"""kit ingest finance on bank statements: camt.052/053/054 against genkgo's expected parses, OFX/QFX fixtures
(including the files ofxparse rejects), quarantine and --on-error fail. Fixtures: tests/data/finance (SOURCE.txt)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest

from connectors.finance.ingest import run_ingest
from kit.errors import KitError
from kit.events import read_subjects, scan_events

DATA = Path(__file__).parent / "data" / "finance"
CAMT = DATA / "camt"
OFX = DATA / "ofx"
# ISO 4217 minor units of the fixtures' currencies (genkgo's Money amounts are in minor units).
MINOR_DIGITS = {"JPY": 0}


def _store_frame(store: Path) -> pl.DataFrame:
    subjects = read_subjects(store).select("subject_id", "source_subject_id")
    return scan_events(store).collect().join(subjects, on="subject_id", how="left")


def _quarantine(store: Path) -> list[dict]:
    return [json.loads(line) for line in (store / "quarantine.ndjson").read_text().splitlines()]


@pytest.fixture(scope="module")
def camt_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("camt") / "store"
    run_ingest([CAMT], out)
    return out


@pytest.fixture(scope="module")
def ofx_store(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ofx") / "store"
    run_ingest([OFX], out)
    return out


def _utc(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp).astimezone(dt.timezone.utc).replace(tzinfo=None)


def _money(m: dict) -> tuple[Decimal, str]:
    ccy = m["getCurrency"]["getCode"]
    return Decimal(m["getAmount"]) / (10 ** MINOR_DIGITS.get(ccy, 2)), ccy


def _expected_counterparty(entry: dict, credit: bool) -> str | None | bool:
    """The oracle's counterparty (as the store writes it), or False when the serialised tree elides it."""
    details = [entry.get("getTransactionDetail")] + list(entry.get("getTransactionDetails") or [])[1:]
    found = set()
    for d in details:
        if not isinstance(d, dict):
            continue
        for party in d.get("getRelatedParties") or []:
            if not isinstance(party, dict):
                return False
            ptype = party["getRelatedPartyType"]
            if not isinstance(ptype, dict):
                return False
            kind = ptype["__CLASS__"].rsplit("\\", 1)[-1]
            if kind != ("Debtor" if credit else "Creditor"):
                continue
            acct = party.get("getAccount")
            if isinstance(acct, dict) and acct.get("getIdentification"):
                found.add(f"camt:{acct['getIdentification']}")
            elif acct == "__RECURSIVITY__":
                return False
            elif ptype.get("getName"):
                found.add(ptype["getName"])
    return found.pop() if len(found) == 1 else None


# Our BAL/<ISO code> -> genkgo's balance type names (genkgo reads PRCD, previously closed booked, as the opening
# balance and XPCD, expected, as expected_credit).
BALANCE_TYPES = {
    "OPBD": "opening", "CLBD": "closing", "OPAV": "opening_available", "CLAV": "closing_available",
    "ITBD": "interim", "ITAV": "interim_available", "FWAV": "forward_available", "INFO": "information",
    "XPCD": "expected_credit", "PRCD": "opening",
}


def _oracle_pairs() -> list[tuple[Path, Path]]:
    return [(x, x.with_suffix(".json")) for x in sorted(CAMT.glob("*.xml")) if x.with_suffix(".json").exists()]


def test_camt_entries_and_balances_match_genkgo(tmp_path):
    pairs = _oracle_pairs()
    assert len(pairs) == 25
    checked_entries = checked_balances = checked_parties = 0
    versions = set()
    for xml, oracle in pairs:
        # one store per file: several fixtures reuse the same account and statement id
        run_ingest([xml], tmp_path / xml.stem)
        mine = _store_frame(tmp_path / xml.stem)
        doc = json.loads(oracle.read_text())
        records = [e["getRecord"] for e in doc["getEntries"]] + [r for r in doc["getRecords"] if isinstance(r, dict)]
        for e in doc["getEntries"]:
            rec = e["getRecord"]
            sid = rec["getId"]
            row = mine.filter(
                (pl.col("source_id") == f"{sid}#{e['getIndex']}") & pl.col("code").str.starts_with("TXN/")
                & (pl.col("source_subject_id") == f"camt:{rec['getAccount']['getIdentification']}")
            )
            assert row.height == 1, (xml.name, sid)
            r = row.row(0, named=True)
            versions.add(r["source_type"])
            amount, ccy = _money(e["getAmount"])
            assert Decimal(r["amount"]) == amount, xml.name
            assert r["unit"] == ccy
            credit = e["getCreditDebitIndicator"] == "CRDT"
            assert r["code"] == ("TXN/CREDIT" if credit else "TXN/DEBIT")
            assert (Decimal(r["amount"]) >= 0) == credit or amount == 0
            for key in ("getBookingDate", "getValueDate"):
                if e[key] is not None:
                    assert r["time"] == _utc(e[key]["0"]), (xml.name, key)
                    break
            party = _expected_counterparty(e, credit)
            if party is not False:
                assert r["counterparty"] == party, xml.name
                checked_parties += 1
            checked_entries += 1
        for rec in records:
            subject = f"camt:{rec['getAccount']['getIdentification']}"
            bals = [b for b in rec.get("getBalances") or [] if isinstance(b, dict)]
            got = mine.filter(
                pl.col("code").str.starts_with("BAL/") & (pl.col("encounter_id") == rec["getId"])
                & (pl.col("source_subject_id") == subject)
            ).sort("source_id")
            if len(bals) != len(rec.get("getBalances") or []):
                continue  # the serialised tree elided some: compare only complete lists
            assert got.height == len(bals), xml.name
            got = sorted(got.iter_rows(named=True), key=lambda r: int(r["source_id"].rsplit("#Bal", 1)[1]))
            for b, r in zip(bals, got):
                amount, ccy = _money(b["getAmount"])
                assert BALANCE_TYPES[r["code"].split("/", 1)[1]] == b["getType"], xml.name
                assert Decimal(r["amount"]) == amount and r["unit"] == ccy, xml.name
                assert r["time"] == _utc(b["getDate"]["0"]), xml.name
                checked_balances += 1
    assert checked_entries == 24 and checked_balances >= 40 and checked_parties >= 10
    # every message and version in the fixtures was read through the same mapping
    assert {v.rsplit(".", 2)[0] for v in versions} == {"camt.052", "camt.053", "camt.054"}
    assert len(versions) == 12


def test_camt_exact_decimals_and_bad_file(camt_store):
    ev = _store_frame(camt_store)
    five = ev.filter(pl.col("source_id").str.starts_with("253EURNL26VAYB8060476890#") & (pl.col("code") == "BAL/OPBD"))
    # camt053.v2.five.decimals.xml writes 18.150: the exact text survives, float32 would not keep every decimal
    assert "18.150" in five["amount"].to_list()
    zero = ev.filter(pl.col("source_type") == "camt.052.001.06")
    assert zero.filter(pl.col("code").str.starts_with("TXN/")).height == 2
    q = _quarantine(camt_store)
    assert q == [
        {"file": str(CAMT / "camt053.v2.wrong.xml"), "position": "file", "resource_type": "camt.053.001.02",
         "resource_id": None, "reason": "no Stmt in BkToCstmrStmt (nothing to ingest)"}
    ]
    report = json.loads((camt_store / "metadata" / "ingest_report.json").read_text())
    assert {s["file"].rsplit("/", 1)[1] for s in report["skipped_files"]} == {p.name for _, p in _oracle_pairs()}


def test_ofx_statements(ofx_store):
    ev = _store_frame(ofx_store)
    medium = ev.filter(pl.col("source_subject_id") == "ofx:160000100:12300 000012345678").sort("time")
    txn = medium.filter(pl.col("code").str.starts_with("TXN/"))
    # DTPOSTED 20090401122017.000[-5:EST] is 17:20:17 UTC
    assert txn["time"].to_list()[0] == dt.datetime(2009, 4, 1, 17, 20, 17)
    assert txn["code"].to_list() == ["TXN/POS", "TXN/CHECK", "TXN/POS"]
    assert txn["amount"].to_list() == ["-6.60", "-316.67", "-22.00"]
    assert set(txn["unit"]) == {"CAD"}
    bal = medium.filter(pl.col("code").str.starts_with("BAL/")).sort("code")
    assert bal.select("code", "amount").rows() == [("BAL/AVAILABLE", "682.34"), ("BAL/LEDGER", "382.34")]
    # chase_cc.qfx: declared USASCII/1252 but UTF-8 inside; ofxparse raises, we read the payee intact
    chase = ev.filter(pl.col("source_subject_id") == "ofx:0123012301230123")
    assert chase.filter(pl.col("code") == "TXN/DEBIT")["counterparty"].to_list() == ["SQ *ECCO UN POCO ¦ NATURA"]
    # ofx-v102-empty-tags.ofx: empty tags crash ofxparse; the transaction is kept under a synthetic id, in the
    # transaction's own currency (CURRENCY/CURSYM; CURDEF is empty)
    empty = ev.filter(pl.col("source_subject_id") == "ofx:NPBS:12345678")
    assert empty.select("code", "amount", "unit").rows() == [("TXN/CREDIT", "12.34", "AUD")]
    assert empty["source_id"].item().startswith("ofx:NPBS:12345678#nofitid-")
    # investment statements: INV/ codes with the trade total, security as counterparty
    fid = ev.filter(pl.col("source_subject_id") == "ofx:fidelity.com:01234567890")
    assert fid.filter(pl.col("code") == "INV/BUYSTOCK").height == 8
    assert "-2571.4500" in fid["amount"].to_list()
    assert ev.filter(pl.col("code") == "INV/BUYSTOCK")["counterparty"].null_count() == 0


def test_ofx_quarantine_reasons(ofx_store):
    q = _quarantine(ofx_store)
    by_file: dict[str, list[str]] = {}
    for r in q:
        if not r["reason"].startswith("duplicate of a record in "):
            by_file.setdefault(Path(r["file"]).name, []).append(r["reason"])
    # date_missing.ofx and decimal_error.ofx report the same ledger balance of the same account: kept once
    dups = [r for r in q if r["reason"].startswith("duplicate of a record in ")]
    assert [(Path(r["file"]).name, r["position"]) for r in dups] == [("date_missing.ofx", "statement 0 balance 0")]
    assert dups[0]["reason"].startswith(f"duplicate of a record in {OFX / 'fail_nice' / 'decimal_error.ofx'}")
    assert by_file["date_missing.ofx"] == [
        "missing DTPOSTED (transaction date)",
        "missing DTPOSTED (transaction date)",
        "invalid DTPOSTED (not an OFX date)",
    ]
    assert by_file["decimal_error.ofx"] == [
        "invalid DTPOSTED (not an OFX date); unparseable TRNAMT (not a decimal)"
    ]
    assert by_file["empty_balance.ofx"] == [
        "empty LEDGERBAL/BALAMT (balance amount)", "empty AVAILBAL/BALAMT (balance amount)"
    ]
    assert by_file["signon_fail.ofx"] == ["no statement in the OFX response (status code 15500)"]
    assert by_file["ofx-v102-empty-tags.ofx"] == ["empty LEDGERBAL/BALAMT (balance amount)"]
    # reasons name fields, never the values ($120 is not repeated)
    assert not any("$" in r["reason"] for r in q)
    ev = _store_frame(ofx_store)
    # the good transaction of empty_balance.ofx is still ingested
    assert ev.filter(pl.col("source_subject_id") == "ofx:123845030:192639749").filter(
        pl.col("code").str.starts_with("TXN/")).height == 1


def test_overlapping_downloads_are_kept_once(tmp_path):
    for name in ("2009-05.ofx", "2009-06.ofx"):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes((OFX / "bank_medium.ofx").read_bytes())
    s = run_ingest([tmp_path / "in"], tmp_path / "store")
    assert s.events == 5 and s.report["duplicate_transactions_dropped"] == 5
    q = _quarantine(tmp_path / "store")
    assert {Path(r["file"]).name for r in q} == {"2009-05.ofx"}
    assert {r["position"] for r in q} == {"statement 0 transaction 0", "statement 0 transaction 1",
                                          "statement 0 transaction 2", "statement 0 balance 0",
                                          "statement 0 balance 1"}


def test_on_error_fail_stops_and_writes_nothing(tmp_path):
    out = tmp_path / "store"
    expected = r"rejected record: .*date_missing\.ofx, statement 0 STMTTRN 0: missing DTPOSTED"
    with pytest.raises(KitError, match=expected):
        run_ingest([OFX / "fail_nice"], out, fail_fast=True)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_same_input_gives_byte_identical_store(camt_store, tmp_path):
    run_ingest([CAMT], tmp_path / "again")
    for f in ("data/shard-00000.parquet", "metadata/subjects.parquet", "metadata/codes.parquet", "quarantine.ndjson",
              "metadata/ingest_report.json"):
        assert (camt_store / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
