"""No warnings on a normal run: the output of a default `dvc repro` (a tiny Fashion-MNIST run of the default
params), `onecycle publish`, `mlflow models serve`'s start-up and `make ui` holds no warning line, and the log lines
read like the commands' own (``lr_find: ...``, never ``INFO onecycle...`` nor MLflow's dated lines).

Python's warnings filters are left at their defaults here (no PYTHONWARNINGS): what a user's shell shows.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEBIAN = Path("/usr/share/datasets/fashion-mnist")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                       reason="needs Debian's dataset-fashion-mnist (make setup installs it as root)"),
    pytest.mark.skipif(shutil.which("git") is None or shutil.which("make") is None, reason="needs git and make"),
]
WARNING = re.compile(r"warn", re.IGNORECASE)
OTHER_STYLES = re.compile(r"^(INFO|WARNING|DEBUG) onecycle|^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) mlflow")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PYTHONWARNINGS"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def _run(cmd, cwd: Path, timeout: int = 900) -> str:
    proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                          env=_env())
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-4000:]}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(cmd, cwd: Path, url: str, ready, seconds: float = 400, then=None) -> str:
    """Start a server, wait until ``url`` answers and ``ready(output so far)``, call ``then()``, stop it; its whole
    output."""
    server = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                              start_new_session=True)
    lines: list[str] = []
    try:
        os.set_blocking(server.stdout.fileno(), False)
        deadline = time.time() + seconds
        answered = False
        while time.time() < deadline and not (answered and ready("".join(lines))):
            assert server.poll() is None, "".join(lines) + (server.stdout.read() or "")
            lines.extend(server.stdout.readlines())
            try:
                urllib.request.urlopen(url, timeout=2)
                answered = True
            except OSError:
                time.sleep(0.5)
        assert answered and ready("".join(lines)), "".join(lines)
        if then is not None:
            then()
        time.sleep(2)  # what the server prints right after it answers (the workers' start-up) counts too
        lines.extend(server.stdout.readlines())
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    return "".join(lines)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A clone of this repo with the working tree's source and params (a tiny run of the defaults), reproduced."""
    clone = tmp_path_factory.mktemp("quiet") / "onecycle"
    _run(["git", "clone", "-q", str(REPO), str(clone)], clone.parent)
    for rel in ("dvc.yaml", "params.yaml", ".gitignore", "Makefile"):
        shutil.copy(REPO / rel, clone / rel)
    shutil.rmtree(clone / "src")
    shutil.copytree(REPO / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((clone / "params.yaml").read_text())
    params["data"].update(train_subset=1024, val_size=256, batch_size=128)  # tiny; every other key the default's
    params["model"]["width"] = 0.125
    params["lr_find"]["num_iter"] = 12
    params["train"]["epochs"] = 1
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "add", "-A", "src", "dvc.yaml", "params.yaml", ".gitignore", "Makefile"], clone)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], clone)
    return {"path": clone, "repro": _run([BIN / "dvc", "repro"], clone, timeout=1500)}


def test_a_default_dvc_repro_and_publish_print_no_warning(repo):
    out = repo["repro"]
    for stage in ("fetch", "lr_find", "train", "evaluate", "publish"):
        assert f"Running stage '{stage}'" in out
    assert not [line for line in out.splitlines() if WARNING.search(line)], out
    assert not [line for line in out.splitlines() if OTHER_STYLES.search(line)], out
    assert "Successfully registered model" not in out  # publish's own line names the version
    assert "publish: onecycle-fashion_mnist version 1 " in out
    again = _run([BIN / "onecycle", "publish"], repo["path"])  # the same model again: its version, quietly
    assert not [line for line in again.splitlines() if WARNING.search(line)], again


def _png_request(clone: Path) -> bytes:
    """An /invocations body: the first test image, as a user's PNG (a read-only array once decoded)."""
    import base64
    import io
    import json

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.load(clone / "data/fashion_mnist/test_x.npy", mmap_mode="r")[0].squeeze()).save(buf, "PNG")
    return json.dumps({"dataframe_split": {"columns": ["image"],
                                           "data": [[base64.b64encode(buf.getvalue()).decode()]]}}).encode()


def test_mlflow_models_serve_starts_and_answers_without_a_warning_and_names_its_model(repo):
    import json

    port = _free_port()
    answers = []

    def ask():
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=_png_request(repo["path"]),
                                     headers={"Content-Type": "application/json"})
        answers.append(json.loads(urllib.request.urlopen(req, timeout=120).read()))

    out = _start([BIN / "mlflow", "models", "serve", "-m", "models:/onecycle-fashion_mnist/1", "--env-manager",
                  "local", "--host", "127.0.0.1", "--port", str(port)], repo["path"],
                 f"http://127.0.0.1:{port}/ping", lambda text: "onecycle: serving" in text, then=ask)
    assert len(answers[0]["predictions"][0]["top_k"]) == 3
    assert not [line for line in out.splitlines() if WARNING.search(line)], out
    (line,) = [ln for ln in out.splitlines() if ln.startswith("onecycle: serving")]
    assert "of MLflow run " in line and "fashion_mnist, 10 classes" in line, line


def test_make_ui_prints_its_link_once_the_server_answers_and_no_warning(repo):
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    out = _start(["make", "-s", "ui", f"PORT={port}", f"VENV={BIN.parent}"], repo["path"], base + "/health",
                 lambda text: "MLflow UI: " in text)
    assert not [line for line in out.splitlines() if WARNING.search(line)], out
    link = next(line for line in out.splitlines() if line.startswith("MLflow UI: "))
    assert link.startswith(f"MLflow UI: {base}/#/experiments/") and link.endswith("?workflowType=machine_learning")
    # printed after the server's own start-up lines: the link is there once the page can open
    assert out.index("MLflow UI: ") > out.index("Uvicorn running")
