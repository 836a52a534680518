"""Metrics with bootstrap intervals and the count-feature baseline."""

import numpy as np
import pytest

from kit.eval.baseline import count_features, fit_baseline
from kit.eval.metrics import bootstrap, evaluate_task, metric_fn, paired_difference


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


def test_cluster_bootstrap_resamples_subjects_not_rows():
    """60 subjects with 25 identical rows each carry the information of 60 rows: a row bootstrap pretends 1500 and is
    far too narrow; the subject bootstrap gives exactly the interval of one row per subject."""
    rng = np.random.default_rng(4)
    y1 = np.r_[np.zeros(30, int), np.ones(30, int)]
    p1 = rng.random(60) + 0.4 * y1
    y, p, subjects = np.repeat(y1, 25), np.repeat(p1, 25), np.repeat(np.arange(60), 25)
    auroc = metric_fn("binary", "auroc")
    per_subject = bootstrap(auroc, y1, p1, n_boot=300, seed=5)
    rows = bootstrap(auroc, y, p, n_boot=300, seed=5)
    clustered = bootstrap(auroc, y, p, n_boot=300, seed=5, clusters=subjects)
    assert clustered.value == pytest.approx(per_subject.value) == pytest.approx(rows.value)
    assert (clustered.low, clustered.high) == pytest.approx((per_subject.low, per_subject.high))
    assert (rows.high - rows.low) < 0.5 * (clustered.high - clustered.low)
    shuffled = rng.permutation(len(y))  # row order does not matter, only which rows share a subject
    again = bootstrap(auroc, y[shuffled], p[shuffled], n_boot=300, seed=5, clusters=subjects[shuffled])
    assert (again.low, again.high) == pytest.approx((clustered.low, clustered.high))


def test_paired_difference_cancels_what_two_models_share():
    rng = np.random.default_rng(6)
    y = rng.integers(0, 2, 400)
    p = rng.random(400) + 0.3 * y
    auroc = metric_fn("binary", "auroc")
    same = paired_difference(auroc, y, p, p, n_boot=100, seed=1)
    assert same.value == 0 and same.low == 0 and same.high == 0
    better = p + 0.5 * y  # the same scores plus more signal: better on every resample
    d = paired_difference(auroc, y, better, p, n_boot=200, seed=1, clusters=np.arange(400) // 4)
    assert d.value > 0 and d.low > 0


def test_numpy_ranking_metrics_equal_scikit_learns_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(7)
    for n, levels in ((50, 5), (300, 1000), (40, 2)):
        y = rng.integers(0, 2, n)
        p = np.round(rng.random(n) * levels) / levels + 0.1 * y  # many ties when levels is small
        assert metric_fn("binary", "auroc")(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert metric_fn("binary", "auprc")(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)
