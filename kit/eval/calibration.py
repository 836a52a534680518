"""Calibration: per-task temperature scaling (isotonic as an option for binary tasks) fit on the validation split,
a decision threshold per binary task, and the calibration metrics (Brier score, expected calibration error).

`apply_calibration(calibration, task, logits)` is the one function that turns a task head's logits into the
probabilities every prediction path reports (evaluation, the Predictor, batch scoring, the service), so they cannot
disagree. `calibration` is the bundle's calibration.json:

    {"tasks": {"mortality_1y": {"type": "binary", "method": "temperature", "temperature": 1.7,
                                "threshold": 0.21, "threshold_rule": "max_f1", "val": {...}}, ...}}
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, softmax

from kit.errors import KitError

Method = Literal["temperature", "isotonic", "none"]
ThresholdRule = Literal["max_f1", "sensitivity"]
MIN_VAL_ROWS = 10  # below this a fitted temperature is noise: keep T=1 and say so
_EPS = 1e-7


# ---------------------------------------------------------------- metrics


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of probabilities: binary (n,), multilabel (n, K) averaged over labels, multiclass (n, K) summed over classes."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if len(y) == 0:
        return float("nan")
    if p.ndim == 2 and y.ndim == 1:  # multiclass: one-hot targets
        onehot = np.zeros_like(p)
        onehot[np.arange(len(y)), y.astype(int)] = 1.0
        return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
    return float(np.mean((p - y) ** 2))


def _bin_edges_equal_mass(p: np.ndarray, n_bins: int) -> list[np.ndarray]:
    order = np.argsort(p, kind="stable")
    return [idx for idx in np.array_split(order, min(n_bins, len(p))) if len(idx)]


def reliability_bins(y: np.ndarray, p: np.ndarray, *, n_bins: int = 15, strategy: str = "uniform") -> list[dict[str, float]]:
    """Per bin: count, mean predicted probability, observed frequency. Binary targets and probabilities, (n,)."""
    y, p = np.asarray(y, dtype=float).reshape(-1), np.asarray(p, dtype=float).reshape(-1)
    if strategy == "uniform":
        # Equal-width bins on [0, 1]; the last bin includes 1.0.
        idx = np.minimum((p * n_bins).astype(int), n_bins - 1)
        groups = [np.flatnonzero(idx == b) for b in range(n_bins)]
    elif strategy == "quantile":
        groups = _bin_edges_equal_mass(p, n_bins)
    else:
        raise ValueError(f"unknown binning strategy {strategy!r}")
    return [{"n": len(g), "confidence": float(p[g].mean()), "frequency": float(y[g].mean())} for g in groups if len(g)]


def expected_calibration_error(y: np.ndarray, p: np.ndarray, *, n_bins: int = 15, strategy: str = "uniform") -> float:
    """ECE = sum over bins of (bin size / n) * |observed frequency - mean probability|.

    Binary (n,) targets; multilabel (n, K) pools every label's probabilities; multiclass (n,) class targets with (n, K)
    probabilities uses the top-label confidence against whether the top label was right.
    """
    y, p = np.asarray(y), np.asarray(p, dtype=float)
    if len(y) == 0:
        return float("nan")
    if p.ndim == 2 and y.ndim == 1:
        conf = p.max(1)
        y, p = (p.argmax(1) == y).astype(float), conf
    y, p = y.reshape(-1).astype(float), p.reshape(-1)
    bins = reliability_bins(y, p, n_bins=n_bins, strategy=strategy)
    n = len(y)
    return float(sum(b["n"] / n * abs(b["frequency"] - b["confidence"]) for b in bins))


def threshold_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """F1, sensitivity, specificity and PPV of `p >= threshold` for binary targets."""
    y = np.asarray(y).astype(int).reshape(-1)
    pred = np.asarray(p).reshape(-1) >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    nan = float("nan")
    sens = tp / (tp + fn) if tp + fn else nan
    spec = tn / (tn + fp) if tn + fp else nan
    ppv = tp / (tp + fp) if tp + fp else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return {"f1": f1, "sensitivity": sens, "specificity": spec, "ppv": ppv}


def choose_threshold(y: np.ndarray, p: np.ndarray, rule: ThresholdRule = "max_f1", target_sensitivity: float = 0.8) -> float:
    """The decision threshold on validation: the one maximising F1, or the highest reaching the target sensitivity."""
    y, p = np.asarray(y).astype(int).reshape(-1), np.asarray(p, dtype=float).reshape(-1)
    if len(y) == 0 or y.sum() == 0 or y.sum() == len(y):
        return 0.5
    candidates = np.unique(p)
    if rule == "max_f1":
        f1 = [threshold_metrics(y, p, t)["f1"] for t in candidates]
        return float(candidates[int(np.nanargmax(f1))])
    if rule == "sensitivity":
        ok = [t for t in candidates if threshold_metrics(y, p, t)["sensitivity"] >= target_sensitivity]
        return float(max(ok)) if ok else float(candidates.min())
    raise ValueError(f"unknown threshold rule {rule!r}")


# ---------------------------------------------------------------- fitting


def _probabilities(kind: str, logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    if kind == "binary":
        return expit(z.reshape(len(z), -1)[:, 0])
    if kind == "multilabel":
        return expit(z)
    if kind == "multiclass":
        return softmax(z, axis=-1)
    raise ValueError(f"task type {kind!r} has no probabilities")


def nll(kind: str, logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the targets under the temperature-scaled logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if kind == "multiclass":
        return float(-np.mean(log_softmax(z, axis=-1)[np.arange(len(y)), np.asarray(y, dtype=int)]))
    z = z.reshape(len(z), -1)[:, 0] if kind == "binary" else z
    y = np.asarray(y, dtype=np.float64).reshape(z.shape)
    # log(1 + e^z) - y z, in a stable form
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(kind: str, logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation NLL (searched over log T, T in [0.05, 20])."""
    res = minimize_scalar(lambda lt: nll(kind, logits, y, math.exp(lt)), bounds=(math.log(0.05), math.log(20.0)),
                          method="bounded", options={"xatol": 1e-4})
    return float(math.exp(res.x))


