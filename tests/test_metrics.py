"""Metrics against scikit-learn, bootstrap behaviour, calibration and operating points."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, brier_score_loss, confusion_matrix, roc_auc_score

from medres.evaluate import bootstrap_ci, patient_bootstrap
from medres.metrics import brier, choose_thresholds, ece, fit_temperature, point_metrics


@pytest.fixture
def fixed():
    rng = np.random.default_rng(0)
    yi = rng.integers(0, 3, 300)
    logits = rng.normal(0, 1, (300, 3)) + 2.0 * np.eye(3)[yi]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return np.eye(3)[yi], p, logits


def test_point_metrics_match_sklearn(fixed):
    y, p, _ = fixed
    m = point_metrics(y, p, ["a", "b", "c"], "multiclass", [0.4, 0.4, 0.4])
    for j, c in enumerate("abc"):
        assert m["per_class"][c]["auroc"] == pytest.approx(roc_auc_score(y[:, j], p[:, j]))
        assert m["per_class"][c]["average_precision"] == pytest.approx(average_precision_score(y[:, j], p[:, j]))
        pred = p[:, j] >= 0.4
        tn, fp, fn, tp = confusion_matrix(y[:, j], pred).ravel()
        assert m["per_class"][c]["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert m["per_class"][c]["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["per_class"][c]["ppv"] == pytest.approx(tp / (tp + fp))
        assert m["per_class"][c]["npv"] == pytest.approx(tn / (tn + fn))
    assert m["accuracy"] == pytest.approx(np.mean(y.argmax(1) == p.argmax(1)))
    assert np.array_equal(m["confusion_matrix"], confusion_matrix(y.argmax(1), p.argmax(1)))
    assert brier(y[:, :1], p[:, :1], "multilabel") == pytest.approx(brier_score_loss(y[:, 0], p[:, 0]))


def test_absent_class_is_nan_not_crash(fixed):
    y, p, _ = fixed
    keep = y[:, 2] == 0
    m = point_metrics(y[keep], p[keep], ["a", "b", "c"], "multiclass", [0.5] * 3)
    assert np.isnan(m["per_class"]["c"]["auroc"]) and not np.isnan(m["macro"]["auroc"])


def test_bootstrap_ci_contains_estimate_and_narrows(fixed):
    y, p, _ = fixed
    patients = np.arange(len(y))
    small = bootstrap_ci(y[:60], p[:60], patients[:60], ["a", "b", "c"], "multiclass", [0.5] * 3, 300)
    large = bootstrap_ci(y, p, patients, ["a", "b", "c"], "multiclass", [0.5] * 3, 300)
    est = point_metrics(y, p, ["a", "b", "c"], "multiclass", [0.5] * 3)["macro"]["auroc"]
    lo, hi = large["macro.auroc"]
    assert lo <= est <= hi
    assert (hi - lo) < (small["macro.auroc"][1] - small["macro.auroc"][0])


def test_patient_resampling_moves_images_together():
    patients = np.array(["p1", "p1", "p2", "p3", "p3", "p3"])
    for idx in patient_bootstrap(patients, 50, seed=1):
        counts = {p: int(np.sum(patients[idx] == p)) for p in ("p1", "p2", "p3")}
        assert counts["p1"] % 2 == 0 and counts["p3"] % 3 == 0


def test_temperature_scaling_lowers_ece_of_overconfident_model(fixed):
    y, _, logits = fixed
    hot = logits * 4  # deliberately over-confident
    p_hot = np.exp(hot) / np.exp(hot).sum(1, keepdims=True)
    t = fit_temperature(hot, y, "multiclass")
    assert t > 2
    cal = np.exp(hot / t) / np.exp(hot / t).sum(1, keepdims=True)
    assert ece(y, cal, "multiclass") < ece(y, p_hot, "multiclass")


def test_thresholds_youden_and_target_sensitivity(fixed):
    """Against brute force over every candidate threshold (positive = p >= t): Youden's threshold
    reaches the maximum J; the sensitivity threshold is the highest one that reaches the target."""
    y, p, _ = fixed
    th, method = choose_thresholds(y, p)
    th95, method95 = choose_thresholds(y, p, target_sensitivity=0.95)
    assert method == "youden" and method95 == "sensitivity>=0.95"
    for j in range(3):
        pos, neg = p[y[:, j] > 0, j], p[y[:, j] == 0, j]

        def sens(t):
            return np.mean(pos >= t)

        def youden(t):
            return sens(t) + np.mean(neg < t) - 1

        candidates = np.unique(p[:, j])
        assert youden(th[j]) == pytest.approx(max(youden(t) for t in candidates), abs=1e-12)
        assert sens(th95[j]) >= 0.95
        higher = candidates[candidates > th95[j]]
        assert len(higher) == 0 or sens(higher.min()) < 0.95
