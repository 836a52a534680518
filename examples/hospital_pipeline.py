"""A nightly risk job as a hospital pipeline would run it, with kit's Predictor and then against `kit serve`.

1. Read last night's FHIR Bulk Data export (NDJSON per resource type), score every patient with the bundle,
   write FHIR RiskAssessment NDJSON (for the FHIR server) and a CSV worklist of the highest-risk patients.
2. The same patients through the running service: one Bundle per patient, POSTed to /predict/batch.

    python examples/hospital_pipeline.py --bundle kit-runs/demo/clinical.kitbundle
    kit serve --bundle kit-runs/demo/clinical.kitbundle --port 8080 &
    python examples/hospital_pipeline.py --bundle kit-runs/demo/clinical.kitbundle --service http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXPORT = REPO / "examples" / "data" / "fhir" / "bulk-ndjson"
# Where each resource type of a Bulk export names its patient.
PATIENT_FIELD = {"Patient": None, "Encounter": "subject", "Condition": "subject", "Observation": "subject",
                 "Procedure": "subject", "MedicationRequest": "subject", "DocumentReference": "subject",
                 "DiagnosticReport": "subject", "Immunization": "patient", "AllergyIntolerance": "patient",
                 "Device": "patient"}


def nightly_job(bundle: Path, export: Path, out: Path, task: str | None, top: int) -> list:
    from kit import Predictor
    from kit.fsutil import atomic_file
    from kit.predict.formats import get_format

    t0 = time.perf_counter()
    predictor = Predictor.load(bundle)  # verified against MANIFEST.json: a changed bundle stops the job here
    predictions = predictor.predict(export)  # ingested through the vertical, scored at each patient's last event
    fhir = get_format(predictor.bundle.vertical, "fhir")
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "risk-assessments.ndjson", "w") as fh:
        for resource in fhir.records(predictions, predictor.info):
            fh.write(json.dumps(resource) + "\n")
    binary = [n for n, t in predictor.tasks.items() if t["type"] == "binary"]
    task = task or ("mortality_1y" if "mortality_1y" in binary else binary[0])
    ranked = sorted((p for p in predictions if p.task == task), key=lambda p: -p.probability)
    with atomic_file(out / "worklist.csv", "w") as fh:
        w = csv.writer(fh)
        w.writerow(["rank", "patient", "task", "probability", "above_threshold", "threshold", "as_of", "why"])
        for i, p in enumerate(ranked[:top], 1):
            why = "; ".join(e["token"] for e in (p.top_events or ())[:3])
            w.writerow([i, p.subject, task, f"{p.probability:.4f}", p.decision, f"{p.threshold:.4f}", p.as_of.isoformat(), why])
    print(f"scored {len({p.subject for p in predictions})} patients x {len(predictor.tasks)} tasks in "
          f"{time.perf_counter() - t0:.1f}s -> {out}/risk-assessments.ndjson, {out}/worklist.csv (top {top} by {task})")
    return predictions


def patient_bundles(export: Path) -> list[dict]:
    """One collection Bundle per patient from a Bulk export, as a pipeline would send them to the service."""
    per_patient: dict[str, list] = {}
    for path in sorted(export.glob("*.ndjson*")):
        rtype = path.name.split(".", 1)[0]
        if rtype not in PATIENT_FIELD:
            continue
        with (gzip.open(path, "rt") if path.name.endswith(".gz") else path.open()) as fh:
            for line in fh:
                if not line.strip():
                    continue
                r = json.loads(line)
                field = PATIENT_FIELD[rtype]
                pid = r.get("id") if field is None else str((r.get(field) or {}).get("reference", "")).split("/")[-1]
                if pid:
                    per_patient.setdefault(pid, []).append(r)
    return [{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in rs]}
            for rs in per_patient.values() if any(r["resourceType"] == "Patient" for r in rs)]


def through_service(url: str, token: str | None, export: Path, out: Path, local: list) -> None:
    import httpx

    headers = {"Content-Type": "application/fhir+json", **({"Authorization": f"Bearer {token}"} if token else {})}
    bundles = patient_bundles(export)
    t0 = time.perf_counter()
    resp = httpx.post(f"{url}/predict/batch", content=json.dumps(bundles), headers=headers, timeout=600)
    resp.raise_for_status()
    risks = []
    for entry in resp.json()["entry"]:
        if entry["response"]["status"] != "200":
            print(f"a patient was refused: {entry['response']['outcome']['issue'][0]['diagnostics']}", file=sys.stderr)
            continue
        risks += [e["resource"] for e in entry["resource"]["entry"] if e["resource"]["resourceType"] == "RiskAssessment"]
    (out / "risk-assessments-service.ndjson").write_text("".join(json.dumps(r) + "\n" for r in risks))
    mine = {(p.subject, p.task): round(p.probability, 6) for p in local if p.type == "binary"}
    theirs = {(r["subject"]["reference"].split("/")[1], r["code"]["coding"][0]["code"]): r["prediction"][0]["probabilityDecimal"]
              for r in risks if "probabilityDecimal" in r["prediction"][0] and len(r["prediction"]) == 1}
    same = sum(1 for k, v in theirs.items() if mine.get(k) == v)
    print(f"service: {len(bundles)} patients, {len(risks)} RiskAssessments in {time.perf_counter() - t0:.1f}s; "
          f"{same}/{len(theirs)} binary probabilities identical to the local job")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--export", type=Path, default=EXPORT, help="a FHIR Bulk Data export folder (NDJSON per type)")
    ap.add_argument("--out", type=Path, default=Path("kit-runs/pipeline"))
    ap.add_argument("--task", help="binary task ranked in the worklist (default: mortality_1y, else the first binary task)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--service", help="base URL of a running `kit serve`")
    ap.add_argument("--token-file", type=Path)
    args = ap.parse_args()
    local = nightly_job(args.bundle, args.export, args.out, args.task, args.top)
    if args.service:
        token = args.token_file.read_text().strip() if args.token_file else None
        through_service(args.service.rstrip("/"), token, args.export, args.out, local)


if __name__ == "__main__":
    main()
