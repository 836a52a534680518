"""Task metrics with percentile-bootstrap 95% intervals.

With `clusters` (each row's subject id), the bootstrap resamples subjects with all their rows (a cluster bootstrap):
rows of one subject are not independent, and resampling rows would make the intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


# Ranking metrics in numpy: the same values as scikit-learn's roc_auc_score / average_precision_score (ties included),
# without their per-call input validation, which dominated bootstraps of hundreds of resamples.


def roc_auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """Binary AUROC as the Mann-Whitney statistic with average ranks (a tie counts one half)."""
    y = np.asarray(y).reshape(-1) == 1
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both classes")
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision_score(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision: sum over distinct score thresholds of (recall step) x precision, as scikit-learn defines it."""
    y = (np.asarray(y).reshape(-1) == 1).astype(np.float64)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.sum() == 0:
        raise ValueError("average precision needs a positive")
    order = np.argsort(-p, kind="stable")
    p, y = p[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(p)), len(p) - 1]  # the last row of each run of tied scores
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_absolute_error(y: np.ndarray, p: np.ndarray) -> float:
    return float(np.mean(np.abs(np.asarray(y, dtype=np.float64).reshape(-1) - np.asarray(p, dtype=np.float64).reshape(-1))))


@dataclass(frozen=True)
class MetricValue:
    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "n": self.n}


def _safe(fn: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, p: np.ndarray) -> float:
    """A ranking metric, or NaN when it is undefined (one class only)."""
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


def cluster_resampler(clusters: np.ndarray | None, n: int, rng: np.random.Generator):
    """A function drawing one bootstrap sample of row indices: rows with replacement, or, with `clusters`, whole
    clusters with replacement (each drawn cluster contributes all of its rows)."""
    if clusters is None:
        return lambda: rng.integers(0, n, n)
    _, inverse = np.unique(np.asarray(clusters), return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by cluster
    counts = np.bincount(inverse)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    k = len(counts)

    def draw() -> np.ndarray:
        pick = rng.integers(0, k, k)
        lengths = counts[pick]
        # Row positions of each picked cluster, laid end to end: start of its block + 0..length-1.
        offsets = np.repeat(starts[pick] - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
        return order[offsets + np.arange(lengths.sum())]

    return draw


def bootstrap(
    fn: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    p: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> MetricValue:
    """Point estimate plus a percentile bootstrap 95% interval, resampling rows or (with `clusters`) subjects."""
    y, p = np.asarray(y), np.asarray(p)
    n = len(y)
    point = fn(y, p) if n else float("nan")
    if clusters is not None and len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} entries for {n} rows")
    if n < 2 or (clusters is not None and len(np.unique(clusters)) < 2):
        return MetricValue(point, float("nan"), float("nan"), n)
    rng = np.random.default_rng(seed)
    draw = cluster_resampler(clusters, n, rng)
    stats = []
    for _ in range(n_boot):
        idx = draw()
        v = fn(y[idx], p[idx])
        if not np.isnan(v):
            stats.append(v)
    if not stats:
        return MetricValue(point, float("nan"), float("nan"), n)
    low, high = np.percentile(stats, [2.5, 97.5])
    return MetricValue(point, float(low), float(high), n)


def paired_difference(
    fn: Callable[[np.ndarray, np.ndarray], float],
    y: np.ndarray,
    p_a: np.ndarray,
    p_b: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    clusters: np.ndarray | None = None,
) -> MetricValue:
    """fn(y, p_a) - fn(y, p_b) on the same rows, with a paired bootstrap 95% interval: each resample (of rows or, with
    `clusters`, of subjects) scores both models on the same draw, so what the two share cancels out."""
    y, p_a, p_b = np.asarray(y), np.asarray(p_a), np.asarray(p_b)
    n = len(y)

    def diff(idx: np.ndarray) -> float:
        return fn(y[idx], p_a[idx]) - fn(y[idx], p_b[idx])

    point = diff(np.arange(n)) if n else float("nan")
    if n < 2 or (clusters is not None and len(np.unique(clusters)) < 2):
        return MetricValue(point, float("nan"), float("nan"), n)
    draw = cluster_resampler(clusters, n, np.random.default_rng(seed))
    stats = [v for v in (diff(draw()) for _ in range(n_boot)) if not np.isnan(v)]
    if not stats:
        return MetricValue(point, float("nan"), float("nan"), n)
    low, high = np.percentile(stats, [2.5, 97.5])
    return MetricValue(point, float(low), float(high), n)


def evaluate_task(task_type: str, y, p, *, n_boot: int = 1000, seed: int = 0,
                  clusters: np.ndarray | None = None) -> dict[str, MetricValue]:
    return {m: bootstrap(metric_fn(task_type, m), y, p, n_boot=n_boot, seed=seed, clusters=clusters)
            for m in default_metrics(task_type)}
