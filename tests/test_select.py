"""`medres select` (medres/select.py): each strategy against a hand-computed ranking, the exclusions
(gate-flagged, failed, already labelled), one film per patient, and the CLI's manifest to fill in."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medres.select import coreset_order, entropy, margin, rank

P = np.array([[0.98, 0.01, 0.01], [0.34, 0.33, 0.33], [0.6, 0.39, 0.01], [0.5, 0.25, 0.25]])


def test_uncertainty_strategies_by_hand():
    # entropy: uniform-ish row 1 first, then row 3 (0.5/0.25/0.25 = 1.04 nats), row 2 (0.71), the confident row 0 last
    assert rank("entropy", P, None, task="multiclass", n=4)[0].tolist() == [1, 3, 2, 0]
    assert entropy(P[[3]], "multiclass")[0] == pytest.approx(-(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)))
    # margin: top-two gaps 0.97, 0.01, 0.21, 0.25 → rows 1, 2, 3, 0
    assert rank("margin", P, None, task="multiclass", n=4)[0].tolist() == [1, 2, 3, 0]
    ml = np.array([[0.9, 0.1], [0.55, 0.2], [0.3, 0.42]])
    # multilabel margin: distance of the closest label to its threshold (0.5, 0.4): 0.3, 0.05, 0.02 → rows 2, 1, 0
    assert rank("margin", ml, None, task="multilabel", n=3, thresholds=[0.5, 0.4])[0].tolist() == [2, 1, 0]
    assert margin(ml, "multilabel", thresholds=[0.5, 0.4]) == pytest.approx([-0.3, -0.05, -0.02])
    r1, r2 = rank("random", P, None, task="multiclass", n=3, seed=1), rank("random", P, None, task="multiclass", n=3, seed=1)
    assert r1[0].tolist() == r2[0].tolist() and len(set(r1[0])) == 3
    with pytest.raises(Exception, match="--strategy must be one of"):
        rank("bald", P, None, task="multiclass", n=2)


def test_coreset_by_hand_and_duplicates():
    labelled = np.array([[0.0, 0.0]])
    x = np.array([[1.0, 0.0], [10.0, 0.0], [9.99, 0.0], [0.0, 5.0]])
    order, dist = coreset_order(x, labelled, 3)
    # farthest from the labelled centre: (10, 0); then from {centre, (10,0)}: (0, 5) at 5, not the near-duplicate (9.99, 0) at 0.01
    assert order.tolist() == [1, 3, 0] and dist[:2] == pytest.approx([10.0, 5.0])


def test_select_cli_excludes_and_writes_a_manifest_to_fill(trained_run, phantoms, tmp_path):
    from PIL import Image

    from medres.cli import app

    folder = tmp_path / "unlabelled"
    folder.mkdir()
    frame = pd.read_csv(phantoms)
    for rel in frame["path"][:12]:  # already in the run's manifest: never proposed again
        (folder / rel.replace("/", "_")).write_bytes((phantoms.parent / rel).read_bytes())
    from medres.data.synthetic import make_dataset

    fresh = make_dataset(tmp_path / "fresh", n_per_class=4, size=80, seed=21)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((80, 80)) * 255).astype(np.uint8)).save(tmp_path / "fresh" / "noise.png")  # flagged by the gate
    (tmp_path / "fresh" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "to_label.csv"
    res = CliRunner().invoke(app, ["select", str(tmp_path / "fresh"), "--checkpoint", str(trained_run), "--n", "5", "--out", str(out), "--strategy", "coreset",
                                   "--exclude", str(phantoms)])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(table) == 5 and table["rank"].tolist() == ["1", "2", "3", "4", "5"] and (table["label"] == "").all()
    assert "noise.png" not in set(table["path"]) and "broken.png" not in set(table["path"])
    assert "flagged by the input gate" in res.output and "failed or refused" in res.output
    # the output is a manifest medres reads: fill the labels in and it loads
    table["label"] = "normal"
    table.to_csv(tmp_path / "filled.csv", index=False)
    from medres.data.manifest import load_manifest

    m = load_manifest(tmp_path / "filled.csv", classes=["normal", "opacity", "diffuse"])
    assert all(m.absolute(i).is_file() for i in range(len(m)))
    # already-labelled files (the exclude manifest's) are left out
    res = CliRunner().invoke(app, ["select", str(phantoms), "--checkpoint", str(trained_run), "--n", "3", "--out", str(tmp_path / "none.csv"), "--exclude", str(phantoms)])
    assert res.exit_code == 2 and "no candidate left" in res.output and "already in the training manifest" in res.output


def test_one_film_per_patient(trained_run, tmp_path):
    from medres.data.synthetic import make_dataset
    from medres.select import select

    m = make_dataset(tmp_path / "d", n_per_class=4, size=80, seed=22)
    df = pd.read_csv(m)
    df["patient_id"] = [f"p{i // 3}" for i in range(len(df))]  # three films per patient
    df.to_csv(m, index=False)
    table = select(trained_run, [m], tmp_path / "s.csv", n=4, strategy="entropy", by_patient=True, exclude=tmp_path / "nothing.csv")
    assert len(table) == 4 and table["patient_id"].nunique() == 4
