"""ISO 20022 bank-to-customer cash management messages (camt.052 report, camt.053 statement, camt.054 notification).

Every version maps the same way: the elements used here (Acct, Bal, Ntry, BkTxCd, RltdPties, RmtInf) keep their names
across versions; v6+ wraps parties in `Pty` and the entry status in `Sts/Cd`, which both readers below accept.
Namespaces are stripped after parsing, so one set of paths reads every version.
"""

from __future__ import annotations

import datetime as dt
import re

from lxml import etree

from connectors.finance.records import Events, Rejected, Sink, exact_decimal, micros, negate

NS_PATTERN = re.compile(r"^urn:iso:std:iso:20022:tech:xsd:(camt\.05[234])\.(\d{3})\.(\d{2})$")
CONTAINERS = {"camt.052": ("BkToCstmrAcctRpt", "Rpt"), "camt.053": ("BkToCstmrStmt", "Stmt"),
              "camt.054": ("BkToCstmrDbtCdtNtfctn", "Ntfctn")}
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_comments=True)


def message_type(head: bytes) -> str | None:
    """`camt.053.001.02` from the first bytes of a file, or None when it is not a camt message."""
    m = re.search(rb"urn:iso:std:iso:20022:tech:xsd:(camt\.05[234]\.\d{3}\.\d{2})", head)
    return m.group(1).decode() if m else None


def _strip_namespaces(root) -> None:
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag = el.tag.split("}", 1)[1]


def _text(el, path: str) -> str | None:
    found = el.find(path) if el is not None else None
    if found is None or found.text is None:
        return None
    t = found.text.strip()
    return t or None


def parse_time(el, what: str) -> int:
    """A `Dt` or `DtTm` choice (BookgDt, ValDt, Bal/Dt) -> UTC microseconds. A date is its midnight UTC; a date-time
    without an offset is taken as UTC."""
    if el is None:
        raise Rejected(f"missing {what}")
    d = _text(el, "Dt")
    if d is not None:
        try:
            return micros(dt.datetime.strptime(d, "%Y-%m-%d"))
        except ValueError:
            raise Rejected(f"unparseable date in {what}/Dt") from None
    t = _text(el, "DtTm")
    if t is not None:
        try:
            return micros(dt.datetime.fromisoformat(t.replace("Z", "+00:00")))
        except ValueError:
            raise Rejected(f"unparseable date-time in {what}/DtTm") from None
    raise Rejected(f"{what} has neither Dt nor DtTm")


