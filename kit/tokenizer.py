"""EHRMamba-style tokenizer: an event timeline as a sequence of tokens with per-token time, age, type and visit.

A subject's sequence reads

    [CLS] <static tokens> <events outside visits> [W2] [VS] ENCOUNTER/AMBULATORY/START ... codes ... [VE] [M3] [VS] ...

- `[VS]`/`[VE]` bracket the events of one encounter (a visit); the encounter's own end code is dropped, `[VE]` says it.
- An interval token before each visit says how long since the previous visit ended: `[W0]`-`[W3]` (weeks, under
  four weeks), `[M1]`-`[M12]` (months), `[LT]` (over a year). Overlapping visits get none.
- A numeric value becomes the code's quantile-bin token (`LOINC/2339-0#Q7` of `value_bins`), with cut points fit on
  the train split only; a coded text value becomes `CODE=VALUE` (`LOINC/72166-2=SNOMED/266919005`).
- Tokens seen fewer than `min_count` times in the train split are `[UNK]` (a bin token first falls back to its code).

Every token carries a time: the event's, a visit's start/end, and the subject's birth (or first event, if earlier) for
`[CLS]` and the timeless static tokens (sex, race; a numeric one gets its bin token like a timed value), which are
known from birth (a subject with no birth and no timed event, a row of a static table, is anchored at 1900-01-01).
So "features strictly before the prediction time" is one comparison on the time column, and a leakage check can test
every token.

The tokenizer is a JSON file; `Tokenizer.load(path)` gives back the identical encoder used at prediction time.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from kit.errors import KitError
from kit.fsutil import write_text_atomic

FORMAT = "kit-tokenizer"
VERSION = 1

PAD, UNK, CLS, VS, VE, MASK = "[PAD]", "[UNK]", "[CLS]", "[VS]", "[VE]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, VS, VE, MASK]
INTERVAL_TOKENS = ["[W0]", "[W1]", "[W2]", "[W3]"] + [f"[M{i}]" for i in range(1, 13)] + ["[LT]"]

# Token type ids, one per token, so a model can embed what kind of token it reads.
TOKEN_TYPES = {
    "pad": 0,
    "special": 1,
    "static": 2,
    "visit_start": 3,
    "visit_end": 4,
    "interval": 5,
    "code": 6,
    "value": 7,
    "task": 8,
}
TYPE_NAMES = {v: k for k, v in TOKEN_TYPES.items()}

# Order of tokens that share a timestamp: interval, then [VS], then the visit's start code, then events, then [VE].
_RANK_PREFIX, _RANK_INTERVAL, _RANK_VS, _RANK_START, _RANK_EVENT, _RANK_VE = 0, 1, 2, 3, 4, 5
_US_PER_YEAR = 365.25 * 86400 * 1e6
_US_PER_DAY = 86400 * 1e6
# Where the static tokens of a subject with no timed event and no birth sit (any prediction time is after it).
STATIC_ANCHOR = datetime(1900, 1, 1)


class TokenizerConfig(BaseModel):
    """How events become tokens. Stored inside the tokenizer JSON."""

    model_config = ConfigDict(extra="forbid")

    max_len: int = Field(1024, ge=8, description="Longest input; older history is cut from the left.")
    min_count: int = Field(5, ge=1, description="Train-split occurrences a token needs to enter the vocabulary.")
    value_bins: int = Field(10, ge=2, le=100, description="Quantile bins per numeric code.")
    drop_code_prefixes: list[str] = Field(
        default_factory=lambda: ["CLAIM/", "EOB/"],
        description="Codes left out of sequences (billing totals repeat every visit and say little clinically).",
    )
    visit_start_pattern: str = Field(r"^ENCOUNTER/.+/START$", description="Regex of a visit's start code.")
    visit_end_pattern: str = Field(r"^ENCOUNTER/.+/END$", description="Regex of a visit's end code (dropped).")
    coded_text_pattern: str = Field(
        r"^[A-Za-z0-9_]+/\S+$", description="Text values that look like codes become CODE=VALUE tokens."
    )


def _interval_token(gap_us: pl.Expr) -> pl.Expr:
    days = gap_us / _US_PER_DAY
    weeks = (days // 7).cast(pl.Int64)
    months = (days / 30.4375).round().cast(pl.Int64).clip(1, 12)
    return (
        pl.when(days < 28)
        .then(pl.format("[W{}]", weeks))
        .when(days <= 365)
        .then(pl.format("[M{}]", months))
        .otherwise(pl.lit("[LT]"))
    )


def _drop_expr(config: TokenizerConfig) -> pl.Expr:
    keep = pl.lit(True)
    for prefix in config.drop_code_prefixes:
        keep = keep & ~pl.col("code").str.starts_with(prefix)
    return keep


def _value_cuts_frame(value_bins: dict[str, list[float]]) -> pl.DataFrame:
    rows = [(code, float(c), i + 1) for code, cuts in value_bins.items() for i, c in enumerate(cuts)]
    return pl.DataFrame(
        rows, schema={"code": pl.String, "cut": pl.Float64, "bin_below": pl.Int32}, orient="row"
    ).sort("cut")


def event_token_strings(
    events: pl.LazyFrame, config: TokenizerConfig, value_bins: dict[str, list[float]], *, static: bool = False
) -> pl.LazyFrame:
    """Timed (or, with `static`, timeless) kept events with their token string (`token`) and token type; the visit
    end codes are dropped. A timeless numeric attribute (a credit limit, an age in a table) gets its bin token too."""
    when = pl.col("time").is_null() if static else pl.col("time").is_not_null()
    ev = (
        events.filter(when & _drop_expr(config))
        .filter(~pl.col("code").str.contains(config.visit_end_pattern))
        .with_columns(pl.col("numeric_value").cast(pl.Float64).alias("_value"), pl.int_range(pl.len()).alias("_row"))
    )
    cuts = _value_cuts_frame(value_bins).lazy()
    # A value's bin is 1 + the number of cut points at or below it: an as-of join finds the last such cut.
    binned = (
        ev.filter(pl.col("_value").is_not_null())
        .sort("_value")
        .join_asof(cuts, left_on="_value", right_on="cut", by="code", strategy="backward", check_sortedness=False)
        .with_columns((pl.col("bin_below").fill_null(0) + 1).alias("_bin"))
        .select("_row", "_bin", pl.col("code").is_in(list(value_bins)).alias("_has_bins"))
    )
    ev = ev.join(binned, on="_row", how="left", maintain_order="left")
    coded_text = pl.col("text_value").is_not_null() & pl.col("text_value").str.contains(config.coded_text_pattern)
    token = (
        pl.when(pl.col("_has_bins").fill_null(False))
        .then(pl.format("{}#Q{}", pl.col("code"), pl.col("_bin")))
        .when(pl.col("_value").is_null() & coded_text)
        .then(pl.format("{}={}", pl.col("code"), pl.col("text_value")))
        .otherwise(pl.col("code"))
    )
    ttype = pl.when(pl.col("_has_bins").fill_null(False)).then(TOKEN_TYPES["value"]).otherwise(TOKEN_TYPES["code"])
    return ev.with_columns(token.alias("token"), ttype.cast(pl.Int8).alias("type")).drop(
        "_value", "_bin", "_has_bins"
    )


class Tokenizer:
    """Vocabulary, value bins and config; `encode` turns events into a per-token table."""

    def __init__(self, vocab: list[str], value_bins: dict[str, list[float]], config: TokenizerConfig) -> None:
        if vocab[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise KitError("tokenizer vocabulary must start with the special tokens " + ", ".join(SPECIAL_TOKENS))
        if len(set(vocab)) != len(vocab):
            raise KitError("tokenizer vocabulary has duplicate tokens")
        self.vocab = list(vocab)
        self.value_bins = {k: list(v) for k, v in value_bins.items()}
        self.config = config
        self.token_to_id = {t: i for i, t in enumerate(self.vocab)}
        self._vocab_frame = pl.DataFrame(
            {"token": self.vocab, "token_id": pl.Series(range(len(self.vocab)), dtype=pl.Int32)}
        )

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def fit(cls, train_events: pl.LazyFrame, config: TokenizerConfig, extra_tokens: list[str] = ()) -> Tokenizer:
        """Fit value bins and the vocabulary on the train split's events only."""
        numeric = (
            train_events.filter(pl.col("numeric_value").is_not_null() & _drop_expr(config))
            .group_by("code")
            .agg(
                pl.len().alias("n"),
                *[
                    pl.col("numeric_value").cast(pl.Float64).quantile(i / config.value_bins, "linear").alias(f"q{i}")
                    for i in range(1, config.value_bins)
                ],
            )
            .filter(pl.col("n") >= config.min_count)
            .sort("code")
            .collect()
        )
        value_bins: dict[str, list[float]] = {}
        for row in numeric.iter_rows(named=True):
            cuts = sorted({float(row[f"q{i}"]) for i in range(1, config.value_bins)})
            value_bins[row["code"]] = cuts
        counts = (
            event_token_strings(train_events, config, value_bins)
            .group_by("token")
            .agg(pl.len().alias("n"))
            .collect()
        )
        static = (
            event_token_strings(train_events, config, value_bins, static=True).group_by("token").agg(pl.len().alias("n"))
        ).collect()
        # A numeric code's plain token is the fallback for its rare bins, so it counts every value of the code.
        bases = (
            counts.filter(pl.col("token").str.contains(r"#Q\d+$"))
            .group_by(pl.col("token").str.replace(r"#Q\d+$", ""))
            .agg(pl.col("n").sum())
        )
        counts = pl.concat([counts, static, bases]).group_by("token").agg(pl.col("n").sum())
        reserved = SPECIAL_TOKENS + INTERVAL_TOKENS + [t for t in extra_tokens if t not in SPECIAL_TOKENS]
        learned = (
            counts.filter((pl.col("n") >= config.min_count) & ~pl.col("token").is_in(reserved))
            .sort(["n", "token"], descending=[True, False])
            .get_column("token")
            .to_list()
        )
        return cls(reserved + learned, value_bins, config)

    # ---- persistence --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.model_dump(mode="json"),
            "token_types": TOKEN_TYPES,
            "vocab": self.vocab,
            "value_bins": self.value_bins,
        }

    def save(self, path: Path | str) -> None:
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path | str) -> Tokenizer:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise KitError(f"{path}: cannot read tokenizer JSON ({exc})") from None
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise KitError(f"{path}: not a kit tokenizer (format {data.get('format')!r} version {data.get('version')!r})")
        return cls(data["vocab"], data["value_bins"], TokenizerConfig(**data["config"]))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def id_of(self, token: str) -> int:
        return self.token_to_id.get(token, self.token_to_id[UNK])

    # ---- encoding -----------------------------------------------------------------------------------------
    def encode(self, events: pl.DataFrame | pl.LazyFrame, subjects: pl.DataFrame | pl.LazyFrame, *,
               engine: str = "auto") -> pl.DataFrame:
        """Token table for every subject in `events`: subject_id, token_id, time, age, type, visit, token.

        Rows are in reading order within each subject (sorted by subject_id). `visit` is the visit's ordinal
        within the subject (1 = first encounter), 0 for tokens outside any visit. `engine`: polars' engine for the
        query ("in-memory" answers a single patient's few hundred events in about 2/3 of the streaming engine's time).
        """
        ev = events.lazy() if isinstance(events, pl.DataFrame) else events
        subj = (subjects.lazy() if isinstance(subjects, pl.DataFrame) else subjects).select("subject_id", "birth_time")
        cfg = self.config
        timed = event_token_strings(ev, cfg, self.value_bins)
        visits = (
            ev.filter(pl.col("time").is_not_null() & pl.col("encounter_id").is_not_null())
            .group_by("subject_id", "encounter_id")
            .agg(pl.col("time").min().alias("start"), pl.col("time").max().alias("end"))
            .sort("subject_id", "start", "end", "encounter_id")
            .with_columns(pl.int_range(1, pl.len() + 1).over("subject_id").cast(pl.Int32).alias("visit"))
            .with_columns(pl.col("end").cum_max().shift(1).over("subject_id").alias("_prev_end"))
        )
        # A subject with neither a timed event nor a birth (a row of a static table) is anchored at STATIC_ANCHOR.
        anchor = (
            ev.group_by("subject_id")
            .agg(pl.col("time").min().alias("_first"))
            .join(subj, on="subject_id", how="left")
            .with_columns(pl.min_horizontal("_first", "birth_time").fill_null(STATIC_ANCHOR).alias("_anchor"))
            .select("subject_id", "_anchor", "birth_time")
        )
        cols = ["subject_id", "time", "_rank", "visit", "_seq", "token", "type"]
        ev_tok = (
            timed.join(visits.select("subject_id", "encounter_id", "visit"), on=["subject_id", "encounter_id"], how="left")
            .with_columns(
                pl.col("visit").fill_null(0),
                pl.when(pl.col("code").str.contains(cfg.visit_start_pattern))
                .then(_RANK_START)
                .otherwise(_RANK_EVENT)
                .alias("_rank"),
                pl.col("_row").alias("_seq"),
            )
            .select(cols)
        )
        vs = visits.select(
            "subject_id", pl.col("start").alias("time"), pl.lit(_RANK_VS).alias("_rank"), "visit",
            pl.lit(0).alias("_seq"), pl.lit(VS).alias("token"), pl.lit(TOKEN_TYPES["visit_start"]).alias("type"),
        )
        ve = visits.select(
            "subject_id", pl.col("end").alias("time"), pl.lit(_RANK_VE).alias("_rank"), "visit",
            pl.lit(0).alias("_seq"), pl.lit(VE).alias("token"), pl.lit(TOKEN_TYPES["visit_end"]).alias("type"),
        )
        gap = (pl.col("start") - pl.col("_prev_end")).dt.total_microseconds()
        intervals = visits.filter(pl.col("_prev_end").is_not_null() & (pl.col("start") >= pl.col("_prev_end"))).select(
            "subject_id", pl.col("start").alias("time"), pl.lit(_RANK_INTERVAL).alias("_rank"), "visit",
            pl.lit(0).alias("_seq"), _interval_token(gap).alias("token"), pl.lit(TOKEN_TYPES["interval"]).alias("type"),
        )
        cls_tok = anchor.select(
            "subject_id", pl.col("_anchor").alias("time"), pl.lit(_RANK_PREFIX).alias("_rank"), pl.lit(0).alias("visit"),
            pl.lit(-1).alias("_seq"), pl.lit(CLS).alias("token"), pl.lit(TOKEN_TYPES["special"]).alias("type"),
        )
        static = (
            event_token_strings(ev, cfg, self.value_bins, static=True)
            .join(anchor, on="subject_id", how="inner")
            .select(
                "subject_id", pl.col("_anchor").alias("time"), pl.lit(_RANK_PREFIX).alias("_rank"),
                pl.lit(0).alias("visit"), pl.col("_row").alias("_seq"), "token",
                pl.lit(TOKEN_TYPES["static"]).alias("type"),
            )
        )
        schema = {
            "subject_id": pl.Int64, "time": pl.Datetime("us"), "_rank": pl.Int8, "visit": pl.Int32,
            "_seq": pl.Int64, "token": pl.String, "type": pl.Int8,
        }
        parts = [p.select([pl.col(c).cast(t) for c, t in schema.items()]) for p in (cls_tok, static, intervals, vs, ev_tok, ve)]
        table = (
            pl.concat(parts)
            .sort(["subject_id", "time", "_rank", "visit", "_seq"])
            .join(self._vocab_frame.lazy(), on="token", how="left", maintain_order="left")
            .join(
                self._vocab_frame.lazy().rename({"token": "_base", "token_id": "_base_id"}),
                left_on=pl.col("token").str.replace(r"#Q\d+$", ""),
                right_on="_base",
                how="left",
                maintain_order="left",
            )
            .join(anchor.select("subject_id", "birth_time"), on="subject_id", how="left", maintain_order="left")
            .with_columns(
                pl.coalesce("token_id", "_base_id", pl.lit(self.token_to_id[UNK], dtype=pl.Int32)).alias("token_id"),
                ((pl.col("time") - pl.col("birth_time")).dt.total_microseconds() / _US_PER_YEAR)
                .fill_null(-1.0)
                .cast(pl.Float32)
                .alias("age"),
            )
            .select("subject_id", "token_id", "time", "age", "type", "visit", "token")
        )
        return table.collect(engine=engine)

    def decode(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] if 0 <= i < len(self.vocab) else UNK for i in ids]


