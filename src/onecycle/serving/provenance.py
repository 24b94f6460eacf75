"""Which model answers: the one line that ``onecycle predict``, ``onecycle demo`` and the served model print first.

A model file (``models/model.pt``, or a ``model.onnx`` export) is named by its path, when it was written and
the training that made it (its MLflow run and DVC experiment, which train records in the file: :data:`TRAINED`).
An MLflow model URI is named by what it resolves to now: the registered version an alias or ``latest`` points
at, or the logged model, with its run. ``dvc exp run`` trains in the workspace, so ``models/model.pt`` is always
the last experiment's model: this line says which one it is.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

TRAINED = "trained"  # the model file's key: {"mlflow_run_id", "dvc_exp_name"} of the training that wrote it


def trained_by(run_id: str | None, dvc_exp_name: str | None) -> dict[str, Any]:
    """What a model file records of the training that wrote it (:data:`TRAINED`)."""
    return {"mlflow_run_id": run_id, "dvc_exp_name": dvc_exp_name}


def _training(trained: dict | None) -> str:
    trained = trained or {}
    parts = []
    if trained.get("dvc_exp_name"):
        parts.append(f"DVC experiment {trained['dvc_exp_name']}")
    if trained.get("mlflow_run_id"):
        parts.append(f"MLflow run {trained['mlflow_run_id']}")
    return ", ".join(parts)


def _metadata_of_file(path: Path) -> dict:
    """A model file's metadata (its bundle without the weights), read without building the network."""
    if path.suffix == ".onnx":
        from onecycle.serving.onnx_model import OnnxScorer

        return OnnxScorer(path).metadata
    from onecycle.training import checkpoint as ckpt

    return {k: v for k, v in ckpt.load(path).items() if k != "state_dict"}


def describe_file(path: Path, metadata: dict | None = None) -> str:
    """``models/model.pt (written 2026-12-07 18:41; DVC experiment lowlr, MLflow run 0a9c...; fashion_mnist)``."""
    path = Path(path)
    meta = _metadata_of_file(path) if metadata is None else metadata
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
    training = _training(meta.get(TRAINED))
    dataset = (meta.get("dataset") or {}).get("name")
    details = "; ".join(p for p in (f"written {written}", training, dataset) if p)
    return f"{path} ({details})"


def describe_uri(uri: str) -> str:
    """``models:/onecycle-fashion_mnist@champion: version 3 (MLflow run 0a9c..., DVC experiment lowlr)``: what an
    MLflow model URI points at now (call after the tracking store is configured)."""
    from onecycle.tracking import store

    client = store.mlflow().MlflowClient()
    target = uri.removeprefix("models:/")
    try:
        if not uri.startswith("models:/"):
            return uri
        if target.startswith("m-"):  # a logged model's id
            model = client.get_logged_model(target.split("/", 1)[0])
            return f"{uri}: logged model {model.name} of MLflow run {model.source_run_id}"
        if "@" in target:
            name, alias = target.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = target.partition("/")
            if number in ("", "latest"):
                version = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, number)
        tags = client.get_run(version.run_id).data.tags if version.run_id else {}
        details = [_training({"mlflow_run_id": version.run_id, "dvc_exp_name": tags.get("dvc_exp_name")})]
        if version.tags.get("test/top1"):
            details.append(f"test top-1 {float(version.tags['test/top1']):.4f}")
        shown = "; ".join(d for d in details if d)
        return f"{uri}: {name} version {version.version}" + (f" ({shown})" if shown else "")
    except Exception:  # an unknown name or alias: loading the model says what is wrong, in its own words
        return uri


def describe_served(model_file: str | Path) -> str:
    """The line a served model prints when it loads: its logged model and run (from the MLmodel file beside its
    artifacts), the runtime and what it was trained on."""
    model_file = Path(model_file)
    meta = _metadata_of_file(model_file)
    logged = ""
    for folder in (model_file.parent.parent, model_file.parent):
        if (folder / "MLmodel").is_file():
            from mlflow.models import Model

            mlmodel = Model.load(str(folder / "MLmodel"))
            logged = f"logged model {mlmodel.model_id or mlmodel.artifact_path} of MLflow run {mlmodel.run_id}"
            break
    runtime = "ONNX Runtime" if model_file.suffix == ".onnx" else "torch"
    dataset = meta.get("dataset") or {}
    details = ", ".join(p for p in (_training(meta.get(TRAINED)) if not logged else "",
                                    f"{dataset.get('name')}, {len(dataset.get('classes') or [])} classes",
                                    f"on {runtime}") if p)
    return f"onecycle: serving {logged or model_file.name} ({details})"


def describe(model_path: Path | None, model_uri: str | None) -> str:
    """The model that answers, for ``--model PATH`` or ``--model-uri URI`` (after it loaded: the store is set)."""
    return describe_uri(model_uri) if model_uri else describe_file(Path(model_path))
