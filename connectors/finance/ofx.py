"""OFX/QFX statements (1.x SGML and 2.x XML) through ofxparse (MIT), with our own handling of what it gets wrong.

ofxparse reads the structure (accounts, statements, transactions, balances, investment transactions). What it gets
wrong on real exports, and what this module does about it (each case is a shared fixture; see
docs/finance-event-store.md):

* **Charset headers that lie.** ofxparse decodes the body with the header's charset (or ASCII when an OFX 2 file has
  no SGML header); `chase_cc.qfx` declares `ENCODING:USASCII`/`CHARSET:1252` but holds UTF-8 (`¦`), and ofxparse
  raises UnicodeDecodeError. We decode the bytes ourselves (valid UTF-8 wins, else the declared charset, else
  cp1252) and hand ofxparse pure ASCII with XML character references, which its HTML parser turns back into text.
* **Empty elements** (`<CURDEF></CURDEF>`, `<LANGUAGE></LANGUAGE>`, `<FITID></FITID>`, as in
  `ofx-v102-empty-tags.ofx`): ofxparse indexes their missing content and raises IndexError for the whole file.
  We remove empty elements first; an empty balance amount is reported as such.
* **One bad record fails the file.** By default ofxparse raises on the first bad transaction (`fail_nice/*.ofx`:
  missing or impossible DTPOSTED, `$120` as TRNAMT, a blank ledger balance). We run it with `fail_fast=False` and
  quarantine exactly the transactions and balances it discarded, with our own reason naming the field (its own
  messages quote values).
* **Missing FITID.** OFX requires one; some exporters leave it empty and ofxparse discards the transaction. We keep
  it, with `source_id` `<account>#nofitid-<hash of the transaction's content>`.
* **Per-transaction currency** (`<CURRENCY><CURSYM>` / `<ORIGCURRENCY>`) is not read by ofxparse; we read it from
  the same document and use it as the unit, else the statement's CURDEF.
"""

from __future__ import annotations

import copy
import hashlib
import io
import re
import warnings
from decimal import Decimal

from connectors.finance.records import Events, Rejected, Sink, decimal_text, micros

SOURCE_TYPE = "ofx"
_EMPTY = re.compile(r"<([A-Za-z0-9_.]+)>\s*</\1>")
_EMPTY_BALAMT = re.compile(r"<BALAMT>\s*</BALAMT>", re.IGNORECASE)
_SGML_CHARSET = re.compile(rb"^\s*CHARSET:\s*(\S+)", re.MULTILINE)
_XML_ENCODING = re.compile(rb"<\?xml[^>]*encoding=[\"']([A-Za-z0-9_.-]+)[\"']")


def looks_like_ofx(head: bytes) -> bool:
    """OFX 1.x starts with its SGML header (`OFXHEADER:100`); OFX 2.x has `<?OFX ...?>`; both have `<OFX>`."""
    h = head.lstrip(b"\xef\xbb\xbf \t\r\n")[:4096].upper()
    return h.startswith(b"OFXHEADER") or b"<?OFX" in h or b"<OFX>" in h


def decode(data: bytes) -> str:
    """The file as text: valid UTF-8 wins over a declared charset (exporters mislabel UTF-8 as USASCII/1252)."""
    try:
        return data.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError:
        pass
    declared = None
    m = _SGML_CHARSET.search(data[:2048]) or _XML_ENCODING.search(data[:2048])
    if m:
        cs = m.group(1).decode("ascii", "replace").upper()
        declared = {"1252": "cp1252", "8859-1": "latin-1", "ISO-8859-1": "latin-1", "NONE": None}.get(cs, cs.lower())
    for enc in (declared, "cp1252"):
        if enc is None:
            continue
        try:
            return data.decode(enc, errors="replace")
        except LookupError:
            continue
    return data.decode("cp1252", errors="replace")  # pragma: no cover - cp1252 always exists


def repair(text: str) -> bytes:
    """ASCII bytes for ofxparse: empty elements removed, except a balance's empty amount, which is kept as a
    marker ofxparse cannot read, so the balance is reported empty instead of vanishing."""
    text = _EMPTY_BALAMT.sub("<BALAMT>(empty)</BALAMT>", text)
    prev = None
    while prev != text:  # nested empties (<LEDGERBAL><BALAMT></BALAMT></LEDGERBAL>) go in a second pass
        prev, text = text, _EMPTY.sub("", text)
    return text.encode("ascii", "xmlcharrefreplace")


def _tag_text(tag, name: str) -> str | None:
    found = tag.find(name)
    if found is None:
        return None
    for s in found.strings:  # SGML: the value runs up to the next tag
        s = s.strip()
        if s:
            return s
    return None


