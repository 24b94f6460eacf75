"""The evaluated model as MLflow serves it: the registered image classifier, logged into the training run by the
publish stage (after evaluate), so the registered version is the model evaluate scored, with its recipe.

``model``, registered under ``mlflow.registered_model``, is an image classifier logged as code
(``pyfunc_model.py``, MLflow's models-from-code, so loading it unpickles nothing) around one model file, its
artifact ``model_file``: the ``model.onnx`` export of the network with evaluate's test-time augmentation
(:mod:`onecycle.serving.onnx_export`, checked against torch on the test split), run on ONNX Runtime, so its
requirements hold no torch (:func:`onnx_requirements`); or, with no ``onnx_file``, a copy of ``models/model.pt``
(read weights-only) that records the test-time augmentation, run on torch (:func:`served_requirements`). It takes
encoded images (PNG, JPEG, ... as base64 in the JSON, column ``image``) and answers each with its top-k class
names and probabilities, after the model's own eval preprocessing, scoring a request's images as one batch
(:class:`onecycle.serving.classifier.ImageClassifier`), the same code path as ``onecycle predict``. Its code is a
copy of onecycle and, for a user's model on torch (``model.name: "package.module:factory"``), of the factory's
top-level package, so the network is rebuilt where the workspace is not importable (``mlflow models serve``
anywhere).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import onecycle
from onecycle.data import catalog
from onecycle.serving.classifier import DEFAULT_K, IMAGE_COLUMN
from onecycle.serving.modelfile import bundle_metadata
from onecycle.tracking import store
from onecycle.training import checkpoint as ckpt
from onecycle.training import model_registry


def _example_png(image_shape) -> bytes:
    """A blank image of the model's channels and size, as the logged input example."""
    import io

    from PIL import Image

    h, w, c = image_shape
    buf = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (min(w, 256), min(h, 256)), 128).save(buf, format="PNG")
    return buf.getvalue()


def log_classifier(run_id: str, model_file: Path, registered_model: str | None, tta: str,
                   network_uri: str | None = None, tags: dict[str, str] | None = None, onnx_file: Path | None = None,
                   name: str = "model", metadata: dict | None = None):
    """Log ``model_file`` (a models/model.pt bundle) with its test-time augmentation ``tta`` as the image
    classifier ``name`` of the run ``run_id`` (by id: the run's status is left alone), registered as
    ``registered_model`` when it is set; ``tags`` go to the logged model, ``metadata`` to its ``onecycle``
    metadata. With ``onnx_file`` (``model_file`` exported by :func:`onecycle.serving.onnx_export.export_onnx`) it
    serves that on ONNX Runtime, else ``model_file`` on torch. Returns MLflow's ModelInfo
    (``registered_model_version`` set when registered)."""
    import pandas as pd

    mlflow = store.mlflow()
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    bundle = {**ckpt.load(model_file), "tta": tta}
    signature = ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
                               params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
    eval_spec = bundle["augment_eval"] or catalog.kind(bundle["dataset"]["name"]).eval_spec(
        bundle["dataset"]["image_shape"][0])
    with tempfile.TemporaryDirectory() as tmp:
        if onnx_file is not None:  # the network is in the graph: no torch, no factory code
            served_file = Path(tmp) / "model.onnx"
            shutil.copyfile(onnx_file, served_file)
            requirements = onnx_requirements(eval_spec)
        else:
            served_file = Path(tmp) / "model.pt"
            ckpt.save(bundle, served_file)  # models/model.pt plus its recipe's test-time augmentation
            requirements = served_requirements(eval_spec)
        code = [Path(tmp) / "onecycle"]  # the package as the model's own code, without caches
        shutil.copytree(Path(onecycle.__file__).parent, code[0], ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        own = model_registry.copy_code(bundle["model"]["name"], Path(tmp) / "user") if onnx_file is None else None
        if own is not None:  # a user's model: its factory's package, importable where the workspace is not
            code.append(own)
        meta = {**bundle_metadata(bundle), "runtime": "onnxruntime" if onnx_file is not None else "torch",
                **({"network_uri": network_uri} if network_uri else {}), **(metadata or {})}
        with store.without_event_lines():  # the publish stage's own line names the version
            return Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id,
                python_model=str(Path(__file__).with_name("pyfunc_model.py")),
                artifacts={"model_file": str(served_file)}, code_paths=[str(c) for c in code],
                signature=signature,
                input_example=pd.DataFrame({IMAGE_COLUMN: [_example_png(bundle["dataset"]["image_shape"])]}),
                registered_model_name=registered_model or None,
                metadata={"onecycle": meta}, pip_requirements=requirements, tags=tags,
            )


def log_served_model(run_id: str, model_file: Path, registered_model: str, tta: str, data, info,
                     network_uri: str | None = None, tags: dict[str, str] | None = None):
    """The registered classifier: ``model_file`` exported to ONNX with ``tta`` and checked against torch on the test
    split of ``data`` (``info``: the fetched dataset), logged as :func:`log_classifier` does, to run on ONNX
    Runtime; a network that cannot be exported faithfully is logged to run on torch, and the check says why.
    Returns ``(ModelInfo, {"runtime", "onnx_check"})``."""
    from onecycle.serving.onnx_export import export_for_serving

    with tempfile.TemporaryDirectory() as tmp:
        onnx, check = export_for_serving(model_file, Path(tmp) / "model.onnx", tta, data, info)
        served = {"runtime": "onnxruntime" if onnx is not None else "torch", "onnx_check": check}
        logged = log_classifier(run_id, model_file, registered_model, tta, network_uri=network_uri, tags=tags,
                                onnx_file=onnx, metadata={"onnx_check": check})
    return logged, served


def served_requirements(eval_spec: list) -> list[str]:
    """The torch classifier's pip requirements: what its code imports to answer, at this environment's versions.

    Resizing, cropping and normalizing need no albumentations (nor OpenCV, SciPy through it); a model whose
    ``augment.eval`` lists another transform needs it, and only then is it listed.
    """
    return _pinned(["torch", "numpy", "pillow", "pandas", "pydantic", "mlflow"], eval_spec)


# What the ONNX classifier's code imports to answer (ONNX Runtime, NumPy, Pillow; pandas for MLflow's request
# formats), and MLflow without its server and UI (mlflow-skinny runs `mlflow models serve`), plus SQLAlchemy
# and Alembic, so that it reads a `models:/NAME@ALIAS` from the project's SQLite store (./mlflow.db).
ONNX_REQUIREMENTS = ("onnxruntime", "numpy", "pillow", "pandas", "mlflow-skinny", "sqlalchemy", "alembic")


def onnx_requirements(eval_spec: list) -> list[str]:
    """The ONNX classifier's pip requirements, at this environment's versions: no torch (albumentations only for a
    model whose ``augment.eval`` needs it)."""
    return _pinned(list(ONNX_REQUIREMENTS), eval_spec)


def _pinned(names: list[str], eval_spec: list) -> list[str]:
    from onecycle.serving.preprocessing import needs_albumentations

    if needs_albumentations(eval_spec):
        names.append("albumentations")
    return [f"{name}=={_version(name).split('+')[0]}" for name in names]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)

