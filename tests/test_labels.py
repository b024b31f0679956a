"""Uncertain and missing labels end to end: label states in manifests, the uncertainty policies, and
the mask — a masked entry (missing, or uncertain under `ignore`) changes neither the loss, its
gradient, nor any metric, calibration fit, threshold or conformal quantile, whatever the model says
there. Plus row selection (views, filters, several manifests) and official splits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from medres import conformal
from medres.config import load_config
from medres.data.manifest import MISSING, UNCERTAIN, load_manifest
from medres.errors import ConfigInvalid, ManifestInvalid
from medres.metrics import brier, choose_thresholds, ece, fit_temperature, point_metrics


def _csv(path, rows, header="path,patient_id,A,B"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_states_and_policies(tmp_path):
    p = _csv(tmp_path / "m.csv", ["a.png,p1,1,-1", "b.png,p2,0,", "c.png,p3,-1.0,1.0", "d.png,p4,,0.0"])
    m = load_manifest(p, classes=["A", "B"], task="multilabel")  # default: ignore
    assert m.states.tolist() == [[1, UNCERTAIN], [0, MISSING], [UNCERTAIN, 1], [MISSING, 0]]
    assert np.isnan(m.targets).tolist() == [[False, True], [False, True], [True, False], [True, False]]
    ones = load_manifest(p, classes=["A", "B"], task="multilabel", uncertain="ones").targets
    assert ones[0, 1] == 1 and ones[2, 0] == 1 and np.isnan(ones[1, 1])  # blank stays missing under every policy
    mixed = load_manifest(p, classes=["A", "B"], task="multilabel", uncertain={"A": "zeros", "default": "ones"}).targets
    assert mixed[2, 0] == 0 and mixed[0, 1] == 1
    assert m.label_counts()["A"] == {"positive": 1, "negative": 1, "uncertain": 1, "missing": 1}


def test_bad_label_values_are_named(tmp_path):
    p = _csv(tmp_path / "m.csv", ["a.png,p1,1,0", "b.png,p2,2,0"])
    with pytest.raises(ManifestInvalid, match=r"column 'A' must be 1, 0, -1 \(uncertain\) or blank \(missing\), got '2' on row 3"):
        load_manifest(p, classes=["A", "B"], task="multilabel")
    p = _csv(tmp_path / "n.csv", ["a.png,p1,1,0", "b.png,p2,-1,1"])
    with pytest.raises(ManifestInvalid, match="uncertain .* on row 3; uncertain and missing labels need data.task: multilabel"):
        load_manifest(p, classes=["A", "B"], task="multiclass")
    with pytest.raises(ConfigInvalid, match="data.uncertain names 'C'"):
        load_config(None, ["data.classes=[A, B]", "data.task=multilabel", "data.uncertain={C: ones}"])


def _masked_problem(seed=0, n=60, c=3):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < 0.4).astype(np.float32)
    y[:, 0] = np.arange(n) % 2  # both classes present everywhere
    mask = rng.random((n, c)) < 0.3
    mask[:4] = False
    ym = y.copy()
    ym[mask] = np.nan
    logits = rng.normal(size=(n, c)).astype(np.float32) + 1.5 * (y - 0.5)
    return ym, logits, mask


def test_masked_labels_change_no_loss_gradient_or_metric():
    from medres.train import _loss_fn

    ym, logits, mask = _masked_problem()
    cfg = load_config(None, ["data.classes=[a, b, c]", "data.task=multilabel"])
    loss = _loss_fn(cfg, ym, torch.device("cpu"))
    z = torch.tensor(logits, requires_grad=True)
    value = loss(z, torch.tensor(ym))
    value.backward()
    assert torch.all(z.grad[torch.tensor(mask)] == 0)  # masked entries: no gradient at all
    other = logits.copy()
    other[mask] = np.random.default_rng(1).normal(size=mask.sum()) * 10  # the model says anything there
    assert float(loss(torch.tensor(other), torch.tensor(ym))) == pytest.approx(float(value.detach()), abs=1e-6)
    # the mask is the label, not the value: a masked entry filled in with 0 or with 1 is the same thing as NaN
    from scipy.special import expit

    p, q = expit(logits), expit(other)
    for fn in (lambda pp: point_metrics(ym, pp, ["a", "b", "c"], "multilabel", [0.5] * 3), lambda pp: choose_thresholds(ym, pp),
               lambda pp: ece(ym, pp, "multilabel"), lambda pp: brier(ym, pp, "multilabel"),
               lambda pp: conformal.fit(pp, ym, "multilabel", coverage=0.8)):
        assert fn(p) == fn(q)
    assert fit_temperature(logits, ym, "multilabel") == pytest.approx(fit_temperature(other, ym, "multilabel"))
    m = point_metrics(ym, p, ["a", "b", "c"], "multilabel", [0.5] * 3)
    assert m["per_class"]["b"]["labelled"] == int((~mask[:, 1]).sum())
    # and equal to the metric computed on the labelled rows alone
    keep = ~mask[:, 1]
    alone = point_metrics(ym[keep][:, [1]], p[keep][:, [1]], ["b"], "multilabel", [0.5])
    assert m["per_class"]["b"]["auroc"] == pytest.approx(alone["per_class"]["b"]["auroc"])


def test_selection_views_filters_and_merge(tmp_path):
    from medres.data.selection import filter_mask, select_rows

    a = _csv(tmp_path / "nih.csv", ["a.png,1,1,0,PA,40", "b.png,2,0,1,AP,17", "c.png,3,0,0,LATERAL,60", "d.png,4,1,,PA,"],
             header="path,patient_id,A,B,view,age")
    b = _csv(tmp_path / "other.csv", ["x.png,1,1,PA,70,other-site", "y.png,2,0,PA,30,"], header="path,patient_id,A,view,age,source")
    cfg = load_config(None, [f"data.manifest=[{a}, {b}]", "data.classes=[A, B]", "data.task=multilabel", "data.views=[PA, AP]", "data.filter=['age >= 18']"])
    sel = select_rows(cfg.data)
    m = sel.manifest
    assert m.frame["path"].tolist() == ["a.png", "x.png", "y.png"]
    assert m.frame["source"].tolist() == ["nih", "other-site", "other"]
    assert m.frame["patient_id"].tolist() == ["nih/1", "other-site/1", "other/2"]  # the two "1"s stay two patients
    assert np.isnan(m.targets[1:, 1]).all()  # B is absent from other.csv: missing, not negative
    assert str(m.absolute(1)) == str((tmp_path / "x.png").resolve())
    assert [s["removed"] for s in sel.steps] == [0, 0, 0, 1, 2, 0]  # read, read, merge, views (LATERAL), age (17, blank), labels
    frame = pd.DataFrame({"sex": ["F", "M", ""], "age": ["30", "x", "5"]})
    assert filter_mask(frame, "sex in [F, M]").tolist() == [True, True, False]
    assert filter_mask(frame, "age < 18").tolist() == [False, False, True]
    assert filter_mask(frame, "sex != F").tolist() == [False, True, True]
    with pytest.raises(ConfigInvalid, match="no column 'weight'"):
        filter_mask(frame, "weight > 3")
    with pytest.raises(ConfigInvalid, match="expected 'COLUMN OP VALUE'"):
        filter_mask(frame, "age is big")


def test_official_split_column(tmp_path):
    from medres.data.splits import assign_splits

    rows = [f"i{k}.png,p{k // 2},{k % 2},{'test' if k >= 16 else 'train'}" for k in range(20)]
    p = _csv(tmp_path / "m.csv", rows, header="path,patient_id,A,official_split")
    m = load_manifest(p, classes=["A"], task="multilabel")
    s = assign_splits(m, val_fraction=0.25, test_fraction=0.25, seed=0, split_column="official_split")
    assert (s[16:] == "test").all()  # the archive's test rows stay test
    assert set(s[:16]) == {"train", "val"}  # no official val: carved from train patients, none moved to test
    patients = m.frame["patient_id"].to_numpy()
    assert all(len(set(s[patients == q])) == 1 for q in set(patients))
    with pytest.raises(ManifestInvalid, match="column 'official_split' has 'holdout'"):
        bad = _csv(tmp_path / "b.csv", ["a.png,p1,1,holdout"], header="path,patient_id,A,official_split")
        assign_splits(load_manifest(bad, classes=["A"], task="multilabel"), val_fraction=0.2, test_fraction=0.2, seed=0, split_column="official_split")
