"""Conformal prediction sets (medres/conformal.py): a hand computation, the coverage guarantee on
exchangeable synthetic data, set size vs classifier quality, storage, and the subgroup warning."""

from __future__ import annotations

import csv
import math

import numpy as np
import pandas as pd
import pytest

from medres import conformal
from medres.model import load_checkpoint


def test_hand_computed_quantiles_and_sets():
    p = np.array([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
    y = np.eye(3)[[0, 1, 2, 2]]
    # LAC scores 1 - p(true): 0.3, 0.6, 0.4, 0.7. n = 4, coverage 0.75: k = ceil(5 * 0.75) = 4 → the 4th smallest, 0.7
    assert conformal.fit(p, y, "multiclass", coverage=0.75, method="lac")["qhat"] == pytest.approx(0.7)
    # coverage 0.5: k = ceil(2.5) = 3 → 0.6
    lac = conformal.fit(p, y, "multiclass", coverage=0.5, method="lac")
    assert lac["qhat"] == pytest.approx(0.6)
    # the set is every label with p ≥ 1 − 0.6 = 0.4
    assert conformal.sets(p, lac, "multiclass").tolist() == [[True, False, False], [True, True, False], [False, False, True], [False, True, False]]
    # APS scores: mass ranked above the true label: 0, 0.5, 0, 0.5. coverage 0.5 → 3rd smallest = 0.5
    aps = conformal.fit(p, y, "multiclass", coverage=0.5, method="aps")
    assert aps["qhat"] == pytest.approx(0.5)
    # mass above each label ≤ 0.5: row 0: 0, 0.7, 0.9 → {0}; row 1: 0, 0.5, 0.9 → {0, 1}; row 2: {2}; row 3: 0, 0.5, 0.8 → {1, 2}
    assert conformal.sets(p, aps, "multiclass").tolist() == [[True, False, False], [True, True, False], [False, False, True], [False, True, True]]
    # too few calibration images for the coverage asked: every set holds every label
    tiny = conformal.fit(p[:2], y[:2], "multiclass", coverage=0.9)
    assert tiny["qhat"] is None and conformal.sets(p, tiny, "multiclass").all()
    # multilabel: per-label threshold on that label's positives
    ym = np.array([[1, 0], [1, 1], [0, 1], [1, 0]])
    pm = np.array([[0.9, 0.1], [0.6, 0.8], [0.2, 0.3], [0.7, 0.4]])
    ml = conformal.fit(pm, ym, "multilabel", coverage=0.5)
    # label 0 positives' scores 0.1, 0.4, 0.3 → k = ceil(4 * 0.5) = 2 → 0.3; label 1: 0.2, 0.7 → k = ceil(1.5) = 2 → 0.7
    assert ml["qhat"] == pytest.approx([0.3, 0.7]) and ml["n"] == [3, 2]
    # label 0 where p ≥ 0.7, label 1 where p ≥ 0.3
    assert conformal.sets(pm, ml, "multilabel").tolist() == [[True, False], [False, True], [False, True], [True, True]]


def _exchangeable(rng, n: int, sharpness: float, classes: int = 3):
    """Probabilities from a Dirichlet; the label drawn from them: a calibrated classifier, whose
    quality grows with `sharpness`."""
    p = rng.dirichlet(np.full(classes, 1.0 / sharpness), size=n)
    y = np.eye(classes)[[rng.choice(classes, p=row) for row in p]]
    return p, y


@pytest.mark.parametrize("method", ["aps", "lac"])
def test_coverage_holds_over_many_seeds(method):
    """Split conformal promises E[coverage] ≥ 1 − α over calibration draws. With n_cal = 100 the realised
    coverage of one draw is Beta-distributed around it (sd ≈ 0.03); the mean over 200 draws must be
    ≥ target − 3 standard errors, and no more than target + 1/(n+1) + slack (APS scores tie at 0 for
    every correctly ranked image, which can push coverage up a little)."""
    target, n_cal, n_test = 0.9, 100, 400
    covs = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        p_cal, y_cal = _exchangeable(rng, n_cal, 1.0)
        p_test, y_test = _exchangeable(rng, n_test, 1.0)
        fitted = conformal.fit(p_cal, y_cal, "multiclass", coverage=target, method=method)
        covs.append(conformal.covered(conformal.sets(p_test, fitted, "multiclass"), y_test, "multiclass").mean())
    covs = np.array(covs)
    se = covs.std(ddof=1) / math.sqrt(len(covs))
    assert covs.mean() >= target - 3 * se, covs.mean()
    assert covs.mean() <= target + 1 / (n_cal + 1) + 0.03, covs.mean()
    # one draw's shortfall stays within the tolerance evaluate uses for its warning, almost always
    tol = conformal.coverage_tolerance(target, n_cal, n_test)
    assert (covs < target - tol).mean() <= 0.05


def test_sets_shrink_as_the_classifier_gets_better():
    rng = np.random.default_rng(0)
    sizes = []
    for sharpness in (0.5, 2.0, 8.0):
        p_cal, y_cal = _exchangeable(rng, 500, sharpness)
        p_test, _ = _exchangeable(rng, 500, sharpness)
        fitted = conformal.fit(p_cal, y_cal, "multiclass", coverage=0.9, method="aps")
        sizes.append(conformal.sets(p_test, fitted, "multiclass").sum(1).mean())
    assert sizes[0] > sizes[1] > sizes[2], sizes
    assert sizes[2] < 1.5


def test_stored_sets_reload_and_reach_predict(trained_run, phantoms, tmp_path):
    """The checkpoint's conformal fit reaches predict unchanged: every written set is the stored q̂ applied
    to the written probabilities. predict decides labels and sets on the probabilities it writes (6
    decimals), so the check is exact on every row, boundary cases included (a near-uniform model puts
    many labels within rounding of q̂; with unrounded probabilities some rows would differ)."""
    from medres.predict import predict

    _, meta = load_checkpoint(trained_run / "model.safetensors")
    assert meta.conformal["method"] == "aps" and meta.conformal["coverage"] == 0.9 and meta.conformal["n"] > 0
    assert meta.conformal["qhat"] is not None  # a real quantile, not the everything-set of a tiny calibration split
    predict(trained_run / "model.safetensors", [phantoms], tmp_path / "p.csv", workers=0)
    with open(tmp_path / "p.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    assert len(rows) >= 40
    probs = np.array([[float(r[f"prob_{c}"]) for c in meta.classes] for r in rows])
    member = conformal.sets(probs, meta.conformal, meta.task)
    sizes = []
    for r, m, p in zip(rows, member, probs):
        in_set = r["prediction_set"].split("|")
        assert set(in_set) == {c for c, v in zip(meta.classes, m) if v} and int(r["set_size"]) == len(in_set)
        assert in_set[0] == meta.classes[int(p.argmax())]  # most probable first; APS sets always hold it
        assert r["prediction"] == in_set[0]
        sizes.append(len(in_set))
    assert min(sizes) < len(meta.classes)  # the fixture's sets are informative, not all "every class"


def test_evaluate_reports_coverage_and_warns_on_a_shifted_subgroup():
    """A constructed shift: subgroup B's labels disagree with confident probabilities, so its coverage
    collapses while A's holds."""
    from medres.evaluate import conformal_audit
    from medres.model import ModelMeta

    rng = np.random.default_rng(0)
    p_cal, y_cal = _exchangeable(rng, 300, 4.0)
    meta = ModelMeta(classes=["a", "b", "c"], task="multiclass", preprocess={}, mean=[0.5], std=[0.25])
    meta.conformal = conformal.fit(p_cal, y_cal, "multiclass", coverage=0.9)
    p, y = _exchangeable(rng, 400, 4.0)
    y[200:] = np.eye(3)[(p[200:].argmax(1) + 1) % 3]  # group B: the label is never the model's top choice
    frame = pd.DataFrame({"patient_id": [f"p{i}" for i in range(400)], "site": ["A"] * 200 + ["B"] * 200})
    out, warns = conformal_audit(y, p, frame, meta, ["site"], n_boot=50, seed=0)
    a, b = out["subgroups"]["site"]["A"], out["subgroups"]["site"]["B"]
    assert a["coverage"] >= 0.9 - a["tolerance"] and b["coverage"] < 0.6
    assert a["coverage_ci"][0] <= a["coverage"] <= a["coverage_ci"][1]
    assert any(w.startswith("site=B: conformal coverage") for w in warns)
    assert not any(w.startswith("site=A") for w in warns)
    assert out["coverage"] == pytest.approx((a["coverage"] * 200 + b["coverage"] * 200) / 400)
