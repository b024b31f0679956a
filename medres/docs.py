"""Generated reference sections (CLI, config keys, error codes, the harmonised label table), so they
cannot drift: marked blocks in docs/reference.md and README.md.

    python -m medres.docs docs/reference.md README.md      # rewrite the marked blocks in place
A test regenerates them and compares with the committed files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def cli_reference_md() -> str:
    import typer.main

    from medres.cli import app

    root = typer.main.get_command(app)
    lines: list[str] = []

    def walk(group, prefix: str) -> None:
        for name, cmd in group.commands.items():
            full = f"{prefix}{name}"
            if hasattr(cmd, "commands"):
                walk(cmd, full + " ")
                continue
            help_text = (cmd.help or "").strip().splitlines()
            lines.append(f"#### `medres {full}`\n")
            lines.append(help_text[0] + "\n" if help_text else "")
            example = [h.strip() for h in help_text if h.strip().startswith("Example:")]
            if example:
                lines.append("```\n" + example[0].removeprefix("Example:").strip() + "\n```\n")
            lines.append("| argument / option | default | meaning |\n|---|---|---|")
            for p in cmd.params:
                opts = ", ".join(f"`{o}`" for o in p.opts) if p.param_type_name == "option" else f"`{p.name.upper()}...`" if p.nargs == -1 else f"`{p.name.upper()}`"
                default = "" if p.required or p.default in (None, [], ()) or p.param_type_name == "argument" else f"`{p.default}`"
                if p.required:
                    default = "required"
                lines.append(f"| {opts} | {default} | {(getattr(p, 'help', '') or '').replace('|', '/')} |")
            lines.append("")

    lines.append("Global options: `medres --version`, `medres --verbose COMMAND ...` (log details to stderr), `medres --install-completion` (shell completion).\n")
    walk(root, "")
    return "\n".join(lines).strip() + "\n"


def config_reference_md() -> str:
    from medres.config import config_reference

    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, typ, default, desc in config_reference():
        rows.append(f"| `{key}` | {typ.replace('|', '/')} | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def error_codes_md() -> str:
    from medres.errors import all_codes

    rows = ["| code | exit code | raised for |", "|---|---|---|"]
    for code, cls in all_codes().items():
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ and cls is not cls.__mro__[1] else ""
        rows.append(f"| `{code}` | {cls.exit_code} | {_ERROR_HELP.get(code, doc)} |")
    return "\n".join(rows) + "\n"


_ERROR_HELP = {
    "MEDRES_ERROR": "base class",
    "INGEST_ERROR": "base class of the file errors below",
    "FILE_NOT_FOUND": "the input file does not exist",
    "NOT_AN_IMAGE": "empty file, unrecognised content, unreadable DICOM",
    "NO_PIXEL_DATA": "DICOM without pixel data (SR, RT plan, waveform, ...)",
    "PIXEL_DATA_SHORT": "pixel data shorter than Rows × Columns × bits declare; truncated file",
    "INVALID_PIXEL_MODULE": "missing/contradictory Rows, Columns, Bits*, PhotometricInterpretation; malformed LUT; 1-bit objects",
    "UNSUPPORTED_PHOTOMETRIC": "colour DICOM (RGB, YBR, PALETTE COLOR)",
    "MULTIFRAME_UNSUPPORTED": "multi-frame DICOM without a requested frame",
    "DECODER_MISSING": "no installed decoder for the transfer syntax (names the pip package)",
    "UNSUPPORTED_TRANSFER_SYNTAX": "a transfer syntax no decoder exists for (e.g. MPEG video)",
    "DECODE_FAILED": "the codec failed on the data; malformed content",
    "DEGENERATE_IMAGE": "constant image, RescaleSlope 0, window mapping everything to one value",
    "IMAGE_TOO_LARGE": "more than data.max_megapixels (checked before decoding)",
    "PATH_OUTSIDE_ROOT": "manifest path escaping its root (.., absolute, symlink out, symlink loop)",
    "USAGE_ERROR": "bad command-line usage",
    "CONFIG_INVALID": "unknown key, wrong type or value in a config / --set",
    "MANIFEST_INVALID": "missing column, unknown/empty/NaN label, empty manifest",
    "SPLIT_LEAKAGE": "a patient or identical file in two splits",
    "OUTPUT_EXISTS": "output exists and --overwrite/--resume was not given",
    "PACS_ERROR": "a PACS request failed (DICOMweb or DIMSE)",
    "PACS_UNREACHABLE": "the PACS did not answer (closed port, wrong host, TLS failure)",
    "PACS_AUTH_FAILED": "the PACS refused the credentials (HTTP 401/403)",
    "PACS_ASSOCIATION_REJECTED": "the DICOM association was rejected or aborted (AE titles, presentation contexts)",
    "PACS_NO_IMAGES": "a study had no image medres could score (none retrieved, or every one refused by the gate)",
    "PACS_STORE_REJECTED": "the PACS refused to store the results (STOW-RS or C-STORE failure); the output table keeps the scores",
    "OUTPUT_FAILED": "an output could not be written (disk full, over quota, read-only); the old file is kept",
    "NO_INPUTS": "no input files found",
    "WEIGHTS_INVALID": "weights are not a torchvision-layout ResNet50 (lists missing/unexpected keys)",
    "WEIGHTS_NOT_FOUND": "pretrained file missing (names the file and folder)",
    "CHECKPOINT_INVALID": "truncated/corrupt checkpoint, pickle with code, not a medres checkpoint",
    "TRAINING_FAILED": "training could not continue",
    "NON_FINITE_LOSS": "non-finite loss at epoch E step S (the last good checkpoint is kept)",
    "EXPORT_PARITY": "ONNX export differs from torch beyond its tolerance (fp32 1e-4; int8 max |Δprob| 0.1)",
    "REJECTED": "base class of the input gate's refusals (status rejected: readable, but the model does not answer)",
    "UNEXPECTED_MODALITY": "DICOM Modality not among the expected ones (learnt from the training headers, or --expect modality=...)",
    "UNEXPECTED_BODY_PART": "DICOM BodyPartExamined not among the expected ones (--expect body_part=...)",
    "UNEXPECTED_VIEW": "DICOM ViewPosition not among the expected ones (--expect view=...)",
    "OUT_OF_DISTRIBUTION": "OOD score above the checkpoint's threshold with --gate reject (with --gate flag the row is scored and marked)",
    "INT8_UNSUPPORTED": "--precision int8 on a CPU without AVX2/VNNI/AMX or ARM dot-product, or on CUDA",
    "ARCHIVE_INVALID": "manifest import: an archive file missing, a column missing, a malformed row (file:line)",
}

def labels_md() -> str:
    from medres.archives.vocabulary import table_md

    return table_md()


BLOCKS = {"cli": cli_reference_md, "config": config_reference_md, "errors": error_codes_md, "labels": labels_md}


def render(text: str) -> str:
    for name, fn in BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pattern.sub(lambda m: m.group(1) + fn() + m.group(2), text)
    return text


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["docs/reference.md", "README.md"]:
        path = Path(arg)
        path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
