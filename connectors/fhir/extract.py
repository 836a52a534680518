"""Fast-path field extraction: one FHIR resource (a dict from orjson) -> event rows.

Each `extract_<type>` function reads only the fields the event mapping needs (docs/event-store.md) and appends
rows to an `EventColumns`. Anything it cannot map raises `Unmappable` with a reason that names fields, never values,
so the caller can quarantine the record without leaking patient data.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from kit.events import BIRTH_CODE, DEATH_CODE, subject_id_for

VOCAB_BY_SYSTEM = {
    "http://snomed.info/sct": "SNOMED",
    "http://loinc.org": "LOINC",
    "http://www.nlm.nih.gov/research/umls/rxnorm": "RXNORM",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD10CM",
    "http://hl7.org/fhir/sid/icd-10": "ICD10",
    "http://hl7.org/fhir/sid/cvx": "CVX",
    "http://www.ama-assn.org/go/cpt": "CPT",
    "http://unitsofmeasure.org": "UCUM",
    "http://hl7.org/fhir/sid/ndc": "NDC",
}

US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race"
US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity"

# Encounter.class (v3 ActCode, or the plain words some exporters write) -> our class name.
ENCOUNTER_CLASS = {
    "IMP": "INPATIENT",
    "ACUTE": "INPATIENT",
    "NONAC": "INPATIENT",
    "inpatient": "INPATIENT",
    "EMER": "EMERGENCY",
    "emergency": "EMERGENCY",
    "AMB": "AMBULATORY",
    "ambulatory": "AMBULATORY",
    "outpatient": "AMBULATORY",
    "wellness": "WELLNESS",
    "urgentcare": "URGENTCARE",
    "HH": "HOME",
    "home": "HOME",
    "VR": "VIRTUAL",
    "virtual": "VIRTUAL",
}
# Synthea writes wellness and urgent-care visits as class AMB; the Encounter.type (SNOMED) tells them apart.
WELLNESS_TYPES = frozenset({"410620009", "162673000", "185349003", "185346005", "444971000124105"})
URGENTCARE_TYPES = frozenset({"702927004"})

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_US = timedelta(microseconds=1)
_DATE_RE = re.compile(
    r"^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?(Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


class Unmappable(Exception):
    """A resource the fast path cannot turn into events; the message is the quarantine reason."""


EVENT_FIELDS = (
    "subject_id",
    "time",
    "code",
    "numeric_value",
    "text_value",
    "unit",
    "encounter_id",
    "source_type",
    "source_id",
    # Internal: which input record an event came from, for dedup and a total, deterministic sort order.
    "file_index",
    "position",
    "seq",
    "updated",
)


class EventColumns:
    """Event rows as tuples in EVENT_FIELDS order; `columns()` transposes them for a polars frame."""

    __slots__ = ("rows", "text_bytes")

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        self.text_bytes = 0  # notes can be large; the caller spills on this as well as on row count

    def __len__(self) -> int:
        return len(self.rows)

    def truncate(self, n: int) -> None:
        del self.rows[n:]

    def columns(self) -> dict[str, list]:
        if not self.rows:
            return {name: [] for name in EVENT_FIELDS}
        return {name: list(col) for name, col in zip(EVENT_FIELDS, zip(*self.rows))}


@dataclass(slots=True)
class ResourceContext:
    """Where a resource sits: its input record and how references resolve in its Bundle or export."""

    file_index: int
    position: int
    refs: dict[str, str]  # Bundle fullUrl -> resource id
    medications: dict[str, tuple[str, str | None]]  # "Medication/<id>" or fullUrl -> (code, display)
    descriptions: dict[str, str]  # code -> display, first seen wins


@dataclass
class PatientRow:
    source_subject_id: str
    birth_time: int | None
    sex: str | None
    death_time: int | None
    updated: int | None
    file_index: int
    position: int


# ---------------------------------------------------------------------------------------------- dates


_time_cache: dict[str, int] = {}


def parse_time(value: object, what: str) -> int:
    """FHIR date/dateTime/instant -> microseconds since the epoch, UTC.

    Rules (docs/event-store.md): an offset converts to UTC; no offset means UTC; a date means its midnight;
    a partial date (2019-05, 2019) means the first day of that month or year.
    """
    if not isinstance(value, str):
        raise Unmappable(f"{what} is not a date string")
    hit = _time_cache.get(value)
    if hit is not None:
        return hit
    m = _DATE_RE.match(value)
    if m is None:
        raise Unmappable(f"unparseable date in {what}")
    y, mo, d, hh, mi, ss, frac, tz = m.groups()
    try:
        if tz is None or tz == "Z":
            tzinfo = timezone.utc
        else:
            sign = 1 if tz[0] == "+" else -1
            tzinfo = timezone(sign * timedelta(hours=int(tz[1:3]), minutes=int(tz[4:6])))
        us = int((frac or "0")[:6].ljust(6, "0"))
        dt = datetime(
            int(y), int(mo or 1), int(d or 1), int(hh or 0), int(mi or 0), int(ss or 0), us, tzinfo=tzinfo
        )
    except ValueError:
        raise Unmappable(f"unparseable date in {what}") from None
    out = (dt - _EPOCH) // _US
    if len(_time_cache) > 200_000:
        _time_cache.clear()
    _time_cache[value] = out
    return out


def first_time(r: dict, fields: tuple[str, ...], what: str) -> int:
    """The first present field among `fields` ('a.b' reads r['a']['b']), parsed."""
    for f in fields:
        if "." in f:
            head, tail = f.split(".", 1)
            v = r.get(head)
            v = v.get(tail) if isinstance(v, dict) else None
        else:
            v = r.get(f)
        if v is not None:
            hit = _time_cache.get(v) if isinstance(v, str) else None  # a repeated time: no message to build
            return hit if hit is not None else parse_time(v, f"{what}.{f}")
    raise Unmappable(f"no event time ({what}.{' / '.join(fields)} all absent)")


# ---------------------------------------------------------------------------------------------- codes


def coding_code(coding: object) -> tuple[str, str | None] | None:
    if not isinstance(coding, dict):
        return None
    code = coding.get("code")
    if not isinstance(code, str) or not code:
        return None
    system = coding.get("system")
    vocab = VOCAB_BY_SYSTEM.get(system) if isinstance(system, str) else None
    if vocab is not None:
        out = f"{vocab}/{code}"
    elif isinstance(system, str) and system:
        out = f"{system}|{code}"
    else:
        out = f"UNKNOWN|{code}"
    display = coding.get("display")
    return out, display if isinstance(display, str) else None


def concept_code(cc: object, what: str, ctx: ResourceContext) -> str:
    """A CodeableConcept -> VOCAB/CODE: the first coding with a known system wins, else the first coding."""
    codings = cc.get("coding") if isinstance(cc, dict) else None
    if not isinstance(codings, list) or not codings:
        raise Unmappable(f"{what} has no coding")
    first = codings[0]
    system = first.get("system") if isinstance(first, dict) else None
    vocab = VOCAB_BY_SYSTEM.get(system) if isinstance(system, str) else None
    code = first.get("code") if vocab is not None else None
    if isinstance(code, str) and code:  # the usual case, read once: the first coding has a known system
        code = f"{vocab}/{code}"
        display = first.get("display")
        if not isinstance(display, str):
            display = None
    else:
        chosen = None
        for c in codings:
            if isinstance(c, dict) and c.get("system") in VOCAB_BY_SYSTEM and c.get("code"):
                chosen = c
                break
        got = coding_code(chosen if chosen is not None else first)
        if got is None:
            raise Unmappable(f"{what} has no usable coding code")
        code, display = got
    if display is None and isinstance(cc.get("text"), str):
        display = cc["text"]
    if display is not None:
        ctx.descriptions.setdefault(code, display)
    return code


# ---------------------------------------------------------------------------------------------- references


def reference_id(ref: object, ctx: ResourceContext, expect: str | None = None, what: str = "reference") -> str:
    """A Reference -> the target's resource id (Bundle fullUrl, urn:uuid:<id>, Type/<id> or absolute URL)."""
    s = ref.get("reference") if isinstance(ref, dict) else None
    if not isinstance(s, str) or not s:
        raise Unmappable(f"{what} has no reference")
    hit = ctx.refs.get(s)
    if hit is not None:
        return hit
    if s.startswith("urn:uuid:"):
        return s[9:]
    if s.startswith("#") or "?" in s:
        raise Unmappable(f"{what} is not a literal resource reference")
    parts = s.split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2 or not parts[-1]:
        raise Unmappable(f"{what} is not a resolvable reference")
    if expect is not None and parts[-2] != expect:
        raise Unmappable(f"{what} points to {parts[-2]}, not {expect}")
    return parts[-1]