def _entry_time(entry, stmt, created: str | None) -> int:
    """Booking date, else value date, else (an unbooked notification or report entry) the creation time of its
    statement, else of the message."""
    for tag in ("BookgDt", "ValDt"):
        el = entry.find(tag)
        if el is not None:
            return parse_time(el, f"Ntry/{tag}")
    for stamp, what in ((_text(stmt, "CreDtTm"), "CreDtTm"), (created, "GrpHdr/CreDtTm")):
        if stamp is not None:
            try:
                return micros(dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")))
            except ValueError:
                raise Rejected(f"unparseable date-time in {what}") from None
    raise Rejected("entry has no BookgDt or ValDt, and no CreDtTm to date it by")


def _signed_amount(el, what: str) -> tuple[str, str]:
    """(exact signed amount, currency) of an element holding Amt@Ccy and CdtDbtInd."""
    amt = el.find("Amt")
    if amt is None:
        raise Rejected(f"missing {what}/Amt")
    value = exact_decimal(amt.text, f"{what}/Amt")
    ccy = (amt.get("Ccy") or "").strip()
    if not re.fullmatch(r"[A-Z]{3}", ccy):
        raise Rejected(f"missing or invalid currency ({what}/Amt@Ccy)")
    ind = _text(el, "CdtDbtInd")
    if ind == "DBIT":
        value = negate(value)
    elif ind != "CRDT" and not (ind is None and value.lstrip("-").strip("0.") == ""):
        raise Rejected(f"missing or invalid {what}/CdtDbtInd")
    return value, ccy


def account_id(acct) -> str | None:
    """IBAN, else the other identification of an `Acct`/`DbtrAcct`/`CdtrAcct` element (`Othr/Id`; v1's
    `PrtryAcct/Id` and `BBAN`)."""
    if acct is None:
        return None
    for path in ("Id/IBAN", "Id/Othr/Id", "Id/PrtryAcct/Id", "Id/BBAN"):
        found = _text(acct, path)
        if found is not None:
            return found
    return None


def _party_name(party) -> str | None:
    if party is None:
        return None
    # v2-v4: Nm; v6+: Pty/Nm, or Agt/FinInstnId/Nm when the party is a financial institution
    return _text(party, "Pty/Nm") or _text(party, "Nm") or _text(party, "Agt/FinInstnId/Nm")


def _counterparty(entry, credit: bool) -> str | None:
    """The other side of an entry: the debtor of a credit, the creditor of a debit (account id, else name).
    A batch entry whose transactions name different counterparties has none."""
    side = "Dbtr" if credit else "Cdtr"
    found = set()
    for tx in entry.iterfind("NtryDtls/TxDtls"):
        parties = tx.find("RltdPties")
        if parties is None:
            continue
        acct = account_id(parties.find(f"{side}Acct"))
        if acct is not None:
            found.add(f"camt:{acct}")
            continue
        name = _party_name(parties.find(side))
        if name is not None:
            found.add(name)
    return found.pop() if len(found) == 1 else None


def _remittance(entry) -> str | None:
    texts = [u.text.strip() for u in entry.iterfind("NtryDtls/TxDtls/RmtInf/Ustrd") if u.text and u.text.strip()]
    if not texts:
        info = _text(entry, "AddtlNtryInf")
        return info
    return " ".join(texts)


def _bank_transaction_code(entry) -> str | None:
    btc = entry.find("BkTxCd")
    if btc is None:
        return None
    domain = _text(btc, "Domn/Cd")
    if domain is not None:
        family = _text(btc, "Domn/Fmly/Cd")
        sub = _text(btc, "Domn/Fmly/SubFmlyCd")
        return "/".join(["BTC", domain] + [p for p in (family, sub) if p])
    prop = _text(btc, "Prtry/Cd")
    return f"BTC/PRTRY/{prop}" if prop else None


def _balance_type(bal) -> str | None:
    return _text(bal, "Tp/CdOrPrtry/Cd") or _text(bal, "Tp/CdOrPrtry/Prtry")


def read(path, data: bytes, name: str, file_index: int, sink: Sink) -> tuple[Events, dict]:
    """Events of one camt file; rejected entries and balances go to `sink`. Returns (events, counts)."""
    events = Events(file_index)
    counts = {"statements": 0, "entries": 0, "balances": 0, "rejected": 0}
    try:
        root = etree.fromstring(data, _PARSER)
    except etree.XMLSyntaxError as exc:
        sink.reject(name, "file", "camt", None, f"malformed XML (line {exc.lineno}: {exc.msg})")
        counts["rejected"] += 1
        return events, counts
    m = NS_PATTERN.match(etree.QName(root).namespace or "")
    if m is None:
        sink.reject(name, "file", "camt", None, "not an ISO 20022 camt.052/053/054 document (namespace)")
        counts["rejected"] += 1
        return events, counts
    msg = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
    _strip_namespaces(root)
    group, record = CONTAINERS[m.group(1)]
    # Version 1 of camt.052 suffixes the message element with its version (BkToCstmrAcctRptV01).
    records = root.findall(f"{group}/{record}") or root.findall(f"{group}V{m.group(3)}/{record}")
    created = _text(root, f"{group}/GrpHdr/CreDtTm") or _text(root, f"{group}V{m.group(3)}/GrpHdr/CreDtTm")
    if not records:
        sink.reject(name, "file", msg, None, f"no {record} in {group} (nothing to ingest)")
        counts["rejected"] += 1
        return events, counts
    for si, stmt in enumerate(records):
        sid = _text(stmt, "Id") or f"{record}[{si}]"
        acct = account_id(stmt.find("Acct"))
        if acct is None:
            why = f"{record} has no account id (Acct/Id: IBAN, Othr/Id, PrtryAcct/Id or BBAN)"
            sink.reject(name, f"{record} {si}", msg, sid, why)
            counts["rejected"] += 1
            continue
        counts["statements"] += 1
        subject = f"camt:{acct}"
        for bi, bal in enumerate(stmt.iterfind("Bal")):
            where = f"{record} {si} Bal {bi}"
            try:
                btype = _balance_type(bal)
                if btype is None:
                    raise Rejected("balance has no type (Tp/CdOrPrtry)")
                amount, ccy = _signed_amount(bal, "Bal")
                time = parse_time(bal.find("Dt"), "Bal/Dt")
            except Rejected as exc:
                sink.reject(name, where, msg, sid, str(exc))
                counts["rejected"] += 1
                continue
            events.add(subject, time, f"BAL/{btype}", unit=ccy, encounter=sid, source_type=msg,
                       source_id=f"{sid}#Bal{bi}", amount=amount, position=si << 20 | bi)
            counts["balances"] += 1
        for ei, entry in enumerate(stmt.iterfind("Ntry")):
            where = f"{record} {si} Ntry {ei}"
            try:
                amount, ccy = _signed_amount(entry, "Ntry")
                time = _entry_time(entry, stmt, created)
            except Rejected as exc:
                sink.reject(name, where, msg, f"{sid}#{ei}", str(exc))
                counts["rejected"] += 1
                continue
            credit = not amount.startswith("-") and _text(entry, "CdtDbtInd") != "DBIT"
            pos = si << 20 | (1 << 19) | ei
            src = f"{sid}#{ei}"
            events.add(subject, time, "TXN/CREDIT" if credit else "TXN/DEBIT", text=_remittance(entry), unit=ccy,
                       encounter=sid, source_type=msg, source_id=src, amount=amount,
                       counterparty=_counterparty(entry, credit), position=pos)
            btc = _bank_transaction_code(entry)
            if btc is not None:
                events.add(subject, time, btc, encounter=sid, source_type=msg, source_id=src, position=pos)
            counts["entries"] += 1
    return events, counts
