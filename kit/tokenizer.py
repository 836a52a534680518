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
import pyarrow.compute as pc
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
_STATIC_ANCHOR_US = int((STATIC_ANCHOR - datetime(1970, 1, 1)).total_seconds()) * 1_000_000
_NO_TIME, _NO_TIME_MAX = np.iinfo(np.int64).min, np.iinfo(np.int64).max
# Tokens that structure a sequence rather than come from an event, in the order `encode` indexes them.
_STRUCTURE = [CLS, VS, VE, *INTERVAL_TOKENS]
_TABLE_SCHEMA = {"subject_id": pl.Int64, "token_id": pl.Int32, "time": pl.Datetime("us"), "age": pl.Float32,
                 "type": pl.Int8, "visit": pl.Int32, "token": pl.String}


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


def _token_string(config: TokenizerConfig, binned: pl.Expr, bin_no: pl.Expr, no_value: pl.Expr) -> pl.Expr:
    """An event's token: `CODE#Qk` for a binned value, `CODE=VALUE` for a coded text value, else the code."""
    coded_text = pl.col("text_value").is_not_null() & pl.col("text_value").str.contains(config.coded_text_pattern)
    return (
        pl.when(binned)
        .then(pl.format("{}#Q{}", pl.col("code"), bin_no))
        .when(no_value & coded_text)
        .then(pl.format("{}={}", pl.col("code"), pl.col("text_value")))
        .otherwise(pl.col("code"))
    )


def event_token_strings(
    events: pl.LazyFrame, config: TokenizerConfig, value_bins: dict[str, list[float]], *, static: bool = False
) -> pl.LazyFrame:
    """Timed (or, with `static`, timeless) kept events with their token string (`token`) and token type; the visit
    end codes are dropped. A timeless numeric attribute (a credit limit, an age in a table) gets its bin token too.
    A lazy query (`Tokenizer.fit` streams the train split through it); `Tokenizer.encode` bins the same way in numpy."""
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
    has_bins = pl.col("_has_bins").fill_null(False)
    token = _token_string(config, has_bins, pl.col("_bin"), pl.col("_value").is_null())
    ttype = pl.when(has_bins).then(TOKEN_TYPES["value"]).otherwise(TOKEN_TYPES["code"])
    return ev.with_columns(token.alias("token"), ttype.cast(pl.Int8).alias("type")).drop(
        "_value", "_bin", "_has_bins"
    )


