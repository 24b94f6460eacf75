"""The registered model the MLflow 3 way: publish's tags and ``@candidate``, ``onecycle promote`` to
``@champion``, and a bare ``mlflow models serve -m models:/NAME@champion`` answering image files over HTTP
on loopback with the probabilities ``onecycle predict`` and ``onecycle evaluate`` give (test-time augmentation on).

One tiny training + evaluate + publish (module fixture, real MLflow store in a temporary folder) serves every test.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from onecycle.config import load_params
from onecycle.core.paths import Workspace
from onecycle.data.store import load_info
from onecycle.stages import evaluate, predict, promote, publish, train
from onecycle.stages.command import guarded
from onecycle.tracking.registry import CANDIDATE, CHAMPION, DIGEST, TOP1, TOP5, mark_version, test_digest
from tiny import tiny_params, write_fetched

pytestmark = pytest.mark.slow
NAME = "tiny-served"
BIN = Path(sys.executable).parent


def _env(**extra) -> dict:
    """The environment of a fresh shell: no MLFLOW_* variables, so MLflow finds ./mlflow.db by itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained, evaluated, and published as NAME version 1 (so tagged and @candidate)."""
    work = tmp_path_factory.mktemp("serving")
    # A module fixture runs before the function-scoped isolated_tracking_uri: an earlier test's
    # mlflow.set_tracking_uri() (which exports MLFLOW_TRACKING_URI) must not pass for the user's store here.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    write_fetched(work / "data", n_train=400, n_test=300)
    tiny_params(work, train={"epochs": 1}, data={"val_size": 64}, mlflow={"registered_model": NAME})
    params = load_params(work / "params.yaml")
    assert guarded("train", lambda: train.run(params, Workspace(work), progress=False)) == 0
    assert guarded("evaluate", lambda: evaluate.run(params, Workspace(work)) and 0) == 0
    assert guarded("publish", lambda: publish.run(params, Workspace(work)) and 0) == 0
    return {"path": work, "params": params}


def _client(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _promote(trained, capsys, force=False, version=None) -> tuple[int, str]:
    capsys.readouterr()
    code = guarded("promote", lambda: promote.run(trained["params"], Workspace(trained["path"]), force=force,
                                                  version=version) and 0)
    out = capsys.readouterr()
    return code, (out.out + out.err).strip()


def _new_candidate(client, run_id: str, top1: float, digest: str) -> str:
    """Another version of NAME (the same logged model), marked as publish marks one: its tags and @candidate."""
    v1 = client.get_model_version(NAME, "1")
    mv = client.create_model_version(NAME, v1.source, run_id=run_id, model_id=v1.model_id)
    mark_version(NAME, mv.version, run_id, {"top1": top1, "top5": 1.0}, digest)
    return str(mv.version)


def _toy_run(client, run_id: str) -> str:
    """A training run like ``run_id`` but on a subset of the training data and one epoch (a queued toy experiment)."""
    run = client.get_run(run_id)
    toy = client.create_run(run.info.experiment_id, tags={"dvc_exp_name": "toy-exp"})
    for key, value in run.data.params.items():
        client.log_param(toy.info.run_id, key, {"data.train_subset": "64", "train.epochs": "1"}.get(key, value))
    client.set_terminated(toy.info.run_id)
    return toy.info.run_id


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(NAME, CHAMPION).version)


def test_evaluate_tags_the_registered_version_and_promote_follows_the_test_accuracy(trained, capsys):
    work, params = trained["path"], trained["params"]
    client = _client(work)
    metrics = json.loads((work / "reports/metrics.json").read_text())["test"]
    run_id = json.loads((work / "reports/runs.json").read_text())["train"]
    cand = client.get_model_version_by_alias(NAME, CANDIDATE)
    assert str(cand.version) == "1" and cand.run_id == run_id
    digest = test_digest(load_info(params.data, work))
    assert float(cand.tags[TOP1]) == pytest.approx(metrics["top1"], abs=1e-6)
    assert float(cand.tags[TOP5]) == pytest.approx(metrics["top5"], abs=1e-6)
    assert cand.tags[DIGEST] == digest and len(digest) == 16
    assert cand.tags["git_commit"] == client.get_run(run_id).data.tags["git_commit"]
    import mlflow

    meta = mlflow.models.get_model_info(f"models:/{NAME}/1").metadata["onecycle"]
    assert meta["tta"] == "flip" and meta["network_uri"].startswith("models:/m-")  # the recipe; train's raw network
    assert client.get_run(run_id).info.status == "FINISHED"  # publish logged into the run by id, status untouched
    assert json.loads((work / "reports/publish.json").read_text())["version"] == 1
    assert guarded("publish", lambda: publish.run(params, Workspace(work)) and 0) == 0  # again: the same version
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]
    assert all(getattr(mv, "current_stage", None) in (None, "None") for mv in client.search_model_versions(f"name='{NAME}'"))
    top1 = metrics["top1"]

    # a queued toy experiment (subset, 1 epoch) evaluated after the real one: @candidate, higher score, not crowned
    toy = _new_candidate(client, _toy_run(client, run_id), top1 + 0.02, digest)
    code, out = _promote(trained, capsys)
    assert code == 0 and f"{NAME} @{CHAMPION}: no champion -> version 1 (test top-1 {top1:.4f})" in out, out
    table = out.splitlines()[1:4]
    assert table[0].split() == ["version", "test", "top-1", "test", "split", "epochs", "train", "subset",
                                "experiment", "aliases"], out
    assert table[1].split()[:6] == [toy, f"{top1 + 0.02:.4f}", digest, "1", "64", "toy-exp"], out
    assert table[2].split()[:5] == ["1", f"{top1:.4f}", digest, "1", "all"], out
    assert _champion(client) == "1"
    code, out = _promote(trained, capsys)
    assert code == 0 and "version 1" in out and f"stays @{CHAMPION}" in out
    assert f"@{CANDIDATE} version {toy}" in out and "not eligible: version " + toy + " was trained on a subset" in out
    code, out = _promote(trained, capsys, version=int(toy))
    assert code == 1 and out.splitlines()[-1] == (
        f"onecycle promote: error: refused: version {toy} was trained on a subset of the training data "
        "(data.train_subset=64) (--force promotes it anyway)")
    assert _champion(client) == "1"

    worse = _new_candidate(client, run_id, top1 - 0.01, digest)
    code, out = _promote(trained, capsys)
    assert code == 0 and f"@{CANDIDATE} version {worse} (test top-1 {top1 - 0.01:.4f}) does not beat it" in out
    assert _champion(client) == "1"

    elsewhere = _new_candidate(client, run_id, top1 + 0.01, "0123456789abcdef")
    code, out = _promote(trained, capsys)
    assert code == 0 and f"stays @{CHAMPION}" in out and "not comparable" in out
    assert f"version {elsewhere} was tested on data 0123456789abcdef, the champion's (version 1) on {digest}" in out
    code, out = _promote(trained, capsys, version=int(elsewhere))
    assert code == 1 and "not comparable (--force promotes it anyway)" in out.splitlines()[-1]
    assert _champion(client) == "1"

    better = _new_candidate(client, run_id, top1 + 0.01, digest)
    code, out = _promote(trained, capsys)
    assert code == 0 and (f"{NAME} @{CHAMPION}: version 1 (test top-1 {top1:.4f}) -> version {better} "
                          f"(test top-1 {top1 + 0.01:.4f})") in out
    assert _champion(client) == better

    code, out = _promote(trained, capsys, version=1)  # a roll-back to an eligible version: the user's choice
    assert code == 0 and f"version {better} (test top-1 {top1 + 0.01:.4f}) -> version 1" in out
    assert _champion(client) == "1"
    code, out = _promote(trained, capsys)  # the default picks the best again
    assert code == 0 and _champion(client) == better

    code, out = _promote(trained, capsys, version=99)
    assert code == 1 and out.splitlines()[-1].startswith(f"onecycle promote: error: {NAME} has no version 99")

    forced = _new_candidate(client, run_id, top1 - 0.5, digest)
    code, out = _promote(trained, capsys, force=True)
    assert code == 0 and f"-> version {forced} (test top-1 {top1 - 0.5:.4f}) (forced)" in out
    assert _champion(client) == forced
    code, out = _promote(trained, capsys, version=int(toy), force=True)
    assert code == 0 and f"-> version {toy}" in out and _champion(client) == toy


def test_promote_says_what_is_missing(tmp_path, capsys):
    tiny_params(tmp_path, mlflow={"registered_model": "never-trained"})
    params = load_params(tmp_path / "params.yaml")
    code = guarded("promote", lambda: promote.run(params, Workspace(tmp_path)) and 0)
    err = capsys.readouterr().err.strip()
    assert code == 1 and err.startswith("onecycle promote: error: no MLflow store at ")
    assert not (tmp_path / "mlflow.db").exists()
    _client(tmp_path).create_registered_model("other-model")  # a store, but not this model in it
    code = guarded("promote", lambda: promote.run(params, Workspace(tmp_path)) and 0)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("onecycle promote: error: no registered model 'never-trained' in sqlite:")
    _client(tmp_path).create_registered_model("never-trained")
    code = guarded("promote", lambda: promote.run(params, Workspace(tmp_path)) and 0)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err == ("onecycle promote: error: never-trained has no @candidate version: "
                                 "run `onecycle evaluate` (or `dvc repro`) first")


# ----------------------------------------------------------------------------------------------- serving

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _wait(port: int, server: subprocess.Popen, seconds: float = 400) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"mlflow models serve exited with {server.returncode}: {server.stdout.read()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            return
        except (urllib.error.URLError, OSError):
            time.sleep(1)
    raise AssertionError(f"mlflow models serve did not answer /ping within {seconds} s")


def _png(work: Path, index: int, path: Path, size: int | None = None, rgb: bool = False) -> bytes:
    from PIL import Image

    im = Image.fromarray(np.load(work / "data/fashion_mnist/test_x.npy")[index].squeeze())
    if size:
        im = im.resize((size, size))
    (im.convert("RGB") if rgb else im).save(path)
    return path.read_bytes()


def _predict(path: Path, capsys, *extra: str) -> list[dict]:
    """``onecycle predict PATH --json -k 3`` (in this process, in the workspace)."""
    capsys.readouterr()
    assert predict.main([str(path), "--json", "-k", "3", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top_k"]


def _every_test_image_scores_as_evaluate_scores_it(trained, port: int, tmp_path: Path, capsys) -> None:
    """Evaluate's per-image class probabilities (test-time augmentation on, as params.yaml says) are what
    `onecycle predict` and the served model answer for the same images, to 1e-5: the registry's test metrics
    describe the served model."""
    import torch

    from onecycle.data.loaders import build_split, make_loader
    from onecycle.serving.modelfile import load_model_bundle
    from onecycle.training.engine import evaluate as score

    work, params = trained["path"], trained["params"]
    assert params.evaluate.tta == "flip"
    model, ds, _ = load_model_bundle(work / "models/model.pt")
    test = build_split(params.data, params.augment, load_info(params.data, work), "test", train_augment=False,
                       seed=params.train.seed)
    out = score(model, make_loader(test, 64, shuffle=False, seed=0, num_workers=0), torch.device("cpu"), None,
                collect=True, tta=params.evaluate.tta)
    expected = torch.softmax(out["logits"], 1).numpy()
    n = len(expected)
    assert n == 300 and out["top1"] == pytest.approx(json.loads((work / "reports/metrics.json").read_text())
                                                     ["test"]["top1"])
    folder = tmp_path / "test_images"
    folder.mkdir()
    paths = [folder / f"{i:03d}.png" for i in range(n)]
    for i, path in enumerate(paths):
        _png(work, i, path)

    def as_matrix(answers: list[list[dict]]) -> np.ndarray:
        return np.array([[next(c["probability"] for c in top if c["class"] == name) for name in ds.classes]
                         for top in answers])

    capsys.readouterr()
    assert predict.main([*map(str, paths), "--json", "-k", str(len(ds.classes))]) == 0
    predicted = [json.loads(line)["top_k"] for line in capsys.readouterr().out.strip().splitlines()]
    np.testing.assert_allclose(as_matrix(predicted), expected, atol=1e-5)
    images = [[base64.b64encode(p.read_bytes()).decode()] for p in paths]
    status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": images},
                                  "params": {"k": len(ds.classes)}})
    assert status == 200, answer
    np.testing.assert_allclose(as_matrix([a["top_k"] for a in answer["predictions"]]), expected, atol=1e-5)
    without = score(model, make_loader(test, 64, shuffle=False, seed=0, num_workers=0), torch.device("cpu"), None,
                    collect=True, tta="none")
    assert not np.allclose(torch.softmax(without["logits"], 1).numpy(), expected, atol=1e-5)  # TTA is on, visibly


def test_mlflow_models_serve_answers_image_files_like_onecycle_predict(trained, tmp_path, monkeypatch, capsys):
    work = trained["path"]
    monkeypatch.chdir(work)
    client = _client(work)
    if not client.get_registered_model(NAME).aliases.get(CHAMPION):
        client.set_registered_model_alias(NAME, CHAMPION, "1")
    files = {"gray.png": _png(work, 0, tmp_path / "gray.png"),
             "rgb.jpg": _png(work, 1, tmp_path / "rgb.jpg", size=56, rgb=True)}  # other size and channels
    port = _free_port()
    server = subprocess.Popen(
        [BIN / "mlflow", "models", "serve", "-m", f"models:/{NAME}@{CHAMPION}", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=work, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait(port, server)
        for name, blob in files.items():
            b64 = base64.b64encode(blob).decode()
            status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[b64]]}})
            assert status == 200, answer
            served = answer["predictions"][0]["top_k"]
            local = _predict(tmp_path / name, capsys)  # models/model.pt
            registry = _predict(tmp_path / name, capsys, "--model-uri", f"models:/{NAME}@{CHAMPION}")
            for expected in (local, registry):
                assert [c["class"] for c in served] == [c["class"] for c in expected]
                np.testing.assert_allclose([c["probability"] for c in served],
                                           [c["probability"] for c in expected], atol=1e-5)
            # MLflow's other JSON layouts and the k parameter
            status, again = _post(port, {"inputs": {"image": [b64]}, "params": {"k": 1}})
            assert status == 200 and again["predictions"][0]["top_k"] == served[:1], again
            status, again = _post(port, {"dataframe_records": [{"image": b64}]})
            assert status == 200 and again["predictions"][0]["top_k"] == served

        _every_test_image_scores_as_evaluate_scores_it(trained, port, tmp_path, capsys)

        good = base64.b64encode(files["gray.png"]).decode()
        truncated = base64.b64encode(files["gray.png"][: len(files["gray.png"]) // 2]).decode()
        status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[truncated]]}})
        assert status == 400 and "not a readable image" in answer["message"], answer
        status, answer = _post(port, {"dataframe_split": {"columns": ["image"],
                                                          "data": [[base64.b64encode(b"not an image").decode()],
                                                                   [good]]}})
        assert status == 200, answer
        bad, ok = answer["predictions"]
        assert "not a readable image" in bad["error"] and len(ok["top_k"]) == 3
        status, answer = _post(port, {"dataframe_split": {"columns": ["image"], "data": [[good]]}})
        assert status == 200 and answer["predictions"][0]["top_k"] == ok["top_k"]  # still serving
        assert server.poll() is None
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
