"""`medres card` and the run's curves.png: every section present, every number equal to its source."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from PIL import Image

from medres.card import SECTIONS, ci, fmt, write_card
from medres.evaluate import evaluate
from medres.model import load_checkpoint, sha256_of


@pytest.fixture(scope="module")
def carded(trained_run, phantoms, tmp_path_factory):
    ev = tmp_path_factory.mktemp("eval")
    evaluate(trained_run / "model.safetensors", phantoms, ev, splits_csv=trained_run / "splits.csv", by=["site"], bootstrap=50)
    out = tmp_path_factory.mktemp("card") / "model_card.md"
    md, page = write_card(trained_run, out, ev)
    return md.read_text(), page.read_text(), json.loads((ev / "metrics.json").read_text()), ev


def _table_rows(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_every_section_in_both_renderings(carded):
    md, page, _, _ = carded
    for title in SECTIONS:
        assert f"## {title}" in md and f"<h2>{title}</h2>" in page
    assert "Research use only" in md
    assert "http://" not in page and "https://" not in page and "data:image/png;base64," in page  # self-contained


def test_numbers_equal_the_sources(carded, trained_run, phantoms):
    md, _, ev, _ = carded
    _, meta = load_checkpoint(trained_run / "model.safetensors")
    assert sha256_of(trained_run / "model.safetensors") in md and meta.config_sha256 in md
    metrics = {r[0]: r[1:] for r in _table_rows(md, "class | AUROC")}
    for c in ev["classes"]:
        pc = ev["per_class"][c]
        assert metrics[c] == [ci(pc[k], pc[k + "_ci"]) for k in ("auroc", "average_precision", "sensitivity", "specificity")]
    assert metrics["macro"][0] == ci(ev["macro"]["auroc"], ev["macro"]["auroc_ci"])
    assert f"Accuracy {ci(ev['accuracy'], ev['accuracy_ci'])}." in md
    cal = {r[0]: r[1:] for r in _table_rows(md, "calibration")}
    assert cal["before (T = 1)"] == [fmt(ev["calibration"]["before"]["ece"]), fmt(ev["calibration"]["before"]["brier"])]
    cf = ev["conformal"]
    assert f"coverage {ci(cf['coverage'], cf['coverage_ci'])}, mean set size {ci(cf['mean_set_size'], cf['mean_set_size_ci'])}" in md
    assert f"{meta.ood['threshold']:.4f}" in md and f"{ev['ood']['flagged']} of {ev['images']} images" in md
    # training data: images per split × class × site, counted here independently
    splits = pd.read_csv(trained_run / "splits.csv")
    man = pd.read_csv(phantoms)
    expected = splits.merge(man, on="path").groupby(["split", "label", "site"]).size()
    table = _table_rows(md, "split | class")
    assert {(r[0], r[1], r[2]): int(r[3]) for r in table} == {k: int(v) for k, v in expected.items()}
    assert sum(int(r[3]) for r in table) == len(man)
    # subgroup rows and every evaluate warning
    site = {r[0]: r for r in _table_rows(md, "site | images | patients")}
    for g, v in ev["subgroups"][0]["groups"].items():
        assert site[g][1:4] == [str(v["images"]), str(v["patients"]), ci(v["macro"]["auroc"], v["macro"]["auroc_ci"])]
    for w in ev["warnings"]:
        assert w in md
    assert re.search(r"Split 'test': \d+ images from \d+ patients", md)


def test_curves_png_and_the_evaluate_page_link(carded, trained_run):
    _, _, ev, ev_dir = carded
    img = Image.open(trained_run / "curves.png")
    assert img.size[0] > 400 and img.size[1] > 200
    assert ev["curves"].endswith("curves.png") and (ev_dir / ev["curves"]).resolve() == (trained_run / "curves.png").resolve()
    page = (ev_dir / "report.html").read_text()
    assert "model_card.html" in page and "curves.png" in page


def test_curves_keep_the_last_record_of_a_resumed_epoch(tmp_path):
    from medres.plots import write_curves

    rows = [{"epoch": 1, "frozen": True, "train_loss": 1.0, "val_loss": 1.1, "val_macro_auroc": 0.6},
            {"epoch": 2, "frozen": False, "train_loss": 0.8, "val_loss": 0.9, "val_macro_auroc": 0.7},
            {"epoch": 2, "frozen": False, "train_loss": 0.7, "val_loss": 0.8, "val_macro_auroc": 0.75}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert write_curves(tmp_path) == tmp_path / "curves.png"
    assert write_curves(tmp_path / "missing") is None


def test_card_refuses_a_folder_that_is_not_a_run(tmp_path):
    from medres.errors import UsageError

    with pytest.raises(UsageError, match="not a medres run folder"):
        write_card(tmp_path, tmp_path / "card.md")


@pytest.mark.slow  # ≥ 20 s on 2 cores: make test runs it, make test-fast does not
def test_tensorboard_and_mlflow_against_local_stores(phantoms, tmp_path):
    """train.log_to writes TensorBoard events and an MLflow run to local files (never a network
    service): params = the resolved config, one metric value per epoch, checkpoint and card as artifacts."""
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from medres.config import load_config
    from medres.train import fit

    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "smoke.yaml", [f"data.manifest={phantoms}", "train.log_to=[tensorboard,mlflow]", "train.max_steps_per_epoch=2"])
    out = tmp_path / "run"
    summary = fit(cfg, out, show_progress=False)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_macro_auroc")] == [1, 2]
    assert [round(e.value, 6) for e in events.Scalars("train_loss")] == [round(e["train_loss"], 6) for e in summary["epochs"]]
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["data.image_size"] == "64"
    history = client.get_metric_history(run.info.run_id, "val_macro_auroc")
    assert [m.step for m in history] == [1, 2] and [m.value for m in history] == pytest.approx([e["val_macro_auroc"] for e in summary["epochs"]])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.safetensors", "model_card.md", "curves.png", "config.yaml"} <= names
    assert str(out / "mlartifacts") in run.info.artifact_uri


def test_card_html_is_rendered_from_its_template_and_escaped(carded):
    """The page comes from templates/model_card.html (Jinja2, autoescaped): card values are escaped, never markup."""
    from pathlib import Path

    import medres.templates
    from medres.card import Section, to_html

    template = Path(medres.templates.__file__).parent / "model_card.html"
    assert template.is_file()
    style = template.read_text(encoding="utf-8").splitlines()[1]  # the template's <style> line, verbatim
    _, page, ev, _ = carded
    assert style in page and f"<td>{ev['classes'][0]}</td>" in page
    sec = Section("Model details")
    sec.p("AUROC < 0.8 & <script>x</script>")
    sec.table(["class", "n"], [["<covid>", 3]])
    html = to_html([sec])
    assert style in html and "<h2>Model details</h2>" in html
    assert "<p>AUROC &lt; 0.8 &amp; &lt;script&gt;x&lt;/script&gt;</p>" in html and "<td>&lt;covid&gt;</td><td>3</td>" in html
    assert "<script>" not in html
