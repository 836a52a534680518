"""Count-feature baselines: how far a bag of codes before the prediction time gets, on the same splits.

Each sample's features are the counts of each token id in its history (a sparse matrix), scaled by log1p so a
long history does not dominate; the model is scikit-learn's logistic regression (ridge for regression), and, for
tasks whose spec asks for it (`baselines: [logistic, gbt]`, e.g. tables), scikit-learn's histogram gradient-boosted
trees on the same features (a value's quantile-bin token is an ordinal feature the trees can split on).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression, Ridge


def count_features(sequences: Sequence[Sequence[int]], vocab_size: int) -> sparse.csr_matrix:
    indptr = np.zeros(len(sequences) + 1, dtype=np.int64)
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    np.cumsum(lengths, out=indptr[1:])
    indices = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else np.zeros(0, np.int64)
    data = np.ones(len(indices), dtype=np.float32)
    m = sparse.csr_matrix((data, indices, indptr), shape=(len(sequences), vocab_size))
    m.sum_duplicates()
    m.data = np.log1p(m.data)
    return m


def fit_baseline(task_type: str, x: sparse.csr_matrix, y: np.ndarray, *, seed: int = 0, c: float = 0.5):
    """Fit the baseline for a task type; returns an object with `predict_scores(x)`."""
    if task_type == "regression":
        model = Ridge(alpha=1.0 / c).fit(x, y.reshape(-1))
        return _Scores(lambda z: model.predict(z))
    lr = LogisticRegression(C=c, max_iter=2000, class_weight="balanced", random_state=seed)
    if task_type == "binary":
        y = y.reshape(-1)
        if len(np.unique(y)) < 2:
            const = float(y.mean()) if len(y) else 0.0
            return _Scores(lambda z: np.full(z.shape[0], const))
        model = lr.fit(x, y)
        return _Scores(lambda z: model.predict_proba(z)[:, 1])
    if task_type == "multiclass":
        y = y.reshape(-1).astype(int)
        n_classes = int(y.max()) + 1 if len(y) else 1
        model = lr.fit(x, y)

        def scores(z):
            out = np.zeros((z.shape[0], n_classes))
            out[:, model.classes_] = model.predict_proba(z)
            return out

        return _Scores(scores)
    if task_type == "multilabel":
        cols = []
        for k in range(y.shape[1]):
            cols.append(fit_baseline("binary", x, y[:, k], seed=seed, c=c))
        return _Scores(lambda z: np.stack([m.predict_scores(z) for m in cols], axis=1))
    raise ValueError(f"unknown task type {task_type!r}")


GBT_MAX_FEATURES = 2048  # the most frequent train columns: keeps the dense matrix small for a wide vocabulary


def fit_gbt_baseline(task_type: str, x: sparse.csr_matrix, y: np.ndarray, *, seed: int = 0):
    """Gradient-boosted trees (HistGradientBoosting, early stopping on a held-back tenth of train) on the count
    features of the token columns seen in train; binary and multiclass tasks only."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    if task_type not in ("binary", "multiclass"):
        raise ValueError(f"the gbt baseline is for binary and multiclass tasks, not {task_type!r}")
    freq = np.asarray((x > 0).sum(axis=0)).reshape(-1)
    cols = np.flatnonzero(freq)
    if len(cols) > GBT_MAX_FEATURES:
        cols = np.sort(cols[np.argsort(-freq[cols], kind="stable")[:GBT_MAX_FEATURES]])

    def dense(z):
        return np.asarray(z[:, cols].todense(), dtype=np.float32)

    y = y.reshape(-1).astype(int) if task_type == "multiclass" else y.reshape(-1)
    if len(np.unique(y)) < 2 or len(cols) == 0:
        return fit_baseline(task_type, x, y, seed=seed)
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, early_stopping=len(y) >= 200,
                                           validation_fraction=0.1, n_iter_no_change=20, random_state=seed)
    model.fit(dense(x), y)
    if task_type == "binary":
        return _Scores(lambda z: model.predict_proba(dense(z))[:, 1])
    n_classes = int(y.max()) + 1

    def scores(z):
        out = np.zeros((z.shape[0], n_classes))
        out[:, model.classes_] = model.predict_proba(dense(z))
        return out

    return _Scores(scores)


BASELINES = {"logistic": fit_baseline, "gbt": fit_gbt_baseline}


def fit_named_baseline(name: str, task_type: str, x: sparse.csr_matrix, y: np.ndarray, *, seed: int = 0):
    """A baseline by its name in a task's `baselines` list."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    return BASELINES[name](task_type, x, y, seed=seed)


class _Scores:
    def __init__(self, fn):
        self._fn = fn

    def predict_scores(self, x) -> np.ndarray:
        return np.asarray(self._fn(x))


__all__ = ["BASELINES", "count_features", "fit_baseline", "fit_gbt_baseline", "fit_named_baseline"]
