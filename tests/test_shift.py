"""The folder-level shift test and label-free performance estimates (medres/shift.py): false alarms at
the nominal rate on same-distribution folders, a constructed prior shift and a feature shift detected,
BBSE recovering known priors, ATC and the expected AUROC matching the real values on calibrated data,
and the whole path through predict (OUT.shift.json, the summary line, windows) and evaluate."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medres.shift import ShiftReference, bbse_priors, check, estimate_performance, expected_auroc

CLASSES = ["a", "b", "c"]


def _calibrated(rng, n: int, priors=(1 / 3, 1 / 3, 1 / 3), sharp: float = 3.0, shift_features: float = 0.0):
    """A calibrated classifier by construction: the label is drawn from the probabilities themselves.
    Features: a class-dependent Gaussian in 64-d (plus an offset for a feature shift)."""
    y = rng.choice(3, size=n, p=priors)
    logits = rng.normal(0, 1, (n, 3)) + sharp * np.eye(3)[y]
    # probabilities that are calibrated for this generative model: P(y | logits) by Bayes with the priors
    lik = np.exp(-0.5 * ((logits[:, None, :] - sharp * np.eye(3)[None]) ** 2).sum(2))
    post = lik * np.asarray(priors)[None]
    probs = post / post.sum(1, keepdims=True)
    means = np.random.default_rng(99).normal(0, 1, (3, 64))
    feats = means[y] + rng.normal(0, 1, (n, 64)) + shift_features
    return probs, np.eye(3)[y].astype(np.float32), feats


def _reference(seed=0, n=800):
    probs, y, feats = _calibrated(np.random.default_rng(seed), n)
    return ShiftReference.fit(probs, y, feats, "multiclass")


@pytest.mark.slow  # ≥ 20 s on 2 cores: make test runs it, make test-fast does not
def test_same_distribution_alarms_at_the_nominal_rate():
    """40 folders of 200 files from the validation distribution: at α = 0.05 (to see any alarms in a
    few dozen draws) the false-alarm rate stays near 5% (at most 4 of 40: P(Binomial(40, 0.05) > 4) ≈ 0.05);
    each test's own p-values are spread like uniform ones (about half below 0.5), not piled up near 0."""
    ref = _reference()
    rng = np.random.default_rng(1)
    alarms, p_mmd, p_ks = 0, [], []
    for _ in range(40):
        probs, _, feats = _calibrated(rng, 200)
        r = check(ref, probs, ref.reduce(feats), CLASSES, alpha=0.05, permutations=100, seed=int(rng.integers(1e6)))
        alarms += r["detected"]
        p_mmd.append(r["mmd"]["p"])
        p_ks.append(r["ks"]["a"]["p"])
    assert alarms <= 4, alarms
    for p in (p_mmd, p_ks):
        assert 0.25 <= np.mean(np.array(p) < 0.5) <= 0.75, p


def test_prior_shift_and_feature_shift_are_detected():
    ref = _reference()
    rng = np.random.default_rng(2)
    probs, _, feats = _calibrated(rng, 200, priors=(0.8, 0.1, 0.1))
    r = check(ref, probs, ref.reduce(feats), CLASSES)
    assert r["detected"] and r["p_min"] < 0.01 and "a" in r["moved_classes"] and not r["guarantees_hold"]
    assert "not guaranteed" in r["warning"]
    probs, _, feats = _calibrated(rng, 200, shift_features=0.6)  # outputs unchanged, features moved
    r = check(ref, probs, ref.reduce(feats), CLASSES)
    assert r["detected"] and r["mmd"]["p"] < 0.01 and r["moved_classes"] == []
    few = check(ref, probs[:20], None, CLASSES)
    assert few["tested"] is False and "at least" in few["reason"]


