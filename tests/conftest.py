from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MEDRES_TEST", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def shared(sub: str) -> Path:
    p = SHARED / sub
    if not p.exists():
        pytest.skip(f"../shared/data/{sub} not present")
    return p


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """A small phantom set (PNG + DICOM), manifest path returned."""
    from medres.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("phantoms"), n_per_class=16, size=80, seed=1)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, phantoms) -> Path:
    """A tiny trained run (64 px, 2 epochs) shared by evaluate/predict/report tests."""
    from medres.config import load_config
    from medres.train import fit

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={phantoms}"])
    fit(cfg, out, show_progress=False)
    return out


@pytest.fixture(autouse=True)
def _reset_medres_logging():
    yield
    root = logging.getLogger("medres")
    for h in list(root.handlers):
        if isinstance(h, logging.FileHandler):
            h.close()
            root.removeHandler(h)
