"""FHIR at prediction time: a request's Bundle (or resource list) to events in memory, predictions to RiskAssessment,
errors to OperationOutcome.

The resources go through exactly the ingest path (`ingest._TaskRun.resource`, the same dedup and row order as the
event store writer), only in memory: a prediction reads the events a training run would have read.
kit finds this through the clinical vertical (`prediction_formats()`), never by import.
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any

from connectors.fhir import extract, ingest, sources
from connectors.fhir.extract import ResourceContext
from kit.errors import KitError
from kit.predict.formats import BadInput, SubjectData

FHIR_JSON = "application/fhir+json"
SUPPORTED_FHIR_VERSIONS = ("4.0", "4.0.1", "4.3", "4.3.0")
RISK_PROBABILITY = "http://terminology.hl7.org/CodeSystem/risk-probability"
KIT_TASK_SYSTEM = "urn:kit:task"
KIT_BUNDLE_SYSTEM = "urn:kit:bundle"
_NS = uuid.UUID("7b0c6c2e-3d4e-4f53-9a57-6b1d1f0e6a11")  # RiskAssessment ids: uuid5 of bundle, subject, task, time
ISSUE_CODES = {400: "structure", 401: "login", 404: "not-found", 405: "not-supported", 413: "too-long",
               415: "not-supported", 422: "processing", 500: "exception", 503: "transient"}


class _MemoryRun(ingest._TaskRun):
    """The ingest's per-record path with rejections kept in a list and nothing spilled to disk."""

    def __init__(self) -> None:
        super().__init__(ingest.Task(0, (), "", 1, {}, False, False))
        self.rejections: list[dict[str, Any]] = []

    def reject(self, name: str, kind: str, pos: int, rtype: object, rid: object, reason: str) -> None:
        rtype = rtype if isinstance(rtype, str) else None
        self.result.counts[(rtype or "(not a resource)", ingest.REJECTED)] += 1
        if reason.startswith(ingest.VERSION_PREFIX):
            self.result.versions[reason[len(ingest.VERSION_PREFIX):].split(" ", 1)[0]] += 1
        self.rejections.append({"position": pos, "resource_type": rtype,
                                "resource_id": rid if isinstance(rid, str) else None, "reason": reason})

    def spill(self) -> None:  # everything stays in memory: a request is one patient or a few
        pass


def _records(doc: Any) -> list[sources.RawRecord]:
    if isinstance(doc, list):
        return [sources.RawRecord(i, r, resource_id=r.get("id") if isinstance(r, dict) else None) for i, r in enumerate(doc)]
    if not isinstance(doc, dict):
        raise BadInput(400, "the request body is not a JSON object or array", code="structure")
    rtype = doc.get("resourceType")
    if rtype is None:
        raise BadInput(400, "the request body is not a FHIR resource (no resourceType)", code="structure")
    if rtype == "Bundle":
        return list(sources.bundle_records(doc))
    if rtype == "Patient":  # a Patient alone: no history, but a valid (if uninformative) request
        return [sources.RawRecord(0, doc, resource_id=doc.get("id"))]
    raise BadInput(422, f"resourceType {rtype!r} is not accepted here; send a Bundle (a Patient $everything result) "
                   "or a Patient", code="not-supported")


def _plain_bundle(doc: Any) -> tuple[list[dict], dict[str, str]] | None:
    """A Bundle whose every entry holds a resource object that is not a Bundle (a Patient $everything result): its
    resources and fullUrl -> id map, read in one pass, exactly as `sources.bundle_records` reads them (positions are
    entry indexes). Anything else returns None and takes the general path."""
    if not isinstance(doc, dict) or doc.get("resourceType") != "Bundle":
        return None
    entries = doc.get("entry")
    if not isinstance(entries, list):
        return None
    refs: dict[str, str] = {}
    resources = []
    for e in entries:
        r = e.get("resource") if isinstance(e, dict) else None
        if r.__class__ is not dict or r.get("resourceType") == "Bundle":
            return None
        rid = r.get("id")
        if isinstance(rid, str) and isinstance(url := e.get("fullUrl"), str):
            refs[url] = rid
        resources.append(r)
    return resources, refs


