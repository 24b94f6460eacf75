"""Generated reference pages: every params.yaml key from the config models, and every command's ``--help``.

At ``config-inited`` this writes ``reference/params.md`` and ``reference/cli.md`` (git-ignored) from the code itself,
so the reference cannot drift from it: a key's type, default and allowed values come from ``onecycle.config``, what it
means from the comment above its field in ``config.py`` (or beside it in ``params.yaml``), which stages read it from
``dvc.yaml``; a command's page is its ``onecycle <command> --help``. A key with no comment in either place is a build
warning, so ``make docs`` (warnings are errors) fails until it is documented.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import tokenize
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parents[1] / "reference"
CLI_COLUMNS = "100"  # --help wrapped for the page's code blocks


def field_comments(source: str) -> dict[tuple[str, str], str]:
    """``{(class name, field): comment}`` from ``config.py``: the comment lines right above a field, or on its line."""
    out: dict[tuple[str, str], str] = {}
    cls, pending = None, []
    lines = source.splitlines()
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    for no, line in enumerate(lines, start=1):
        if m := re.match(r"class (\w+)\(", line):
            cls, pending = m.group(1), []
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(comments.get(no, ""))
            continue
        if cls and (m := re.match(r"    (\w+): [^=]+=", line)):
            text = " ".join([*pending, *([comments[no]] if no in comments and not stripped.startswith("#") else [])])
            out[(cls, m.group(1))] = text.strip()
        pending = []
    return out


def yaml_comments(text: str) -> dict[str, str]:
    """``{dotted key: comment}`` from params.yaml's comments beside each key."""
    out, section = {}, None
    for line in text.splitlines():
        if m := re.match(r"^(\w+):\s*(#.*)?$", line):
            section = m.group(1)
        elif section and (m := re.match(r"^  (\w+):[^#]*#\s*(.*)$", line)):
            out[f"{section}.{m.group(1)}"] = m.group(2).strip()
    return out


def readers(dvc_yaml: str) -> dict[str, list[str]]:
    """``{dotted key or section: [stages]}`` from dvc.yaml's ``params`` lists."""
    import yaml

    out: dict[str, list[str]] = {}
    for stage, spec in yaml.safe_load(dvc_yaml)["stages"].items():
        for p in spec.get("params", []):
            for key in (p if isinstance(p, str) else [k for v in p.values() for k in v]),:
                out.setdefault(key, []).append(stage)
    return out


def type_text(annotation) -> str:
    """A field's type as a params.yaml author reads it."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{_yaml(a)}`" for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in typing.get_args(annotation))
    if origin in (list, tuple):
        return "list"
    if origin is dict:
        return "mapping"
    names = {int: "integer", float: "number", str: "string", bool: "true/false", type(None): "null"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _yaml(value) -> str:
    import json

    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value
    return json.dumps(value) if isinstance(value, list | tuple | dict) else f"{value:g}" if isinstance(value, float) \
        else str(value)


def params_page(app) -> str:
    """reference/params.md: one table per section of params.yaml."""
    sys.path.insert(0, str(ROOT / "src"))
    from onecycle.config import Params

    comments = field_comments((ROOT / "src/onecycle/config.py").read_text())
    beside = yaml_comments((ROOT / "params.yaml").read_text())
    read_by = readers((ROOT / "dvc.yaml").read_text())
    lines = ["# params.yaml", "",
             "Every key of `params.yaml`, generated from the config models (`src/onecycle/config.py`) when the docs are "
             "built: its type, default, what it means, and which DVC stages read it (`dvc.yaml`; `tune` reads every "
             "section a training reads, and `tune.*`). A wrong key, type or value exits with code 2 and one line "
             "naming the dotted key, before anything is written.", ""]
    for section, field in Params.model_fields.items():
        model = field.annotation
        lines += [f"## {section}", "", "| key | type | default | read by | meaning |", "|---|---|---|---|---|"]
        for name, f in model.model_fields.items():
            key = f"{section}.{name}"
            meaning = comments.get((model.__name__, name)) or beside.get(key)
            if not meaning:
                from sphinx.util import logging as sphinx_logging

                sphinx_logging.getLogger(__name__).warning(
                    f"params reference: {key} has no comment in config.py or params.yaml: document it")
                meaning = ""
            stages = {*read_by.get(key, []), *read_by.get(section, [])}
            if "train" in stages or section == "tune":
                stages.add("tune")  # a trial trains with every key train reads
            default = f.default_factory() if f.default_factory is not None else f.default
            cell = meaning.replace("|", "\\|")
            lines.append(f"| `{key}` | {type_text(f.annotation)} | `{_yaml(default)}` | {', '.join(sorted(stages)) or '-'} "
                         f"| {cell} |")
        lines.append("")
    return "\n".join(lines)


def cli_page(app) -> str:
    """reference/cli.md: ``onecycle --help`` and each command's ``--help``, as the installed command prints them."""
    sys.path.insert(0, str(ROOT / "src"))
    from onecycle.cli import COMMANDS

    env = {**os.environ, "COLUMNS": CLI_COLUMNS, "PYTHONPATH": str(ROOT / "src")}

    def help_of(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "onecycle", *args, "--help"], capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"onecycle {' '.join(args)} --help exited {proc.returncode}: {proc.stderr[-500:]}")
        return proc.stdout.rstrip()

    lines = ["# The onecycle command", "",
             "Generated from the argument parsers when the docs are built: each block is what "
             "`onecycle <command> --help` prints. Every command also runs as `python -m onecycle <command>`, takes "
             "`--params PATH`, exits non-zero with one line on bad input (2 for bad params), and shows progress on a "
             "terminal.", "", "```text", help_of(), "```", ""]
    for command, (_, summary) in COMMANDS.items():
        lines += [f"## onecycle {command}", "", summary[0].upper() + summary[1:] + ".", "", "```text",
                  help_of(command), "```", ""]
    return "\n".join(lines)


def write_pages(app, config) -> None:
    OUT.mkdir(exist_ok=True)
    for name, page in (("params.md", params_page), ("cli.md", cli_page)):
        text = page(app)
        path = OUT / name
        if not path.is_file() or path.read_text() != text:  # unchanged pages keep their mtime: no rebuild
            path.write_text(text)


def setup(app):
    app.connect("config-inited", write_pages)
    return {"version": "1", "parallel_read_safe": True}