_subject_cache: dict[str, int] = {}


def cached_subject_id(patient_id: str) -> int:
    """subject_id_for with a cache: every resource of a patient names the same id, and hashing is not free."""
    sid = _subject_cache.get(patient_id)
    if sid is None:
        if len(_subject_cache) > 500_000:
            _subject_cache.clear()
        sid = _subject_cache[patient_id] = subject_id_for(patient_id)
    return sid


def subject_of(r: dict, ctx: ResourceContext, key: str = "subject") -> int:
    if key not in r:
        raise Unmappable(f"missing subject reference ({key})")
    ref = r[key]
    # The usual case inline (a Bundle's fullUrl, an id seen before); anything else goes through reference_id.
    s = ref.get("reference") if isinstance(ref, dict) else None
    pid = ctx.refs.get(s) if isinstance(s, str) and s else None
    if pid is None:
        pid = reference_id(ref, ctx, "Patient", key)
    sid = _subject_cache.get(pid)
    return sid if sid is not None else cached_subject_id(pid)


def optional_encounter(ref: object, ctx: ResourceContext) -> str | None:
    if isinstance(ref, list):
        ref = ref[0] if ref else None
    if ref is None:
        return None
    s = ref.get("reference") if isinstance(ref, dict) else None
    hit = ctx.refs.get(s) if isinstance(s, str) and s else None  # the usual case inline, as in subject_of
    if hit is not None:
        return hit
    try:
        return reference_id(ref, ctx, "Encounter", "encounter")
    except Unmappable:
        return None


