"""Finance JSON: kit's MEDS-style JSON documents (kit/predict/formats.py), plus text.

The finance vertical reads and answers the JSON every vertical gets (`{"subjects": [...], "events": [...]}` in,
prediction objects out), with one addition for the text task: an event with the code `TEXT` and the text in
`text_value` is read as the corpus reader reads a row of text (verticals/finance/text.py): one `TEXT/<word>` event
per word, one second apart from the event's time (NEWS_TIME when it has none), and an empty `LABEL/SENTIMENT` a day
later, which is never a token but puts the default prediction time where the task predicted in training.

The same documents saved as `.json` (or `.json.gz`) files are an input of the vertical's ingest, so `kit predict`,
`Predictor.predict` on a folder and `kit finetune --data` read them like statements and tables.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from kit.errors import KitError
from kit.events import EVENT_SCHEMA
from kit.predict.formats import BadInput, JsonFormat, SubjectData, meds_json_events
from verticals.finance.text import NEWS_TIME, SOURCE_TYPE, text_events

TEXT_CODE = "TEXT"
JSON_SUFFIXES = (".json", ".json.gz")


def expand_text(events: pl.DataFrame) -> pl.DataFrame:
    """`TEXT` events (text in text_value) as their words and label events; other events unchanged, in store order."""
    is_text = pl.col("code") == TEXT_CODE
    texts = events.filter(is_text)
    if texts.height == 0:
        return events
    rows: list[dict[str, Any]] = []
    for e in texts.iter_rows(named=True):
        made = text_events(e["text_value"] or "", e["time"] or NEWS_TIME)
        if not made:
            raise BadInput(422, f"events[{e['source_id']}]: a {TEXT_CODE} event needs words in text_value",
                           code="invalid")
        rows.extend({**e, "time": t, "code": code, "text_value": None, "source_type": SOURCE_TYPE} for t, code in made)
    words = pl.DataFrame(rows, schema=events.schema)
    out = pl.concat([events.filter(~is_text), words]).with_row_index("_i")
    return out.sort(["subject_id", "time", "_i"], nulls_last=False).drop("_i")


class FinanceJsonFormat(JsonFormat):
    """kit's JSON format with `TEXT` events read as words (the text task's input)."""

    def parse(self, doc: Any) -> SubjectData:
        sd = meds_json_events(doc)
        return SubjectData(events=expand_text(sd.events), subjects=sd.subjects, rejected=sd.rejected)


def is_json_document(path: Path) -> bool:
    """A .json/.json.gz file holding one object with `subjects` and `events` (camt oracles and other JSON are not)."""
    if not path.is_file() or not path.name.lower().endswith(JSON_SUFFIXES):
        return False
    try:
        doc = _load(path)
    except KitError:
        return True  # named like one and unreadable: the ingest reports why
    return isinstance(doc, dict) and "subjects" in doc and "events" in doc


def _load(path: Path) -> Any:
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        return orjson.loads(raw)
    except (OSError, EOFError, gzip.BadGzipFile, orjson.JSONDecodeError) as err:
        raise KitError(f"{path}: cannot read the JSON document ({err})") from None


def add_documents(store: Path, files: list[Path], *, fail_fast: bool = False) -> dict:
    """Append JSON documents to an event store directory being written: a `json-NNNNN` shard per document. A document
    that does not parse is quarantined whole with its reason (or stops the ingest with `fail_fast`)."""
    from verticals.finance.text import append_to_store

    fmt = FinanceJsonFormat()
    shards, subjects, quarantine, report = [], [], [], {}
    for i, f in enumerate(files):
        try:
            sd = fmt.parse(_load(f))
        except KitError as err:  # BadInput is a KitError: it names the record (events[3]: ...)
            if fail_fast:
                raise KitError(f"{f}: {err}") from None
            quarantine.append({"file": str(f), "position": "document", "resource_type": "json", "resource_id": None,
                               "reason": str(err)})
            report[str(f)] = {"subjects": 0, "events": 0, "quarantined": 1}
            continue
        # Provenance as the connector writes it: the file and the record (the event's index in the document).
        ev = sd.events.with_columns(
            pl.concat_str(pl.lit(f"{f.name}:events["), pl.col("source_id"), pl.lit("]")).alias("source_id"))
        shards.append((f"json-{i:05d}", ev.select(list(EVENT_SCHEMA))))
        subjects.append(sd.subjects)
        report[str(f)] = {"subjects": sd.subjects.height, "events": ev.height, "quarantined": 0}
    if shards:
        codes = (pl.concat([ev.select("code") for _, ev in shards]).unique().sort("code")
                 .with_columns(pl.col("code").alias("description"),
                               pl.col("code").str.split("/").list.first().alias("vocabulary")))
        append_to_store(store, shards, pl.concat(subjects), codes, quarantine)
    elif quarantine:
        append_to_store(store, [], pl.DataFrame(schema={"subject_id": pl.Int64, "source_subject_id": pl.String}),
                        pl.DataFrame(schema={"code": pl.String, "description": pl.String, "vocabulary": pl.String}),
                        quarantine)
    return report
