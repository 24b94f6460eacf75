"""`dvc plots show` draws the intended plots only, with titled axes, a readable LR range test, and a page that
renders offline (Vega from .dvc/plots/vendor/, via the repository's plots.html_template).

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
INTENDED = {"LR range test", "Loss", "Top-1 accuracy", "Learning rate", "Momentum", "reports/predictions.csv",
            "reports/lr_find.png", "reports/confusion_matrix.png", "reports/misclassified.png",
            "Pareto front"}  # empty here: reports/tune/pareto.csv is a multi-objective study's, on its machine

pytestmark = pytest.mark.slow


def _dvc(*args, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
    proc = subprocess.run([BIN / "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"dvc {args} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plots")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(REPO / name, root / name)
    shutil.copytree(REPO / "reports", root / "reports", ignore=shutil.ignore_patterns("tune"))
    _dvc("init", "--no-scm", "-q", cwd=root)
    shutil.copytree(REPO / ".dvc/plots", root / ".dvc/plots", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("vendor"))
    shutil.copyfile(REPO / ".dvc/config", root / ".dvc/config")
    return root


def _titles(spec: dict, channel: str) -> list:
    """Every title a Vega-Lite spec gives ``channel`` (top level and layers)."""
    out = []
    for part in [spec, *spec.get("layer", [])]:
        enc = part.get("encoding", {}).get(channel)
        if isinstance(enc, dict) and "field" in enc:
            out.append(enc.get("title"))
    return out


def test_only_the_intended_plots_with_titled_axes(project):
    plots = json.loads(_dvc("plots", "show", "--json", cwd=project))["data"]
    assert set(plots) == INTENDED  # no auto plot of lr_find.csv, history.csv (images_per_second), schedule.csv
    for name in INTENDED - {"reports/predictions.csv"}:
        for item in plots[name]:
            if item["type"] != "vega":
                continue
            spec = item["content"]
            for channel in ("x", "y"):
                titles = _titles(spec, channel)
                assert titles and all(t and t not in ("x", "y", "step", "dvc_inferred_y_value") for t in titles), \
                    (name, channel, titles)


def test_the_lr_range_test_labels_only_powers_of_ten_and_keeps_the_legend_clear(project):
    (item,) = json.loads(_dvc("plots", "show", "--json", cwd=project))["data"]["LR range test"]
    spec = item["content"]
    line, suggestion = spec["layer"]
    axis = line["encoding"]["x"]["axis"]
    assert line["encoding"]["x"]["scale"]["type"] == "log" and "LN10" in axis["labelExpr"]
    assert spec["config"]["legend"]["orient"] == "bottom"  # the suggestion's label cannot run into it
    text = next(layer for layer in suggestion["layer"] if layer["mark"]["type"] == "text")
    assert text["mark"]["align"] == "right" and text["encoding"]["y"]["field"] == "label_y"  # one line per revision
    assert "row_number" in json.dumps(suggestion["transform"])


def test_the_html_page_loads_vega_from_the_repository_and_says_why_when_it_cannot(project):
    _dvc("plots", "show", "-o", "out", cwd=project)
    page = (project / "out/index.html").read_text()
    assert '<script src="../.dvc/plots/vendor/vega.min.js"></script>' in page
    assert page.index(".dvc/plots/vendor/") < page.index("cdn.jsdelivr.net")  # the CDN only as a fallback
    assert "This plot needs Vega" in page and "make vega" in page
