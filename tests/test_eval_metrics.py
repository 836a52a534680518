"""Metrics with bootstrap intervals and the count-feature baseline."""

import numpy as np
import pytest

from kit.eval.baseline import count_features, fit_baseline
from kit.eval.metrics import bootstrap, evaluate_task, metric_fn


def test_auroc_matches_pairwise_definition():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = rng.random(200) + 0.3 * y
    pos, neg = p[y == 1], p[y == 0]
    pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert metric_fn("binary", "auroc")(y, p) == pytest.approx(pairwise)


def test_bootstrap_interval_brackets_point_and_is_deterministic():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    p = rng.random(300) + 0.5 * y
    a = bootstrap(metric_fn("binary", "auroc"), y, p, n_boot=200, seed=3)
    b = bootstrap(metric_fn("binary", "auroc"), y, p, n_boot=200, seed=3)
    assert a == b
    assert a.low < a.value < a.high


def test_single_class_gives_nan_not_error():
    m = evaluate_task("binary", np.zeros(10), np.random.default_rng(0).random(10), n_boot=20)
    assert np.isnan(m["auroc"].value)


def test_baseline_learns_a_code_signal():
    rng = np.random.default_rng(0)
    seqs, y = [], []
    for i in range(400):
        label = int(rng.random() < 0.3)
        seq = list(rng.integers(5, 50, 20))
        if label:
            seq.append(3)  # the signal token
        seqs.append(seq)
        y.append(label)
    x = count_features(seqs, 50)
    y = np.array(y)
    model = fit_baseline("binary", x[:300], y[:300])
    auc = metric_fn("binary", "auroc")(y[300:], model.predict_scores(x[300:]))
    assert auc > 0.95


def test_multiclass_and_multilabel_shapes():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(0, 20, 10)) for _ in range(60)]
    x = count_features(seqs, 20)
    mc = fit_baseline("multiclass", x, rng.integers(0, 3, 60))
    assert mc.predict_scores(x).shape == (60, 3)
    ml = fit_baseline("multilabel", x, rng.integers(0, 2, (60, 4)))
    assert ml.predict_scores(x).shape == (60, 4)
