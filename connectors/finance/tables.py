"""Transaction and attribute tables (CSV, CSV.gz, Parquet) through a declarative YAML column mapping.

A mapping names the columns a layout must have (detection by header), the subject column, the default time, and
the events, static attributes and labels each row gives. Rows are mapped as whole columns with polars (no Python
per row), so the 120k-row AMLSim transfer table maps in well under a second. Every cell is read as text, so amounts
stay the exact decimals written in the file (`amount` column); a row with any unreadable cell is quarantined whole.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import re
from functools import cache
from pathlib import Path
from typing import Literal

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

from connectors.finance.records import INTERNAL_SCHEMA, Sink
from kit.errors import KitError

LAYOUT_DIR = Path(__file__).parent / "layouts"
TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")
_DECIMAL_RE = r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$"
_TEMPLATE = re.compile(r"\{([^{}]+)\}")
# A virtual column: the 1-based data row number, for tables without an id column (German credit).
ROW_COLUMN = "_row"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubjectSpec(_Strict):
    column: str
    prefix: str = Field(description="source_subject_id = <prefix>:<cell>")


class TimeSpec(_Strict):
    """One of: a date/time column (`format`, ISO when omitted), a step-count column (`origin` + `step`), a fixed
    time, or `at_end` (midnight after the latest dated event of the same subject namespace in the ingest: for labels
    after an observation window)."""

    column: str | None = None
    format: str | None = None
    origin: dt.date | None = None
    step: Literal["days", "hours", "weeks"] = "days"
    fixed: dt.datetime | None = None
    at_end: bool = False

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = sum([self.column is not None, self.fixed is not None, self.at_end])
        if kinds != 1:
            raise ValueError("a time needs exactly one of `column`, `fixed`, `at_end`")
        if self.origin is not None and self.format is not None:
            raise ValueError("a time column is either a date (`format`) or a step count (`origin`), not both")
        return self


class CurrencySpec(_Strict):
    column: str | None = None
    value: str | None = Field(None, pattern=r"^[A-Z]{3}$")

    @model_validator(mode="after")
    def _one(self):
        if (self.column is None) == (self.value is None):
            raise ValueError("a currency is either `column` or `value`")
        return self


class EventSpec(_Strict):
    code: str = Field(description="code, with {column} placeholders for cell values (upper-cased)")
    subject: SubjectSpec | None = None
    time: TimeSpec | None = None
    amount: str | None = None
    negate: bool = False
    value: str | None = None
    unit: str | None = None
    currency: CurrencySpec | None = None
    counterparty: str | None = None
    counterparty_prefix: str | None = None
    text: str | None = None
    when: str | None = None


class StaticSpec(_Strict):
    column: str
    kind: Literal["categorical", "numeric"]
    name: str | None = None
    unit: str | None = None
    money: bool = False


class LabelSpec(_Strict):
    column: str
    code: str = Field(pattern=r"^LABEL/")
    positive: list[str]
    negative: list[str] | None = None
    time: TimeSpec | None = None  # None: static label (null time)


class Mapping(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = ""
    header: list[str] = Field(min_length=1)
    separator: str = ","
    subject: SubjectSpec
    time: TimeSpec | None = None
    currency: CurrencySpec | None = None
    events: list[EventSpec] = []
    static: list[StaticSpec] = []
    labels: list[LabelSpec] = []

    @model_validator(mode="after")
    def _columns_declared(self):
        used = set(self.referenced_columns()) - {ROW_COLUMN}
        missing = sorted(used - set(self.header))
        if missing:
            raise ValueError(f"columns used but not listed in `header`: {', '.join(missing)}")
        if not (self.events or self.static or self.labels):
            raise ValueError("a mapping needs at least one of `events`, `static`, `labels`")
        return self

    def referenced_columns(self) -> list[str]:
        cols = [self.subject.column]
        times = [self.time] + [e.time for e in self.events] + [lab.time for lab in self.labels]
        cols += [t.column for t in times if t is not None and t.column]
        currencies = [self.currency] + [e.currency for e in self.events]
        cols += [c.column for c in currencies if c is not None and c.column]
        for e in self.events:
            cols += _TEMPLATE.findall(e.code)
            cols += [c for c in (e.amount, e.value, e.counterparty, e.text, e.when) if c]
            if e.subject:
                cols.append(e.subject.column)
        cols += [s.column for s in self.static] + [lab.column for lab in self.labels]
        return cols


def load_mapping(path: Path | str) -> Mapping:
    from kit.configfile import load_model_config

    return load_model_config(Mapping, path, example="name=my-layout")


@cache
def shipped_layouts() -> dict[str, Mapping]:
    return {m.name: m for m in (load_mapping(p) for p in sorted(LAYOUT_DIR.glob("*.yaml")))}


def is_table(path: Path) -> bool:
    return path.name.lower().endswith(TABLE_SUFFIXES)


def read_header(path: Path, separator: str = ",") -> list[str]:
    """The column names of a table file (first CSV line, or the Parquet schema)."""
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            return list(pq.read_schema(path).names)
        except Exception as exc:  # noqa: BLE001
            raise KitError(f"{path}: not a readable Parquet file ({type(exc).__name__})") from None
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as fh:
            line = fh.readline()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise KitError(f"{path}: cannot read the header line ({type(exc).__name__})") from None
    sep = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else separator
    return [c.strip() for c in next(csv.reader(io.StringIO(line), delimiter=sep), [])]


def match_layout(header: list[str], layouts: dict[str, Mapping]) -> Mapping | None:
    """The layout whose declared columns are all in `header` (the most specific one if several)."""
    have = set(header)
    fits = [m for m in layouts.values() if set(m.header) <= have]
    if not fits:
        return None
    return max(fits, key=lambda m: (len(m.header), m.name))


def read_table(path: Path, mapping: Mapping) -> pl.DataFrame:
    """Every cell as text (exact decimals), stripped; empty cells are null."""
    try:
        if path.name.lower().endswith(".parquet"):
            df = pl.read_parquet(path)
            df = df.with_columns(pl.all().cast(pl.String))
        else:
            sep = "\t" if path.name.lower().endswith((".tsv", ".tsv.gz")) else mapping.separator
            df = pl.read_csv(path, infer_schema=False, separator=sep, encoding="utf8-lossy",
                             truncate_ragged_lines=False)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds for malformed CSV
        raise KitError(f"{path}: not a readable table ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})")
    df = df.rename({c: c.strip().lstrip("\ufeff") for c in df.columns})
    return df.select(pl.col(c).str.strip_chars().replace("", None) for c in mapping.header)


# --- column expressions ---------------------------------------------------------------------------------------


def _is_decimal(col: str) -> pl.Expr:
    return pl.col(col).str.contains(_DECIMAL_RE).fill_null(False)


def _exact(col: str, negate: bool) -> pl.Expr:
    s = pl.col(col).str.strip_prefix("+")
    s = pl.when(s.str.starts_with(".")).then(pl.concat_str(pl.lit("0"), s)).otherwise(s)
    s = pl.when(s.str.starts_with("-.")).then(pl.concat_str(pl.lit("-0"), s.str.slice(1))).otherwise(s)
    if not negate:
        return s
    zero = s.str.replace_all(r"[-0.]", "") == ""
    return pl.when(zero).then(s).when(s.str.starts_with("-")).then(s.str.slice(1)).otherwise(
        pl.concat_str(pl.lit("-"), s)
    )


_ISO_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d")


def _time_expr(spec: TimeSpec) -> pl.Expr:
    """Datetime[us] expression; null where the cell is empty or unreadable. `at_end` gives null (set later)."""
    if spec.fixed is not None:
        return pl.lit(spec.fixed.replace(tzinfo=None), dtype=pl.Datetime("us"))
    if spec.at_end:
        return pl.lit(None, dtype=pl.Datetime("us"))
    col = pl.col(spec.column)
    if spec.origin is not None:
        steps = col.cast(pl.Int64, strict=False)
        origin = pl.lit(dt.datetime.combine(spec.origin, dt.time()), dtype=pl.Datetime("us"))
        return origin + pl.duration(**{spec.step: steps}, time_unit="us")
    if spec.format is not None:
        return col.str.to_datetime(spec.format, strict=False, time_unit="us")
    return pl.coalesce([col.str.to_datetime(f, strict=False, time_unit="us") for f in _ISO_FORMATS])


def _template(code: str) -> tuple[pl.Expr, list[str]]:
    parts = _TEMPLATE.split(code)
    if len(parts) == 1:
        return pl.lit(code), []
    exprs, cols = [], []
    for i, p in enumerate(parts):
        if i % 2:
            exprs.append(pl.col(p).str.to_uppercase())
            cols.append(p)
        elif p:
            exprs.append(pl.lit(p))
    return pl.concat_str(exprs), cols


def _time_check(spec: TimeSpec | None) -> list[tuple[pl.Expr, str]]:
    if spec is None or spec.column is None:
        return []
    bad = pl.col(spec.column).is_null()
    checks = [(bad, f"missing time ({spec.column})")]
    kind = "step number" if spec.origin is not None else "date"
    checks.append((~bad & _time_expr(spec).is_null(), f"unparseable {kind} in {spec.column}"))
    return checks


def _row_checks(m: Mapping) -> list[tuple[pl.Expr, str]]:
    """(expression true for a bad row, reason) in the order they are reported; reasons name columns, never cells."""
    checks = [(pl.col(m.subject.column).is_null(), f"missing subject ({m.subject.column})")]
    if m.subject.column == ROW_COLUMN:
        checks = []
    for e in m.events:
        present = pl.col(e.when).is_not_null() if e.when else pl.lit(True)
        if e.subject:
            checks.append((present & pl.col(e.subject.column).is_null(), f"missing subject ({e.subject.column})"))
        checks += [(present & c, r) for c, r in _time_check(e.time or m.time)]
        for col in _TEMPLATE.findall(e.code):
            checks.append((present & pl.col(col).is_null(), f"missing {col} (needed for {e.code})"))
        if e.amount:
            checks.append((present & pl.col(e.amount).is_null(), f"missing amount ({e.amount})"))
            checks.append(
                (present & pl.col(e.amount).is_not_null() & ~_is_decimal(e.amount),
                 f"unparseable amount in {e.amount} (not a plain decimal)")
            )
            cur = e.currency or m.currency
            if cur is not None and cur.column:
                ok = pl.col(cur.column).str.contains(r"^[A-Z]{3}$").fill_null(False)
                checks.append((present & ~ok, f"missing or invalid currency in {cur.column} (ISO 4217 code)"))
        if e.value:
            checks.append(
                (present & pl.col(e.value).is_not_null() & pl.col(e.value).cast(pl.Float64, strict=False).is_null(),
                 f"unparseable number in {e.value}")
            )
    for s in m.static:
        if s.kind == "numeric":
            test = _is_decimal(s.column) if s.money else pl.col(s.column).cast(pl.Float64, strict=False).is_not_null()
            checks.append((pl.col(s.column).is_not_null() & ~test, f"unparseable number in {s.column}"))
    for lab in m.labels:
        if lab.negative is not None:
            allowed = lab.positive + lab.negative
            checks.append(
                (pl.col(lab.column).is_not_null() & ~pl.col(lab.column).is_in(allowed),
                 f"unexpected label value in {lab.column} (expected one of {', '.join(allowed)})")
            )
        checks += _time_check(lab.time)
    return checks


def _subject_key(spec: SubjectSpec) -> pl.Expr:
    return pl.concat_str(pl.lit(spec.prefix + ":"), pl.col(spec.column).cast(pl.String))


def _frame(df: pl.DataFrame, seq: int, **cols: pl.Expr) -> pl.DataFrame:
    exprs = []
    for name, dtype in INTERNAL_SCHEMA.items():
        if name == "seq":
            expr = pl.lit(seq)
        elif name in cols:
            expr = cols[name]
        elif name in ("position",):
            expr = pl.col("_row")
        else:
            expr = pl.lit(None)
        exprs.append(expr.cast(dtype).alias(name))
    return df.select(exprs)


def _plain_exponents(df: pl.DataFrame, cols: list[str]) -> pl.DataFrame:
    """Cells in exponent notation (`5e+05`, as R's write.csv renders round numbers) as exact plain decimals."""
    from decimal import Decimal, InvalidOperation

    for c in cols:
        sci = df.get_column(c).filter(df.get_column(c).str.contains(r"^[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d{1,3}$"))
        if not sci.len():
            continue
        plain = {}
        for v in sci.unique().to_list():
            try:
                plain[v] = format(Decimal(v), "f")
            except InvalidOperation:  # pragma: no cover - the pattern admits only valid numbers
                continue
        df = df.with_columns(pl.col(c).replace(plain))
    return df


def map_table(df: pl.DataFrame, m: Mapping, name: str, file_index: int, sink: Sink) -> tuple[pl.DataFrame, dict]:
    """Events of a table (columns already selected and stripped); bad rows to `sink`. Returns (events, counts)."""
    money = {e.amount for e in m.events if e.amount} | {s.column for s in m.static if s.money}
    df = _plain_exponents(df, sorted(money))
    df = df.with_row_index(ROW_COLUMN, offset=1).with_columns(pl.col(ROW_COLUMN).cast(pl.Int64))
    reason = pl.lit(None, dtype=pl.String)
    for bad, why in reversed(_row_checks(m)):
        reason = pl.when(bad).then(pl.lit(why)).otherwise(reason)
    df = df.with_columns(reason.alias("_reason"))
    bad_rows = df.filter(pl.col("_reason").is_not_null())
    if bad_rows.height:
        for row, why in bad_rows.select("_row", "_reason").iter_rows():
            sink.reject(name, f"row {row}", m.name, None, why)
    good = df.filter(pl.col("_reason").is_null())
    file_name = name.replace("\\", "/").rsplit("/", 1)[-1]
    source_id = pl.concat_str(pl.lit(file_name + ":"), pl.col("_row").cast(pl.String))
    base = {"file_index": pl.lit(file_index), "source_type": pl.lit(m.name), "source_id": source_id}
    frames = []
    seq = 0
    for s in m.static:
        label = s.name or s.column
        part = good.filter(pl.col(s.column).is_not_null())
        if s.kind == "categorical":
            cols = {"code": pl.concat_str(pl.lit(f"ATTR/{label}/"), pl.col(s.column))}
        else:
            cols = {"code": pl.lit(f"ATTR/{label}"), "numeric_value": pl.col(s.column).cast(pl.Float64)}
            if s.money:
                cols["amount"] = _exact(s.column, False)
                cur = m.currency
                cols["unit"] = pl.lit(s.unit or (cur.value if cur and cur.value else None))
                if cur is not None and cur.column and not s.unit:
                    cols["unit"] = pl.col(cur.column)
            elif s.unit:
                cols["unit"] = pl.lit(s.unit)
        frames.append(_frame(part, seq, subject_key=_subject_key(m.subject), time=pl.lit(None), **base, **cols))
        seq += 1
    for e in m.events:
        part = good.filter(pl.col(e.when).is_not_null()) if e.when else good
        code, _ = _template(e.code)
        time_spec = e.time or m.time
        cols = {
            "code": code,
            "time": _time_expr(time_spec) if time_spec is not None else pl.lit(None),
            "subject_key": _subject_key(e.subject or m.subject),
        }
        if e.amount:
            cols["amount"] = _exact(e.amount, e.negate)
            cols["numeric_value"] = cols["amount"].cast(pl.Float64)
            cur = e.currency or m.currency
            if cur is not None:
                cols["unit"] = pl.col(cur.column) if cur.column else pl.lit(cur.value)
        elif e.value:
            cols["numeric_value"] = pl.col(e.value).cast(pl.Float64, strict=False)
            if e.unit:
                cols["unit"] = pl.lit(e.unit)
        if e.counterparty:
            cp = pl.col(e.counterparty)
            if e.counterparty_prefix:
                cp = pl.concat_str(pl.lit(e.counterparty_prefix + ":"), cp)
            cols["counterparty"] = cp
        if e.text:
            cols["text_value"] = pl.col(e.text)
        frames.append(_frame(part, seq, **base, **cols))
        seq += 1
    labels = {}
    for lab in m.labels:
        part = good.filter(pl.col(lab.column).is_not_null())
        positive = pl.col(lab.column).is_in(lab.positive)
        cols = {
            "code": pl.lit(lab.code),
            "numeric_value": positive.cast(pl.Float64),
            "text_value": pl.col(lab.column),
            "time": _time_expr(lab.time) if lab.time is not None else pl.lit(None),
            "subject_key": _subject_key(m.subject),
        }
        frame = _frame(part, seq, **base, **cols)
        if lab.time is not None and lab.time.at_end:
            frame = frame.with_columns(pl.lit("at_end").alias("_at_end"))
        frames.append(frame)
        seq += 1
        n_pos = int(part.select(positive.sum()).item() or 0)
        labels[lab.code] = {"positive": n_pos, "negative": part.height - n_pos}
    events = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame(schema=INTERNAL_SCHEMA)
    counts = {"rows": df.height, "rows_ingested": good.height, "rejected": bad_rows.height, "labels": labels}
    return events, counts
