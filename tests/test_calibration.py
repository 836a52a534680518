"""Calibration metrics against hand-computed values, and temperature scaling on deliberately overconfident logits."""

import numpy as np
import pytest
import torch

from kit.errors import KitError
from kit.eval.calibration import (
    apply_calibration,
    brier_score,
    choose_threshold,
    expected_calibration_error,
    fit_task_calibration,
    nll,
    threshold_metrics,
)


def test_ece_equal_width_and_equal_mass_by_hand():
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.2, 0.7, 0.8, 0.9])
    # 15 equal-width bins put each probability alone: (0.1 + 0.8 + 0.3 + 0.8 + 0.1) / 5
    assert expected_calibration_error(y, p, n_bins=15) == pytest.approx(0.42)
    # 2 equal-mass bins {0.1, 0.2, 0.7} and {0.8, 0.9}: 3/5 * |2/3 - 1/3| + 2/5 * |1/2 - 0.85|
    assert expected_calibration_error(y, p, n_bins=2, strategy="quantile") == pytest.approx(0.2 + 0.14)
    # two probabilities in one equal-width bin [0, 1/15): |1/2 - 0.03|
    assert expected_calibration_error(np.array([0, 1]), np.array([0.01, 0.05])) == pytest.approx(0.47)
    # 1.0 falls in the last bin, and a perfectly calibrated set has ECE 0
    assert expected_calibration_error(np.array([1, 1]), np.array([1.0, 1.0])) == 0.0


def test_multiclass_ece_uses_top_label_confidence():
    y = np.array([0, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])  # right at 0.7, wrong at 0.5
    assert expected_calibration_error(y, p) == pytest.approx(0.5 * 0.3 + 0.5 * 0.5)


def test_brier_by_hand():
    assert brier_score(np.array([0, 1, 1]), np.array([0.2, 0.6, 1.0])) == pytest.approx((0.04 + 0.16 + 0.0) / 3)
    y = np.array([0, 2])
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert brier_score(y, p) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.09 + 0.16)) / 2)


def _overconfident(kind: str, n: int, seed: int, scale: float = 4.0):
    rng = np.random.default_rng(seed)
    if kind == "multiclass":
        z = rng.normal(0, 1.5, (n, 4))
        pr = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        y = np.array([rng.choice(4, p=row) for row in pr])
    else:
        z = rng.normal(0, 1.5, (n, 1 if kind == "binary" else 3))
        y = (rng.random(z.shape) < 1 / (1 + np.exp(-z))).astype(float)
        y = y[:, 0] if kind == "binary" else y
    return z * scale, y  # logits `scale` times too sharp: the true temperature is `scale`


@pytest.mark.parametrize("kind", ["binary", "multilabel", "multiclass"])
def test_temperature_scaling_lowers_nll_of_an_overconfident_model(kind):
    val_logits, val_y = _overconfident(kind, 2000, seed=1)
    entry = fit_task_calibration(kind, val_logits, val_y)
    assert entry["method"] == "temperature"
    assert entry["temperature"] == pytest.approx(4.0, rel=0.15)
    assert entry["val"]["nll_after"] < entry["val"]["nll_before"] - 0.1
    assert entry["val"]["ece_after"] < entry["val"]["ece_before"]
    # and it generalises: lower NLL on fresh samples from the same model
    test_logits, test_y = _overconfident(kind, 2000, seed=2)
    assert nll(kind, test_logits, test_y, entry["temperature"]) < nll(kind, test_logits, test_y)


def test_isotonic_option_for_binary_and_refused_for_multiclass():
    logits, y = _overconfident("binary", 1000, seed=3)
    entry = fit_task_calibration("binary", logits, y, method="isotonic")
    assert entry["method"] == "isotonic"
    assert entry["val"]["brier_after"] < entry["val"]["brier_before"]
    p = apply_calibration({"tasks": {"t": entry}}, "t", np.sort(logits, axis=0))
    assert np.all(np.diff(p) >= 0)  # monotone in the logit
    with pytest.raises(KitError, match="isotonic calibration is for binary tasks"):
        fit_task_calibration("multiclass", *_overconfident("multiclass", 200, seed=4), method="isotonic")


def test_too_few_validation_samples_keep_the_models_probabilities():
    entry = fit_task_calibration("binary", np.array([[2.0], [-1.0], [0.5]]), np.array([1, 0, 1]))
    assert entry["method"] == "none" and entry["temperature"] == 1.0 and "3 validation samples" in entry["note"]


def test_apply_calibration_accepts_tensors_and_names_missing_tasks():
    cal = {"tasks": {"t": {"type": "binary", "method": "temperature", "temperature": 2.0}}}
    logits = torch.tensor([[2.0], [-4.0]])
    np.testing.assert_allclose(apply_calibration(cal, "t", logits), 1 / (1 + np.exp(-np.array([1.0, -2.0]))))
    with pytest.raises(KitError, match="no entry for task 'other'"):
        apply_calibration(cal, "other", logits)


def test_thresholds_by_f1_and_by_target_sensitivity():
    y = np.array([0, 0, 1, 0, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    # F1 at 0.8: tp 2, fp 0, fn 1 -> 0.8; at 0.3: tp 3, fp 1 -> 6/7 = 0.857 (the best)
    assert choose_threshold(y, p, "max_f1") == pytest.approx(0.3)
    assert choose_threshold(y, p, "sensitivity", 0.6) == pytest.approx(0.8)  # highest threshold with sens >= 0.6
    m = threshold_metrics(y, p, 0.3)
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(6 / 7)