def _add_medication(run: _MemoryRun, r: Any, refs: dict[str, str] | None) -> None:
    if isinstance(r, dict) and r.get("resourceType") == "Medication" and isinstance(r.get("id"), str):
        med = extract.medication_entry(r)
        if med is not None:
            run.medications[f"Medication/{r['id']}"] = med
            for url, rid in (refs or {}).items():
                if rid == r["id"]:
                    run.medications[url] = med


def document_events(doc: Any) -> SubjectData:
    """Events and subjects of one request document (a Bundle, a Patient, or a JSON array of resources)."""
    run = _MemoryRun()
    # One context moved from record to record (a resource is done with it before the next one starts), the same
    # values ingest gives each record its own context with.
    ctx = ResourceContext(0, 0, {}, run.medications, run.result.descriptions)
    resource, no_refs = run.resource, ctx.refs
    plain = _plain_bundle(doc)
    if plain is not None:  # the usual request: no per-entry record objects (~1 ms of a 1 MB patient's parse)
        resources, refs = plain
        for r in resources:  # Medication entries first, so medicationReference resolves in one pass (as ingest does)
            if r.get("resourceType") == "Medication":
                _add_medication(run, r, refs)
        ctx.refs = refs
        for i, r in enumerate(resources):
            ctx.position = i
            resource(r, ctx, "<request>", "json")
    else:
        records = _records(doc)
        for rec in records:
            _add_medication(run, rec.resource, rec.refs)
        for rec in records:
            if rec.error is not None:
                run.reject("<request>", "json", rec.position, None, rec.resource_id, rec.error)
                continue
            ctx.position, ctx.refs = rec.position, rec.refs or no_refs
            resource(rec.resource, ctx, "<request>", "json")
    from connectors.fhir.writer import store_events, subjects_table

    events = store_events(run.cols)
    subjects, _ = subjects_table(run.result.patients)
    if subjects.height == 0:
        if run.result.versions:
            version = run.result.versions.most_common(1)[0][0]
            raise BadInput(422, f"unsupported FHIR version {version}: kit reads FHIR R4 (4.0.1) and R4B",
                           code="not-supported")
        raise BadInput(422, "no Patient resource in the request; send the Patient with its records "
                       "(a Patient $everything result)", code="required")
    return SubjectData(events=events, subjects=subjects, rejected=run.rejections)


def _time(value: datetime) -> str:
    return value.replace(tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")


def _risk_id(info: dict, p) -> str:
    return str(uuid.uuid5(_NS, f"{info['name']}|{info['version']}|{p.subject}|{p.task}|{p.as_of.isoformat()}"))


def risk_assessment(p, info: dict) -> dict[str, Any]:
    """One FHIR R4 RiskAssessment for one subject and task."""
    patient = {"reference": f"Patient/{p.subject}"}
    basis = [patient]
    seen = set()
    for ev in p.top_events or ():
        ref = ev.get("source")
        if ref and ref not in seen and not ref.startswith("Patient/"):
            seen.add(ref)
            basis.append({"reference": ref})
    predictions: list[dict[str, Any]] = []
    if p.type == "binary":
        entry: dict[str, Any] = {"outcome": {"text": p.description or p.task}, "probabilityDecimal": round(p.probability, 6)}
        if p.decision is not None:
            entry["qualitativeRisk"] = {"coding": [{"system": RISK_PROBABILITY, "code": "high" if p.decision else "low"}],
                                        "text": f"{'at or above' if p.decision else 'below'} the threshold {p.threshold:.4g}"}
        predictions.append(entry)
    elif p.type in ("multiclass", "multilabel"):
        for cls, prob in (p.scores or {}).items():
            predictions.append({"outcome": {"text": f"{p.task}: {cls}"}, "probabilityDecimal": round(prob, 6)})
    else:
        predictions.append({"outcome": {"text": p.description or p.task}, "rationale": f"predicted value {p.value:.6g}"})
    out: dict[str, Any] = {
        "resourceType": "RiskAssessment",
        "id": _risk_id(info, p),
        "status": "final",
        "subject": patient,
        "occurrenceDateTime": _time(p.as_of),
        "code": {"coding": [{"system": KIT_TASK_SYSTEM, "code": p.task}], "text": p.description or p.task},
        "method": {"coding": [{"system": KIT_BUNDLE_SYSTEM, "code": info["name"], "version": info["version"],
                               "display": f"kit {info['vertical']} bundle {info['name']} {info['version']}"}],
                   "text": f"kit {info['kit_version']} bundle {info['name']} version {info['version']}"},
        "basis": basis,
        "prediction": predictions,
    }
    if p.top_events:
        top = "; ".join(f"{e['token']} ({e['time'][:10] if e.get('time') else '-'})" for e in p.top_events)
        out["note"] = [{"text": f"most influential input events: {top}"}]
    return out


def operation_outcome(status: int, message: str, code: str | None = None, severity: str = "error") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code or ISSUE_CODES.get(status, "processing"), "diagnostics": message}]}


