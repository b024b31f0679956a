"""The Typer CLI: each command parses its arguments, calls one library function, prints the result
and maps errors to exit codes. No torch code here.

Exit codes: 0 success; 1 some inputs failed (predict/report) or training failed; 2 usage, config or
manifest error / no inputs; 3 unusable checkpoint or weights.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, List, Literal, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from medres import __version__
from medres.errors import MedresError


class _FlagsTakeNoValue:
    """On/off flags (and --help) take no value: their --help line shows no `<bool>` type."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_bool_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


class CommandGroup(typer.Typer):
    """typer.Typer for medres's command groups: commands and groups get `_FlagsTakeNoValue`."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cls=_Group, **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or _Command, **kwargs)


app = CommandGroup(add_completion=True, no_args_is_help=True, help="medres: fine-tune, evaluate, score and explain a ResNet50 on chest X-rays. Research use only — not for diagnosis.")
manifest_app = CommandGroup(no_args_is_help=True, help="Build and check CSV manifests.")
app.add_typer(manifest_app, name="manifest")
weights_app = CommandGroup(no_args_is_help=True, help="Pretrained weight files on machines without internet: check, import, list.")
app.add_typer(weights_app, name="weights")

# --- options shared by several commands: one name, help text, type and validation each --------------
Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda.")]
Precision = Annotated[Literal["auto", "bf16", "fp16", "fp32", "int8"], typer.Option(
    "--precision", help="auto, bf16, fp16, fp32, or int8 (CPU, ONNX Runtime: the CHECKPOINT.int8.onnx that medres export --quantize int8 writes beside it).")]
Workers = Annotated[Optional[int], typer.Option(
    "--workers", min=0, help="Decoding workers (threads; default one per core, 2 to 4); 0 decodes in the calling thread.")]
Expect = Annotated[List[str], typer.Option(
    "--expect", help="Header expectation KEY=V1,V2 (modality, body_part, view; repeatable; KEY=* switches one off). Default: what the training images had (medres inspect CHECKPOINT).")]
Gate = Annotated[Literal["flag", "reject", "off"], typer.Option(
    "--gate", help="OOD input gate: flag (keep every case, marked in or out of distribution), reject (out-of-distribution inputs get no probabilities or heatmap) or off.")]
StoreDir = Annotated[Optional[Path], typer.Option(
    "--store-dir", help="Decoded-image store folder (default: the run's data.store_dir, else $MEDRES_STORE_DIR or ~/.cache/medres/store).")]
# evaluate and calibrate read a run folder, or a checkpoint with a manifest
RunFolder = Annotated[Optional[Path], typer.Option("--run", help="Run folder: its model.safetensors, splits.csv and manifest.")]
RunCheckpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="model.safetensors (default: the --run folder's).")]
RunManifest = Annotated[Optional[Path], typer.Option("--manifest", help="Manifest with labels and a split column (default: the --run folder's rows and splits).")]


def _err(text: str) -> None:
    typer.echo(text, err=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medres {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details, and other libraries' messages, to stderr."),
) -> None:
    configure_console_logging(verbose)


def configure_console_logging(verbose: bool) -> None:
    """medres's own warnings (INFO with --verbose) go to stderr. Other libraries' records (e.g.
    pydicom's traceback when its first decoder fails and the next one succeeds) reach the console
    only with --verbose; without it a NullHandler on the root keeps Python's last-resort handler
    from printing them."""
    medres_log, root = logging.getLogger("medres"), logging.getLogger()
    for logger in (medres_log, root):
        for h in [h for h in logger.handlers if getattr(h, "_medres_console", False)]:
            logger.removeHandler(h)
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    quiet: logging.Handler = logging.NullHandler()
    for h in (handler, quiet):
        h._medres_console = True  # type: ignore[attr-defined]
    (root if verbose else medres_log).addHandler(handler)
    if not verbose:
        root.addHandler(quiet)
    medres_log.setLevel(logging.INFO)


def _run(fn):
    """Run a library call; a MedresError becomes one line on stderr and its exit code."""
    try:
        return fn()
    except MedresError as err:
        _err(err.one_line())
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        _err("interrupted")
        raise typer.Exit(130) from None


def _voi_choice(value: str) -> str:
    if value in ("auto", "none", "minmax") or value.isdigit():
        return value
    raise typer.BadParameter(f"{value!r} is not one of 'auto', 'none', 'minmax' or a window index (0, 1, ...)")


def _checkpoint_path(value: Optional[Path]) -> Optional[Path]:
    """--checkpoint RUN_FOLDER means the run's model.safetensors."""
    if value is not None and value.is_dir() and (value / "model.safetensors").is_file():
        return value / "model.safetensors"
    return value


ModelCheckpoint = Annotated[Path, typer.Option("--checkpoint", callback=_checkpoint_path, help="model.safetensors, or a run folder (its model.safetensors).")]
Inputs = Annotated[List[Path], typer.Argument(help="Files, folders (recursive) or a manifest CSV.", show_default=False)]

def _console():
    from rich.console import Console

    return Console(stderr=False)


# --- train -----------------------------------------------------------------------------------------
@app.command()
def train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=5 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<name>-<time>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its last epoch."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels: --resume equals an uninterrupted run."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Fine-tune ResNet50 on a manifest.

    Example: medres train --config configs/covid_xray.yaml --set train.epochs=5 --out runs/covid
    """
    from medres.config import load_config
    from medres.run import new_run_folder, training_paths
    from medres.train import fit

    def go():
        cfg_path, folder = training_paths(config, out, resume)
        cfg = load_config(cfg_path, list(set_) + (["train.deterministic=true"] if deterministic else []))
        return fit(cfg, folder or new_run_folder(cfg.name), resume=resume is not None, show_progress=not quiet)

    summary = _run(go)
    last = summary["epochs"][-1] if summary["epochs"] else {}
    typer.echo(f"run: {summary['run']}")
    if last:
        typer.echo("last epoch: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in last.items()))
    if "calibration" in summary:
        typer.echo(f"calibration: temperature {summary['calibration']['temperature']:.3f}, thresholds ({summary['calibration']['method']}) " + ", ".join(f"{t:.3f}" for t in summary["calibration"]["thresholds"]))


@app.command()
def pretrain(
    config: Optional[Path] = typer.Option(None, "--config", help="A config (its data: and pretrain: sections), or a shipped config's name."),
    set_: List[str] = typer.Option([], "--set", help="Override a config key, e.g. --set data.manifest=/archive/all.csv (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Run folder: backbone.safetensors, metrics.jsonl, curves.png, pretrain.json."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run from its last finished epoch."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Self-supervised pretraining (VICReg) on films without labels; the backbone feeds model.weights.

    Example: medres pretrain --config covid_xray --set data.manifest=/archive/all.csv --set pretrain.epochs=20 --out runs/ssl
    """
    from medres.config import load_config
    from medres.pretrain import pretrain as run_pretrain

    summary = _run(lambda: run_pretrain(load_config(config, list(set_)), out, resume=resume, show_progress=not quiet))
    typer.echo(f"pretrained on {summary['films']} films, {summary['epochs']} epochs; embedding spread {summary['embedding_spread']:.4f} -> {summary['backbone']}")
    typer.echo(f"fine-tune from it: medres train --config ... --set model.weights={summary['backbone']}")


@app.command("lr-find")
def lr_find_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (see configs/)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key: --set train.batch_size=16 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for lr_find.png and lr_find.json (default runs/<name>-lr-find-<time>)."),
    steps: int = typer.Option(100, "--steps", min=2, help="Steps of the exponential sweep (one batch each)."),
    start_lr: float = typer.Option(1e-7, "--start-lr", min=0, help="First learning rate of the sweep."),
    end_lr: float = typer.Option(10.0, "--end-lr", min=0, help="Last learning rate; the sweep stops earlier when the loss diverges."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Learning-rate range test on the training pipeline: suggests train.lr; saves no weights.

    Example: medres lr-find --config configs/covid_xray.yaml --out runs/covid-lr
    """
    from medres.config import load_config
    from medres.lr_find import lr_find
    from medres.run import new_run_folder

    def go():
        cfg = load_config(config, list(set_))
        folder = out or new_run_folder(f"{cfg.name}-lr-find")
        return folder, lr_find(cfg, folder, steps=steps, start_lr=start_lr, end_lr=end_lr, show_progress=not quiet)

    folder, result = _run(go)
    typer.echo(f"{result['steps_run']} of {result['steps']} steps ({result['stopped']}), {result['stage']}")
    typer.echo(f"suggested lr {result['suggestion']:.3g} ({result['rule']})")
    typer.echo(f"train with: {result['set']}")
    typer.echo(f"plot: {folder / 'lr_find.png'}")


# --- evaluate / calibrate --------------------------------------------------------------------------
def _with_run_inputs(run, checkpoint, manifest, store_dir, call):
    """`call(checkpoint, rows, splits, store)` on what --run/--checkpoint/--manifest/--store-dir name
    (medres/run.py: a run folder's own rows, roots and splits), errors printed as one line."""
    from medres.run import eval_inputs

    return _run(lambda: call(*eval_inputs(run, checkpoint, manifest, store_dir)))


@app.command()
def evaluate(
    run: RunFolder = None,
    checkpoint: RunCheckpoint = None,
    manifest: RunManifest = None,
    split: str = typer.Option("test", "--split", help="Which split to evaluate ('' for all rows)."),
    by: str = typer.Option("", "--by", help="Comma-separated manifest columns for the subgroup audit, e.g. source,view,sex."),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Patient-level bootstrap resamples for 95% CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    out: Path = typer.Option(..., "--out", help="Output folder (metrics.json, per_case.csv, plots, report.html)."),
    top_losses: int = typer.Option(0, "--top-losses", min=0, help="Also write the N highest-loss cases with the Grad-CAMs of their true and predicted class (OUT/top_losses/index.html)."),
    device: Device = "auto",
    store_dir: StoreDir = None,
    workers: Workers = None,
) -> None:
    """Metrics with patient-level CIs, calibration, operating points and a subgroup audit.

    Example: medres evaluate --run runs/covid --split test --by source --out runs/covid/eval
    """
    from medres.evaluate import evaluate as run_eval

    result = _with_run_inputs(run, checkpoint, manifest, store_dir, lambda ckpt, rows, splits, store: run_eval(
        ckpt, rows, out, split=split or None, splits_csv=splits, by=[b for b in by.split(",") if b], bootstrap=bootstrap, seed=seed, device=device,
        store_dir=store, num_workers=workers, top_losses=top_losses))
    m = result["macro"]
    typer.echo(f"{result['images']} images, {result['patients']} patients ({result['split'] or 'all'})")
    ci = m.get("auroc_ci") or [float("nan")] * 2
    typer.echo(f"macro AUROC {m['auroc']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    for c, row in result["per_class"].items():
        typer.echo(f"  {c}: AUROC {row['auroc']:.3f}  sensitivity {row['sensitivity']:.3f}  specificity {row['specificity']:.3f}")
    est = result.get("estimated_without_labels")
    if est:
        parts = [f"accuracy {est['accuracy']['estimate']:.3f} (actual {result.get('accuracy', float('nan')):.3f})"] if "accuracy" in est else []
        parts += [f"{c} AUROC {v['estimate']:.3f} (actual {v['actual']:.3f})" for c, v in est["per_class_auroc"].items()]
        typer.echo("estimated without labels: " + ", ".join(parts))
    cal = result["calibration"]
    typer.echo(f"ECE {cal['before']['ece']:.3f} -> {cal['after']['ece']:.3f} after temperature {cal['temperature']:.2f}")
    if result.get("conformal"):
        cf = result["conformal"]
        typer.echo(f"conformal sets ({cf['method']}, target {cf['target']:.2f}): coverage {cf['coverage']:.3f}, mean set size {cf['mean_set_size']:.2f}")
    if result.get("ood"):
        typer.echo(f"input gate: {result['ood']['flagged']} of {result['images']} images flagged out of distribution")
    for w in result["warnings"]:
        typer.echo(f"warning: {w}")
    typer.echo(f"report: {out / 'report.html'}")
    if result.get("top_losses"):
        typer.echo(f"top losses: {result['top_losses']['cases']} cases -> {out / result['top_losses']['index']}")


@app.command()
def calibrate(
    run: RunFolder = None,
    checkpoint: RunCheckpoint = None,
    manifest: RunManifest = None,
    target_sensitivity: Optional[float] = typer.Option(None, "--target-sensitivity", help="Operating point at this sensitivity instead of Youden's J."),
    coverage: float = typer.Option(0.9, "--coverage", min=0.5, max=0.999, help="Target coverage of the conformal prediction sets."),
    conformal: Literal["aps", "lac"] = typer.Option("aps", "--conformal", help="Conformal score for multiclass: aps (adaptive) or lac (smallest sets)."),
    ood_quantile: float = typer.Option(0.99, "--ood-quantile", min=0.5, max=0.9999, help="OOD threshold: this quantile of the validation images' scores."),
    store_dir: StoreDir = None,
) -> None:
    """Fit temperature scaling, operating points, conformal sets (validation split) and the input gate
    (OOD detector on the train split, threshold on validation); store them in the checkpoint.

    Example: medres calibrate --run runs/covid --target-sensitivity 0.95 --coverage 0.9
    """
    from medres.calibration import calibrate as run_cal

    result = _with_run_inputs(run, checkpoint, manifest, store_dir, lambda ckpt, rows, splits, store: run_cal(
        ckpt, rows, splits, target_sensitivity=target_sensitivity, coverage=coverage, method=conformal, ood_quantile=ood_quantile, store_dir=store))
    typer.echo(json.dumps(result))


# --- predict / export ------------------------------------------------------------------------------
@app.command()
def predict(
    inputs: Inputs,
    checkpoint: ModelCheckpoint,
    out: Path = typer.Option(..., "--out", help="Output table."),
    fmt: Literal["csv", "jsonl", "parquet"] = typer.Option("csv", "--format", help="csv, jsonl or parquet."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per forward pass."),
    workers: Workers = None,
    decode_pool: Literal["thread", "process"] = typer.Option("thread", "--decode-pool", help="Run the --workers as threads of this process (default; measured faster) or as processes (spawned)."),
    device: Device = "auto",
    precision: Precision = "auto",
    backend: Literal["torch", "onnx", "openvino"] = typer.Option("torch", "--backend", help="torch; onnx (ONNX Runtime, needs --onnx); openvino (OpenVINO's CPU plugin, on --onnx or a graph made from the checkpoint)."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="ONNX model for --backend onnx/openvino, or for --precision int8 instead of the one beside the checkpoint."),
    tta: bool = typer.Option(False, "--tta", help="Average mild affine variants."),
    expect: Expect = [],
    gate: Gate = "flag",
    shard_: Optional[str] = typer.Option(None, "--shard", help="i/n: score only this machine's share (under torchrun the ranks share the inputs by themselves)."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Decoded-image cache folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    resume: bool = typer.Option(False, "--resume", help="Keep rows already scored (the journal of a killed run, or the output); score the rest."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first bad file."),
    flush_every: float = typer.Option(10.0, "--flush-every", help="Seconds between fsyncs of the row journal (.OUT.partial); the table is written atomically at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    benchmark: bool = typer.Option(False, "--benchmark", help="Do not score: time each stage (start-up, decode, forward, write, end to end) on the first --benchmark-files inputs and write the figures as JSON to --out."),
    benchmark_files: int = typer.Option(200, "--benchmark-files", min=1, help="How many input files --benchmark times."),
    shift: bool = typer.Option(True, "--shift/--no-shift", help="Folder-level shift test against the validation reference (from 50 scored files): OUT.shift.json, a summary line, a warning."),
    shift_window: int = typer.Option(0, "--shift-window", min=0, help="Also test every N scored files (long runs, streams); 0: only the whole run."),
) -> None:
    """Score whole folders; one row per file, errors included. Exit 0 all scored, 1 some failed, 2 usage, 3 bad checkpoint.

    Several processes or machines: torchrun --nproc_per_node 4 -m medres predict ... (rank 0 writes the one table).

    Example: medres predict --checkpoint runs/covid/model.safetensors /data/studies --out preds.csv
    """
    from medres.predict import predict as run_predict
    from medres.progress import Progress

    if benchmark:
        from medres.speed import benchmark as run_benchmark, summary_lines

        res = _run(lambda: run_benchmark(checkpoint, list(inputs), out, files=benchmark_files, batch_size=batch_size, workers=workers, device=device, precision=precision, gate=gate, backend=backend, onnx_path=onnx))
        lines = summary_lines(res)
        for line in lines[:-1]:
            typer.echo(line)
        typer.echo(f"{lines[-1]} -> {out}")
        raise typer.Exit(0)

    def go():
        bar = Progress(enabled=not quiet)
        with bar.task("predict", total=None) as tick:
            started = time.perf_counter()
            done = [0]

            def progress(n: int) -> None:
                done[0] += n
                tick(advance=n, images_per_s=done[0] / max(time.perf_counter() - started, 1e-9))

            return run_predict(checkpoint, list(inputs), out, fmt=fmt, batch_size=batch_size, workers=workers, decode_pool=decode_pool, device=device, precision=precision, backend=backend, onnx_path=onnx, tta=tta, expect=list(expect), gate=gate, shard_spec=shard_, cache_dir=cache_dir, overwrite=overwrite, resume=resume, fail_fast=fail_fast, flush_every=flush_every, on_progress=progress, on_total=lambda n: tick(advance=0, total=n),
                               shift=shift, shift_window=shift_window)

    result = _run(go)
    rate = (result.scored + result.failed) / max(result.seconds, 1e-9)
    typer.echo(f"{result.total} files: {result.scored} scored, {result.rejected} rejected by the input gate, {result.failed} failed, {result.skipped_existing} already done ({rate:.1f} images/s) -> {result.out}")
    for code, n in sorted(result.by_code.items()):
        if code != "ok":
            typer.echo(f"  {code}: {n}")
    if result.shift is not None:
        from medres.shift import summary_line

        typer.echo(f"{summary_line(result.shift)} -> {result.shift_path}")
    raise typer.Exit(result.exit_code)


@app.command()
def export(
    checkpoint: ModelCheckpoint,
    fmt: Literal["onnx", "monai-bundle"] = typer.Option("onnx", "--format", help="onnx (a model file) or monai-bundle (a folder for MONAI Deploy / MONAI Label)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output model file (onnx) or folder (monai-bundle). Default with --quantize int8: CHECKPOINT.int8.onnx beside the checkpoint (where predict --precision int8 looks)."),
    quantize: Optional[Literal["int8"]] = typer.Option(None, "--quantize", help="int8: static quantization (ONNX Runtime QDQ) calibrated on validation images."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration images for --quantize: folder, file or manifest CSV (default: the validation split of the checkpoint's run)."),
    calibration_count: int = typer.Option(200, "--calibration-count", min=1, help="How many calibration images (spread evenly over the source)."),
) -> None:
    """Export for deployment with a parity check (fp32: max |Δprob| ≤ 1e-4 vs torch; int8: reported, ≤ 0.1 on the calibration images).

    Example: medres export --checkpoint runs/covid/model.safetensors --format onnx --out model.onnx
    Example: medres export --checkpoint runs/covid/model.safetensors --format onnx --quantize int8
    Example: medres export --checkpoint runs/covid/model.safetensors --format monai-bundle --out covid_bundle
    """
    from medres.export import export as run_export

    result = _run(lambda: run_export(checkpoint, out, fmt=fmt, quantize=quantize, calibration=calibration, calibration_count=calibration_count))
    if result.get("precision") == "int8":
        cal = result["calibration"]
        typer.echo(f"wrote {result['out']} (int8; calibrated on {cal['count']} images from {cal['source']}; max |Δprob| vs fp32 {result['max_abs_prob_diff']:.3f}, mean {result['mean_abs_prob_diff']:.4f})")
        return
    opset = f"opset {result['opset']}, " if result.get("opset") else ""
    typer.echo(f"wrote {result['out']} ({opset}parity max |Δprob| {result['max_abs_prob_diff']:.2e})")


# --- report ----------------------------------------------------------------------------------------
@app.command()
def report(
    inputs: Inputs,
    out: Path = typer.Option(..., "--out", help="Report folder (index.html, cases/)."),
    checkpoint: ModelCheckpoint = ...,
    method: Literal["gradcam", "gradcam++", "occlusion"] = typer.Option("gradcam", "--method", help="gradcam, gradcam++, or occlusion (MONAI OcclusionSensitivity: model-agnostic, 196 forward passes per image)."),
    layer: str = typer.Option("layer4", "--layer", help="Module name for the CAM: layer4 gives image_size/32 cells per side, layer3 image_size/16."),
    class_: Optional[str] = typer.Option(None, "--class", help="Explain this class instead of the prediction."),
    normalize: Literal["shared", "per-image"] = typer.Option("shared", "--normalize", help="shared (absolute scale across the report) or per-image."),
    weight_by_probability: bool = typer.Option(False, "--weight-by-probability", help="Multiply each heatmap by its class probability."),
    include_identifiers: bool = typer.Option(False, "--include-identifiers", help="Keep DICOM patient/study identifiers in Secondary Captures."),
    dicom_sc: bool = typer.Option(False, "--dicom-sc", help="Also write overlays as DICOM Secondary Capture for DICOM inputs."),
    faithfulness: bool = typer.Option(False, "--faithfulness", help="Deletion/insertion AUC per case."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N files."),
    device: Device = "auto",
    precision: Precision = "auto",
    workers: Workers = None,
    expect: Expect = [],
    gate: Gate = "flag",
) -> None:
    """Per-case Grad-CAM heatmap reports (HTML, offline).

    With --precision int8 the maps come from layer4 of the int8 model (gradcam and gradcam++ only).

    Example: medres report --checkpoint runs/covid/model.safetensors scans/ --out runs/covid/report
    """
    from medres.report import report as run_report

    summary = _run(lambda: run_report(checkpoint, list(inputs), out, method=method, layer=layer, target_class=class_, normalize=normalize, weight_by_probability=weight_by_probability, include_identifiers=include_identifiers, dicom_sc=dicom_sc, faithfulness=faithfulness, limit=limit, device=device, precision=precision, workers=workers, expect=list(expect), gate=gate))
    typer.echo(f"{summary['cases']} cases ({summary['failed']} failed, {summary['rejected']} rejected, {summary['flagged_out_of_distribution']} flagged out of distribution) -> {out / 'index.html'}")
    raise typer.Exit(1 if summary["failed"] else 0)


# --- inspect / manifest ----------------------------------------------------------------------------
@app.command()
def inspect(
    files: List[Path] = typer.Argument(..., help="Image files, or a medres checkpoint (.safetensors) to see its input gate and calibration."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write <stem>.npy (model input) and <stem>.json (record)."),
    size: int = typer.Option(224, "--size", help="Model input size."),
    resize: Literal["letterbox", "crop", "stretch"] = typer.Option("letterbox", "--resize", help="letterbox, crop or stretch."),
    voi: str = typer.Option("auto", "--voi", callback=_voi_choice, help="auto, none, minmax or a window index."),
) -> None:
    """Show how each file is decoded: modality, body part, view, photometric, bits, transfer syntax, steps, geometry.

    Example: medres inspect scan.dcm --out inspected/
    Example: medres inspect runs/covid/model.safetensors
    """
    from medres.io import PreprocessSpec
    from medres.io.inspect import describe, describe_checkpoint, inspect_files
    from medres.io.listing import split_checkpoints

    spec = PreprocessSpec(image_size=size, resize=resize, voi=int(voi) if voi.isdigit() else voi)
    failed = 0
    checkpoints, images = split_checkpoints(list(files))
    for f in checkpoints:
        try:
            for line in describe_checkpoint(f):
                typer.echo(line)
        except MedresError as err:
            _err(err.one_line())
            failed += 1
    for f, result in inspect_files(images, spec, out=out):
        if isinstance(result, MedresError):
            _err(result.one_line())
            failed += 1
            continue
        for line in describe(f.name, result.record):
            typer.echo(line)
    raise typer.Exit(1 if failed else 0)


@manifest_app.command("build")
def manifest_build(
    folder: Path = typer.Argument(..., help="Folder with one subfolder per class."),
    out: Path = typer.Option(..., "--out", help="Manifest CSV to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Build a manifest from a class-per-subfolder layout (paths relative to the manifest's folder).

    Example: medres manifest build data/xrays --out data/xrays/manifest.csv
    """
    from medres.data.manifest import write_manifest

    def go():
        return write_manifest(folder, out, overwrite=overwrite)

    df, skipped = _run(go)
    for rel, line in skipped:
        _err(f"skipped {rel}: {line}")
    typer.echo(f"wrote {out}: {len(df)} images, {df['label'].nunique()} classes ({', '.join(sorted(df['label'].unique()))}); "
               f"{len(skipped)} non-image files skipped; check patient_id (default: file name before the first '_')")


@manifest_app.command("import")
def manifest_import(
    fmt: str = typer.Argument(..., metavar="FORMAT", help="nih, chexpert, mimic-cxr-jpg, padchest, rsna-pneumonia, vindr-cxr or covid-chestxray."),
    source: Path = typer.Argument(..., help="The archive's folder as downloaded (label tables and images below it)."),
    out: Path = typer.Option(..., "--out", help="Manifest CSV to write (beside it: OUT.import.json, and OUT.missing.csv when images are absent)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Import a public chest X-ray archive's own files as a manifest with the shared label vocabulary.

    Example: medres manifest import nih /data/nih --out manifests/nih.csv
    """
    from medres.archives import import_archive

    rep = _run(lambda: import_archive(fmt, source, out, overwrite=overwrite))
    typer.echo(f"wrote {rep.out}: {rep.rows} images ({rep.archive}); official split: " + ", ".join(f"{k} {v}" for k, v in rep.splits.items()))
    for reason, n in rep.removed.items():
        typer.echo(f"left out: {n} {reason}")
    if rep.missing:
        _err(f"warning: {rep.missing} rows whose image is not below {source}: listed in {rep.out.with_name(rep.out.stem + '.missing.csv')}")
    for line in rep.malformed[:5]:
        _err(f"[ARCHIVE_INVALID] {line} (row left out)")
    if len(rep.malformed) > 5:
        _err(f"... {len(rep.malformed) - 5} more malformed rows: see {rep.out.with_name(rep.out.stem + '.import.json')}")
    labelled = {c: v for c, v in rep.counts.items() if v["positive"] + v["negative"] + v["uncertain"]}
    typer.echo("labels (positive/negative/uncertain/missing): " + "; ".join(f"{c} {v['positive']}/{v['negative']}/{v['uncertain']}/{v['missing']}" for c, v in labelled.items()))
    raise typer.Exit(1 if rep.malformed else 0)


@app.command("select")
def select_cmd(
    inputs: Annotated[List[Path], typer.Argument(help="Unlabelled files, folders (recursive) or a manifest CSV.", show_default=False)],
    checkpoint: ModelCheckpoint,
    n: int = typer.Option(..., "--n", min=1, help="How many files to propose."),
    out: Path = typer.Option(..., "--out", help="Manifest to fill in: path, root, an empty label column, rank, strategy, score."),
    strategy: Literal["entropy", "margin", "coreset", "random"] = typer.Option("margin", "--strategy", help="margin (default: the strategy that held up against random in bench/label_efficiency.py), entropy (most uncertain first), coreset (k-centre on features), random."),
    by: Literal["file", "patient"] = typer.Option("file", "--by", help="patient: at most one film per patient_id (manifest input)."),
    exclude: Optional[Path] = typer.Option(None, "--exclude", help="Manifest whose files are already labelled (default: the checkpoint's run manifest)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random strategy."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing file."),
) -> None:
    """Which files to label next: the most informative unlabelled films, gate-flagged and already-labelled ones left out.

    Example: medres select --checkpoint runs/covid /archive/unlabelled --n 200 --out to_label.csv
    """
    from medres.select import select

    table = _run(lambda: select(checkpoint, list(inputs), out, n=n, strategy=strategy, by_patient=by == "patient", exclude=exclude, seed=seed, overwrite=overwrite))
    left = ", ".join(f"{v} {k}" for k, v in table.attrs.get("left_out", {}).items() if v)
    typer.echo(f"wrote {out}: {len(table)} files to label ({strategy})" + (f"; left out: {left}" if left else ""))


@app.command("configs")
def configs() -> None:
    """List the configs shipped with medres (usable by name: --config covid_xray).

    Example: medres configs
    """
    from medres.config import config_summary, shipped_configs

    for name, path in shipped_configs().items():
        typer.echo(f"{name:22s} {config_summary(path)}")


@manifest_app.command("check")
def manifest_check(
    manifest: Path = typer.Argument(..., help="Manifest CSV."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config whose data.classes/task/root apply."),
) -> None:
    """Validate a manifest (missing files, unknown or empty labels, duplicates) and print class x patient counts.

    Example: medres manifest check data_manifests/covid_xray.csv --config configs/covid_xray.yaml
    """
    from medres.config import load_config
    from medres.data.manifest import check_manifest, load_manifest

    def go():
        classes, task, root, uncertain = None, "multiclass", None, "ignore"
        if config is not None:
            cfg = load_config(config)
            classes, task, root, uncertain = cfg.data.classes or None, cfg.data.task, cfg.data.root, cfg.data.uncertain
        m = load_manifest(manifest, classes=classes, task=task, root=root, uncertain=uncertain)
        return m, check_manifest(m)

    m, rep = _run(go)
    console = _console()
    from rich.table import Table

    table = Table(title=f"{manifest}: {rep['images']} images, {rep['patients']} patients")
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("patients", justify="right")
    states = any("states" in row for row in rep["counts"])
    if states:
        for name in ("negative", "uncertain", "missing"):
            table.add_column(name, justify="right")
    for row in rep["counts"]:
        extra = [str(row["states"][k]) for k in ("negative", "uncertain", "missing")] if states else []
        table.add_row(row["class"], str(row["images"]), str(row["patients"]), *extra)
    console.print(table)
    for w in rep["warnings"]:
        _err(f"warning: {manifest}: {w}")
    for p in rep["problems"]:
        _err(f"[MANIFEST_INVALID] {manifest}: {p}")
    raise typer.Exit(2 if rep["problems"] else 0)


# --- card ------------------------------------------------------------------------------------------
@app.command()
def card(
    run: Path = typer.Option(..., "--run", help="Run folder (model.safetensors, config.yaml, splits.csv, metrics.jsonl)."),
    eval_dir: Optional[Path] = typer.Option(None, "--eval", help="An evaluate output folder (metrics.json) for the quantitative sections."),
    out: Path = typer.Option(..., "--out", help="Markdown file; the self-contained HTML page is written beside it (.html)."),
) -> None:
    """A model card (Mitchell et al. 2019) generated from what the run and evaluation recorded.

    Example: medres card --run runs/covid --eval runs/covid/eval --out runs/covid/model_card.md
    """
    from medres.card import write_card

    md, page = _run(lambda: write_card(run, out, eval_dir))
    typer.echo(f"model card: {md} and {page}")


# --- demo ------------------------------------------------------------------------------------------
@weights_app.command("import")
def weights_import(
    file: Path = typer.Argument(..., help="A weight file (.pth/.pt/.safetensors; torchvision, torchxrayvision, DDP or medres layout)."),
    as_: Optional[str] = typer.Option(None, "--as", help="imagenet: file it under torchvision's name so model.weights: imagenet finds it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different file of the same name."),
) -> None:
    """Check a weight file (safe read, layout, strict ResNet50 shapes, the sha256 prefix in its name) and copy it into $TORCH_HOME/hub/checkpoints.

    Example: medres weights import /media/usb/resnet50-11ad3fa6.pth --as imagenet
    """
    from medres.weights import import_weights

    if as_ not in (None, "imagenet"):
        raise typer.BadParameter(f"--as {as_!r}: only 'imagenet' is known", param_hint="--as")
    info = _run(lambda: import_weights(file, as_imagenet=as_ == "imagenet", overwrite=overwrite))
    typer.echo(f"imported {info.path} ({info.layout} layout, sha256 {info.sha256[:16]}…){'; model.weights: imagenet will use it' if info.imagenet else ''}")


@weights_app.command("list")
def weights_list(
    files: List[Path] = typer.Argument(None, help="Other weight files to check as well."),
) -> None:
    """Show the weight files in $TORCH_HOME/hub/checkpoints (and any given): layout, sha256, whether model.weights: imagenet uses it, problems.

    Example: medres weights list
    """
    from medres.model import hub_checkpoint_dir
    from medres.weights import list_weights

    infos = _run(lambda: list_weights(files))
    typer.echo(f"hub cache: {hub_checkpoint_dir()}")
    if not infos:
        typer.echo("  (no weight files)")
    for i in infos:
        status = f"PROBLEM: {i.problem}" if i.problem else ("used by model.weights: imagenet" if i.imagenet else "ok (model.weights: PATH)")
        typer.echo(f"  {i.path.name}  {i.layout or '-'}  {i.size_bytes / 1e6:.1f} MB  sha256 {i.sha256[:16]}…  {status}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Demo folder."),
    config: Optional[Path] = typer.Option(None, "--config", help="Config (default: the packaged demo.yaml, linked as configs/demo.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Override a key."),
) -> None:
    """Synthetic phantoms -> train -> evaluate -> Grad-CAM report, in a few minutes on 2 CPU cores.

    Example: medres demo --out runs/demo
    """
    from medres.demo import run_demo

    result = _run(lambda: run_demo(out, config=config, overrides=list(set_)))
    typer.echo("")
    typer.echo(f"test macro AUROC {result['auroc']:.3f} (95% CI {result['auroc_ci'][0]:.3f}-{result['auroc_ci'][1]:.3f}), accuracy {result['accuracy']:.3f}")
    typer.echo(f"evaluation report: {result['eval_html']}")
    typer.echo(f"predictions:       {result['predictions']}")
    typer.echo(f"model card:        {result['card']}")
    typer.echo(f"Grad-CAM report:   {result['report_html']}")


# --- PACS -----------------------------------------------------------------------------------------
pacs_app = CommandGroup(no_args_is_help=True, help="Score studies in a PACS (DICOMweb or DIMSE) and store the results back.")
app.add_typer(pacs_app, name="pacs")

_SERVER_HELP = "A DICOMweb URL (https://host/dicom-web), AET@host:port for DIMSE, or a name in the servers file."
ServersFile = Annotated[Optional[Path], typer.Option("--servers", help="Servers file (default: $MEDRES_PACS_SERVERS or ~/.config/medres/pacs.yaml).")]
CaBundle = Annotated[Optional[Path], typer.Option("--ca-bundle", help="CA certificates (PEM) to trust for TLS to the PACS.")]
ClientCert = Annotated[Optional[Path], typer.Option("--client-cert", help="Client certificate (PEM) for mutual TLS to the PACS.")]
ClientKey = Annotated[Optional[Path], typer.Option("--client-key", help="Client key (PEM) for --client-cert.")]
CallingAet = Annotated[str, typer.Option("--aet", help="medres's own AE title (DIMSE).")]


def _server(server: str, servers: Optional[Path], calling_aet: str, ca_bundle: Optional[Path], client_cert: Optional[Path], client_key: Optional[Path]):
    from medres.pacs.servers import parse_server

    return _run(lambda: parse_server(server, servers_file=servers, calling_aet=calling_aet, ca_bundle=str(ca_bundle) if ca_bundle else None,
                                     client_cert=str(client_cert) if client_cert else None, client_key=str(client_key) if client_key else None))


def _server_options(command):
    """The PACS connection options (--server, --servers, --aet, TLS files), declared once: the command
    takes `target` (the parsed server) and gets these options appended to its own."""
    import functools
    import inspect

    def option(name, annotation, default):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    connection = [option("server", Annotated[str, typer.Option("--server", help=_SERVER_HELP)], ...), option("servers", ServersFile, None),
                  option("calling_aet", CallingAet, "MEDRES"), option("ca_bundle", CaBundle, None), option("client_cert", ClientCert, None),
                  option("client_key", ClientKey, None)]

    @functools.wraps(command)
    def run(*args, server, servers, calling_aet, ca_bundle, client_cert, client_key, **kwargs):
        return command(*args, target=_server(server, servers, calling_aet, ca_bundle, client_cert, client_key), **kwargs)

    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "target"]
    run.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + connection)
    return run


@pacs_app.command("echo")
@_server_options
def pacs_echo(target) -> None:
    """Check the connection: C-ECHO (DIMSE) or a QIDO-RS query (DICOMweb); print what answered.

    Credentials come from MEDRES_PACS_USERNAME + MEDRES_PACS_PASSWORD, MEDRES_PACS_TOKEN, or the file
    named by MEDRES_PACS_CREDENTIALS — never from the command line.

    Example: medres pacs echo --server http://localhost:8042/dicom-web
    """
    from medres.pacs.clients import client_for

    typer.echo(_run(lambda: client_for(target).echo()))


@pacs_app.command("score")
@_server_options
def pacs_score_cmd(
    target,
    checkpoint: ModelCheckpoint,
    study: List[str] = typer.Option([], "--study", help="Study Instance UID (repeatable)."),
    query: List[str] = typer.Option([], "--query", help="KEY=VALUE study query, e.g. ModalitiesInStudy=CR or StudyDate=20240101- (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output table (CSV): one row per image, hashed UIDs, predict's columns."),
    rescore: bool = typer.Option(False, "--rescore", help="Score studies that already hold this checkpoint's results (new SR and SC instances)."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Also store Grad-CAM Secondary Captures (one backward pass per image)."),
    gate: Gate = "flag",
    device: Device = "auto",
    precision: Precision = "auto",
    batch_size: int = typer.Option(16, "--batch-size", min=1),
) -> None:
    """Find studies, score their images on predict's path, store a TID 1500 Comprehensive SR and the
    Grad-CAM Secondary Captures back into each study. A study already scored by this checkpoint is skipped.

    Example: medres pacs score --checkpoint runs/covid --server http://localhost:8042/dicom-web --query ModalitiesInStudy=CR --out scores.csv
    """
    from medres.pacs.score import pacs_score

    summary = _run(lambda: pacs_score(checkpoint, target, studies=list(study), query=list(query), out=out, rescore=rescore, heatmaps=heatmaps,
                                      gate=gate, device=device, precision=precision, batch_size=batch_size))
    for o in summary["outcomes"]:
        if o["status"] == "failed":
            _err(o["message"])
    typer.echo(f"{summary['studies']} studies: {summary['scored']} scored and stored, {summary['skipped']} already scored, {summary['failed']} failed "
               f"({summary['images_scored']} of {summary['images']} images scored, {summary['seconds']:.1f} s)" + (f" -> {out}" if out else ""))
    if summary["failed"]:
        raise typer.Exit(1)


@app.command("listen")
def listen_cmd(
    checkpoint: ModelCheckpoint,
    port: int = typer.Option(..., "--port", help="TCP port of the storage SCP."),
    store_to: str = typer.Option(..., "--store-to", help="Where results go: " + _SERVER_HELP),
    spool: Path = typer.Option(Path("medres-spool"), "--spool", help="Durable spool folder (received instances, studies being scored)."),
    aet: str = typer.Option("MEDRES", "--aet", help="This SCP's AE title; associations calling another title are rejected."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    quiet_seconds: float = typer.Option(5.0, "--quiet-seconds", min=0.0, help="Score a study once no instance has arrived for this long."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output table (CSV), appended per study."),
    heatmaps: bool = typer.Option(True, "--heatmaps/--no-heatmaps", help="Also store Grad-CAM Secondary Captures."),
    gate: Gate = "flag",
    device: Device = "auto",
    precision: Precision = "auto",
    servers: ServersFile = None,
    ca_bundle: CaBundle = None,
    client_cert: ClientCert = None,
    client_key: ClientKey = None,
) -> None:
    """A DICOM storage SCP that scores each study once it has been quiet and stores the results back.

    Instances are spooled durably before they are acknowledged; a restart finishes what a crash
    interrupted, each study scored and stored once. Ctrl-C stops it cleanly.

    Example: medres listen --checkpoint runs/covid --port 11112 --store-to ORTHANC@pacs:4242 --out scores.csv
    """
    from medres.pacs.listen import listen

    target = _server(store_to, servers, aet, ca_bundle, client_cert, client_key)
    counts = _run(lambda: listen(checkpoint, port=port, store_to=target, spool=spool, aet=aet, host=host, quiet_seconds=quiet_seconds, out=out,
                                 gate=gate, heatmaps=heatmaps, device=device, precision=precision,
                                 on_ready=lambda: typer.echo(f"listening as {aet} on {host}:{port}; results to {target.label} (Ctrl-C stops)")))
    typer.echo(f"stopped: {counts['received']} instances received, {counts['scored']} studies scored, {counts['skipped']} skipped, {counts['failed']} failed")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
