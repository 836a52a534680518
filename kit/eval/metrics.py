"""Task metrics with percentile-bootstrap 95% intervals."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, mean_absolute_error, roc_auc_score


@dataclass(frozen=True)
class MetricValue:
    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def _safe(fn: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, p: np.ndarray) -> float:
    """A ranking metric, or NaN when it is undefined (one class only), without sklearn's warnings."""
    if len(np.unique(y)) < 2:
        return float("nan")
    try:
        return float(fn(y, p))
    except ValueError:
        return float("nan")


def _multiclass_auroc(y: np.ndarray, p: np.ndarray) -> float:
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    # One-vs-rest macro AUROC over the classes present, so a class missing from a small test split is not an error.
    return float(np.mean([roc_auc_score(y == k, p[:, k]) for k in present]))


def _multilabel(fn: Callable, y: np.ndarray, p: np.ndarray) -> float:
    vals = [_safe(fn, y[:, k], p[:, k]) for k in range(y.shape[1])]
    vals = [v for v in vals if not np.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def metric_fn(task_type: str, name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    """The function computing `name` for a task type from (targets, scores)."""
    if task_type == "binary":
        return {"auroc": lambda y, p: _safe(roc_auc_score, y, p), "auprc": lambda y, p: _safe(average_precision_score, y, p)}[name]
    if task_type == "multiclass":
        return {"auroc": _multiclass_auroc, "accuracy": lambda y, p: float(np.mean(p.argmax(1) == y))}[name]
    if task_type == "multilabel":
        return {
            "auroc": lambda y, p: _multilabel(roc_auc_score, y, p),
            "auprc": lambda y, p: _multilabel(average_precision_score, y, p),
        }[name]
    if task_type == "regression":
        return {"mae": lambda y, p: float(mean_absolute_error(y, p))}[name]
    raise ValueError(f"unknown task type {task_type!r}")


def default_metrics(task_type: str) -> tuple[str, ...]:
    return {
        "binary": ("auroc", "auprc"),
        "multiclass": ("auroc", "accuracy"),
        "multilabel": ("auroc", "auprc"),
        "regression": ("mae",),
    }[task_type]


def bootstrap(
    fn: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    p: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> MetricValue:
    """Point estimate plus a percentile bootstrap 95% interval over resampled samples."""
    y, p = np.asarray(y), np.asarray(p)
    n = len(y)
    point = fn(y, p) if n else float("nan")
    if n < 2:
        return MetricValue(point, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        v = fn(y[idx], p[idx])
        if not np.isnan(v):
            stats.append(v)
    if not stats:
        return MetricValue(point, float("nan"), float("nan"), n)
    low, high = np.percentile(stats, [2.5, 97.5])
    return MetricValue(point, float(low), float(high), n)


def evaluate_task(task_type: str, y, p, *, n_boot: int = 1000, seed: int = 0) -> dict[str, MetricValue]:
    return {m: bootstrap(metric_fn(task_type, m), y, p, n_boot=n_boot, seed=seed) for m in default_metrics(task_type)}
