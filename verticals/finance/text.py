"""A labelled text corpus (financial news sentiment) as events, so the text task rides the same path as the others.

A CSV with the header `text,label` (the shared twitter-financial-news layout: label 0 bearish, 1 bullish,
2 neutral) becomes, per row, one subject `news:<file name>:<row>` (1-based data row) with

* one `TEXT/<word>` event per word, in reading order, one second apart from NEWS_TIME (the corpus has no dates);
* one `LABEL/SENTIMENT` event a day later: `text_value` = the raw label cell, `numeric_value` = its number.

A CSV with the header `text` alone (texts to score) gets the same events with an empty label event: it is never a
token (labels are targets only) but it puts a subject's default prediction time a day after its text, where the task
predicts in training (`text_events`, also used for a `TEXT` event of a JSON prediction request).

Words are the corpus's lower-cased words, tickers (`$tsla`) and punctuation; links become `<url>` and numbers
`<num>`. Which words enter the vocabulary is decided by the kit tokenizer on the train split only (`min_count`):
that is the text tokenizer "trained on the corpus", and unknown words read as `[UNK]`.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import polars as pl

from kit.errors import KitError
from kit.events import conform_events, subject_id_for

HEADER = ["text", "label"]
HEADERS = (HEADER, ["text"])  # labelled, or texts to score
SOURCE_TYPE = "news-sentiment"
TEXT_PREFIX = "TEXT/"
LABEL_CODE = "LABEL/SENTIMENT"
LABEL_NAMES = {"0": "bearish", "1": "bullish", "2": "neutral"}
NEWS_TIME = datetime(2022, 1, 1)
MAX_WORDS = 96  # a tweet is short; this caps a pathological row

_URL = re.compile(r"https?://\S+|www\.\S+")
_WORD = re.compile(r"\$?[a-z][a-z0-9&'._-]*[a-z0-9]|\$?[a-z]|\d[\d.,:/]*%?|[^\s\w]")
_NUM = re.compile(r"^\d[\d.,:/]*%?$")


def words(text: str) -> list[str]:
    """The word tokens of one text (lower-cased; links and numbers replaced by placeholders)."""
    out: list[str] = []
    for k, part in enumerate(_URL.split(text.lower())):
        if k:
            out.append("<url>")
        out.extend("<num>" if _NUM.match(w) else w for w in _WORD.findall(part))
    return out[:MAX_WORDS]


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else open(path, encoding="utf-8", newline="")


def text_events(text: str, start: datetime) -> list[tuple[datetime, str]]:
    """(time, code) of one text's events: its words one second apart from `start`, then the label a day later."""
    out = [(start + timedelta(seconds=i), TEXT_PREFIX + w) for i, w in enumerate(words(text))]
    return out + [(start + timedelta(days=1), LABEL_CODE)] if out else []


def is_text_corpus(path: Path) -> bool:
    """True for a CSV whose header is exactly `text,label` (or `text`: texts to score)."""
    if not path.is_file() or not (path.name.endswith(".csv") or path.name.endswith(".csv.gz")):
        return False
    try:
        with _open(path) as fh:
            return next(csv.reader(fh), None) in HEADERS
    except (OSError, UnicodeDecodeError, csv.Error):
        return False


def read_corpus(path: Path) -> tuple[pl.DataFrame, pl.DataFrame, list[dict]]:
    """Events and subjects of one corpus file, and the quarantined rows (file, position, reason)."""
    rows_ev: dict[str, list] = {k: [] for k in ("subject_id", "time", "code", "numeric_value", "text_value", "source_id")}
    subjects: dict[str, list] = {"subject_id": [], "source_subject_id": []}
    quarantine: list[dict] = []
    with _open(path) as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header not in HEADERS:
            raise KitError(f"{path}: not a text corpus (header {header!r}, expected {','.join(HEADER)} or text)")
        for n, rec in enumerate(reader, start=1):
            where = f"{path.name}:{n}"
            if len(header) == 1 and len(rec) > 1:
                rec = [",".join(rec)]  # texts to score, one a line: an unquoted comma is part of the text
            if len(rec) != len(header):
                quarantine.append({"file": str(path), "position": f"row {n}",
                                   "reason": f"{len(rec)} cells, expected {len(header)}"})
                continue
            text, raw = rec[0], (rec[1].strip() if len(rec) > 1 else None)
            if raw is not None and raw not in LABEL_NAMES:
                quarantine.append({"file": str(path), "position": f"row {n}",
                                   "reason": f"label {raw!r} is not one of {', '.join(LABEL_NAMES)}"})
                continue
            events = text_events(text, NEWS_TIME)
            if not events:
                quarantine.append({"file": str(path), "position": f"row {n}", "reason": "no words in text"})
                continue
            key = f"news:{path.name}:{n}"
            sid = subject_id_for(key)
            subjects["subject_id"].append(sid)
            subjects["source_subject_id"].append(key)
            for t, code in events:
                rows_ev["subject_id"].append(sid)
                rows_ev["time"].append(t)
                rows_ev["code"].append(code)
                is_label = code == LABEL_CODE and raw is not None
                rows_ev["numeric_value"].append(float(raw) if is_label else None)
                rows_ev["text_value"].append(raw if is_label else None)
                rows_ev["source_id"].append(where)
    ev = pl.DataFrame(rows_ev, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String,
                                       "numeric_value": pl.Float32, "text_value": pl.String, "source_id": pl.String})
    ev = conform_events(ev.with_columns(pl.lit(SOURCE_TYPE).alias("source_type")))
    subj = pl.DataFrame(subjects, schema={"subject_id": pl.Int64, "source_subject_id": pl.String})
    return ev, subj, quarantine