def _lists(values: pl.Series, offsets: np.ndarray) -> pl.Series:
    """A list column from flat values and int64 offsets (Arrow builds it without copying per row)."""
    arr = values.to_arrow()
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return pl.Series(values.name, pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), arr))


def windows(tokens: pl.DataFrame, samples: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Attach to each sample (subject_id, prediction_time, ...) its tokens strictly before the prediction time.

    Left truncation keeps `[CLS]` and the static tokens, then the most recent history, to at most `max_len` tokens.
    Visit ids are renumbered so the first visit inside the window is 1. Adds list columns input_ids, token_time,
    token_age, token_type, token_visit and the int n_tokens; samples with no token before their time get n_tokens 0.
    `tokens` must be in `encode` order (sorted by subject, then reading order).
    """
    tok = tokens.with_row_index("_g").with_columns(pl.col("_g").cast(pl.Int64))
    first = tok.group_by("subject_id").agg(
        pl.col("_g").min().alias("_first"),
        pl.col("type").is_in([TOKEN_TYPES["special"], TOKEN_TYPES["static"]]).sum().alias("_n_prefix"),
    )
    s = samples.with_row_index("_sample").sort("prediction_time")
    s = s.join_asof(
        tok.select("subject_id", "time", "_g").sort("time"),
        left_on="prediction_time",
        right_on="time",
        by="subject_id",
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).drop("time")
    s = s.join(first, on="subject_id", how="left").sort("_sample")
    # end = how many of the subject's tokens are strictly before the prediction time
    end = (s.get_column("_g") + 1 - s.get_column("_first")).fill_null(0).to_numpy().astype(np.int64)
    base = s.get_column("_first").fill_null(0).to_numpy().astype(np.int64)
    n_prefix = np.minimum(s.get_column("_n_prefix").fill_null(0).to_numpy().astype(np.int64), max_len // 2)
    truncated = end > max_len
    p_len = np.where(truncated, n_prefix, 0)
    w_len = np.minimum(end, max_len - p_len)
    w_start = base + end - w_len
    lengths = p_len + w_len
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    # Flat token indices: for each sample its prefix range then its window range.
    seg_start = np.repeat(np.stack([base, w_start], 1).reshape(-1), np.stack([p_len, w_len], 1).reshape(-1))
    seg_len = np.stack([p_len, w_len], 1).reshape(-1)
    seg_off = np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
    flat = seg_start + (np.arange(seg_len.sum(), dtype=np.int64) - seg_off)
    picked = tok.select("token_id", "time", "age", "type", "visit")[pl.Series(flat)]
    visit = picked.get_column("visit").to_numpy().astype(np.int32)
    big = np.where(visit > 0, visit, np.iinfo(np.int32).max)
    nonempty = lengths > 0
    mins = np.full(len(lengths), 1, dtype=np.int64)
    if nonempty.any():
        mins[nonempty] = np.minimum.reduceat(big, offsets[:-1][nonempty])
    renumbered = np.where(visit > 0, visit - np.repeat(mins, lengths) + 1, 0).astype(np.int32)
    out = s.drop("_sample", "_g", "_first", "_n_prefix").with_columns(
        _lists(picked.get_column("token_id").alias("input_ids"), offsets),
        _lists(picked.get_column("time").alias("token_time"), offsets),
        _lists(picked.get_column("age").alias("token_age"), offsets),
        _lists(picked.get_column("type").alias("token_type"), offsets),
        _lists(pl.Series("token_visit", renumbered), offsets),
        pl.Series("n_tokens", lengths.astype(np.int32)),
    )
    return out