def _why_discarded(block, ofxparse_error: str) -> str:
    """Our quarantine reason for a STMTTRN ofxparse discarded: the field, never its value."""
    from ofxparse import OfxParser

    problems = []
    date = _tag_text(block, "dtposted")
    if date is None:
        problems.append("missing DTPOSTED (transaction date)")
    else:
        try:
            if OfxParser.parseOfxDateTime(date) is None:
                problems.append("invalid DTPOSTED (all zeros)")
        except ValueError:
            problems.append("invalid DTPOSTED (not an OFX date)")
    if _tag_text(block, "trnamt") is None:
        problems.append("missing TRNAMT (transaction amount)")
    else:
        try:
            OfxParser.toDecimal(block.find("trnamt"))
        except Exception:  # noqa: BLE001 - any failure is a bad amount
            problems.append("unparseable TRNAMT (not a decimal)")
    if _tag_text(block, "trntype") is None:
        problems.append("missing TRNTYPE")
    if problems:
        return "; ".join(problems)
    return f"rejected by ofxparse ({ofxparse_error.split(':', 1)[0].strip()})"


def _currency(block, default: str | None) -> str | None:
    for agg in ("currency", "origcurrency"):
        tag = block.find(agg)
        if tag is not None:
            sym = _tag_text(tag, "cursym")
            if sym:
                return sym.upper()
    return default


def _time(t, what: str) -> int:
    if t is None:
        raise Rejected(f"missing {what}")
    return micros(t)


def _subject(account, kind: str) -> str | None:
    acct = (account.account_id or "").strip()
    if not acct:
        return None
    if kind == "bank":
        bank = (getattr(account, "routing_number", "") or "").strip()
        return f"ofx:{bank}:{acct}" if bank else f"ofx:{acct}"
    if kind == "investment":
        broker = (getattr(account, "brokerid", "") or "").strip()
        return f"ofx:{broker}:{acct}" if broker else f"ofx:{acct}"
    return f"ofx:{acct}"


def _status_note(ofx) -> str:
    signon = getattr(ofx, "signon", None)
    code = getattr(signon, "code", None) if signon is not None else None
    status = getattr(ofx, "status", None) or {}
    code = status.get("code", code)
    return f" (status code {code})" if code not in (None, 0, "0") else ""


def read(path, data: bytes, name: str, file_index: int, sink: Sink) -> tuple[Events, dict]:
    """Events of one OFX/QFX file; rejected transactions and balances go to `sink`. Returns (events, counts)."""
    from bs4 import BeautifulSoup
    from ofxparse import OfxParser
    from ofxparse.ofxparse import OfxPreprocessedFile

    events = Events(file_index)
    counts = {"statements": 0, "transactions": 0, "balances": 0, "rejected": 0}
    body = repair(decode(data))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bs4 warns about markup that looks like XML
            ofx = OfxParser.parse(io.BytesIO(body), fail_fast=False)
            doc = BeautifulSoup(OfxPreprocessedFile(io.BytesIO(body)).fh.read(), "html.parser")
    except Exception as exc:  # noqa: BLE001 - any parser failure is one unreadable file
        if "empty" in str(exc):
            reason = "no statement in the OFX response (empty OFX element)"
        else:
            reason = f"unreadable OFX ({type(exc).__name__})"
        sink.reject(name, "file", SOURCE_TYPE, None, reason)
        counts["rejected"] += 1
        return events, counts

    tags = {"bank": doc.find_all("stmtrs"), "cc": doc.find_all("ccstmtrs"), "investment": doc.find_all("invstmtrs")}
    kinds = ["bank"] * len(tags["bank"]) + ["cc"] * len(tags["cc"]) + ["investment"] * len(tags["investment"])
    elements = tags["bank"] + tags["cc"] + tags["investment"]
    # ofxparse lists statement accounts in the same order (bank, credit card, investment), then account listings.
    statements = list(zip(ofx.accounts, kinds, elements))
    if not statements:
        sink.reject(name, "file", SOURCE_TYPE, None, f"no statement in the OFX response{_status_note(ofx)}")
        counts["rejected"] += 1
        return events, counts
    for si, (account, kind, element) in enumerate(statements):
        subject = _subject(account, kind)
        where = f"statement {si}"
        if subject is None:
            sink.reject(name, where, SOURCE_TYPE, None, "statement has no ACCTID")
            counts["rejected"] += 1
            continue
        counts["statements"] += 1
        stmt = account.statement
        curdef = (getattr(account, "curdef", None) or getattr(stmt, "currency", None) or "").upper() or None
        base = si << 24
        if kind == "investment":
            _investment(events, sink, name, subject, stmt, element, curdef, base, counts)
        else:
            _bank(events, sink, name, subject, stmt, element, curdef, base, counts)
        for label, amount, when, tag in (
            ("LEDGER", getattr(stmt, "balance", None), getattr(stmt, "balance_date", None), "ledgerbal"),
            ("AVAILABLE", getattr(stmt, "available_balance", None), getattr(stmt, "available_balance_date", None),
             "availbal"),
        ):
            if element.find(tag) is None and amount is None:
                continue
            pos = base | (1 << 23) | (0 if label == "LEDGER" else 1)
            if amount is None:
                reason = f"empty {tag.upper()}/BALAMT (balance amount)"
                sink.reject(name, f"{where} {tag.upper()}", SOURCE_TYPE, subject, reason)
                counts["rejected"] += 1
                continue
            if when is None:
                sink.reject(name, f"{where} {tag.upper()}", SOURCE_TYPE, subject, f"missing {tag.upper()}/DTASOF")
                counts["rejected"] += 1
                continue
            events.add(subject, micros(when), f"BAL/{label}", unit=curdef, source_type=SOURCE_TYPE,
                       source_id=f"{subject}#{tag.upper()}@{when:%Y%m%d%H%M%S}", amount=decimal_text(Decimal(amount)),
                       position=pos)
            counts["balances"] += 1
    return events, counts


