"""Test-split evaluation of a model beside the count-feature baseline, per task, with bootstrap intervals."""

from __future__ import annotations

import numpy as np

from kit.eval.baseline import count_features, fit_baseline
from kit.eval.metrics import evaluate_task
from kit.eval.scoring import scores_from_outputs, targets_array, task_logits
from kit.train.batching import Row


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
) -> dict[str, dict]:
    """Per task: n, prevalence, model metrics and baseline metrics (each value with a 95% interval)."""
    out: dict[str, dict] = {}
    for t in tasks:
        rows = ds.splits[split][t.name].rows
        entry: dict = {"type": t.type, "n": len(rows), "metric": ds.manifest["tasks"][t.name].get("metric")}
        if not rows:
            entry["note"] = f"no {split} samples"
            out[t.name] = entry
            continue
        y = targets_array(t.type, rows)
        entry["prevalence"] = prevalence(t.type, y)
        scores = scores_from_outputs(t.type, task_logits(model, rows, t.name, device, batch_size=batch_size, bf16=bf16))
        entry["model"] = {k: v.as_dict() for k, v in evaluate_task(t.type, y, scores, n_boot=n_boot, seed=seed).items()}
        if baseline:
            train_rows = ds.splits["train"][t.name].rows
            if train_rows:
                vocab = ds.vocab_size
                fitted = fit_baseline(t.type, count_features(_history(train_rows), vocab), targets_array(t.type, train_rows), seed=seed)
                b_scores = fitted.predict_scores(count_features(_history(rows), vocab))
                entry["baseline"] = {k: v.as_dict() for k, v in evaluate_task(t.type, y, b_scores, n_boot=n_boot, seed=seed).items()}
        out[t.name] = entry
    return out