class _ValueBins:
    """The value bins as arrays, to bin many values at once. A value's bin is 1 + the place (in its code's list) of
    the last cut point at or below it, in polars' order (NaN above every number), as `event_token_strings`' as-of
    join finds it."""

    def __init__(self, value_bins: dict[str, list[float]]) -> None:
        self.codes = list(value_bins)
        self.index = {c: i for i, c in enumerate(self.codes)}
        sizes = [len(cuts) for cuts in value_bins.values()]
        code = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        cut = np.array([float(c) for cuts in value_bins.values() for c in cuts], dtype=np.float64)
        place = np.concatenate([np.arange(1, n + 1, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, np.int64)
        order = np.lexsort((cut, code))  # numpy sorts NaN last, as polars does
        self.cut_code, self.cut, self.place = code[order], cut[order], place[order]
        self.first = np.searchsorted(self.cut_code, np.arange(len(sizes) + 1))  # where each code's cuts start

    def bins(self, code: np.ndarray, value: np.ndarray) -> np.ndarray:
        """Bin numbers of values of binned codes (`code`: the code's position in `codes`)."""
        m, n = len(self.cut), len(code)
        if n == 0 or m == 0:
            return np.ones(n, dtype=np.int64)
        # Cuts and values sorted together by (code, value), a cut before a value equal to it: the cuts before a
        # value, less those of earlier codes, are its code's cuts at or below it.
        kind = np.concatenate([np.zeros(m, np.int8), np.ones(n, np.int8)])
        order = np.lexsort((kind, np.concatenate([self.cut, value]), np.concatenate([self.cut_code, code])))
        is_value = kind[order] == 1
        cuts_up_to = np.cumsum(~is_value)
        at = np.empty(n, dtype=np.int64)
        at[order[is_value] - m] = np.flatnonzero(is_value)
        below = cuts_up_to[at] - self.first[code]
        last = self.place[np.maximum(self.first[code] + below - 1, 0)]
        return np.where(below > 0, last, 0) + 1


_MEMO_SIZE = 1 << 16


def _remember(memo: dict, found: dict) -> None:
    if len(memo) + len(found) > _MEMO_SIZE:
        memo.clear()
    memo.update(found)


def _arrow(series: pl.Series) -> pa.Array:
    """A column as one Arrow array, without a copy (strings stay polars' string views)."""
    arr = series.to_arrow(compat_level=pl.CompatLevel.newest())
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def _numpy(arr: pa.Array, dtype: type) -> np.ndarray:
    """A primitive Arrow array's values (whatever sits in a null's slot), read from its buffer."""
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=arr.offset + len(arr))[arr.offset:]


def _validity(arr: pa.Array) -> np.ndarray:
    if arr.null_count == 0:
        return np.ones(len(arr), dtype=bool)
    bits = np.frombuffer(arr.buffers()[0], dtype=np.uint8)
    return np.unpackbits(bits, count=arr.offset + len(arr), bitorder="little")[arr.offset:].astype(bool)


def _times(series: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """A datetime column as epoch microseconds (nulls: _NO_TIME, which is NaT's int64) and its validity."""
    if series.dtype != pl.Datetime("us"):
        series = series.cast(pl.Datetime("us"))
    t = series.to_numpy().view(np.int64)
    return t, t != _NO_TIME


def _float64_values(series: pl.Series) -> tuple[np.ndarray, np.ndarray]:
    """A numeric column as float64 (NaN kept; nulls 0) and its validity."""
    if series.dtype not in (pl.Float32, pl.Float64):
        series = series.cast(pl.Float64)
    arr = _arrow(series)
    valid = _validity(arr)
    values = _numpy(arr, np.float32 if series.dtype == pl.Float32 else np.float64)
    return np.where(valid, values.astype(np.float64), 0.0), valid


def _int64_column(series: pl.Series) -> np.ndarray:
    return (series if series.dtype == pl.Int64 else series.cast(pl.Int64)).to_numpy()


def _distinct(series: pl.Series) -> tuple[np.ndarray, list[str]]:
    """A string column as indices into its distinct values (null: -1, which numpy reads as the last entry)."""
    enc = pc.dictionary_encode(_arrow(series))
    return np.where(_validity(enc.indices), _numpy(enc.indices, np.int32), -1), enc.dictionary.to_pylist()


def _births(subjects: pl.DataFrame, subject: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Birth times (epoch us) of the sorted subject ids `subject`, and whether each has one (the first row of a
    subject listed twice)."""
    sid = _int64_column(subjects.get_column("subject_id"))
    birth, has = _times(subjects.get_column("birth_time"))
    if len(sid) == 0:
        return np.zeros(len(subject), np.int64), np.zeros(len(subject), bool)
    order = np.argsort(sid, kind="stable")
    at = order[np.minimum(np.searchsorted(sid, subject, sorter=order), len(sid) - 1)]
    found = (sid[at] == subject) & has[at]
    return np.where(found, birth[at], 0), found


def _visits(subject: np.ndarray, t: np.ndarray, enc: np.ndarray, rows: np.ndarray, visit: np.ndarray):
    """Visits from the timed events `rows` that name an encounter: each (subject, encounter) spans its events'
    times. `subject` is each event's subject index (subjects in id order), `enc` a dense rank of its encounter id (0:
    none). Returns the visits sorted by subject, start, end and encounter id: subject index, start, end, ordinal
    within the subject and the latest end of the subject's earlier visits (_NO_TIME for a first visit); writes each
    event's visit ordinal into `visit`."""
    if len(rows) == 0:
        e = np.zeros(0, np.int64)
        return e, e, e, np.zeros(0, np.int32), e
    pair, group = np.unique(subject[rows] * (int(enc.max()) + 1) + enc[rows], return_inverse=True)
    g_start = np.full(len(pair), _NO_TIME_MAX, dtype=np.int64)
    g_end = np.full(len(pair), _NO_TIME, dtype=np.int64)
    np.minimum.at(g_start, group, t[rows])
    np.maximum.at(g_end, group, t[rows])
    g_subject = pair // (int(enc.max()) + 1)
    vo = np.lexsort((pair, g_end, g_start, g_subject))  # pair orders a subject's encounters by id
    v_subject, v_start, v_end = g_subject[vo], g_start[vo], g_end[vo]
    first = np.ones(len(vo), dtype=bool)
    first[1:] = v_subject[1:] != v_subject[:-1]
    pos = np.arange(len(vo))
    v_no = (pos - np.maximum.accumulate(np.where(first, pos, 0)) + 1).astype(np.int32)
    no_of_group = np.empty(len(vo), dtype=np.int32)
    no_of_group[vo] = v_no
    visit[rows] = no_of_group[group]
    # The running max of the ends restarts at each subject: ranks offset by the subject's ordinal never fall back.
    seg = np.cumsum(first) - 1
    ends, rank = np.unique(v_end, return_inverse=True)
    run = np.maximum.accumulate(seg * len(ends) + rank) - seg * len(ends)
    prev = np.full(len(vo), _NO_TIME, dtype=np.int64)
    prev[1:] = ends[run[:-1]]
    prev[first] = _NO_TIME
    return v_subject, v_start, v_end, v_no, prev


def _interval_codes(gap_us: np.ndarray) -> np.ndarray:
    """Index into INTERVAL_TOKENS of each gap between visits: `[W<weeks>]` under four weeks, `[M<months>]` (1-12) up
    to a year, `[LT]` beyond. As polars computed it: division by a float constant is multiplication by its
    reciprocal, `//` floors the true quotient, rounding is half to even."""
    days = gap_us.astype(np.float64) * (1.0 / _US_PER_DAY)
    weeks = np.floor(days / 7)
    months = np.clip(np.rint(days * (1.0 / 30.4375)), 1, 12)
    return np.where(days < 28, weeks, np.where(days <= 365, 3 + months, len(INTERVAL_TOKENS) - 1)).astype(np.int64)


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
        self._memo: dict[str, dict] = {"code": {}, "text": {}, "id": {}}
        self._bins = _ValueBins(self.value_bins)
        self._structure_ids = np.array([self.id_of(t) for t in _STRUCTURE], dtype=np.int32)

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
        within the subject (1 = first encounter), 0 for tokens outside any visit. `engine`: polars' engine for
        collecting lazy inputs.

        Columns are read as Arrow/numpy arrays and strings are handled once per distinct value (a code's facts, a
        token's id), so a single patient's few hundred events cost no per-query overhead and a chunk of a million
        events stays a handful of vectorized passes. Equal to the same rules stated as polars joins
        (tests/test_tokenizer_reference.py).
        """
        ev = events.collect(engine=engine) if isinstance(events, pl.LazyFrame) else events
        subj = subjects.collect(engine=engine) if isinstance(subjects, pl.LazyFrame) else subjects
        if ev.height == 0:
            return pl.DataFrame(schema=_TABLE_SCHEMA)
        sid = _int64_column(ev.get_column("subject_id"))
        t, timed = _times(ev.get_column("time"))
        value, has_value = _float64_values(ev.get_column("numeric_value"))
        code_of, codes = _distinct(ev.get_column("code"))
        keep_c, start_c, bin_c, id_c = self._code_facts(codes)  # one past the end: a null code (dropped)
        keep, is_start, bin_code = keep_c[code_of], start_c[code_of], bin_c[code_of]
        kept = np.flatnonzero(keep)

        # An event's token: its code, `CODE#Qk` for a value of a binned code, `CODE=VALUE` for a coded text value.
        # Tokens are indexed into `strings`: the codes, the bin tokens, the coded values, then _STRUCTURE.
        binned = np.flatnonzero(keep & has_value & (bin_code >= 0))
        text_of, texts = _distinct(ev.get_column("text_value"))
        coded = np.flatnonzero(keep & ~has_value & self._coded_texts(texts)[text_of])
        token_of = code_of.astype(np.int64)
        strings, ids = list(codes), [id_c[:-1]]
        bin_no = self._bins.bins(bin_code[binned], value[binned])
        pairs = (
            (binned, zip(code_of[binned].tolist(), bin_no.tolist()), "{}#Q{}"),
            (coded, zip(code_of[coded].tolist(), [texts[i] for i in text_of[coded].tolist()]), "{}={}"),
        )
        for rows, keys, fmt in pairs:
            if len(rows):
                distinct: dict[tuple, int] = {}
                token_of[rows] = len(strings) + np.array([distinct.setdefault(k, len(distinct)) for k in keys])
                made = [fmt.format(codes[c], x) for c, x in distinct]
                strings += made
                ids.append(self._ids_of(made))
        structure_at = len(strings)
        strings += _STRUCTURE
        ids = np.concatenate([*ids, self._structure_ids])
        is_value = np.zeros(len(sid), dtype=bool)
        is_value[binned] = True

        # Visits: an encounter's timed events (any code) span it; ordered by start, end, encounter id per subject.
        enc_of, encounters = _distinct(ev.get_column("encounter_id"))
        enc_rank = np.zeros(len(encounters) + 1, dtype=np.int64)  # 0: no encounter
        enc_rank[sorted(range(len(encounters)), key=encounters.__getitem__)] = np.arange(1, len(encounters) + 1)
        enc = enc_rank[enc_of]
        # Anchor: a subject's birth, or its first event if earlier, else STATIC_ANCHOR.
        subject, row_subject = np.unique(sid, return_inverse=True)
        first = np.full(len(subject), _NO_TIME_MAX, dtype=np.int64)
        np.minimum.at(first, row_subject[timed], t[timed])
        birth, has_birth = _births(subj, subject)
        anchor = np.where(has_birth, np.minimum(birth, first), first)
        anchor = np.where(anchor == _NO_TIME_MAX, _STATIC_ANCHOR_US, anchor)
        visit = np.zeros(len(sid), dtype=np.int32)
        v_subject, v_start, v_end, v_no, v_prev = _visits(row_subject, t, enc, np.flatnonzero(timed & (enc > 0)), visit)

        # The table: events, then [CLS], intervals, [VS], [VE]; sorted into reading order below.
        k_timed = timed[kept]
        has_gap = v_prev != _NO_TIME
        has_gap[has_gap] = v_start[has_gap] >= v_prev[has_gap]
        interval = _interval_codes(v_start[has_gap] - v_prev[has_gap])
        n_cls, n_int, n_vis = len(subject), int(has_gap.sum()), len(v_subject)
        key_subject = np.concatenate([row_subject[kept], np.arange(n_cls), v_subject[has_gap], v_subject, v_subject])
        key_time = np.concatenate([np.where(k_timed, t[kept], anchor[row_subject[kept]]), anchor, v_start[has_gap],
                                   v_start, v_end])
        key_rank = np.concatenate([
            np.where(k_timed, np.where(is_start[kept], _RANK_START, _RANK_EVENT), _RANK_PREFIX),
            np.full(n_cls, _RANK_PREFIX), np.full(n_int, _RANK_INTERVAL), np.full(n_vis, _RANK_VS),
            np.full(n_vis, _RANK_VE),
        ])
        key_visit = np.concatenate([np.where(k_timed, visit[kept], 0), np.zeros(n_cls, np.int32), v_no[has_gap], v_no,
                                    v_no]).astype(np.int32)
        # Events keep their input order among equal keys; a subject's [CLS] comes before its static tokens.
        key_seq = np.concatenate([np.arange(1, len(kept) + 1), np.zeros(n_cls + n_int + 2 * n_vis, np.int64)])
        ttype = np.concatenate([
            np.where(k_timed, np.where(is_value[kept], TOKEN_TYPES["value"], TOKEN_TYPES["code"]),
                     TOKEN_TYPES["static"]),
            np.full(n_cls, TOKEN_TYPES["special"]), np.full(n_int, TOKEN_TYPES["interval"]),
            np.full(n_vis, TOKEN_TYPES["visit_start"]), np.full(n_vis, TOKEN_TYPES["visit_end"]),
        ]).astype(np.int8)
        string_of = np.concatenate([token_of[kept], structure_at + np.concatenate(
            [np.full(n_cls, 0), 3 + interval, np.full(n_vis, 1), np.full(n_vis, 2)])])
        # Every row's key (subject, time, rank, visit, seq) is distinct, so the order is fully determined; rank,
        # visit and seq fold into one int64 (fewer sort passes) wherever they fit.
        span_visit, span_seq = int(key_visit.max()) + 1, len(kept) + 1
        if 8 * span_visit * span_seq < 2**62:
            order = np.lexsort(((key_rank * span_visit + key_visit) * span_seq + key_seq, key_time, key_subject))
        else:
            order = np.lexsort((key_seq, key_visit, key_rank, key_time, key_subject))
        row_subject = key_subject[order]
        string_of = string_of[order]
        time = key_time[order]
        # As polars computed it: division by a float constant is multiplication by its reciprocal.
        age = np.where(has_birth[row_subject],
                       (time - birth[row_subject]).astype(np.float64) * (1.0 / _US_PER_YEAR), -1.0)
        columns = {
            "subject_id": pa.array(subject[row_subject]),
            "token_id": pa.array(ids[string_of].astype(np.int32)),
            "time": pa.array(time).view(pa.timestamp("us")),
            "age": pa.array(age.astype(np.float32)),
            "type": pa.array(ttype[order]),
            "visit": pa.array(key_visit[order]),
            "token": pa.array(strings, pa.large_string()).take(string_of),
        }
        # Series from Arrow arrays: polars' numpy path costs several times more per column at this size.
        return pl.DataFrame([pl.Series(name, values) for name, values in columns.items()])

    # Facts about a distinct code, text or token depend only on the tokenizer, which does not change: kept per
    # tokenizer (bounded) so a request computes only those of strings it has not met before.
    def _code_facts(self, codes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per code: kept (not a dropped prefix, not a visit end), a visit start, its index among the binned codes
        (-1: none), its id as a token; plus a last entry for a null code (dropped)."""
        memo = self._memo["code"]
        facts = [memo.get(c) for c in codes]
        missing = [c for c, f in zip(codes, facts) if f is None]
        if missing:
            cfg = self.config
            new = pl.DataFrame({"code": missing}, schema={"code": pl.String}).select(
                (_drop_expr(cfg) & ~pl.col("code").str.contains(cfg.visit_end_pattern)).fill_null(False),
                pl.col("code").str.contains(cfg.visit_start_pattern).fill_null(False),
            )
            kept, starts = new.to_series(0).to_list(), new.to_series(1).to_list()
            bins = [self._bins.index.get(c, -1) for c in missing]
            found = dict(zip(missing, zip(kept, starts, bins, self._ids_of(missing).tolist())))
            _remember(memo, found)
            facts = [f if f is not None else found[c] for c, f in zip(codes, facts)]
        facts.append((False, False, -1, self.token_to_id[UNK]))
        keep, start, bin_code, ids = zip(*facts)
        return np.array(keep, bool), np.array(start, bool), np.array(bin_code, np.int64), np.array(ids, np.int64)

    def _coded_texts(self, texts: list[str]) -> np.ndarray:
        """Per text value: whether it looks like a code (`coded_text_pattern`); plus False for a null text. Long
        texts (notes) are not kept."""
        memo = self._memo["text"]
        out = [memo.get(x) for x in texts]
        missing = [x for x, o in zip(texts, out) if o is None]
        if missing:
            hit = pl.Series(missing, dtype=pl.String).str.contains(self.config.coded_text_pattern).fill_null(False)
            found = dict(zip(missing, hit.to_list()))
            _remember(memo, {x: h for x, h in found.items() if len(x) <= 256})
            out = [o if o is not None else found[x] for x, o in zip(texts, out)]
        return np.array([*out, False], dtype=bool)

    def _ids_of(self, tokens: list[str]) -> np.ndarray:
        """Vocabulary ids: the token's, else a bin token's code's (`X#Q7` -> `X`), else [UNK]."""
        memo = self._memo["id"]
        out = [self.token_to_id.get(tok, memo.get(tok)) for tok in tokens]
        missing = [tok for tok, i in zip(tokens, out) if i is None]
        if missing:
            base = pl.Series(missing, dtype=pl.String).str.replace(r"#Q\d+$", "").to_list()
            unk = self.token_to_id[UNK]
            found = {tok: self.token_to_id.get(b, unk) for tok, b in zip(missing, base)}
            _remember(memo, found)
            out = [i if i is not None else found[tok] for tok, i in zip(tokens, out)]
        return np.array(out, dtype=np.int64)

    def decode(self, ids: list[int]) -> list[str]:
        return [self.vocab[i] if 0 <= i < len(self.vocab) else UNK for i in ids]


def _lists(name: str, values: pa.Array, offsets: np.ndarray) -> pl.Series:
    """A list column from flat values and int64 offsets (Arrow builds it without copying per row)."""
    return pl.Series(name, pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values))


def windows(tokens: pl.DataFrame, samples: pl.DataFrame, max_len: int) -> pl.DataFrame:
    """Attach to each sample (subject_id, prediction_time, ...) its tokens strictly before the prediction time.

    Left truncation keeps `[CLS]` and the static tokens, then the most recent history, to at most `max_len` tokens.
    Visit ids are renumbered so the first visit inside the window is 1. Adds list columns input_ids, token_time,
    token_age, token_type, token_visit and the int n_tokens; samples with no token before their time get n_tokens 0.
    `tokens` must be in `encode` order (sorted by subject, then reading order).
    """
    sid = _int64_column(tokens.get_column("subject_id"))
    t, _ = _times(tokens.get_column("time"))
    if not np.all((sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (t[1:] >= t[:-1]))):
        raise ValueError("windows: tokens must be in encode order (sorted by subject_id, then time)")
    ttype = tokens.get_column("type").to_numpy()
    s_sid = _int64_column(samples.get_column("subject_id"))
    pt, has_pt = _times(samples.get_column("prediction_time"))
    # A subject's tokens are rows first..last; (subject, time) is sorted, so one search over both finds how many of
    # them are strictly before the prediction time.
    base = np.searchsorted(sid, s_sid, "left")
    last = np.searchsorted(sid, s_sid, "right")
    key = np.dtype([("s", np.int64), ("t", np.int64)])
    tok_key, sample_key = np.empty(len(sid), key), np.empty(len(s_sid), key)
    tok_key["s"], tok_key["t"], sample_key["s"], sample_key["t"] = sid, t, s_sid, pt
    end = np.where(has_pt, np.searchsorted(tok_key, sample_key, "left") - base, 0)
    prefix = np.concatenate([[0], np.cumsum(np.isin(ttype, [TOKEN_TYPES["special"], TOKEN_TYPES["static"]]))])
    n_prefix = np.minimum(prefix[last] - prefix[base], max_len // 2)
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
    visit = tokens.get_column("visit").to_numpy()[flat].astype(np.int32)
    big = np.where(visit > 0, visit, np.iinfo(np.int32).max)
    nonempty = lengths > 0
    mins = np.full(len(lengths), 1, dtype=np.int64)
    if nonempty.any():
        mins[nonempty] = np.minimum.reduceat(big, offsets[:-1][nonempty])
    renumbered = np.where(visit > 0, visit - np.repeat(mins, lengths) + 1, 0).astype(np.int32)
    take = pa.array(flat)
    added = [
        *(_lists(name, _arrow(tokens.get_column(col)).take(take), offsets) for name, col in
          (("input_ids", "token_id"), ("token_time", "time"), ("token_age", "age"), ("token_type", "type"))),
        _lists("token_visit", pa.array(renumbered), offsets),
        pl.Series("n_tokens", pa.array(lengths.astype(np.int32))),
    ]
    replaced = [s.name for s in added if s.name in samples.columns]
    return (samples.drop(replaced) if replaced else samples).hstack(added)