# ---------------------------------------------------------------------------------------------- emit


class Emitter:
    """Appends the rows of one resource; `rollback` undoes them if the resource turns out unmappable."""

    __slots__ = ("cols", "rows", "rtype", "rid", "ctx", "updated", "start", "seq")

    def __init__(self, cols: EventColumns, rtype: str, rid: str, ctx: ResourceContext, updated: int | None):
        self.cols, self.rtype, self.rid, self.ctx, self.updated = cols, rtype, rid, ctx, updated
        self.rows = cols.rows
        self.start = len(self.rows)
        self.seq = 0

    def __call__(self, subject, time, code, numeric=None, text=None, unit=None, encounter=None) -> None:
        ctx = self.ctx
        if text is not None:
            self.cols.text_bytes += len(text)
        self.rows.append(
            (subject, time, code, numeric, text, unit, encounter, self.rtype, self.rid,
             ctx.file_index, ctx.position, self.seq, self.updated)
        )
        self.seq += 1

    def rollback(self) -> None:
        self.cols.truncate(self.start)


def _number(v: object, what: str) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise Unmappable(f"{what} is not a number")
    return float(v)


def _quantity(q: object, what: str, field: str = "") -> tuple[float | None, str | None]:
    """`what` + `field` names the Quantity in a reason; joined only when there is one to give."""
    if not isinstance(q, dict):
        raise Unmappable(f"{what}{field} is not a Quantity")
    unit = q.get("code") or q.get("unit") or q.get("currency")
    v = q.get("value")
    if v.__class__ is not float:  # a JSON decimal is a float already
        v = _number(v, f"{what}{field}.value")
    return v, unit if isinstance(unit, str) else None


def _money(m: object, what: str) -> tuple[float | None, str | None]:
    if not isinstance(m, dict):
        raise Unmappable(f"{what} is not Money")
    cur = m.get("currency")
    return _number(m.get("value"), f"{what}.value"), cur if isinstance(cur, str) else None


# ---------------------------------------------------------------------------------------------- per type


