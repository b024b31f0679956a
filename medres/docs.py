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
        doc = (cls.__dict__.get("__doc__") or "").strip().splitlines()  # the class's own docstring, not its parent's
        text = doc[0].replace("|", "\\|") if doc else ""
        rows.append(f"| `{code}` | {cls.exit_code} | {text} |")
    return "\n".join(rows) + "\n"



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
