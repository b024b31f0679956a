"""The on-disk decoded-image store: exact contents, resumable and crash-safe builds, one builder
among several processes, reuse across runs and commands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import ROOT
from medres.data.store import ImageStore, quantise
from medres.io import PreprocessSpec, load_image

SPEC = PreprocessSpec(image_size=32)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> list[tuple[str, str]]:
    """120 small noise PNGs of varied shapes (and one broken file) as (absolute path, shown) items."""
    d = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    items = []
    for i in range(120):
        h, w = 40 + i % 7, 48 - i % 5
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(d / f"{i:03d}.png")
        items.append((str(d / f"{i:03d}.png"), f"{i:03d}.png"))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    items.insert(7, (str(d / "broken.png"), "broken.png"))
    return items


def _journal_rows(store: ImageStore) -> list[int]:
    lines = (store.folder / "journal.jsonl").read_bytes().splitlines()
    return [json.loads(x)["row"] for x in lines if b'"row"' in x]


def test_rows_equal_the_ingestion_pipeline(pngs, tmp_path):
    """float32 rows are exactly what load_image returns; uint8 rows are those rounded to 1/255."""
    for dtype in ("float32", "uint8"):
        store = ImageStore.open(pngs, SPEC, root=tmp_path, dtype=dtype)
        stats = store.ensure(workers=2)
        assert stats.decoded == len(pngs) and stats.reused == 0
        for i in (0, 8, 60, len(pngs) - 1):
            want = load_image(pngs[i][0], SPEC).pixels
            got = store.read_raw(np.array([i]))[0]
            if dtype == "float32":
                np.testing.assert_array_equal(got, want)
            else:
                np.testing.assert_array_equal(got, quantise(want, "uint8"))
                assert np.abs(store.read(np.array([i]))[0] - want).max() <= 0.5 / 255 + 1e-7
        # The bad file is an error row with its code, not an exception; the others are usable.
        assert store.errors() == [(7, "NOT_AN_IMAGE", store.errors()[0][2])] and "broken.png" in store.errors()[0][2]
        assert store.ok_mask().sum() == len(pngs) - 1
        # A plain .npy: NumPy opens it without medres.
        assert np.load(store.folder / "pixels.npy", mmap_mode="r").shape == (len(pngs), 32, 32)


def test_second_open_decodes_nothing(pngs, tmp_path):
    ImageStore.open(pngs, SPEC, root=tmp_path).ensure(workers=0)
    again = ImageStore.open(pngs, SPEC, root=tmp_path)
    stats = again.ensure(workers=0)
    assert stats.decoded == 0 and stats.reused == len(pngs)
    # A different spec or dtype is a different store.
    assert ImageStore.open(pngs, PreprocessSpec(image_size=24), root=tmp_path).folder != again.folder
    assert ImageStore.open(pngs, SPEC, root=tmp_path, dtype="uint16").folder != again.folder



def test_threads_processes_and_inline_build_the_same_rows(pngs, tmp_path):
    """The shared decoding pool (medres.data.pool): threads (the default), spawned processes and
    in-line decoding write the same rows and journal the same entries."""
    built = {}
    for pool, workers in (("thread", 0), ("thread", 3), ("process", 2)):
        store = ImageStore.open(pngs, SPEC, root=tmp_path / f"{pool}{workers}")
        assert store.ensure(workers=workers, pool=pool).decoded == len(pngs)
        assert _journal_rows(store) == list(range(len(pngs)))  # in row order, whatever the pool
        built[pool, workers] = (store.read_raw(np.arange(len(pngs))), store.errors(), store.digests())
    ref = built["thread", 0]
    for key, (pixels, errors, digests) in built.items():
        np.testing.assert_array_equal(pixels, ref[0], err_msg=str(key))
        assert errors == ref[1] and digests == ref[2], key


def test_pool_workers_are_validated_and_defaulted():
    from medres.data import pool
    from medres.errors import UsageError

    assert pool.resolve_workers(None) == pool.default_workers() == pool.default_workers("process")
    assert 2 <= pool.default_workers() <= 4 and pool.resolve_workers(0) == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(UsageError, match="--workers"):
            pool.resolve_workers(bad)
    with pytest.raises(UsageError, match="decoding pool"):
        list(pool.imap(lambda s, x: x, [1, 2], setup=lambda: None, workers=2, kind="fork"))
    assert pool.START_METHOD == "spawn" and pool.DEFAULT_KIND == "thread"


_CHILD = textwrap.dedent(
    """
    import json, sys, time
    import medres.data.store as S
    from medres.io import PreprocessSpec

    real = S._decode_row
    def slow(rows, job):  # test-only pacing so the parent can act mid-build
        time.sleep(0.01)
        return real(rows, job)
    S._decode_row = slow
    items = [tuple(x) for x in json.load(open(sys.argv[1]))]
    store = S.ImageStore.open(items, PreprocessSpec(image_size=32), root=sys.argv[2])
    st = store.ensure(workers=int(sys.argv[3]))
    print(json.dumps({"decoded": st.decoded, "reused": st.reused, "waited": st.waited}))
    """
)


def _child(tmp_path: Path, items, root: Path, workers: int) -> subprocess.Popen:
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "child.py").write_text(_CHILD)
    return subprocess.Popen([sys.executable, str(tmp_path / "child.py"), str(tmp_path / "items.json"), str(root), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=ROOT)


def test_kill_9_mid_build_then_resume(pngs, tmp_path):
    root = tmp_path / "store"
    proc = _child(tmp_path, pngs, root, workers=2)
    store = ImageStore.open(pngs, SPEC, root=root)
    journal = store.folder / "journal.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (journal.exists() and journal.read_bytes().count(b'"row"') >= 30):
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = ImageStore.open(pngs, SPEC, root=root)
    done = len(killed.rows)
    assert 30 <= done < len(pngs), "the build finished before it could be killed"
    stats = killed.ensure(workers=2)
    # Every journaled row is kept; only the rest is decoded.
    assert stats.reused == done and stats.decoded == len(pngs) - done
    assert sorted(_journal_rows(killed)) == list(range(len(pngs)))  # no row journaled twice
    reference = ImageStore.open(pngs, SPEC, root=tmp_path / "ref")
    reference.ensure(workers=0)
    rows = np.arange(len(pngs))
    np.testing.assert_array_equal(killed.read_raw(rows), reference.read_raw(rows))
    assert killed.errors() == reference.errors() and killed.digests() == reference.digests()


def test_two_processes_build_one_store(pngs, tmp_path):
    root = tmp_path / "store"
    procs = [_child(tmp_path, pngs, root, workers=1) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    # One built everything; the other waited and reused it. Every row was decoded exactly once.
    assert sorted(r["decoded"] for r in results) == [0, len(pngs)]
    store = ImageStore.open(pngs, SPEC, root=root)
    assert sorted(_journal_rows(store)) == list(range(len(pngs)))
    assert store.ensure(workers=0).decoded == 0 and not store.verify()


def test_damage_is_detected_and_repaired(pngs, tmp_path):
    store = ImageStore.open(pngs, SPEC, root=tmp_path)
    store.ensure(workers=0)
    good = store.read_raw(np.arange(len(pngs)))
    journal = store.folder / "journal.jsonl"
    lines = journal.read_bytes().splitlines(keepends=True)
    # A crash: the last sync marker gone (rows after it are unvouched), one of those rows' pixels lost,
    # and a torn half line at the end.
    assert b"sync" in lines[-1]
    journal.write_bytes(b"".join(lines[:-1]) + b'{"row": 3, "ok": tr')
    with open(store.folder / "pixels.npy", "r+b") as fh:
        fh.seek(store._offset + 50 * store.row_bytes)
        fh.write(b"\x01" * store.row_bytes)
    again = ImageStore.open(pngs, SPEC, root=tmp_path)
    assert 50 not in again.rows and len(again.rows) == len(pngs) - 1
    assert again.ensure(workers=0).decoded == 1
    np.testing.assert_array_equal(again.read_raw(np.arange(len(pngs))), good)
    # Damage that a full verify finds (bit rot in a synced row).
    with open(store.folder / "pixels.npy", "r+b") as fh:
        fh.seek(store._offset + 10 * store.row_bytes + 5)
        fh.write(b"\xff\x00\xff")
    assert again.verify() == [10] and again.ensure(workers=0).decoded == 1
    # A truncated array or unreadable metadata: the store is rebuilt from scratch, not read.
    with open(store.folder / "pixels.npy", "r+b") as fh:
        fh.truncate(1000)
    rebuilt = ImageStore.open(pngs, SPEC, root=tmp_path)
    assert not rebuilt.rows and rebuilt.ensure(workers=0).decoded == len(pngs)
    (store.folder / "meta.json").write_text("{not json")
    assert not ImageStore.open(pngs, SPEC, root=tmp_path).rows


def test_changed_file_is_decoded_again(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    items = []
    for i in range(5):
        Image.fromarray(np.tile(np.arange(20, dtype=np.uint8) * 10 + i, (20, 1))).save(d / f"{i}.png")
        items.append((str(d / f"{i}.png"), f"{i}.png"))
    store = ImageStore.open(items, SPEC, root=tmp_path / "s")
    store.ensure(workers=0)
    before = store.read_raw(np.arange(5))
    Image.fromarray(np.tile(np.arange(20, dtype=np.uint8)[::-1] * 10 + 2, (20, 1))).save(d / "2.png")  # mirrored
    os.utime(d / "2.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    store = ImageStore.open(items, SPEC, root=tmp_path / "s")
    assert store.missing().tolist() == [2]
    assert store.ensure(workers=0).decoded == 1
    after = store.read_raw(np.arange(5))
    assert np.abs(after[2].astype(int) - before[2][:, ::-1]).max() <= 1  # the new content
    np.testing.assert_array_equal(np.delete(after, 2, 0), np.delete(before, 2, 0))


# --- the commands on the store ---------------------------------------------------------------------
def _cfg(manifest: Path, *extra: str):
    from medres.config import load_config

    return load_config(ROOT / "configs" / "smoke.yaml", [f"data.manifest={manifest}", "train.epochs=1", "train.max_steps_per_epoch=2", "train.calibrate=false", *extra])


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_second_train_and_evaluate_decode_nothing(phantoms, tmp_path, caplog):
    import logging

    from medres.evaluate import evaluate
    from medres.train import fit

    store_dir = tmp_path / "store"
    fit(_cfg(phantoms, f"data.store_dir={store_dir}"), tmp_path / "a", show_progress=False)
    (folder,) = list(store_dir.iterdir())
    before = (folder / "journal.jsonl").read_bytes()
    with caplog.at_level(logging.INFO, logger="medres"):
        fit(_cfg(phantoms, f"data.store_dir={store_dir}"), tmp_path / "b", show_progress=False)
        evaluate(tmp_path / "b" / "model.safetensors", phantoms, tmp_path / "eval", splits_csv=tmp_path / "b" / "splits.csv", bootstrap=0, plots=False, store_dir=store_dir)
    assert "0 rows decoded" in caplog.text
    assert (folder / "journal.jsonl").read_bytes() == before  # nothing decoded, nothing appended
    assert list(store_dir.iterdir()) == [folder]


def test_evaluate_from_store_equals_direct_scoring(trained_run, phantoms, tmp_path):
    """The store path gives the logits the in-memory path gave: float32 store exactly (same pixels),
    the uint8 default within the rounding of 1/255."""
    import torch

    from medres.evaluate import evaluate
    from medres.inference import Predictor
    from medres.model import load_checkpoint

    ckpt = trained_run / "model.safetensors"
    model, meta = load_checkpoint(ckpt)
    df = pd.read_csv(phantoms)
    spec = PreprocessSpec.from_dict(meta.preprocess)
    pixels = torch.from_numpy(np.stack([load_image(phantoms.parent / p, spec).pixels for p in df["path"]]))
    predictor = Predictor.create(model, meta, precision="fp32")
    direct = predictor.probs(predictor.logits_batched(pixels, 16))
    probs = {}
    for dtype in ("float32", "uint8"):
        meta_dtype_ckpt = tmp_path / f"{dtype}.safetensors"
        from medres.model import save_checkpoint

        meta.store_dtype = dtype
        save_checkpoint(meta_dtype_ckpt, model, meta)
        evaluate(meta_dtype_ckpt, phantoms, tmp_path / dtype, split=None, bootstrap=0, plots=False, precision="fp32", store_dir=tmp_path / "s")
        per_case = pd.read_csv(tmp_path / dtype / "per_case.csv")
        assert list(per_case["path"]) == list(df["path"])
        probs[dtype] = per_case[[f"prob_{c}" for c in meta.classes]].to_numpy()
    assert np.abs(probs["float32"] - direct).max() < 2e-6  # 6-decimal CSV rounding
    assert np.abs(probs["uint8"] - direct).max() < 0.02


@pytest.mark.slow  # ≥ 5 s on 2 cores (2026-12-03): make test runs it, make test-fast does not
def test_loader_workers_do_not_change_training(phantoms, tmp_path):
    from medres.train import fit

    args = ("train.deterministic=true", "train.epochs=2", "train.max_steps_per_epoch=3", "train.num_workers=0")
    a = fit(_cfg(phantoms, *args, "train.loader_workers=0"), tmp_path / "a", show_progress=False)
    b = fit(_cfg(phantoms, *args, "train.loader_workers=2"), tmp_path / "b", show_progress=False)
    assert [e["train_loss"] for e in a["epochs"]] == pytest.approx([e["train_loss"] for e in b["epochs"]], rel=1e-6)


def test_bad_file_is_skipped_and_listed(phantoms, tmp_path):
    """(A copy of the phantoms: the session's shared folder must not gain a broken file.)"""
    import shutil

    from medres.train import fit

    shutil.copytree(phantoms.parent / "images", tmp_path / "data" / "images")
    df = pd.read_csv(phantoms)
    (tmp_path / "data" / "images" / "not_an_image.png").write_text("hello")
    df.loc[len(df)] = {**df.iloc[0].to_dict(), "path": "images/not_an_image.png", "patient_id": "bad-1"}
    m = tmp_path / "data" / "with_bad.csv"
    df.to_csv(m, index=False)
    fit(_cfg(m), tmp_path / "run", show_progress=False)
    skipped = pd.read_csv(tmp_path / "run" / "skipped.csv")
    assert skipped["code"].tolist() == ["NOT_AN_IMAGE"] and "not_an_image.png" in skipped["message"].iloc[0]