def add_corpora(store: Path, files: list[Path]) -> dict:
    """Append text corpora to an event store directory being written (`store` is not yet published): a `text-NNNNN`
    event shard per file, their subjects and codes appended to the metadata tables. Returns counts per file."""
    report: dict = {}
    shards, all_subj, all_q = [], [], []
    for i, f in enumerate(files):
        ev, subj, q = read_corpus(f)
        shards.append((f"text-{i:05d}", ev))
        all_subj.append(subj)
        all_q.extend({**r, "resource_type": "text", "resource_id": None} for r in q)
        counts = ev.filter(pl.col("code") == LABEL_CODE).group_by("text_value").len().sort("text_value", nulls_last=True)
        report[str(f)] = {"rows": subj.height, "quarantined": len(q),
                          "labels": {LABEL_NAMES.get(k, "unlabelled"): n for k, n in counts.iter_rows()}}
    codes = pl.concat([ev.select("code") for _, ev in shards]).unique().sort("code").with_columns(
        pl.when(pl.col("code") == LABEL_CODE).then(pl.lit("news sentiment label (target only)"))
        .otherwise(pl.col("code").str.strip_prefix(TEXT_PREFIX)).alias("description"),
        pl.lit("TEXT").alias("vocabulary"))
    append_to_store(store, shards, pl.concat(all_subj), codes, all_q)
    return report


def append_to_store(store: Path, shards: list[tuple[str, pl.DataFrame]], subjects: pl.DataFrame, codes: pl.DataFrame,
                    quarantine: list[dict]) -> None:
    """Add event shards (name, events) to an event store directory being written, with their subjects (subject_id,
    source_subject_id and any of birth_time, sex, death_time), codes (code, description, vocabulary) and
    quarantined records. A subject or code already in the store keeps its first row."""
    from kit.events import CODES_FILE, DATA_DIR, QUARANTINE_FILE, SUBJECTS_FILE

    data = store / DATA_DIR
    data.mkdir(parents=True, exist_ok=True)
    existing = sorted(data.glob("*.parquet"))
    # The connector's shards may carry extra columns (finance: amount, counterparty); new shards get them as nulls.
    template = pl.read_parquet_schema(existing[0]) if existing else None
    for name, ev in shards:
        ev = ev.sort("subject_id", "time", maintain_order=True, nulls_last=False)
        if template is not None:
            ev = ev.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in template.items() if c not in ev.columns])
            ev = ev.select(list(template))
        ev.write_parquet(data / f"{name}.parquet", compression="zstd", statistics=True)
    subjects_path, codes_path = store / SUBJECTS_FILE, store / CODES_FILE
    subjects_path.parent.mkdir(parents=True, exist_ok=True)
    new_subj = subjects.with_columns([pl.lit(None, dtype=t).alias(c) for c, t in
                                      {"birth_time": pl.Datetime("us"), "sex": pl.String, "death_time": pl.Datetime("us")}.items()
                                      if c not in subjects.columns])
    if subjects_path.exists():
        old = pl.read_parquet(subjects_path)
        new_subj = pl.concat([old, new_subj.select(old.columns)], how="vertical_relaxed")
    new_subj.unique("subject_id", keep="first", maintain_order=True).write_parquet(subjects_path)
    codes = codes.with_columns(pl.lit([], dtype=pl.List(pl.String)).alias("parent_codes"))
    if codes_path.exists():
        old = pl.read_parquet(codes_path)
        codes = pl.concat([old, codes.select(old.columns)], how="vertical_relaxed").unique("code", keep="first", maintain_order=True)
    codes.write_parquet(codes_path)
    if quarantine:
        with open(store / QUARANTINE_FILE, "a") as fh:
            for q in quarantine:
                fh.write(json.dumps(q) + "\n")
