"""The docs site: it builds offline with warnings as errors (no broken link or anchor, no undocumented param), its
params reference covers every key, its CLI reference is what `onecycle <command> --help` prints, and the README's
commands are the ones the docs use."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
COMMAND_WORDS = ("make", "dvc", "onecycle", "mlflow", "optuna")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
                           str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _text(html: Path) -> str:
    import html as htmllib

    return htmllib.unescape(re.sub(r"<[^>]+>", "", html.read_text()))


def test_the_site_builds_offline_with_warnings_as_errors_and_every_page_is_in_the_toctree(site):
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md")
             if "_build" not in p.parts and p.name != "README.md"}
    built = {p.relative_to(site).with_suffix("").as_posix() for p in site.rglob("*.html")}
    assert pages <= built
    for part in ("tutorials", "how-to", "reference", "explanation"):
        assert any(p.startswith(f"{part}/") for p in pages), part


def test_the_params_reference_documents_every_key(site):
    from onecycle.config import load_params, parse_params

    text = _text(site / "reference" / "params.html")
    keys = set(load_params(ROOT / "params.yaml").flat()) | set(parse_params({}).flat())
    sections = {k.split(".")[0] for k in keys}
    flat_fields = {f"{s}.{f}" for s in sections
                   for f in type(getattr(parse_params({}), s)).model_fields}
    missing = sorted(k for k in flat_fields if k not in text)
    assert missing == []
    rows = [line for line in (DOCS / "reference" / "params.md").read_text().splitlines() if line.startswith("| `")]
    assert len(rows) == len(flat_fields)
    assert [r for r in rows if r.rstrip().endswith("|  |")] == []  # every key says what it means


def test_the_cli_reference_is_what_each_command_prints(site):
    from onecycle.cli import COMMANDS

    page = (DOCS / "reference" / "cli.md").read_text()
    env = {**os.environ, "COLUMNS": "100"}
    for command in ("", *COMMANDS):
        proc = subprocess.run([sys.executable, "-m", "onecycle", *([command] if command else []), "--help"],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 0 and proc.stdout.rstrip() in page, command
        assert f"onecycle {command}" in _text(site / "reference" / "cli.html")


def test_the_readmes_commands_are_the_ones_the_docs_use():
    docs = "\n".join(p.read_text() for p in DOCS.rglob("*.md") if "_build" not in p.parts)
    docs = re.sub(r"\s+", " ", docs)
    blocks = re.findall(r"```(?:bash|sh|console)?\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    commands = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
                if line.strip().split(" ")[0] in COMMAND_WORDS]
    assert commands, "the README shows no command"
    assert [c for c in commands if re.sub(r"\s+", " ", c) not in docs] == []
