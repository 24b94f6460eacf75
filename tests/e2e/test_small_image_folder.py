"""A small image folder (3 classes x 40 grey 28 x 28 images) trains end to end on the defaults: only data.dataset
and data.source set in params.yaml, then the real `dvc repro`.

The validation split and the batch size come from the data (auto), the images keep their own size and channel,
the LR range test fits the few batches there are, the model registers under the folder's own name, and nothing
prints a warning. `onecycle predict` then says first which model answers.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="needs git")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTHONWARNINGS"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=_env())
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _shapes(folder: Path, per_class: int, seed: int) -> None:
    """Grey 28 x 28 PNGs: class c is a bright square in its own corner of a noisy background."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, (row, col) in enumerate([(2, 2), (2, 16), (16, 9)]):
        (folder / f"shape{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = rng.integers(0, 60, (28, 28), dtype=np.uint8)
            dy, dx = rng.integers(-2, 3, 2)
            image[row + dy: row + dy + 10, col + dx: col + dx + 10] = 230
            Image.fromarray(image, "L").save(folder / f"shape{c}" / f"{i}.png")


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    clone = tmp_path_factory.mktemp("small") / "onecycle"
    _run(["git", "clone", "-q", str(REPO), str(clone)], cwd=clone.parent)
    for rel in ("dvc.yaml", "params.yaml", ".gitignore"):  # the working tree's, as in the pipeline test
        shutil.copy(REPO / rel, clone / rel)
    shutil.rmtree(clone / "src")
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _shapes(clone / "images/shapes/train", 40, seed=1)
    _shapes(clone / "images/shapes/val", 10, seed=2)
    params = (clone / "params.yaml").read_text()
    params = params.replace("  dataset: fashion_mnist      #", "  dataset: imagefolder        #", 1)
    params = params.replace("  source:                     #", "  source: images/shapes      #", 1)
    (clone / "params.yaml").write_text(params)
    assert _run([sys.executable, "-c", "from onecycle.config import load_params as l; p = l('params.yaml'); "
                 "print(p.data.dataset, p.data.source)"], clone).stdout == "imagefolder images/shapes\n"
    _run(["git", "add", "-A", "src", "dvc.yaml", "params.yaml", ".gitignore"], clone)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a small image folder"], clone)
    proc = _run([BIN / "dvc", "repro"], clone, timeout=1500)
    return {"path": clone, "out": proc.stdout + proc.stderr}


def test_every_stage_runs_on_the_defaults_without_a_warning(repo):
    out = repo["out"]
    for stage in ("fetch", "lr_find", "train", "evaluate", "publish"):
        assert f"Running stage '{stage}'" in out
    assert not [line for line in out.splitlines() if "warning" in line.lower()], out
    assert "small data: 120 training examples, so batches of 14" in out  # one line says what auto chose


def test_the_images_keep_their_size_and_channel_and_the_splits_fit_the_data(repo):
    clone = repo["path"]
    meta = json.loads((clone / "data/imagefolder/meta.json").read_text())
    assert meta["image_shape"] == [28, 28, 1] and (meta["num_train"], meta["num_test"]) == (120, 30)
    assert len(meta["mean"]) == 1 and 0 < meta["mean"][0] < 1
    trained = json.loads((clone / "reports/train.json").read_text())
    assert trained["epochs"] == 4
    assert trained["best_val_top1"] > 0.5  # 3 classes: chance is a third
    lr_find = json.loads((clone / "reports/lr_find.json").read_text())
    assert lr_find["suggested_lr"] is not None and len(lr_find["lrs"]) <= 30
    assert lr_find["measured_on"]["data.val_size"] == 12 and lr_find["measured_on"]["data.batch_size"] == 14
    test = json.loads((clone / "reports/metrics.json").read_text())["test"]
    assert test["n"] == 30 and test["top1"] > 1 / 3


def test_the_model_registers_under_the_folders_own_name(repo):
    published = json.loads((repo["path"] / "reports/publish.json").read_text())
    assert published["registered_model"] == "onecycle-shapes" and published["version"] == 1


def test_predict_says_first_which_model_answers(repo):
    clone = repo["path"]
    image = clone / "images/shapes/val/shape2/0.png"
    proc = _run([BIN / "onecycle", "predict", str(image), "--json"], clone)
    run_id = json.loads((clone / "reports/runs.json").read_text())["train"]
    first = proc.stderr.splitlines()[0]
    assert first.startswith("predict: models/model.pt (written ") and f"MLflow run {run_id}" in first, proc.stderr
    assert {c["class"] for c in json.loads(proc.stdout)["top_k"]} == {"shape0", "shape1", "shape2"}
    registered = _run([BIN / "onecycle", "predict", str(image), "--model-uri", "models:/onecycle-shapes/latest"],
                      clone)
    assert registered.stderr.splitlines()[0].startswith(
        f"predict: models:/onecycle-shapes/latest: onecycle-shapes version 1 (MLflow run {run_id}; test top-1 ")
