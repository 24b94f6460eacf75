"""README.md reads in a 160-column terminal and names what a new user asks first."""

from __future__ import annotations

from pathlib import Path

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_code_blocks_and_tables_fit_160_columns():
    wide, in_code = [], False
    for number, line in enumerate(README.splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if (in_code or line.startswith("|")) and len(line) > 160:
            wide.append((number, len(line)))
    assert not wide, f"README lines wider than 160 columns (line, width): {wide}"


def test_the_readme_names_the_remote_the_demo_api_and_exp_apply():
    assert "no DVC remote" in README
    assert 'api_name="/classify"' in README and "gradio_client" in README
    assert "dvc exp apply" in README
