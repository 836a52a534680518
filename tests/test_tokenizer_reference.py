"""`Tokenizer.encode`, `windows` and `rows_from_frame` against plain polars statements of the same rules.

encode and windows work on numpy/Arrow arrays and handle strings once per distinct value (they serve single-patient
requests, where polars' per-query cost dominated); a bundle's predictions must still equal what its dataset was
built with, so here each one is compared, exactly, to a direct polars version: joins for visits and the vocabulary,
an as-of join for value bins and windows, iter_rows for Rows.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import polars as pl
import pytest

from kit.events import read_subjects, scan_events
from kit.tokenizer import (
    CLS, STATIC_ANCHOR, TOKEN_TYPES, UNK, VE, VS, Tokenizer, TokenizerConfig, event_token_strings, windows,
)
from kit.train.batching import make_row
from kit.train.data import rows_from_frame

_PREFIX, _INTERVAL, _VS, _START, _EVENT, _VE = range(6)


def _interval(gap_us: pl.Expr) -> pl.Expr:
    days = gap_us / (86400 * 1e6)
    return (pl.when(days < 28).then(pl.format("[W{}]", (days // 7).cast(pl.Int64)))
            .when(days <= 365).then(pl.format("[M{}]", (days / 30.4375).round().cast(pl.Int64).clip(1, 12)))
            .otherwise(pl.lit("[LT]")))


def reference_encode(tk: Tokenizer, events: pl.DataFrame, subjects: pl.DataFrame) -> pl.DataFrame:
    ev, cfg = events.lazy(), tk.config
    subj = subjects.lazy().select("subject_id", "birth_time")
    visits = (
        ev.filter(pl.col("time").is_not_null() & pl.col("encounter_id").is_not_null())
        .group_by("subject_id", "encounter_id").agg(pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
        .sort("subject_id", "start", "end", "encounter_id")
        .with_columns(pl.int_range(1, pl.len() + 1).over("subject_id").cast(pl.Int32).alias("visit"),
                      pl.col("end").cum_max().shift(1).over("subject_id").alias("prev"))
    )
    anchor = (
        ev.group_by("subject_id").agg(pl.col("time").min().alias("first")).join(subj, on="subject_id", how="left")
        .with_columns(pl.min_horizontal("first", "birth_time").fill_null(STATIC_ANCHOR).alias("anchor"))
    )
    cols = ["subject_id", "time", "rank", "visit", "seq", "token", "type"]
    timed = (
        event_token_strings(ev, cfg, tk.value_bins)
        .join(visits.select("subject_id", "encounter_id", "visit"), on=["subject_id", "encounter_id"], how="left")
        .select("subject_id", "time",
                pl.when(pl.col("code").str.contains(cfg.visit_start_pattern)).then(_START).otherwise(_EVENT).alias("rank"),
                pl.col("visit").fill_null(0), pl.col("_row").alias("seq"), "token", "type")
    )
    static = event_token_strings(ev, cfg, tk.value_bins, static=True).join(anchor, on="subject_id").select(
        "subject_id", pl.col("anchor").alias("time"), pl.lit(_PREFIX).alias("rank"), pl.lit(0).alias("visit"),
        pl.col("_row").alias("seq"), "token", pl.lit(TOKEN_TYPES["static"]).alias("type"))

    def marks(frame: pl.LazyFrame, time: str, rank: int, token: pl.Expr, kind: str, visit="visit") -> pl.LazyFrame:
        return frame.select("subject_id", pl.col(time).alias("time"), pl.lit(rank).alias("rank"),
                            pl.col(visit) if visit else pl.lit(0).alias("visit"), pl.lit(-1 if rank == _PREFIX else 0).alias("seq"),
                            token.alias("token"), pl.lit(TOKEN_TYPES[kind]).alias("type"))

    gaps = visits.filter(pl.col("prev").is_not_null() & (pl.col("start") >= pl.col("prev")))
    parts = [
        marks(anchor, "anchor", _PREFIX, pl.lit(CLS), "special", visit=None), static,
        marks(gaps, "start", _INTERVAL, _interval((pl.col("start") - pl.col("prev")).dt.total_microseconds()), "interval"),
        marks(visits, "start", _VS, pl.lit(VS), "visit_start"), timed, marks(visits, "end", _VE, pl.lit(VE), "visit_end"),
    ]
    schema = {"subject_id": pl.Int64, "time": pl.Datetime("us"), "rank": pl.Int8, "visit": pl.Int32, "seq": pl.Int64,
              "token": pl.String, "type": pl.Int8}
    vocab = pl.LazyFrame({"token": tk.vocab, "token_id": pl.Series(range(len(tk.vocab)), dtype=pl.Int32)})
    return (
        pl.concat([p.select([pl.col(c).cast(t) for c, t in schema.items()]) for p in parts])
        .sort(cols[:5])
        .join(vocab, on="token", how="left", maintain_order="left")
        .join(vocab.rename({"token": "base", "token_id": "base_id"}), left_on=pl.col("token").str.replace(r"#Q\d+$", ""),
              right_on="base", how="left", maintain_order="left")
        .join(anchor.select("subject_id", "birth_time"), on="subject_id", how="left", maintain_order="left")
        .select("subject_id",
                pl.coalesce("token_id", "base_id", pl.lit(tk.token_to_id[UNK], dtype=pl.Int32)).alias("token_id"),
                "time",
                ((pl.col("time") - pl.col("birth_time")).dt.total_microseconds() / (365.25 * 86400 * 1e6))
                .fill_null(-1.0).cast(pl.Float32).alias("age"),
                "type", "visit", "token")
        .collect()
    )


def reference_windows(tokens: pl.DataFrame, samples: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Each sample's window token by token in Python: the tokens strictly before its time, [CLS] and the static
    tokens kept in front of a left-truncated history, visits renumbered from 1."""
    by_subject = {sid: part for (sid,), part in tokens.group_by("subject_id")}
    cols = {"input_ids": [], "token_time": [], "token_age": [], "token_type": [], "token_visit": [], "n_tokens": []}
    for sid, pt in samples.select("subject_id", "prediction_time").iter_rows():
        seq = by_subject.get(sid, tokens.head(0))
        before = seq.filter(pl.col("time") < pt) if pt is not None else seq.head(0)
        if before.height > max_len:
            n_prefix = min(seq.filter(pl.col("type").is_in([TOKEN_TYPES["special"], TOKEN_TYPES["static"]])).height, max_len // 2)
            before = pl.concat([before.head(n_prefix), before.tail(max_len - n_prefix)])
        visits = [v for v in before.get_column("visit").to_list() if v > 0]
        low = min(visits) if visits else 1
        for name, col in (("input_ids", "token_id"), ("token_time", "time"), ("token_age", "age"), ("token_type", "type")):
            cols[name].append(before.get_column(col))
        cols["token_visit"].append(pl.Series([v - low + 1 if v > 0 else 0 for v in before.get_column("visit").to_list()],
                                             dtype=pl.Int32))
        cols["n_tokens"].append(before.height)
    dtypes = {"input_ids": pl.Int32, "token_time": pl.Datetime("us"), "token_age": pl.Float32, "token_type": pl.Int8,
              "token_visit": pl.Int32}
    return samples.hstack([pl.Series(name, values, dtype=pl.List(dtypes[name])) for name, values in cols.items()
                           if name != "n_tokens"] + [pl.Series("n_tokens", cols["n_tokens"], dtype=pl.Int32)])


@pytest.fixture(scope="module")
def data(synthea_events):
    subjects = read_subjects(synthea_events)
    ids = sorted(subjects.get_column("subject_id").to_list())
    events = scan_events(synthea_events).filter(pl.col("subject_id").is_in(ids[:60])).collect()
    train = events.filter(pl.col("subject_id").is_in(ids[:30]))
    return {"events": events, "subjects": subjects,
            "tokenizers": [Tokenizer.fit(train.lazy(), TokenizerConfig(min_count=m)) for m in (1, 5, 40)]}


def _edge_case_events() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Values on and around cut points (NaN, -0.0, inf), a timeless numeric attribute, coded and free text, a raw
    code that already ends in #Q<n>, encounters that start and end together, an encounter without a start code, a
    subject with no birth and one with only timeless facts, a null code, events out of order."""
    d = datetime
    rows = [
        (5, None, "GENDER/F", None, None, None), (5, None, "LOINC/8302-2", 170.0, None, None),
        (5, d(2000, 1, 1), "ENCOUNTER/A/START", None, None, "e1"), (5, d(2000, 1, 1), "LOINC/8302-2", float("nan"), None, "e1"),
        (5, d(2000, 1, 1), "LOINC/8302-2", -0.0, None, "e1"), (5, d(2000, 1, 1), "X/1", None, "SNOMED/123", None),
        (5, d(2000, 1, 1), "X/2", None, "free text, not a code", "e1"), (5, d(2000, 3, 5), "ENCOUNTER/B/START", None, None, "e2"),
        (5, d(2000, 3, 5), "ENCOUNTER/B/END", None, None, "e2"), (5, d(2000, 3, 5), "CLAIM/9", 5.0, None, "e2"),
        (7, None, "RACE/1", None, None, None), (7, None, "LOINC/8302-2", 1e9, None, None),
        (9, d(1950, 1, 1), "FOO#Q3", None, "a b", "e9"), (9, d(1950, 1, 1), "LOINC/8302-2", float("-inf"), None, None),
        (5, d(2001, 3, 5), "ENCOUNTER/C/START", None, None, "e4"), (5, d(2001, 3, 5), "ENCOUNTER/D/START", None, None, "e3"),
        (5, d(2000, 1, 1), None, 1.0, None, "e1"), (5, d(1999, 6, 1), "LOINC/8302-2", 100.0, None, "e0"),
    ]
    events = pl.DataFrame(rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                        "numeric_value": pl.Float32, "text_value": pl.String, "encounter_id": pl.String},
                          orient="row")
    subjects = pl.DataFrame({"subject_id": [5, 9], "birth_time": [d(1999, 1, 1), None]},
                            schema={"subject_id": pl.Int64, "birth_time": pl.Datetime("us")})
    return events, subjects


def _assert_same(got: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert got.schema == expected.schema
    assert got.equals(expected)


def test_encode_equals_the_polars_statement(data):
    events, subjects = data["events"], data["subjects"]
    shuffled = events.sample(fraction=1.0, shuffle=True, seed=3)
    for tk in data["tokenizers"]:
        _assert_same(tk.encode(events, subjects), reference_encode(tk, events, subjects))
        _assert_same(tk.encode(shuffled.lazy(), subjects.lazy()), reference_encode(tk, shuffled, subjects))
    edge, edge_subjects = _edge_case_events()
    fitted = Tokenizer.fit(edge.lazy(), TokenizerConfig(min_count=1, value_bins=3))
    on_cuts = Tokenizer(fitted.vocab, {"LOINC/8302-2": [0.0, 100.0, 170.0]}, fitted.config)
    nan_cut = Tokenizer(fitted.vocab, {"LOINC/8302-2": [float("nan"), 0.0, 100.0]}, fitted.config)
    for tk in (*data["tokenizers"], fitted, on_cuts, nan_cut):
        _assert_same(tk.encode(edge, edge_subjects), reference_encode(tk, edge, edge_subjects))
        again = tk.encode(edge, edge_subjects)  # facts kept from the first call give the same table
        _assert_same(again, reference_encode(tk, edge, edge_subjects))


def test_windows_and_rows_equal_the_polars_statement(data):
    tk = data["tokenizers"][1]
    tokens = tk.encode(data["events"], data["subjects"])
    rng = np.random.default_rng(0)
    at = rng.integers(0, tokens.height, 300)
    shift = pl.Series(rng.choice([-1, 0, 1, 86_400_000_000, -(10**14)], len(at))).cast(pl.Duration("us"))
    samples = pl.DataFrame({
        "subject_id": tokens.get_column("subject_id").gather(at),
        "prediction_time": tokens.get_column("time").gather(at) + shift,
        "label": pl.Series(rng.random(len(at)), dtype=pl.Float32),
    })
    odd = pl.DataFrame({"subject_id": [1, samples.item(0, "subject_id")], "prediction_time": [datetime(2000, 1, 1), None],
                        "label": [0.0, 1.0]}, schema=samples.schema)
    samples = pl.concat([samples, odd])  # a subject without tokens, a sample without a time
    for max_len in (8, 64, 4096):
        win = windows(tokens, samples, max_len)
        _assert_same(win, reference_windows(tokens, samples, max_len))
    frame = win.filter(pl.col("n_tokens") > 0).with_columns(pl.lit(9, dtype=pl.Int32).alias("task_token_id"))
    for kind in ("binary", "forecast"):
        rows, df = rows_from_frame(frame, "t", kind, 1)
        expected = frame.with_columns(pl.col("token_time").list.eval(pl.element().dt.epoch("us")),
                                      pl.col("prediction_time").dt.epoch("us").alias("_pred_us"))
        _assert_same(df, expected)
        for row, rec in zip(rows, expected.iter_rows(named=True), strict=True):
            want = make_row({**rec, "prediction_time": rec["_pred_us"]}, "t", kind, 1, with_task_token=kind == "binary")
            for field in ("input_ids", "time", "age", "token_type", "visit", "target"):
                a, b = getattr(row, field), getattr(want, field)
                assert a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True), field
                assert a.flags.writeable, field
