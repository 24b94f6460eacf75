"""The registered model served from a fresh environment built from its own requirements, as a deployment does it:
``python -m venv`` and ``pip install -r`` of the version's requirements.txt (from the package registry), then
``mlflow models serve -m models:/NAME@champion`` of that environment, in the project folder, on loopback. The
environment holds no torch and stays within 500 MiB, and the server answers every test image with evaluate's top-1
class and probabilities (to 1e-4).

One tiny training + evaluate + publish + promote (module fixture, the real MLflow store in a temporary folder).
"""

from __future__ import annotations

import base64
import csv
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port
from onecycle.config import load_params
from onecycle.core.paths import Workspace
from onecycle.stages import evaluate, promote, publish, train
from onecycle.stages.command import guarded
from tiny import tiny_params, write_fetched

pytestmark = pytest.mark.slow
NAME = "tiny-onnx"
N_TEST = 300
# pip's words when it cannot reach the package registry (then the test is skipped: nothing to install from)
UNREACHABLE = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
               "Max retries exceeded", "ProxyError", "ConnectTimeout", "Connection refused")


def _env(venv: Path | None = None) -> dict:
    """A fresh shell's environment (no MLFLOW_*: MLflow finds ./mlflow.db), with ``venv``'s commands first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTHON", "VIRTUAL_ENV"))}
    if venv is not None:
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(venv)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny model trained, evaluated, published (as ONNX) and promoted to NAME@champion."""
    work = tmp_path_factory.mktemp("onnx-served")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    write_fetched(work / "data", n_train=400, n_test=N_TEST)
    tiny_params(work, train={"epochs": 1}, data={"val_size": 64}, mlflow={"registered_model": NAME})
    params = load_params(work / "params.yaml")
    ws = Workspace(work)
    assert guarded("train", lambda: train.run(params, ws, progress=False)) == 0
    assert guarded("evaluate", lambda: evaluate.run(params, ws) and 0) == 0
    assert guarded("publish", lambda: publish.run(params, ws) and 0) == 0
    assert guarded("promote", lambda: promote.run(params, ws, force=True) and 0) == 0
    return {"path": work, "params": params}


@pytest.fixture(scope="module")
def served_env(project, tmp_path_factory) -> Path:
    """A fresh venv holding exactly the champion's requirements, installed from the package registry."""
    import mlflow

    work = project["path"]
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    try:
        requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}@champion"))
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    venv = tmp_path_factory.mktemp("venv") / "served"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=_env(), timeout=300)
    proc = subprocess.run([venv / "bin/python", "-m", "pip", "install", "--disable-pip-version-check",
                           "--no-input", "-r", str(requirements)], env=_env(venv), capture_output=True, text=True,
                          timeout=1500)
    if proc.returncode != 0 and any(word in proc.stdout + proc.stderr for word in UNREACHABLE):
        pytest.skip(f"the package registry is unreachable: {(proc.stderr or proc.stdout).strip().splitlines()[-1]}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return venv


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def test_the_champions_requirements_hold_no_torch_and_fit_in_500_mib(project, served_env):
    import mlflow

    work = project["path"]
    assert json.loads((work / "reports/publish.json").read_text())["runtime"] == "onnxruntime"
    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    try:
        requirements = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}@champion")).read_text()
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    names = [line.split("==")[0] for line in requirements.split() if line and not line.startswith("-")]
    assert "onnxruntime" in names and "mlflow-skinny" in names
    assert not {"torch", "torchvision", "mlflow", "albumentations"} & set(names), names
    probe = subprocess.run([served_env / "bin/python", "-c", "import torch"], capture_output=True, text=True,
                           env=_env(served_env))
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr
    assert _du(served_env) <= 500 * 2**20, f"{_du(served_env) / 2**20:.0f} MiB"


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _evaluates_probabilities(project) -> np.ndarray:
    """Evaluate's per-image class probabilities (its function, its test-time augmentation) of the test split."""
    import torch

    from onecycle.data.loaders import build_split, make_loader
    from onecycle.data.store import load_info
    from onecycle.serving.modelfile import load_model_bundle
    from onecycle.training.engine import evaluate as score

    work, params = project["path"], project["params"]
    model, _, _ = load_model_bundle(work / "models/model.pt")
    test = build_split(params.data, params.augment, load_info(params.data, work), "test", train_augment=False,
                       seed=params.train.seed)
    out = score(model, make_loader(test, 64, shuffle=False, seed=0, num_workers=0), torch.device("cpu"), None,
                collect=True, tta=params.evaluate.tta)
    return torch.softmax(out["logits"], 1).numpy()


def test_the_fresh_environment_serves_every_test_image_as_evaluate_scores_it(project, served_env, tmp_path):
    from PIL import Image

    work = project["path"]
    classes = json.loads((work / "data/fashion_mnist/meta.json").read_text())["classes"]
    images = np.load(work / "data/fashion_mnist/test_x.npy")
    pngs = []
    for i, image in enumerate(images):
        Image.fromarray(image.squeeze()).save(tmp_path / f"{i}.png")
        pngs.append(base64.b64encode((tmp_path / f"{i}.png").read_bytes()).decode())
    with open(work / "reports/predictions.csv", newline="") as f:
        evaluated_top1 = [row["predicted"] for row in csv.DictReader(f)]
    expected = _evaluates_probabilities(project)
    assert len(evaluated_top1) == len(expected) == N_TEST

    port = free_port()
    server = subprocess.Popen(
        [served_env / "bin/mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=work, env=_env(served_env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"mlflow models serve exited: {server.stdout.read()[-3000:]}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping within 300 s"
                time.sleep(1)
        status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[p] for p in pngs]},
                                      "params": {"k": len(classes)}})
        assert status == 200, answer
        served = np.array([[next(c["probability"] for c in a["top_k"] if c["class"] == name) for name in classes]
                           for a in answer["predictions"]])
        assert [a["top_k"][0]["class"] for a in answer["predictions"]] == evaluated_top1
        np.testing.assert_allclose(served, expected, atol=1e-4)
        status, one = _post(port, {"inputs": {"image": [pngs[7]]}, "params": {"k": 1}})  # one image, another layout
        assert status == 200 and one["predictions"][0]["top_k"] == answer["predictions"][7]["top_k"][:1]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
