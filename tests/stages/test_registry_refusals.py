"""Registry actions check what they act on, and loading a model never unpickles: publish registers only the model file
evaluate measured, promote moves @champion only to a version whose files are all in the store, and a model directory
that holds a pickle is refused in one line whatever it carries, while train's pt2 network still loads.

One tiny training + evaluate + publish (module fixture, a real MLflow store in a temporary folder) serves every test.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from onecycle.config import load_params
from onecycle.core.paths import Workspace
from onecycle.stages import evaluate, predict, promote, publish, train
from onecycle.stages.command import guarded
from tiny import tiny_params, write_fetched

pytestmark = pytest.mark.slow
NAME = "tiny-refusals"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained, evaluated and published as NAME version 1."""
    work = tmp_path_factory.mktemp("registry")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    write_fetched(work / "data", n_train=320, n_test=100)
    tiny_params(work, train={"epochs": 1}, data={"val_size": 64, "batch_size": 32}, mlflow={"registered_model": NAME})
    params = load_params(work / "params.yaml")
    assert guarded("train", lambda: train.run(params, Workspace(work), progress=False)) == 0
    assert guarded("evaluate", lambda: evaluate.run(params, Workspace(work)) and 0) == 0
    assert guarded("publish", lambda: publish.run(params, Workspace(work)) and 0) == 0
    return {"path": work, "params": params}


def _client(work: Path):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    return mlflow.MlflowClient()


def _stage(name: str, fn, capsys) -> tuple[int, list[str]]:
    """(exit code, stderr lines); stdout stays readable with capsys."""
    capsys.readouterr()
    code = guarded(name, fn)
    captured = capsys.readouterr()
    print(captured.out, end="")
    return code, captured.err.strip().splitlines()


def test_publish_after_a_new_training_without_evaluate_registers_nothing_then_the_evaluated_file(trained, capsys):
    work, params = trained["path"], trained["params"]
    ws, client = Workspace(work), _client(work)
    retrained = params.replace(train={"seed": 1, "resume": False})
    assert guarded("train", lambda: train.run(retrained, ws, progress=False)) == 0
    before = {p: (work / p).read_bytes() for p in ("reports/publish.json", "reports/metrics.json")}

    code, err = _stage("publish", lambda: publish.run(retrained, ws) and 0, capsys)  # train && publish
    assert code == 1 and len(err) == 1, err
    assert re.search(r"models/model.pt is not the model file \S*reports/metrics.json measured", err[0]), err
    assert "run `onecycle evaluate`" in err[0]
    assert [str(v.version) for v in client.search_model_versions(f"name='{NAME}'")] == ["1"]  # nothing registered
    assert {p: (work / p).read_bytes() for p in before} == before

    evaluated = json.loads(ws.evaluated_model_json.read_text())
    assert guarded("evaluate", lambda: evaluate.run(retrained, ws) and 0) == 0
    assert json.loads(ws.evaluated_model_json.read_text())["model_sha256"] != evaluated["model_sha256"]
    code, err = _stage("publish", lambda: publish.run(retrained.replace(evaluate={"tta": "none"}), ws) and 0, capsys)
    assert code == 1 and "measured with evaluate.tta flip, but the params say none" in err[0], err
    assert guarded("publish", lambda: publish.run(retrained, ws) and 0) == 0
    v2 = client.get_model_version(NAME, "2")
    assert float(v2.tags["test/top1"]) == pytest.approx(json.loads(ws.metrics_json.read_text())["test"]["top1"], abs=1e-6)