def _has_both_outcomes(kind: str, y: np.ndarray) -> bool:
    if kind == "multiclass":
        return len(np.unique(y)) >= 2
    y = np.asarray(y).reshape(-1)
    return 0 < y.sum() < len(y)


def fit_task_calibration(
    kind: str,
    logits: np.ndarray,
    y: np.ndarray,
    *,
    method: Method = "temperature",
    threshold_rule: ThresholdRule = "max_f1",
    target_sensitivity: float = 0.8,
) -> dict[str, Any]:
    """One task's calibration entry from its validation logits and targets."""
    entry: dict[str, Any] = {"type": kind, "method": "none", "temperature": 1.0}
    if kind not in ("binary", "multiclass", "multilabel"):
        entry["note"] = "regression: outputs are not probabilities"
        return entry
    logits = np.asarray(logits, dtype=np.float64)
    n = len(y)
    before = _probabilities(kind, logits) if n else None
    if method != "none" and n >= MIN_VAL_ROWS and _has_both_outcomes(kind, y):
        entry["temperature"] = fit_temperature(kind, logits, y)
        entry["method"] = "temperature"
        if method == "isotonic":
            if kind != "binary":
                raise KitError(f"isotonic calibration is for binary tasks; this task is {kind}", hint="use calibration.method=temperature")
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(_probabilities(kind, logits), y)
            entry["method"] = "isotonic"
            entry["temperature"] = 1.0
            entry["isotonic"] = {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}
    elif method != "none":
        entry["note"] = (f"not fit: {n} validation samples" + ("" if n < MIN_VAL_ROWS else " with a single outcome")
                         + f"; probabilities are the model's own (needs >= {MIN_VAL_ROWS} with both outcomes)")
    if n:
        after = apply_task_calibration(entry, logits)
        entry["val"] = {
            "n": int(n),
            "nll_before": nll(kind, logits, y),
            "nll_after": nll(kind, logits, y, entry["temperature"]) if entry["method"] != "isotonic" else None,
            "ece_before": expected_calibration_error(y, before),
            "ece_after": expected_calibration_error(y, after),
            "brier_before": brier_score(y, before),
            "brier_after": brier_score(y, after),
        }
    if kind == "binary":
        entry["threshold_rule"] = threshold_rule if threshold_rule == "max_f1" else f"sensitivity>={target_sensitivity}"
        entry["threshold"] = choose_threshold(y, apply_task_calibration(entry, logits), threshold_rule, target_sensitivity) if n else 0.5
    return entry


# ---------------------------------------------------------------- applying


def apply_task_calibration(entry: dict[str, Any], logits) -> np.ndarray:
    """Calibrated probabilities from one task's logits, (n,) for binary and (n, K) otherwise."""
    kind = entry["type"]
    logits = np.asarray(logits.float().cpu().numpy() if hasattr(logits, "cpu") else logits, dtype=np.float64)
    if kind == "regression":
        return logits.reshape(len(logits), -1)[:, 0]
    p = _probabilities(kind, logits, float(entry.get("temperature", 1.0)))
    if entry.get("method") == "isotonic":
        iso = entry["isotonic"]
        p = np.interp(p, iso["x"], iso["y"])
    return p


def apply_calibration(calibration: dict[str, Any], task: str, logits) -> np.ndarray:
    """The probabilities a bundle reports for `task`: its calibration.json entry applied to the head's logits."""
    try:
        entry = calibration["tasks"][task]
    except KeyError as err:
        raise KitError(f"calibration.json has no entry for task '{task}'") from err
    return apply_task_calibration(entry, logits)


def decide(calibration: dict[str, Any], task: str, probabilities: np.ndarray) -> np.ndarray | None:
    """Binary decisions at the task's validation-chosen threshold (None for other task types)."""
    entry = calibration["tasks"][task]
    if entry["type"] != "binary":
        return None
    return np.asarray(probabilities) >= float(entry.get("threshold", 0.5))


__all__ = [
    "apply_calibration", "apply_task_calibration", "brier_score", "choose_threshold", "decide",
    "expected_calibration_error", "fit_task_calibration", "fit_temperature", "nll", "reliability_bins",
    "threshold_metrics",
]
