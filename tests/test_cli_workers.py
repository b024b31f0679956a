"""`--workers` means one thing everywhere: the number of workers of the one decoding pool
(`medres.data.pool`) — the same help, default and validation in every command that takes it, and the
same outputs whatever the number. Also: options shared by several commands read the same in each."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from medres.cli import app
from medres.data import pool

runner = CliRunner()
WORKER_COMMANDS = ("predict", "evaluate", "report")


@pytest.fixture
def spied_pool(monkeypatch):
    """Every call of the shared pool's `imap`: (module of the work function, workers)."""
    calls: list[tuple[str, int | None]] = []
    real = pool.imap

    def spy(work, items, **kw):
        calls.append((work.__module__, kw.get("workers")))
        return real(work, items, **kw)

    monkeypatch.setattr(pool, "imap", spy)
    return calls


def test_predict_workers_n_equals_workers_0(trained_run, phantoms, tmp_path, spied_pool):
    src = tmp_path / "in"
    src.mkdir()
    for png in sorted((phantoms.parent / "images").glob("*.png"))[:9]:
        shutil.copy(png, src / png.name)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    tables = {}
    for workers in ("0", "3"):
        out = tmp_path / f"w{workers}.csv"
        r = runner.invoke(app, ["predict", "--checkpoint", str(trained_run), str(src), "--out", str(out), "--workers", workers, "--precision", "fp32", "-q", "--no-shift"])
        assert r.exit_code == 1, r.output  # the broken file
        tables[workers] = pd.read_csv(out, keep_default_na=False)
    assert (tables["0"]["status"] == "error").sum() == 1 and len(tables["0"]) == 10
    pd.testing.assert_frame_equal(tables["3"], tables["0"])
    assert ("medres.scoring", 0) in spied_pool and ("medres.scoring", 3) in spied_pool


def test_evaluate_workers_n_equals_workers_0(trained_run, tmp_path, spied_pool):
    results = {}
    for workers in ("0", "2"):
        out = tmp_path / f"eval{workers}"
        # A fresh store each time, so the images are really decoded with that many workers.
        r = runner.invoke(app, ["evaluate", "--run", str(trained_run), "--out", str(out), "--bootstrap", "20", "--device", "cpu",
                                "--store-dir", str(tmp_path / f"store{workers}"), "--workers", workers])
        assert r.exit_code == 0, r.output
        results[workers] = (pd.read_csv(out / "per_case.csv", keep_default_na=False), json.loads((out / "metrics.json").read_text()))
    pd.testing.assert_frame_equal(results["2"][0], results["0"][0])
    assert results["2"][1]["macro"] == results["0"][1]["macro"]
    assert ("medres.data.store", 0) in spied_pool and ("medres.data.store", 2) in spied_pool


def test_scoring_and_store_call_the_one_pool(trained_run, phantoms, tmp_path, spied_pool):
    """Both decoding paths go through `medres.data.pool.imap`, with its default when not told."""
    from medres.data.store import ImageStore
    from medres.io import PreprocessSpec
    from medres.predict import predict

    images = sorted((phantoms.parent / "images").glob("*.png"))[:4]
    predict(trained_run / "model.safetensors", images, tmp_path / "p.csv", shift=False)
    ImageStore.open([(str(p), p.name) for p in images], PreprocessSpec(image_size=32), root=tmp_path / "s").ensure()
    assert [m for m, _ in spied_pool] == ["medres.scoring", "medres.data.store"]
    assert [pool.resolve_workers(w) for _, w in spied_pool] == [pool.default_workers()] * 2  # one default


def _option_help(command: str, option: str) -> str:
    import typer.main

    cmd = typer.main.get_command(app).commands[command]
    (p,) = [p for p in cmd.params if option in getattr(p, "opts", ())]
    return f"{p.help}|{p.default}|{getattr(p, 'min', None)}"


@pytest.mark.parametrize("option, commands", [("--workers", WORKER_COMMANDS), ("--device", ("evaluate", "predict", "report")),
                                              ("--precision", ("predict", "report")), ("--expect", ("predict", "report")),
                                              ("--gate", ("predict", "report")), ("--store-dir", ("evaluate", "calibrate"))])
def test_shared_options_read_the_same_everywhere(option, commands):
    assert len({_option_help(c, option) for c in commands}) == 1


@pytest.mark.parametrize("command", WORKER_COMMANDS)
def test_negative_workers_is_a_usage_error(command, tmp_path):
    inputs = [] if command == "evaluate" else [str(tmp_path)]
    r = runner.invoke(app, [command, "--workers", "-1", "--checkpoint", str(tmp_path / "m.safetensors"), *inputs, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--workers" in r.output, r.output


@pytest.mark.parametrize("command", [[], ["train"], ["predict"], ["evaluate"], ["report"], ["manifest", "build"], ["weights", "import"]])
def test_flags_show_no_value_type_in_help(command):
    r = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "<bool>" not in r.output, r.output