def extract_patient(r: dict, emit: Emitter, ctx: ResourceContext) -> PatientRow:
    sid = subject_id_for(emit.rid)
    gender = r.get("gender")
    if gender is not None and not isinstance(gender, str):
        raise Unmappable("Patient.gender is not a code")
    birth = parse_time(r["birthDate"], "Patient.birthDate") if r.get("birthDate") is not None else None
    death = None
    if r.get("deceasedDateTime") is not None:
        death = parse_time(r["deceasedDateTime"], "Patient.deceasedDateTime")
    if gender:
        emit(sid, None, f"GENDER/{gender}")
    for ext in r.get("extension") or ():
        if not isinstance(ext, dict):
            continue
        url = ext.get("url")
        if url == US_CORE_RACE or url == US_CORE_ETHNICITY:
            prefix = "RACE" if url == US_CORE_RACE else "ETHNICITY"
            for sub in ext.get("extension") or ():
                if isinstance(sub, dict) and sub.get("url") == "ombCategory":
                    vc = sub.get("valueCoding") or {}
                    value = vc.get("code") or vc.get("display")
                    if isinstance(value, str) and value:
                        code = f"{prefix}/{value}"
                        emit(sid, None, code)
                        if isinstance(vc.get("display"), str):
                            ctx.descriptions.setdefault(code, vc["display"])
    if birth is not None:
        emit(sid, birth, BIRTH_CODE)
    if death is not None:
        emit(sid, death, DEATH_CODE)
    return PatientRow(emit.rid, birth, gender, death, emit.updated, ctx.file_index, ctx.position)


def encounter_class(r: dict, type_code: str | None) -> str:
    cls = r.get("class")
    if isinstance(cls, list):  # R5 shape; validation names it, this keeps the fast path from crashing
        raise Unmappable("Encounter.class is a list (R5 shape)")
    raw = cls.get("code") if isinstance(cls, dict) else None
    name = ENCOUNTER_CLASS.get(raw, "OTHER") if isinstance(raw, str) else "OTHER"
    if name == "AMBULATORY" and type_code is not None:
        bare = type_code.split("/", 1)[-1]
        if bare in WELLNESS_TYPES:
            return "WELLNESS"
        if bare in URGENTCARE_TYPES:
            return "URGENTCARE"
    return name


