"""Evaluation of a model beside the count-feature baseline, per task, with bootstrap intervals.

With a calibration (calibration.json), the reported probabilities are the calibrated ones, and each task also gets
Brier score, ECE (15 equal-width bins and equal-mass), threshold metrics at the validation-chosen threshold,
reliability bins before and after calibration, and the same metrics per subgroup (sex, age band) with sizes.
Intervals are a subject-level (cluster) bootstrap: a subject's rows are resampled together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kit.eval.baseline import count_features, fit_baseline, fit_named_baseline
from kit.eval.calibration import (
    apply_task_calibration,
    brier_score,
    expected_calibration_error,
    fit_task_calibration,
    reliability_bins,
    threshold_metrics,
)
from kit.eval.metrics import bootstrap, evaluate_task
from kit.eval.scoring import targets_array, task_logits
from kit.train.batching import Row

AGE_BANDS = ((0, 18, "0-17"), (18, 45, "18-44"), (45, 65, "45-64"), (65, 80, "65-79"), (80, 200, "80+"))
MIN_SUBGROUP = 1  # every non-empty subgroup is reported with its size; intervals say how little a small one shows


def _history(rows: list[Row]) -> list[np.ndarray]:
    # The baseline sees the codes before the prediction time: the history without the appended task token.
    return [r.input_ids[:-1] for r in rows]


def prevalence(kind: str, y: np.ndarray) -> float | list[float] | None:
    if len(y) == 0:
        return None
    if kind == "binary":
        return float(np.mean(y))
    if kind == "multilabel":
        return [float(v) for v in y.mean(0)]
    if kind == "multiclass":
        return [float(v) for v in np.bincount(y.astype(int), minlength=int(y.max()) + 1) / len(y)]
    return None


def _span(times: np.ndarray) -> list[str] | None:
    if len(times) == 0:
        return None
    return [str(np.min(times))[:10], str(np.max(times))[:10]]


def data_summary(ds) -> dict[str, Any]:
    """The time span of prediction times over every split, and the dataset's end."""
    times = [t.prediction_times for split in ds.splits.values() for t in split.values() if len(t.prediction_times)]
    span = _span(np.concatenate(times)) if times else None
    return {"start": span[0] if span else None, "end": span[1] if span else None,
            "dataset_end": ds.manifest.get("dataset_end"), "subjects": ds.manifest.get("subjects")}


def fit_calibration(model, ds, tasks, device, *, method: str = "temperature", threshold_rule: str = "max_f1",
                    target_sensitivity: float = 0.8, split: str = "val", batch_size: int = 64, bf16: bool = True) -> dict:
    """calibration.json: per task, fit on `split` (the validation split)."""
    out: dict[str, Any] = {"fit_on": split, "method": method, "threshold_rule": threshold_rule, "tasks": {}}
    for t in tasks:
        rows = ds.splits[split][t.name].rows
        logits = task_logits(model, rows, t.name, device, batch_size=batch_size, bf16=bf16).numpy()
        y = targets_array(t.type, rows)
        m = method if (method != "isotonic" or t.type == "binary") else "temperature"
        out["tasks"][t.name] = fit_task_calibration(t.type, logits, y, method=m, threshold_rule=threshold_rule,
                                                    target_sensitivity=target_sensitivity)
    return out


def age_band(age: float) -> str:
    if age is None or age < 0 or np.isnan(age):
        return "unknown"
    return next((label for lo, hi, label in AGE_BANDS if lo <= age < hi), "unknown")


def subject_sex(manifest: dict, subject_ids: np.ndarray) -> np.ndarray:
    """Each subject's sex from the event store's subjects table (`unknown` when it is not at hand)."""
    events_dir = manifest.get("events_dir")
    path = Path(events_dir) / "metadata" / "subjects.parquet" if events_dir else None
    if path is None or not path.is_file():
        return np.full(len(subject_ids), "unknown", dtype=object)
    import polars as pl

    table = pl.read_parquet(path, columns=["subject_id", "sex"])
    lookup = dict(zip(table["subject_id"].to_list(), table["sex"].to_list(), strict=True))
    return np.array([str(lookup.get(int(s)) or "unknown") for s in subject_ids], dtype=object)


def subgroups_for(manifest: dict, task_rows) -> dict[str, np.ndarray]:
    """Subgroup labels per row: sex, and age band at the prediction time."""
    ages = np.array([float(r.age[-1]) if len(r.age) else -1.0 for r in task_rows.rows])
    return {"sex": subject_sex(manifest, task_rows.subject_ids), "age_band": np.array([age_band(a) for a in ages], dtype=object)}


def _calibration_metrics(kind: str, y, p, *, n_boot: int, seed: int, clusters=None) -> dict[str, dict]:
    fns = {
        "brier": brier_score,
        "ece": lambda a, b: expected_calibration_error(a, b, n_bins=15, strategy="uniform"),
        "ece_equal_mass": lambda a, b: expected_calibration_error(a, b, n_bins=15, strategy="quantile"),
    }
    return {k: bootstrap(fn, y, p, n_boot=n_boot, seed=seed, clusters=clusters).as_dict() for k, fn in fns.items()}


def _threshold_block(y, p, threshold: float, *, n_boot: int, seed: int, clusters=None) -> dict[str, dict]:
    return {k: bootstrap(lambda a, b, k=k: threshold_metrics(a, b, threshold)[k], y, p, n_boot=n_boot, seed=seed,
                         clusters=clusters).as_dict()
            for k in ("f1", "sensitivity", "specificity")}


