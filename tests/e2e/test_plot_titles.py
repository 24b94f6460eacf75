"""`dvc plots show` titles each plot by what it shows, never by the file it reads (reports/predictions.csv).

A copy of the repository's DVC files and its committed reports/ in a temporary DVC project (no git, no run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_every_drawn_plot_is_titled_by_what_it_shows(tmp_path):
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "reports", tmp_path / "reports", ignore=shutil.ignore_patterns("tune"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True, env=env, timeout=120)
    shutil.copytree(REPO / ".dvc/plots", tmp_path / ".dvc/plots", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("vendor"))
    shown = subprocess.run([BIN / "dvc", "plots", "show", "--json"], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=300, check=True).stdout
    titles = {name: item["content"].get("title", {}).get("text")
              for name, items in json.loads(shown)["data"].items() for item in items if item["type"] == "vega"}
    assert titles["reports/predictions.csv"] == "Confusion matrix, test split (share of each actual class)"
    assert titles["Loss"] == "Loss" and titles["LR range test"] == "LR range test"
    assert not [t for t in titles.values() if not t or "/" in t or t.endswith((".csv", ".json"))], titles
    (confusion,) = json.loads(shown)["data"]["reports/predictions.csv"]
    encoding = confusion["content"]["spec"]["encoding"]
    assert (encoding["x"]["title"], encoding["y"]["title"]) == ("predicted class", "actual class")