def extract_encounter(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    period = r.get("period")
    if not isinstance(period, dict) or period.get("start") is None:
        raise Unmappable("no event time (Encounter.period.start absent)")
    start = parse_time(period["start"], "Encounter.period.start")
    end = parse_time(period["end"], "Encounter.period.end") if period.get("end") is not None else None
    type_code = None
    types = r.get("type")
    if isinstance(types, list) and types:
        try:
            type_code = concept_code(types[0], "Encounter.type", ctx)
        except Unmappable:
            type_code = None  # the type is extra detail; a text-only type does not cost the encounter
    cls = encounter_class(r, type_code)
    enc = emit.rid
    emit(sid, start, f"ENCOUNTER/{cls}/START", encounter=enc)
    if type_code is not None:
        emit(sid, start, type_code, encounter=enc)
    if end is not None:
        emit(sid, end, f"ENCOUNTER/{cls}/END", encounter=enc)


def extract_condition(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = concept_code(r.get("code"), "Condition.code", ctx)
    enc = optional_encounter(r.get("encounter"), ctx)
    t = first_time(r, ("onsetDateTime", "onsetPeriod.start", "recordedDate"), "Condition")
    emit(sid, t, code, encounter=enc)
    abate = r.get("abatementDateTime")
    if abate is None and isinstance(r.get("abatementPeriod"), dict):
        abate = r["abatementPeriod"].get("start")
    if abate is not None:
        emit(sid, parse_time(abate, "Condition.abatementDateTime"), f"RESOLVED/{code}", encounter=enc)


def _observation_value(holder: dict, ctx: ResourceContext, what: str):
    """(numeric, text, unit) of an Observation or component value[x]."""
    if "valueQuantity" in holder:
        num, unit = _quantity(holder["valueQuantity"], what, ".valueQuantity")
        return num, None, unit
    if "valueCodeableConcept" in holder:
        return None, concept_code(holder["valueCodeableConcept"], f"{what}.valueCodeableConcept", ctx), None
    if "valueString" in holder:
        v = holder["valueString"]
        if not isinstance(v, str):
            raise Unmappable(f"{what}.valueString is not a string")
        return None, v, None
    if "valueBoolean" in holder:
        v = holder["valueBoolean"]
        if not isinstance(v, bool):
            raise Unmappable(f"{what}.valueBoolean is not a boolean")
        return None, "true" if v else "false", None
    if "valueInteger" in holder:
        return _number(holder["valueInteger"], f"{what}.valueInteger"), None, None
    if "valueDateTime" in holder:
        parse_time(holder["valueDateTime"], f"{what}.valueDateTime")
        return None, holder["valueDateTime"], None
    return None, None, None


def extract_observation(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = concept_code(r.get("code"), "Observation.code", ctx)
    enc = optional_encounter(r.get("encounter"), ctx)
    t = first_time(r, ("effectiveDateTime", "effectivePeriod.start", "effectiveInstant", "issued"), "Observation")
    num, text, unit = _observation_value(r, ctx, "Observation")
    components = r.get("component")
    has_value = num is not None or text is not None
    if has_value or not components:
        emit(sid, t, code, num, text, unit, enc)
    if components:
        if not isinstance(components, list):
            raise Unmappable("Observation.component is not a list")
        for i, comp in enumerate(components):
            if not isinstance(comp, dict):
                raise Unmappable(f"Observation.component[{i}] is not an object")
            ccode = concept_code(comp.get("code"), f"Observation.component[{i}].code", ctx)
            cnum, ctext, cunit = _observation_value(comp, ctx, f"Observation.component[{i}]")
            emit(sid, t, ccode, cnum, ctext, cunit, enc)


def _medication_code(r: dict, ctx: ResourceContext, what: str) -> str:
    if "medicationCodeableConcept" in r:
        return concept_code(r["medicationCodeableConcept"], f"{what}.medicationCodeableConcept", ctx)
    ref = r.get("medicationReference")
    if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
        s = ref["reference"]
        if s.startswith("#"):
            for c in r.get("contained") or ():
                if isinstance(c, dict) and c.get("resourceType") == "Medication" and c.get("id") == s[1:]:
                    return concept_code(c.get("code"), f"{what}.contained Medication.code", ctx)
        hit = ctx.medications.get(s)
        if hit is None:
            try:
                hit = ctx.medications.get(f"Medication/{reference_id(ref, ctx, 'Medication', 'medicationReference')}")
            except Unmappable:
                hit = None
        if hit is not None:
            code, display = hit
            if display is not None:
                ctx.descriptions.setdefault(code, display)
            return code
        raise Unmappable(f"{what}.medicationReference does not resolve to a Medication in the input")
    raise Unmappable(f"{what} has no medication[x]")


def extract_medication_request(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = _medication_code(r, ctx, "MedicationRequest")
    t = first_time(r, ("authoredOn",), "MedicationRequest")
    emit(sid, t, code, encounter=optional_encounter(r.get("encounter"), ctx))


def extract_medication_administration(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = _medication_code(r, ctx, "MedicationAdministration")
    t = first_time(r, ("effectiveDateTime", "effectivePeriod.start"), "MedicationAdministration")
    emit(sid, t, code, encounter=optional_encounter(r.get("context"), ctx))


def extract_procedure(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = concept_code(r.get("code"), "Procedure.code", ctx)
    t = first_time(r, ("performedDateTime", "performedPeriod.start"), "Procedure")
    emit(sid, t, code, encounter=optional_encounter(r.get("encounter"), ctx))


def extract_immunization(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx, "patient")
    code = concept_code(r.get("vaccineCode"), "Immunization.vaccineCode", ctx)
    t = first_time(r, ("occurrenceDateTime", "recorded"), "Immunization")
    emit(sid, t, code, encounter=optional_encounter(r.get("encounter"), ctx))


def extract_allergy(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx, "patient")
    code = concept_code(r.get("code"), "AllergyIntolerance.code", ctx)
    t = first_time(r, ("recordedDate", "onsetDateTime", "onsetPeriod.start"), "AllergyIntolerance")
    emit(sid, t, code, encounter=optional_encounter(r.get("encounter"), ctx))


def _decode_attachment(att: object) -> str | None:
    """Inline text attachments are decoded; other content types (PDF, images) and URLs give None."""
    if not isinstance(att, dict) or not isinstance(att.get("data"), str):
        return None
    ctype = att.get("contentType") or "text/plain"
    if not isinstance(ctype, str) or not ctype.startswith("text/"):
        return None
    try:
        raw = base64.b64decode(att["data"], validate=True)
    except (binascii.Error, ValueError):
        raise Unmappable("attachment.data is not valid base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def extract_diagnostic_report(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = concept_code(r.get("code"), "DiagnosticReport.code", ctx)
    t = first_time(r, ("effectiveDateTime", "effectivePeriod.start", "issued"), "DiagnosticReport")
    text = None
    for form in r.get("presentedForm") or ():
        text = _decode_attachment(form)
        if text is not None:
            break
    emit(sid, t, code, text=text, encounter=optional_encounter(r.get("encounter"), ctx))


def extract_document_reference(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx)
    code = concept_code(r.get("type"), "DocumentReference.type", ctx)
    context = r.get("context") if isinstance(r.get("context"), dict) else {}
    period = context.get("period") if isinstance(context.get("period"), dict) else {}
    if r.get("date") is not None:
        t = parse_time(r["date"], "DocumentReference.date")
    elif period.get("start") is not None:
        t = parse_time(period["start"], "DocumentReference.context.period.start")
    else:
        raise Unmappable("no event time (DocumentReference.date / context.period.start absent)")
    text = None
    for content in r.get("content") or ():
        if isinstance(content, dict):
            text = _decode_attachment(content.get("attachment"))
            if text is not None:
                break
    emit(sid, t, code, text=text, encounter=optional_encounter(context.get("encounter"), ctx))


def _claim_encounter(r: dict, ctx: ResourceContext) -> str | None:
    for item in r.get("item") or ():
        if isinstance(item, dict) and item.get("encounter"):
            return optional_encounter(item["encounter"], ctx)
    return None


def extract_claim(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx, "patient")
    t = first_time(r, ("created", "billablePeriod.start"), "Claim")
    num, cur = _money(r["total"], "Claim.total") if "total" in r else (None, None)
    emit(sid, t, "CLAIM/TOTAL", num, unit=cur, encounter=_claim_encounter(r, ctx))


def extract_eob(r: dict, emit: Emitter, ctx: ResourceContext) -> None:
    sid = subject_of(r, ctx, "patient")
    t = first_time(r, ("created", "billablePeriod.start"), "ExplanationOfBenefit")
    enc = _claim_encounter(r, ctx)
    totals = r.get("total") or []
    if not isinstance(totals, list):
        raise Unmappable("ExplanationOfBenefit.total is not a list")
    # The submitted amount is the claim's total; other categories (benefit, deductible...) are not summed.
    chosen = None
    for tot in totals:
        cats = tot.get("category", {}).get("coding", []) if isinstance(tot, dict) else []
        for c in cats:
            if isinstance(c, dict) and c.get("code") == "submitted":
                chosen = tot
                break
        if chosen is not None:
            break
    if chosen is None and totals:
        chosen = totals[0]
    num, cur = _money(chosen.get("amount"), "ExplanationOfBenefit.total.amount") if chosen else (None, None)
    emit(sid, t, "EOB/TOTAL", num, unit=cur, encounter=enc)
    payment = r.get("payment")
    if isinstance(payment, dict) and payment.get("amount") is not None:
        pnum, pcur = _money(payment["amount"], "ExplanationOfBenefit.payment.amount")
        emit(sid, t, "EOB/PAYMENT", pnum, unit=pcur, encounter=enc)
    outcome = r.get("outcome")
    if isinstance(outcome, str) and outcome:
        emit(sid, t, f"EOB/OUTCOME/{outcome}", encounter=enc)


Extractor = Callable[[dict, Emitter, ResourceContext], object]

EXTRACTORS: dict[str, Extractor] = {
    "Patient": extract_patient,
    "Encounter": extract_encounter,
    "Condition": extract_condition,
    "Observation": extract_observation,
    "MedicationRequest": extract_medication_request,
    "MedicationAdministration": extract_medication_administration,
    "Procedure": extract_procedure,
    "Immunization": extract_immunization,
    "AllergyIntolerance": extract_allergy,
    "DiagnosticReport": extract_diagnostic_report,
    "DocumentReference": extract_document_reference,
    "Claim": extract_claim,
    "ExplanationOfBenefit": extract_eob,
}

# Fixed descriptions for the codes the connector itself coins.
SYNTHETIC_DESCRIPTIONS = {
    BIRTH_CODE: "Birth",
    DEATH_CODE: "Death",
    "CLAIM/TOTAL": "Claim total amount",
    "EOB/TOTAL": "Explanation of benefit: submitted amount",
    "EOB/PAYMENT": "Explanation of benefit: payment amount",
}


def medication_entry(r: dict) -> tuple[str, str | None] | None:
    """A Medication resource -> (code, display) for resolving medicationReference; None if it has no code."""
    cc = r.get("code")
    if not isinstance(cc, dict):
        return None
    scratch = ResourceContext(0, 0, {}, {}, {})
    try:
        code = concept_code(cc, "Medication.code", scratch)
    except Unmappable:
        return None
    return code, scratch.descriptions.get(code)