def _position_key(tag) -> tuple:
    return (tag.sourceline, tag.sourcepos)


def _bank(events, sink, name, subject, stmt, element, curdef, base, counts) -> None:
    from ofxparse import OfxParser

    discarded = {_position_key(d["content"]): d["error"] for d in getattr(stmt, "discarded_entries", [])}
    parsed = iter(stmt.transactions)
    for ti, block in enumerate(element.find_all("stmttrn")):
        where = f"statement {base >> 24} STMTTRN {ti}"
        key = _position_key(block)
        source_id = None
        if key in discarded:
            if _tag_text(block, "fitid") is None and "FIT id" in discarded[key]:
                # ofxparse drops a transaction without FITID; keep it under a synthetic id.
                patched = copy.copy(block)
                fitid = copy.copy(block)  # any Tag to clone the factory from
                fitid.name, fitid.attrs = "fitid", {}
                fitid.clear()
                fitid.append("-")
                patched.append(fitid)
                try:
                    t = OfxParser.parseTransaction(patched)
                except Exception:  # noqa: BLE001
                    sink.reject(name, where, SOURCE_TYPE, None, _why_discarded(block, discarded[key]))
                    counts["rejected"] += 1
                    continue
                # content-derived, so the same transaction in an overlapping download still matches
                digest = hashlib.sha256(block.get_text("|", strip=True).encode()).hexdigest()[:16]
                source_id = f"{subject}#nofitid-{digest}"
            else:
                sink.reject(name, where, SOURCE_TYPE, _tag_text(block, "fitid"),
                            _why_discarded(block, discarded[key]))
                counts["rejected"] += 1
                continue
        else:
            t = next(parsed, None)
            if t is None:  # pragma: no cover - ofxparse returned fewer transactions than blocks
                sink.reject(name, where, SOURCE_TYPE, None, "transaction not read by ofxparse")
                counts["rejected"] += 1
                continue
        _transaction(events, sink, name, where, subject, t, _currency(block, curdef), source_id, base | ti, counts)


def _transaction(events, sink, name, where, subject, t, unit, source_id, pos, counts) -> None:
    if t.date is None:
        sink.reject(name, where, SOURCE_TYPE, t.id, "invalid DTPOSTED (all zeros)")
        counts["rejected"] += 1
        return
    time = micros(t.date)
    sid = source_id or t.id
    ttype = (t.type or "other").upper()
    events.add(subject, time, f"TXN/{ttype}", text=t.memo or None, unit=unit, source_type=SOURCE_TYPE,
               source_id=sid, amount=decimal_text(Decimal(t.amount)), counterparty=t.payee or None, position=pos)
    if getattr(t, "sic", None):
        events.add(subject, time, f"MCC/{t.sic}", source_type=SOURCE_TYPE, source_id=sid, position=pos)
    counts["transactions"] += 1


def _investment(events, sink, name, subject, stmt, element, curdef, base, counts) -> None:
    from ofxparse.ofxparse import InvestmentTransaction

    for error in getattr(stmt, "discarded_entries", []):
        content = error["content"]
        sink.reject(name, f"statement {base >> 24} {content.name.upper()}", SOURCE_TYPE, _tag_text(content, "fitid"),
                    f"unreadable {content.name.upper()} (investment record)")
        counts["rejected"] += 1
    for ti, t in enumerate(stmt.transactions):
        where = f"statement {base >> 24} transaction {ti}"
        if isinstance(t, InvestmentTransaction):
            if t.tradeDate is None:
                sink.reject(name, where, SOURCE_TYPE, t.id, "missing DTTRADE (trade date)")
                counts["rejected"] += 1
                continue
            events.add(subject, micros(t.tradeDate), f"INV/{t.type.upper()}", text=t.memo or None, unit=curdef,
                       source_type=SOURCE_TYPE, source_id=t.id, amount=decimal_text(Decimal(t.total)),
                       counterparty=t.security or None, position=base | ti)
            counts["transactions"] += 1
        else:
            _transaction(events, sink, name, where, subject, t, curdef, None, base | ti, counts)
    cash = getattr(stmt, "available_cash", None)
    when = getattr(stmt, "end_date", None)
    if cash is not None and when is not None:
        events.add(subject, micros(when), "BAL/CASH", unit=curdef, source_type=SOURCE_TYPE,
                   source_id=f"{subject}#AVAILCASH@{when:%Y%m%d%H%M%S}", amount=decimal_text(Decimal(cash)),
                   position=base | (1 << 23))
        counts["balances"] += 1
