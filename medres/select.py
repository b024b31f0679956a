"""`medres select`: which files to label next (active learning, one round).

The candidates are scored through predict's path (calibrated probabilities, pooled features, the input
gate); files the gate flags (out of distribution, rotated, inverted, refused by header) or that fail to
load are never proposed — a radiologist's time is not spent on a scanned form — and neither are files
the run already trained on. Strategies are a table of small functions (`STRATEGIES`):

- `entropy`: the most uncertain first (Shannon entropy of the class distribution; the sum of the
  labels' binary entropies for multilabel models);
- `margin`: the smallest gap between the two most probable classes first (multilabel: the label closest
  to its operating threshold);
- `coreset`: k-centre greedy (Sener & Savarese, ICLR 2018) on the penultimate features projected like the
  shift test's (the validation films stored in the checkpoint are the already-labelled centres), so the
  picks cover what the labelled data does not; a near-duplicate of a pick is never the next pick;
- `random`: a seeded random order (the baseline every strategy should beat).

`margin` is the default: on real chest films (bench/label_efficiency.py, 5 % → 25 % labels, 2 seeds)
no strategy beat random beyond seed noise, margin matched it, coreset trailed slightly and entropy
trailed by ≈ 0.02–0.03 macro AUROC (on one seed it picked half again as many covid films as random).

The output is a manifest to fill in: `path` and `root` as `train` reads them, an empty label column
(or empty class columns for multilabel), the strategy's `score` and `rank`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from medres.errors import NoInputs, UsageError
from medres.files import atomic_write


def entropy(probs: np.ndarray, task: str, **_) -> np.ndarray:
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1.0)
    if task == "multiclass":
        return -(p * np.log(p)).sum(1)
    q = np.clip(1 - p, 1e-12, 1.0)
    return -(p * np.log(p) + q * np.log(q)).sum(1)


def margin(probs: np.ndarray, task: str, thresholds: list[float] | None = None, **_) -> np.ndarray:
    """Higher = more uncertain: minus the top-two gap (multiclass), minus the smallest distance of a label
    to its operating threshold (multilabel)."""
    p = np.asarray(probs, np.float64)
    if task == "multiclass":
        top = np.sort(p, axis=1)
        return -(top[:, -1] - top[:, -2])
    t = np.asarray(thresholds if thresholds is not None else [0.5] * p.shape[1])
    return -np.abs(p - t[None, :]).min(1)


def coreset_order(candidates: np.ndarray, labelled: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """k-centre greedy: each pick is the candidate farthest from every labelled film and earlier pick.
    Returns (picked indices in order, each pick's distance at the time it was picked). Memory stays
    O(candidates): the distances to the labelled films are taken in chunks."""
    x = np.asarray(candidates, np.float64)
    d = np.full(len(x), np.inf)
    for lab in np.array_split(np.asarray(labelled, np.float64), max(1, len(labelled) // 256)) if len(labelled) else []:
        sq = (x * x).sum(1)[:, None] + (lab * lab).sum(1)[None, :] - 2 * x @ lab.T
        d = np.minimum(d, np.sqrt(np.maximum(sq, 0)).min(1))
    picks, dist = [], []
    for _ in range(min(n, len(x))):
        i = int(np.argmax(d))
        picks.append(i)
        dist.append(float(d[i]))
        d = np.minimum(d, np.sqrt(((x - x[i]) ** 2).sum(1)))
        d[i] = -np.inf
    return np.array(picks, dtype=int), np.array(dist)


def rank(strategy: str, probs: np.ndarray, features: np.ndarray | None, *, task: str, n: int, thresholds=None, labelled=None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the chosen candidates in order, their scores)."""
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "coreset":
        if features is None:
            raise UsageError("--strategy coreset needs the model's features (a torch checkpoint or an ONNX file with a features output)")
        return coreset_order(features, labelled if labelled is not None else np.zeros((0, features.shape[1])), n)
    if strategy == "random":
        order = np.random.default_rng(seed).permutation(len(probs))[:n]
        return order, np.zeros(len(order))
    score = STRATEGIES[strategy](probs, task, thresholds=thresholds)
    order = np.argsort(-score, kind="stable")[:n]
    return order, score[order]


STRATEGIES: dict[str, Callable | None] = {"entropy": entropy, "margin": margin, "coreset": None, "random": None}


def select(checkpoint: str | Path, inputs: list[str | Path], out: str | Path, *, n: int, strategy: str = "margin", by_patient: bool = False,
           exclude: str | Path | None = None, seed: int = 0, overwrite: bool = False, workers: int = 0) -> pd.DataFrame:
    """Score `inputs` and write the `n` files to label next to `out` (a manifest to fill in)."""
    from medres.errors import OutputExists
    from medres.gate import verdicts
    from medres.model import load_checkpoint
    from medres.predict import gate_of
    from medres.run import resolve_checkpoint
    from medres.scoring import discover, scored_batches, scorer_for
    from medres.shift import load_reference

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExists(f"{out} exists; pass --overwrite to replace it")
    checkpoint = resolve_checkpoint(checkpoint)
    model, meta = load_checkpoint(checkpoint)
    files = discover(inputs)
    if not files:
        raise NoInputs(f"no input files found in {', '.join(str(i) for i in inputs)}")
    known = _already_labelled(checkpoint, exclude)
    patients = _patients(inputs) if by_patient else {}
    scorer = scorer_for(checkpoint, model, meta)
    expect, detector = gate_of(checkpoint, meta, expect=None, gate="flag", scorer=scorer)
    ref = load_reference(checkpoint, meta)
    keep, probs, feats = [], [], []
    left_out = {"failed or refused": 0, "flagged by the input gate": 0, "already in the training manifest": 0}
    for batch in scored_batches(files, scorer, workers=workers, detector=detector, expect=expect, features=True):
        good = batch.good
        judged = verdicts([d.file.shown for d in good], batch.ood, batch.orientation, detector, "flag")
        left_out["failed or refused"] += len(batch.items) - len(good)
        for k, d in enumerate(good):
            if judged[k].flagged:
                left_out["flagged by the input gate"] += 1
            elif str(Path(d.file.full).resolve()) in known:
                left_out["already in the training manifest"] += 1
            else:
                keep.append(d.file)
                probs.append(batch.probs[k])
                # reduced at once (16 numbers a film, not 2048): memory stays small for a whole archive
                feats.append(None if batch.features is None or ref is None else ref.reduce(batch.features[k : k + 1])[0])
    if not keep:
        raise NoInputs(f"no candidate left to select from ({', '.join(f'{v} {k}' for k, v in left_out.items() if v)})")
    probs = np.stack(probs)
    features = np.stack(feats) if all(f is not None for f in feats) else None
    labelled = ref.reduced if features is not None else None
    if by_patient:
        order, score = _one_per_patient(strategy, probs, features, keep, patients, meta, n, labelled, seed)
    else:
        order, score = rank(strategy, probs, features, task=meta.task, n=n, thresholds=meta.effective_thresholds(), labelled=labelled, seed=seed)
    table = _table(keep, order, score, meta, strategy, patients)
    atomic_write(out, table.to_csv(index=False, lineterminator="\n"))
    table.attrs["left_out"] = left_out
    return table


def _one_per_patient(strategy, probs, features, keep, patients, meta, n, labelled, seed):
    """Rank everything, then keep each patient's first film (ranked by the strategy) until n."""
    order, score = rank(strategy, probs, features, task=meta.task, n=len(keep), thresholds=meta.effective_thresholds(), labelled=labelled, seed=seed)
    seen, picked, scores = set(), [], []
    for i, s in zip(order, score):
        pid = patients.get(keep[i].shown)
        if pid is None:
            raise UsageError(f"--by patient: {keep[i].shown} has no patient_id (give a manifest CSV with a patient_id column as input)")
        if pid not in seen:
            seen.add(pid)
            picked.append(i)
            scores.append(s)
        if len(picked) == n:
            break
    return np.array(picked, dtype=int), np.array(scores)


def _patients(inputs) -> dict[str, str]:
    """path as shown → patient_id, from manifest CSV inputs."""
    from medres.data.manifest import read_csv

    out = {}
    for i in inputs:
        p = Path(i)
        if p.is_file() and p.suffix.lower() == ".csv":
            df = read_csv(p)
            if "patient_id" in df.columns:
                out.update(zip(df["path"], df["patient_id"]))
    return out


def _already_labelled(checkpoint: Path, exclude) -> set[str]:
    """Absolute paths of the rows the checkpoint's run trained on (or of `exclude`, a manifest)."""
    from medres.data.manifest import load_manifest
    from medres.errors import MedresError
    from medres.run import RunDir

    try:
        m = load_manifest(exclude, require_labels=False) if exclude else RunDir.open(checkpoint.parent).manifest()
    except (MedresError, OSError):
        return set()
    out = set()
    for i in range(len(m)):
        try:
            out.add(str(m.absolute(i)))
        except MedresError:
            continue
    return out


def _table(keep, order, score, meta, strategy: str, patients: dict[str, str]) -> pd.DataFrame:
    rows = []
    for r, (i, s) in enumerate(zip(order, score), start=1):
        full = Path(keep[i].full).resolve()
        rows.append({"path": full.name, "root": str(full.parent), "patient_id": patients.get(keep[i].shown, full.stem), "rank": r, "strategy": strategy,
                     "score": f"{float(s):.6g}"})
    table = pd.DataFrame(rows, columns=["path", "root", "patient_id", "rank", "strategy", "score"])
    if meta.task == "multiclass":
        table.insert(1, "label", "")
    else:
        for j, c in enumerate(meta.classes):
            table.insert(1 + j, c, "")
    return table