def _reliability(kind: str, y, p) -> list[dict]:
    if kind == "multiclass":
        y, p = (p.argmax(1) == y).astype(float), p.max(1)
    return reliability_bins(np.asarray(y).reshape(-1), np.asarray(p).reshape(-1), n_bins=15)


def score_task(kind: str, y: np.ndarray, logits: np.ndarray, cal_entry: dict | None, *, n_boot: int, seed: int,
               groups: dict[str, np.ndarray] | None = None, clusters: np.ndarray | None = None) -> dict[str, Any]:
    """All metrics of one task from its logits and targets: the block `kit evaluate` and `kit finetune` both report.

    `clusters` (each row's subject id) makes the intervals a subject-level bootstrap.
    """
    entry: dict[str, Any] = {}
    if clusters is not None:
        clusters = np.asarray(clusters)
        entry["subjects"] = int(len(np.unique(clusters)))
    sub_c = (lambda idx: clusters[idx]) if clusters is not None else (lambda idx: None)
    raw = apply_task_calibration({"type": kind, "method": "none"}, logits)
    p = apply_task_calibration(cal_entry, logits) if cal_entry else raw
    model = {k: v.as_dict() for k, v in evaluate_task(kind, y, p, n_boot=n_boot, seed=seed, clusters=clusters).items()}
    if kind != "regression":
        model.update(_calibration_metrics(kind, y, p, n_boot=n_boot, seed=seed, clusters=clusters))
        entry["uncalibrated"] = {"brier": brier_score(y, raw), "ece": expected_calibration_error(y, raw),
                                 "ece_equal_mass": expected_calibration_error(y, raw, strategy="quantile")}
        entry["reliability"] = {"before": _reliability(kind, y, raw), "after": _reliability(kind, y, p)}
    if kind == "binary" and cal_entry and "threshold" in cal_entry:
        entry["threshold"] = {"value": cal_entry["threshold"], "rule": cal_entry.get("threshold_rule")}
        model.update(_threshold_block(y, p, cal_entry["threshold"], n_boot=n_boot, seed=seed, clusters=clusters))
    entry["model"] = model
    if groups:
        entry["subgroups"] = {}
        for name, labels in groups.items():
            block = {}
            for value in sorted(set(labels.tolist())):
                idx = np.flatnonzero(labels == value)
                if len(idx) < MIN_SUBGROUP:
                    continue
                sub = {"n": len(idx), "prevalence": prevalence(kind, y[idx])}
                sub.update({k: v.as_dict() for k, v in evaluate_task(kind, y[idx], p[idx], n_boot=n_boot, seed=seed,
                                                                       clusters=sub_c(idx)).items()})
                if kind != "regression":
                    sub["brier"] = brier_score(y[idx], p[idx])
                    sub["ece"] = expected_calibration_error(y[idx], p[idx])
                block[str(value)] = sub
            entry["subgroups"][name] = block
    return entry


def evaluate_tasks(
    model,
    ds,
    tasks,
    device,
    *,
    split: str = "test",
    batch_size: int = 64,
    n_boot: int = 500,
    seed: int = 0,
    bf16: bool = True,
    baseline: bool = True,
    calibration: dict | None = None,
    subgroups: bool = True,
) -> dict[str, dict]:
    """Per task: n, prevalence, model metrics and baseline metrics (each value with a 95% interval)."""
    out: dict[str, dict] = {}
    for t in tasks:
        task_rows = ds.splits[split][t.name]
        rows = task_rows.rows
        entry: dict = {"type": t.type, "n": len(rows), "metric": ds.manifest["tasks"][t.name].get("metric")}
        if not rows:
            entry["note"] = f"no {split} samples"
            out[t.name] = entry
            continue
        y = targets_array(t.type, rows)
        entry["prevalence"] = prevalence(t.type, y)
        entry["time_span"] = _span(task_rows.prediction_times)
        logits = task_logits(model, rows, t.name, device, batch_size=batch_size, bf16=bf16).numpy()
        cal_entry = (calibration or {}).get("tasks", {}).get(t.name)
        groups = subgroups_for(ds.manifest, task_rows) if subgroups else None
        clusters = np.asarray(task_rows.subject_ids) if len(task_rows.subject_ids) == len(rows) else None
        entry.update(score_task(t.type, y, logits, cal_entry, n_boot=n_boot, seed=seed, groups=groups, clusters=clusters))
        if baseline:
            train_rows = ds.splits["train"][t.name].rows if "train" in ds.splits else []
            if train_rows:
                vocab = ds.vocab_size
                fitted = fit_baseline(t.type, count_features(_history(train_rows), vocab), targets_array(t.type, train_rows), seed=seed)
                b_scores = fitted.predict_scores(count_features(_history(rows), vocab))
                entry["baseline"] = {k: v.as_dict() for k, v in evaluate_task(t.type, y, b_scores, n_boot=n_boot, seed=seed,
                                                                              clusters=clusters).items()}
                if t.type != "regression":
                    entry["baseline"]["brier"] = {"value": brier_score(y, b_scores), "ci95": [None, None], "n": len(y)}
                # Further baselines the task's spec asks for (e.g. gradient-boosted trees for a table task).
                for extra in ds.manifest["tasks"][t.name].get("baselines", []):
                    if extra != "logistic":
                        fitted = fit_named_baseline(extra, t.type, count_features(_history(train_rows), vocab),
                                                    targets_array(t.type, train_rows), seed=seed)
                        e_scores = fitted.predict_scores(count_features(_history(rows), vocab))
                        entry[f"baseline_{extra}"] = {k: v.as_dict() for k, v in evaluate_task(
                            t.type, y, e_scores, n_boot=n_boot, seed=seed, clusters=clusters).items()}
        out[t.name] = entry
    return out
