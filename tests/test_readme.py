"""The README cannot rot: its quickstart runs on phantom data, and its reference sections are
regenerated from the code and compared."""

import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from medres.cli import app

from helpers import ROOT  # noqa: E402
README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
FAST = ["--set", "data.image_size=32", "--set", "train.epochs=1", "--set", "train.batch_size=16", "--set", "train.precision=fp32"]


def quickstart_lines() -> list[str]:
    block = re.search(r"<!-- BEGIN quickstart -->\n```bash\n(.*?)```", README, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_quickstart_runs_on_phantoms(tmp_path, monkeypatch, phantoms):
    runner = CliRunner()
    # Lay the phantoms out as the README's class-per-folder example.
    mapping = {"normal": "normal", "opacity": "pneumonia", "diffuse": "covid"}
    df = pd.read_csv(phantoms)
    for _, row in df.iterrows():
        dest = tmp_path / "xrays" / mapping[row["label"]]
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(phantoms.parent / row["path"], dest / f"{row['patient_id']}_{Path(row['path']).name}")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    lines = quickstart_lines()
    assert [l.split()[1] for l in lines] == ["manifest", "manifest", "train", "evaluate", "predict", "report"]
    for line in lines:
        args = shlex.split(line)[1:]
        if args[0] == "train":
            args += FAST + ["--quiet"]
        if args[0] == "evaluate":
            args += ["--bootstrap", "20"]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, (line, result.output)
    run = tmp_path / "runs" / "covid"
    assert (run / "model.safetensors").exists() and (run / "eval" / "report.html").exists()
    # the README's Python example, on the same run and folder
    block = re.search(r"<!-- BEGIN api -->\n```python\n(.*?)```", README, re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README api example", "exec"), scope)
    assert len(scope["table"]) == len(list((tmp_path / "xrays" / "covid").iterdir()))
    assert set(scope["cam"]["probs"]) == {"normal", "pneumonia", "covid"} and next(iter(scope["cam"]["maps"].values())).shape == (32, 32)
    assert len(pd.read_csv(run / "predictions.csv")) == len(df)
    assert (run / "report" / "index.html").exists()


def test_reference_sections_are_generated_from_the_code():
    from medres.docs import render

    assert render(README) == README, "run: python -m medres.docs"
    assert render(REFERENCE) == REFERENCE, "run: python -m medres.docs"


def test_readme_stays_short():
    assert len(README.splitlines()) <= 300


def test_architecture_names_every_module():
    """One line (or one entry) per module in the README's architecture block: a module nobody can place
    in the data flow is a module in the wrong room."""
    block = README.split("## Architecture", 1)[1].split("```")[1]
    names = {p.name for p in (ROOT / "medres").glob("*.py") if not p.name.startswith("__")}
    names |= {p.name + "/" for p in (ROOT / "medres").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    missing = sorted(n for n in names if not re.search(rf"(?<![\w/]){re.escape(n)}", block))
    assert not missing, f"not in the README's architecture section: {missing}"


def test_every_cli_option_documented():
    import typer.main

    root = typer.main.get_command(app)

    def walk(group):
        for cmd in group.commands.values():
            if hasattr(cmd, "commands"):
                yield from walk(cmd)
            else:
                yield cmd

    for cmd in walk(root):
        for p in cmd.params:
            for opt in p.opts:
                if opt.startswith("-"):
                    assert f"`{opt}`" in REFERENCE, opt


def test_every_error_code_documented():
    import medres.export  # noqa: F401
    from medres.errors import all_codes

    from medres.docs import error_codes_md

    for code in all_codes():
        assert f"`{code}`" in REFERENCE, code
    for row in error_codes_md().splitlines()[2:]:
        assert not row.rstrip().endswith("|  |"), f"error code without a description: {row}"


def test_version_and_help_examples():
    runner = CliRunner()
    assert "medres 0." in runner.invoke(app, ["--version"]).output
    for cmd in ("train", "evaluate", "calibrate", "predict", "export", "report", "inspect", "demo"):
        out = runner.invoke(app, [cmd, "--help"]).output
        assert "Example:" in out, cmd


@pytest.mark.slow  # ≥ 20 s on 2 cores: make test runs it, make test-fast does not
def test_demo_command(tmp_path):
    """`medres demo` end to end, as `make demo` runs it, at a reduced size."""
    runner = CliRunner()
    r = runner.invoke(app, ["demo", "--out", str(tmp_path), "--set", "data.image_size=32", "--set", "train.epochs=1", "--set", "eval.bootstrap=20"])
    assert r.exit_code == 0, r.output
    for p in ("eval/report.html", "eval/metrics.json", "report/index.html", "predictions.csv", "run/model.safetensors", "run/model_card.md", "run/model_card.html", "run/curves.png"):
        assert (tmp_path / p).exists(), p
    assert "test macro AUROC" in r.output and f"model card:        {tmp_path / 'run' / 'model_card.md'}" in r.output
    assert r.output.rstrip().splitlines()[-1] == f"Grad-CAM report:   {tmp_path / 'report' / 'index.html'}"  # the demo ends with the report


def test_demo_config_is_package_data_and_linked_from_configs():
    """One copy: the installed package carries demo.yaml; configs/demo.yaml is a link to it."""
    from importlib.resources import files

    from medres.config import load_config
    from medres.demo import default_demo_config

    packaged = files("medres") / "demo.yaml"
    assert packaged.is_file() and default_demo_config() == Path(str(packaged))
    assert (ROOT / "configs" / "demo.yaml").resolve() == Path(str(packaged)).resolve()
    assert load_config(default_demo_config()).name == "demo"


def test_shift_example_has_the_form_predict_prints():
    """The README's example summary is the form shift.summary_line and shift.warning print (P, N, A,
    LOW, HIGH, CLASSES stand for the values; '…' for text left out)."""
    from medres.shift import summary_line, warning

    result = {"tested": True, "detected": True, "p_min": 3.1e-07, "files": 171, "alpha": 0.01, "moved_classes": ["covid"],
              "estimated_performance": {"accuracy": {"estimate": 0.61, "ci": [0.54, 0.68]}}}
    block = README[README.index("shift: SHIFT DETECTED"):]
    shown = block[: block.index("```")].strip().splitlines()

    def pattern(line: str) -> str:
        out = re.escape(line)
        for word, rx in (("LOW", r"[\d.]+"), ("HIGH", r"[\d.]+"), ("CLASSES", r"[^)]+"), ("P", r"[\d.e+-]+"), ("N", r"\d+"), ("A", r"[\d.]+")):
            out = re.sub(rf"\b{word}\b", lambda _: rx, out)
        return out.replace("…", ".*")

    assert re.fullmatch(pattern(shown[0]), summary_line(result)), (shown[0], summary_line(result))
    assert re.fullmatch(pattern(shown[1]), "warning: " + warning(result)), (shown[1], warning(result))