def test_mmd_permutations_equal_the_statistic_recomputed_per_permutation():
    """mmd_test computes all permutation statistics in one matrix product; each must equal the
    unbiased MMD² computed directly from that permutation's two groups (same RNG draws), so the
    p-value is the count it always was."""
    from medres.shift import mmd_test

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 4)), rng.normal(size=(20, 4)) + 0.4
    observed, p = mmd_test(x, y, permutations=99, seed=7)

    def direct(a, b):
        z = np.concatenate([a, b])
        sq = ((z[:, None] - z[None]) ** 2).sum(-1)
        k = np.exp(-sq / np.median(sq[np.triu_indices(len(z), 1)]))
        np.fill_diagonal(k, 0.0)
        n, m = len(a), len(b)
        return k[:n, :n].sum() / (n * (n - 1)) + k[n:, n:].sum() / (m * (m - 1)) - 2 * k[:n, n:].sum() / (n * m)

    z = np.concatenate([x, y])
    draws = np.random.default_rng(7)
    ref = direct(x, y)
    perms = [draws.permutation(50) for _ in range(99)]
    exceed = sum(direct(z[q[:30]], z[q[30:]]) >= ref for q in perms)
    assert observed == pytest.approx(ref, rel=1e-9)
    assert p == (1 + exceed) / 100


def test_bbse_recovers_known_priors():
    ref = _reference(n=3000)
    for priors in ((0.6, 0.3, 0.1), (0.1, 0.1, 0.8)):
        probs, _, _ = _calibrated(np.random.default_rng(3), 3000, priors=priors)
        q = bbse_priors(ref.probs.astype(np.float64), ref.targets, probs)
        assert np.abs(q - np.array(priors)).max() < 0.05, (q, priors)


def test_performance_estimates_match_the_real_values_on_calibrated_data():
    ref = _reference(n=2000)
    probs, y, _ = _calibrated(np.random.default_rng(4), 2000)
    est = estimate_performance(ref, probs, CLASSES, boot=50)
    real_acc = float((probs.argmax(1) == y.argmax(1)).mean())
    assert abs(est["accuracy"]["estimate"] - real_acc) < 0.03
    for j, c in enumerate(CLASSES):
        assert abs(est["per_class_auroc"][c]["estimate"] - roc_auc_score(y[:, j], probs[:, j])) < 0.03
        lo, hi = est["per_class_auroc"][c]["ci"]
        assert lo <= est["per_class_auroc"][c]["estimate"] <= hi


def test_expected_auroc_is_the_mean_realised_auroc():
    rng = np.random.default_rng(5)
    p = np.round(rng.random(1500), 1)  # ties included
    realised = np.mean([roc_auc_score(rng.random(1500) < p, p) for _ in range(300)])
    assert expected_auroc(p) == pytest.approx(realised, abs=0.005)


def test_predict_writes_the_shift_test_and_evaluate_the_estimates(trained_run, phantoms, tmp_path):
    from medres.cli import app
    from medres.data.synthetic import make_dataset
    from medres.model import load_checkpoint

    _, meta = load_checkpoint(trained_run / "model.safetensors")
    assert meta.shift["n"] > 0 and meta.shift["components"] > 0
    more = make_dataset(tmp_path / "more", n_per_class=20, size=80, seed=11)
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(app, ["predict", str(more), "--checkpoint", str(trained_run), "--out", str(out), "--shift-window", "30", "--quiet"])
    assert res.exit_code == 0, res.output
    shift = json.loads((tmp_path / "p.shift.json").read_text())
    assert shift["tested"] and shift["files"] == 60 and set(shift["ks"]) == set(meta.classes) and "mmd" in shift
    assert set(shift["priors"]["new"]) == set(meta.classes) and "accuracy" in shift["estimated_performance"]
    assert [w["ending_at_file"] for w in shift["windows"]] == [30, 60]
    assert "shift: " in res.output and "p.shift.json" in res.output
    assert len(pd.read_csv(out)) == 60
    res = CliRunner().invoke(app, ["predict", str(more), "--checkpoint", str(trained_run), "--out", str(tmp_path / "q.csv"), "--no-shift", "--quiet"])
    assert res.exit_code == 0 and not (tmp_path / "q.shift.json").exists()
    res = CliRunner().invoke(app, ["evaluate", "--run", str(trained_run), "--split", "", "--out", str(tmp_path / "e"), "--bootstrap", "10"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    est = m["estimated_without_labels"]
    assert est["accuracy"]["actual"] == m["accuracy"] and set(est["per_class_auroc"]) == set(meta.classes)
    assert "estimated without labels" in res.output