def _rejection_outcome(rejected: list[dict]) -> dict[str, Any] | None:
    if not rejected:
        return None
    reasons = Counter(r["reason"] for r in rejected)
    issues = [{"severity": "warning", "code": "invalid",
               "diagnostics": f"{n} resource(s) not used: {reason}"} for reason, n in reasons.most_common(10)]
    return {"resourceType": "OperationOutcome", "issue": issues}


class FhirFormat:
    """The clinical vertical's wire format: FHIR Bundles in, Bundles of RiskAssessment out."""

    name = "fhir"
    request_media_types = (FHIR_JSON, "application/json")
    response_media_type = FHIR_JSON

    def check_media_type(self, content_type: str) -> None:
        main, _, params = (content_type or "").partition(";")
        main = main.strip().lower()
        if main not in self.request_media_types:
            raise BadInput(415, f"Content-Type {main or '(none)'!r} is not accepted; send {FHIR_JSON} or application/json",
                           code="not-supported")
        for param in params.split(";"):
            key, _, value = param.partition("=")
            if key.strip().lower() == "fhirversion":
                v = value.strip().strip('"')
                if v not in SUPPORTED_FHIR_VERSIONS:
                    raise BadInput(415, f"unsupported FHIR version {v!r}: kit reads FHIR R4 (4.0) and R4B (4.3)",
                                   code="not-supported")

    def parse(self, doc: Any) -> SubjectData:
        return document_events(doc)

    def split_batch(self, doc: Any) -> list[Any]:
        """A batch: a JSON array of documents, or a Bundle whose entries are Bundles (one per patient)."""
        if isinstance(doc, list):
            return doc
        if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
            entries = doc.get("entry") or []
            if not isinstance(entries, list):
                raise BadInput(400, "Bundle.entry is not a list", code="structure")
            return [e.get("resource") if isinstance(e, dict) else e for e in entries]
        raise BadInput(400, "a batch is a JSON array of Bundles or a Bundle whose entries are Bundles", code="structure")

    def records(self, predictions, info: dict) -> list[dict[str, Any]]:
        return [risk_assessment(p, info) for p in predictions]

    def render(self, predictions, info: dict, rejected: list[dict] | None = None) -> dict[str, Any]:
        entries = [{"fullUrl": f"urn:uuid:{r['id']}", "resource": r} for r in self.records(predictions, info)]
        warn = _rejection_outcome(rejected or [])
        if warn is not None:  # resources that could not be read: said, by type, id and reason, never by content
            entries.append({"resource": warn})
        return {"resourceType": "Bundle", "type": "collection",
                "timestamp": _time(datetime.now(timezone.utc).replace(tzinfo=None)), "entry": entries}

    def render_batch(self, results: list, info: dict) -> dict[str, Any]:
        """A batch-response Bundle: per input document, its Bundle of RiskAssessment or its OperationOutcome."""
        entries = []
        for res in results:
            if isinstance(res, BadInput):
                entries.append({"response": {"status": str(res.status), "outcome": self.error(res)}})
            else:
                preds, rejected = res
                entries.append({"resource": self.render(preds, info, rejected), "response": {"status": "200"}})
        return {"resourceType": "Bundle", "type": "batch-response", "entry": entries}

    def error(self, err: BadInput) -> dict[str, Any]:
        return operation_outcome(err.status, str(err), err.code)


def validate_resource(resource: dict[str, Any]) -> None:
    """Validate with fhir.resources (R4B models); raises KitError naming the fields."""
    from connectors.fhir.validate import validation_error

    reason = validation_error(resource)
    if reason is not None:
        raise KitError(reason)