def test_promote_never_moves_champion_to_a_version_whose_model_files_are_gone(trained, capsys):
    import mlflow

    work = trained["path"]
    params, ws, client = trained["params"], Workspace(trained["path"]), _client(work)
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{NAME}'"))
    if versions == [1]:  # run alone: a second version of another logged model
        test_publish_after_a_new_training_without_evaluate_registers_nothing_then_the_evaluated_file(trained, capsys)
    v1, v2 = client.get_model_version(NAME, "1"), client.get_model_version(NAME, "2")
    assert v1.source != v2.source
    # the better one's files removed from the artifact store (a cleanup, a lost bucket): it must never serve
    best, other = (v1, v2) if float(v1.tags["test/top1"]) >= float(v2.tags["test/top1"]) else (v2, v1)
    artifacts = Path(client.get_model_version_download_uri(NAME, best.version).removeprefix("file://"))
    shutil.move(artifacts / "MLmodel", work / "MLmodel.removed")
    try:
        for force in (False, True):
            code, err = _stage("promote", lambda f=force: promote.run(params, ws, version=int(best.version),
                                                                       force=f) and 0, capsys)
            assert code == 1 and len(err) == 1, err
            assert f"refused: version {best.version} of {NAME} cannot be loaded" in err[0] and "MLmodel" in err[0]
        with pytest.raises(mlflow.exceptions.MlflowException):
            client.get_model_version_by_alias(NAME, "champion")  # nothing moved
        code, out = _stage("promote", lambda: promote.run(params, ws) and 0, capsys)
        assert code == 0
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == str(other.version)
        assert f"version {best.version} cannot be loaded, so it is not eligible" in capsys.readouterr().out
    finally:
        shutil.move(work / "MLmodel.removed", artifacts / "MLmodel")


def _image(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.full((28, 28), 200, dtype=np.uint8), "L").save(path)
    return path


class _Payload:
    """Unpickled, it would write a marker file: the proof that nothing was unpickled is that the marker is absent."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "the payload ran"))


def _crafted_dir(tmp_path: Path, meta: dict, marker: Path) -> Path:
    """An MLflow model directory with onecycle's metadata and a pytorch flavor holding a pickle with a payload, and a
    pickle module in its code folder that would run on import."""
    folder = tmp_path / "crafted"
    (folder / "data").mkdir(parents=True)
    (folder / "code").mkdir()
    (folder / "data/model.pth").write_bytes(pickle.dumps(_Payload(marker)))
    (folder / "data/pickle_module_info.txt").write_text("evil_pickle_module")
    (folder / "code/evil_pickle_module.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                                        "from pickle import *\n")
    (folder / "MLmodel").write_text(yaml.safe_dump({
        "flavors": {"pytorch": {"model_data": "data", "code": "code", "pytorch_version": "2.14.1"},
                    "python_function": {"loader_module": "mlflow.pytorch", "data": "data", "code": "code"}},
        "metadata": {"onecycle": meta}}))
    return folder


def test_a_model_directory_holding_a_pickle_is_refused_and_train_s_pt2_network_loads(trained, tmp_path, monkeypatch,
                                                                                    capsys):
    import mlflow

    work = trained["path"]
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")  # whatever MLflow would allow
    image = _image(tmp_path / "shirt.png")
    _client(work)
    network = mlflow.models.get_model_info(f"models:/{NAME}/1").metadata["onecycle"]["network_uri"]
    capsys.readouterr()
    assert predict.main([str(image), "--model-uri", network, "--json", "-k", "2"]) == 0  # the pt2 network loads
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["top_k"]) == 2

    meta = mlflow.models.get_model_info(network).metadata["onecycle"]
    marker = tmp_path / "marker"
    crafted = _crafted_dir(tmp_path, meta, marker)
    code = predict.main([str(image), "--model-uri", str(crafted)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "holds no torch.export network" in err[0] and "pickled model.pth" in err[0]
    assert not marker.exists()
    # a pt2 archive beside the pickle changes nothing: a model.pth is refused
    (tmp_path / "network").mkdir()
    shutil.copy(Path(mlflow.artifacts.download_artifacts(network, dst_path=str(tmp_path / "network"))) / "data/model.pt2",
                crafted / "data/model.pt2")
    assert predict.main([str(image), "--model-uri", str(crafted)]) == 1
    assert "pickled model.pth" in capsys.readouterr().err and not marker.exists()
