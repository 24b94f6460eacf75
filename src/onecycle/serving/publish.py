"""The trained model as MLflow logs and registers it (:func:`log_final_model`, the train stage's last step).

Two models go into the training run:

* ``model``, registered under ``mlflow.registered_model``: an image classifier logged as code
  (``pyfunc_model.py``, MLflow's models-from-code, so loading it unpickles nothing) around the
  ``models/model.pt`` file (read weights-only). It takes encoded images (PNG, JPEG, ... as base64 in the
  JSON, column ``image``) and answers each with its top-k class names and probabilities, after the
  model's own eval preprocessing (:class:`onecycle.serving.classifier.ImageClassifier`), the same code path
  as ``onecycle predict``.
* ``network``: the raw network in MLflow's "pt2" format (``torch.export``), softmax output, for callers
  that send normalized CxHxW tensors.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

import onecycle
from onecycle.config import AugmentConfig, ModelConfig
from onecycle.data import catalog
from onecycle.serving.classifier import DEFAULT_K, IMAGE_COLUMN
from onecycle.serving.modelfile import model_bundle
from onecycle.tracking import store


def _onecycle_metadata(model: ModelConfig, augment: AugmentConfig, info) -> dict:
    """What ``onecycle predict --model-uri`` needs to preprocess images and name classes."""
    return {k: v for k, v in model_bundle(model, augment, info, {}).items() if k != "state_dict"}


def _log_network(model_cfg: ModelConfig, augment: AugmentConfig, setup, state_dict: dict):
    """The raw network (softmax output) in MLflow's "pt2" format, unregistered; returns its ModelInfo."""
    import numpy as np

    from onecycle.training.models import build_model

    mlflow = store.mlflow()
    from mlflow.models import infer_signature

    model = build_model(model_cfg, setup.info.num_classes, setup.info.in_channels)
    model.load_state_dict(state_dict)
    served = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    loader = setup.val_loader or setup.train_loader
    # Two examples: with one, torch.export (MLflow's default "pt2" format) would fix the batch size to 1.
    example = torch.stack([loader.dataset[i][0] for i in range(2)]).numpy().astype(np.float32)
    with torch.no_grad():
        probs = served(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        served, name="network", signature=infer_signature(example, probs), input_example=example,
        serialization_format="pt2", metadata={"onecycle": _onecycle_metadata(model_cfg, augment, setup.info)},
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
    )


def _example_png(info) -> bytes:
    """A blank image of the model's channels and size, as the logged input example."""
    import io

    from PIL import Image

    h, w, c = info.image_shape
    buf = io.BytesIO()
    Image.new("L" if c == 1 else "RGB", (min(w, 256), min(h, 256)), 128).save(buf, format="PNG")
    return buf.getvalue()


def log_final_model(setup, state_dict: dict, *, model: ModelConfig, augment: AugmentConfig,
                    registered_model: str) -> str | None:
    """Log the image classifier (registered as ``registered_model``) and the raw network to the active run;
    returns the classifier's URI."""
    import pandas as pd

    mlflow = store.mlflow()
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from onecycle.serving.modelfile import save_model

    network = _log_network(model, augment, setup, state_dict)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
                               params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.pt"
        save_model(model, augment, setup.info, state_dict, model_file)  # the same bytes as models/model.pt
        code = Path(tmp) / "onecycle"  # the package as the model's own code, without caches
        shutil.copytree(Path(onecycle.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"model_file": str(model_file)}, code_paths=[str(code)],
            signature=signature, input_example=pd.DataFrame({IMAGE_COLUMN: [_example_png(setup.info)]}),
            registered_model_name=registered_model,
            metadata={"onecycle": {**_onecycle_metadata(model, augment, setup.info),
                                   "network_uri": network.model_uri}},
            pip_requirements=served_requirements(augment.eval or catalog.kind(setup.info.name).eval_spec()),
        )
    return info.model_uri


def served_requirements(eval_spec: list) -> list[str]:
    """The served classifier's pip requirements: what its code imports to answer, at this environment's versions.

    Resizing, cropping and normalizing need no albumentations (nor OpenCV, SciPy through it); a model whose
    ``augment.eval`` lists another transform needs it, and only then is it listed.
    """
    from onecycle.serving.preprocessing import needs_albumentations

    names = ["torch", "numpy", "pillow", "pandas", "pydantic", "mlflow"]
    if needs_albumentations(eval_spec):
        names.append("albumentations")
    return [f"{name}=={_version(name).split('+')[0]}" for name in names]


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
