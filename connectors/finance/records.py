"""What every finance reader produces: event rows with exact amounts, and quarantine records.

Statement readers (OFX, camt) add events row by row through `Events`; table readers build the same columns as
polars expressions. Both carry `position` and `seq`, so the writer can sort into input order within a time.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

import polars as pl

from kit.errors import KitError
from kit.events import EVENT_SCHEMA

# The finance store's columns: the core event columns, then the exact amount and the counterparty.
FINANCE_SCHEMA: dict[str, pl.DataType] = {**EVENT_SCHEMA, "amount": pl.String(), "counterparty": pl.String()}
# Internal: which subject key an event belongs to (hashed to subject_id by the writer) and its input order.
INTERNAL_SCHEMA: dict[str, pl.DataType] = {
    **{k: v for k, v in FINANCE_SCHEMA.items() if k != "subject_id"},
    "subject_key": pl.String(),
    "file_index": pl.Int32(),
    "position": pl.Int64(),
    "seq": pl.Int32(),
}

_EPOCH = dt.datetime(1970, 1, 1)
_DECIMAL = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")


class Rejected(Exception):
    """One record cannot be ingested; the message is the quarantine reason (never a value of the record)."""


def exact_decimal(text: object, what: str) -> str:
    """The decimal as plain text (no exponent, no '+'), exactly as many digits as written; Rejected if not one."""
    if text is None:
        raise Rejected(f"missing {what}")
    s = str(text).strip()
    if not s:
        raise Rejected(f"empty {what}")
    if not _DECIMAL.match(s):
        raise Rejected(f"unparseable amount in {what} (not a plain decimal)")
    s = s.lstrip("+")
    if s.startswith("."):
        s = "0" + s
    elif s.startswith("-."):
        s = "-0" + s[1:]
    return s


def decimal_text(d: Decimal) -> str:
    """A Decimal as plain text with its own exponent kept (Decimal('0E-7') -> '0.0000000')."""
    return format(d, "f")


def negate(s: str) -> str:
    if s.startswith("-"):
        return s[1:]
    try:
        if Decimal(s) == 0:
            return s
    except InvalidOperation:  # pragma: no cover - callers pass exact_decimal output
        pass
    return "-" + s


def micros(t: dt.datetime) -> int:
    """Naive UTC datetime (or aware, converted to UTC) -> microseconds since the epoch."""
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


@dataclass
class Quarantined:
    file: str
    position: str
    resource_type: str | None
    resource_id: str | None
    reason: str

    def as_dict(self) -> dict:
        return {
            "file": self.file,
            "position": self.position,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "reason": self.reason,
        }


class RecordRejected(KitError):
    """`--on-error fail`: the first rejected record stops the ingest."""


@dataclass
class Sink:
    """Where a reader puts rejected records; in fail mode the first one raises."""

    fail_fast: bool = False
    records: list[Quarantined] = field(default_factory=list)

    def reject(self, file: str, position: str, rtype: str | None, rid: str | None, reason: str) -> None:
        if self.fail_fast:
            raise RecordRejected(
                f"rejected record: {file}, {position}: {reason}",
                hint="drop --on-error fail to quarantine such records and go on",
            )
        self.records.append(Quarantined(file, position, rtype, rid, reason))


class Events:
    """Row-wise event accumulator for statement files (small: one file at a time)."""

    def __init__(self, file_index: int) -> None:
        self.file_index = file_index
        self.rows: list[tuple] = []

    def add(
        self,
        subject_key: str,
        time: int | None,
        code: str,
        *,
        value: float | None = None,
        text: str | None = None,
        unit: str | None = None,
        encounter: str | None = None,
        source_type: str,
        source_id: str | None,
        amount: str | None = None,
        counterparty: str | None = None,
        position: int = 0,
    ) -> None:
        if amount is not None and value is None:
            value = float(amount)
        self.rows.append(
            (time, code, value, text, unit, encounter, source_type, source_id, amount, counterparty, subject_key,
             self.file_index, position, len(self.rows))
        )

    def frame(self) -> pl.DataFrame:
        cols = list(INTERNAL_SCHEMA)
        schema = {**INTERNAL_SCHEMA, "time": pl.Int64()}
        df = pl.DataFrame(self.rows, schema=schema, orient="row")
        return df.with_columns(pl.col("time").cast(pl.Datetime("us"))).select(cols)
