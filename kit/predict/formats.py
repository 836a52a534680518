"""What a prediction reads and writes on the wire, per vertical.

A vertical may offer formats through `prediction_formats()` (the clinical vertical: "fhir", Bundles in and
RiskAssessment out, from the FHIR connector). Every vertical gets "json": MEDS-style events in, plain JSON out:

    {"subjects": [{"subject_id": "A-17", "birth_time": "1970-01-01", "sex": "F"}],
     "events":   [{"subject_id": "A-17", "time": "2024-03-01T10:00:00", "code": "TXN/ATM", "numeric_value": -60.0}]}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import msgspec
import polars as pl

from kit import registry
from kit.errors import KitError
from kit.events import EVENT_SCHEMA, SUBJECT_SCHEMA, subject_id_for

JSON = "application/json"


class BadInput(KitError):
    """A request the predictor cannot score, with the HTTP status and issue code it answers with."""

    def __init__(self, status: int, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def decode_json(raw: bytes | bytearray | memoryview, what: str) -> Any:
    """A request document's JSON, decoded with msgspec: 20-25% faster than orjson on FHIR Bundles (bench/serve.py,
    the batch phase), which is a fifth of a served patient's CPU. The same values come out (tests compare both on the
    shipped data); a malformed document is a BadInput 400 naming the byte, never the content."""
    try:
        return _DECODER.decode(raw)
    except UnicodeDecodeError as err:
        raise BadInput(400, f"{what} is not valid UTF-8", code="structure") from None
    except RecursionError:
        raise BadInput(400, f"{what} is nested too deeply", code="structure") from None
    except msgspec.MsgspecError as err:  # DecodeError (malformed, truncated), ValidationError (a number out of range)
        raise BadInput(400, f"{what} is not valid JSON ({err})", code="structure") from None


_DECODER = msgspec.json.Decoder()


@dataclass
class SubjectData:
    """Events (EVENT_SCHEMA, in event-store order) and subjects (SUBJECT_SCHEMA) of one input."""

    events: pl.DataFrame
    subjects: pl.DataFrame
    rejected: list[dict[str, Any]] = field(default_factory=list)  # records not used: position, type, id, reason


class WireFormat(Protocol):
    name: str
    request_media_types: tuple[str, ...]
    response_media_type: str

    def check_media_type(self, content_type: str) -> None: ...
    def parse(self, doc: Any) -> SubjectData: ...
    def split_batch(self, doc: Any) -> list[Any]: ...
    def records(self, predictions: list, info: dict) -> list[dict[str, Any]]: ...
    def render(self, predictions: list, info: dict, rejected: list[dict] | None = None) -> Any: ...
    def render_batch(self, results: list, info: dict) -> Any: ...
    def error(self, err: BadInput) -> Any: ...


def _parse_time(value: Any, what: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadInput(422, f"{what}: expected an ISO 8601 date-time string", code="invalid")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadInput(422, f"{what}: {value[:40]!r} is not an ISO 8601 date-time", code="invalid") from None
    if t.tzinfo is not None:
        from datetime import timezone

        try:
            t = t.astimezone(timezone.utc).replace(tzinfo=None)
        except (OverflowError, ValueError):
            raise BadInput(422, f"{what}: {value[:40]!r} is out of range", code="invalid") from None
    return t


def meds_json_events(doc: Any) -> SubjectData:
    """The generic JSON input: {"subjects": [...], "events": [...]} with string subject keys."""
    if not isinstance(doc, dict):
        raise BadInput(400, "the request body is not a JSON object", code="structure")
    subjects, events = doc.get("subjects"), doc.get("events")
    if not isinstance(subjects, list) or not subjects:
        raise BadInput(422, "'subjects' must be a non-empty list of {subject_id, birth_time, sex}", code="required")
    if not isinstance(events, list):
        raise BadInput(422, "'events' must be a list of {subject_id, time, code, numeric_value, text_value}", code="required")
    srows = []
    for i, s in enumerate(subjects):
        if not isinstance(s, dict) or not isinstance(s.get("subject_id"), (str, int)) or isinstance(s.get("subject_id"), bool):
            raise BadInput(422, f"subjects[{i}]: needs a string subject_id", code="invalid")
        key = str(s["subject_id"])
        srows.append({"subject_id": subject_id_for(key), "source_subject_id": key,
                      "birth_time": _parse_time(s.get("birth_time"), f"subjects[{i}].birth_time"),
                      "sex": str(s["sex"]) if s.get("sex") is not None else None,
                      "death_time": _parse_time(s.get("death_time"), f"subjects[{i}].death_time")})
    known = {r["source_subject_id"] for r in srows}
    erows = []
    for i, e in enumerate(events):
        if not isinstance(e, dict):
            raise BadInput(422, f"events[{i}]: not an object", code="invalid")
        key, code = e.get("subject_id"), e.get("code")
        if str(key) not in known or isinstance(key, (bool, dict, list)):
            raise BadInput(422, f"events[{i}]: subject_id is not one of the request's subjects", code="invalid")
        if not isinstance(code, str) or not code:
            raise BadInput(422, f"events[{i}]: needs a code", code="invalid")
        value = e.get("numeric_value")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise BadInput(422, f"events[{i}].numeric_value: not a number", code="invalid")
        text = e.get("text_value")
        erows.append({"subject_id": subject_id_for(str(key)), "time": _parse_time(e.get("time"), f"events[{i}].time"),
                      "code": code, "numeric_value": value, "text_value": text if isinstance(text, str) else None,
                      "unit": None, "encounter_id": e.get("encounter_id") if isinstance(e.get("encounter_id"), str) else None,
                      "source_type": "event", "source_id": str(i)})
    ev = pl.DataFrame(erows, schema={**EVENT_SCHEMA, "numeric_value": pl.Float64}).cast(EVENT_SCHEMA)
    # Event-store order: static events (null time) first, then by time, then input order.
    ev = ev.with_row_index("_i").sort(["subject_id", "time", "_i"], nulls_last=False).drop("_i")
    return SubjectData(events=ev, subjects=pl.DataFrame(srows, schema=SUBJECT_SCHEMA))


class JsonFormat:
    """Plain JSON: MEDS-style events in, prediction objects out (every vertical)."""

    name = "json"
    request_media_types = (JSON,)
    response_media_type = JSON

    def check_media_type(self, content_type: str) -> None:
        main = (content_type or "").partition(";")[0].strip().lower()
        if main != JSON and not main.endswith("+json"):
            raise BadInput(415, f"Content-Type {main or '(none)'!r} is not accepted; send {JSON}", code="not-supported")

    def parse(self, doc: Any) -> SubjectData:
        return meds_json_events(doc)

    def split_batch(self, doc: Any) -> list[Any]:
        if not isinstance(doc, list):
            raise BadInput(400, "a batch is a JSON array of request objects", code="structure")
        return doc

    def records(self, predictions: list, info: dict) -> list[dict[str, Any]]:
        return [p.to_dict() for p in predictions]

    def render(self, predictions: list, info: dict, rejected: list[dict] | None = None) -> Any:
        out = {"bundle": info, "predictions": self.records(predictions, info)}
        if rejected:  # records or subjects of the request that were not used, by id and reason (never content)
            out["not_used"] = [{"id": r.get("resource_id"), "reason": r["reason"]} for r in rejected]
        return out

    def render_batch(self, results: list, info: dict) -> Any:
        out = []
        for res in results:
            if isinstance(res, BadInput):
                out.append({"status": res.status, "error": self.error(res)["error"]})
            else:
                out.append({"status": 200, **{k: v for k, v in self.render(res[0], info, res[1]).items() if k != "bundle"}})
        return {"bundle": info, "results": out}

    def error(self, err: BadInput) -> Any:
        return {"error": {"status": err.status, "code": err.code, "message": str(err)}}


def formats_for(vertical_name: str) -> dict[str, WireFormat]:
    """The vertical's own formats (found through the registry), then "json"."""
    out: dict[str, WireFormat] = {}
    try:
        vertical = registry.vertical(vertical_name)
    except KitError:
        vertical = None
    offered = getattr(vertical, "prediction_formats", None)
    if callable(offered):
        out.update(offered())
    out.setdefault("json", JsonFormat())
    return out


def get_format(vertical_name: str, name: str | None = None) -> WireFormat:
    """A named format, or the vertical's first (its native one) when `name` is None."""
    formats = formats_for(vertical_name)
    if name is None:
        return next(iter(formats.values()))
    if name not in formats:
        raise KitError(f"format {name!r} is not offered for the {vertical_name} vertical; choose one of: {', '.join(formats)}")
    return formats[name]
