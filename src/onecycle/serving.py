"""The trained model as MLflow logs, registers, tags, promotes and serves it.

``log_final_model`` logs two models into the training run:

* ``model``, registered under ``mlflow.registered_model``: an image classifier logged as code
  (``pyfunc_model.py``, MLflow's models-from-code, so loading it unpickles nothing) around the
  ``models/model.pt`` file (read weights-only). It takes encoded images (PNG, JPEG, ... as base64 in the
  JSON, column ``image``) and answers each with its top-k class names and probabilities, after the
  model's own eval preprocessing: the same code path as ``onecycle predict``.
* ``network``: the raw network in MLflow's "pt2" format (``torch.export``), softmax output, for callers
  that send normalized CxHxW tensors.

After ``evaluate``, :func:`mark_candidate` tags the registered version with its test metrics, the test
split's digest, git commit and DVC experiment, and gives it the alias ``candidate``; ``onecycle
promote`` moves ``champion`` to it when it beats the current champion on the same test data.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path

import torch

from . import tracking
from .modelfile import model_bundle

CANDIDATE, CHAMPION = "candidate", "champion"  # registered-model aliases
TOP1, TOP5, DIGEST = "test/top1", "test/top5", "test/dataset_digest"  # model-version tags
IMAGE_COLUMN = "image"
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")
DEFAULT_K = 3


def test_digest(info) -> str:
    """A digest of the test split as fetch wrote it (the md5s meta.json lists for the test files)."""
    meta = json.loads((Path(info.folder) / "meta.json").read_text())
    files = {name: md5 for name, md5 in sorted((meta.get("files") or {}).items()) if name.startswith("test")}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


test_digest.__test__ = False  # not a pytest test, whatever its name


def _onecycle_metadata(params, info) -> dict:
    """What ``onecycle predict --model-uri`` needs to preprocess images and name classes."""
    return {k: v for k, v in model_bundle(params, info, {}).items() if k != "state_dict"}


def _log_network(params, setup, state_dict: dict):
    """The raw network (softmax output) in MLflow's "pt2" format, unregistered; returns its ModelInfo."""
    import numpy as np

    from .models import build_model

    mlflow = tracking.mlflow()
    from mlflow.models import infer_signature

    model = build_model(params.model, setup.info.num_classes, setup.info.in_channels)
    model.load_state_dict(state_dict)
    served = torch.nn.Sequential(model, torch.nn.Softmax(dim=1)).eval()
    loader = setup.val_loader or setup.train_loader
    # Two examples: with one, torch.export (MLflow's default "pt2" format) would fix the batch size to 1.
    example = torch.stack([loader.dataset[i][0] for i in range(2)]).numpy().astype(np.float32)
    with torch.no_grad():
        probs = served(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        served, name="network", signature=infer_signature(example, probs), input_example=example,
        serialization_format="pt2", metadata={"onecycle": _onecycle_metadata(params, setup.info)},
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


def log_final_model(params, setup, state_dict: dict) -> str | None:
    """Log the image classifier (registered) and the raw network to the active run; returns the classifier's URI."""
    import numpy as np
    import pandas as pd
    import PIL

    mlflow = tracking.mlflow()
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from .modelfile import save_model

    network = _log_network(params, setup, state_dict)
    signature = ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
                               params=ParamSchema([ParamSpec("k", "long", DEFAULT_K)]))
    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "model.pt"
        save_model(params, setup.info, state_dict, model_file)  # the same bytes as models/model.pt
        code = Path(tmp) / "onecycle"  # the package as the model's own code, without caches
        shutil.copytree(Path(__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"model_file": str(model_file)}, code_paths=[str(code)],
            signature=signature, input_example=pd.DataFrame({IMAGE_COLUMN: [_example_png(setup.info)]}),
            registered_model_name=params.mlflow.registered_model,
            metadata={"onecycle": {**_onecycle_metadata(params, setup.info), "network_uri": network.model_uri}},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
                              f"pillow=={PIL.__version__}", f"pandas=={pd.__version__}",
                              f"albumentations=={_version('albumentations')}", f"pydantic=={_version('pydantic')}",
                              f"mlflow=={mlflow.__version__}"],
        )
    return info.model_uri


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


# ----------------------------------------------------------------------------------------------- registry

def mark_candidate(run_id: str, test_metrics: dict, digest: str) -> list[str]:
    """Tag the versions registered from ``run_id`` with their test results and provenance; alias ``candidate``.

    Returns "NAME/VERSION" of each version marked (none when the run registered no model).
    """
    client = tracking.mlflow().MlflowClient()
    run_tags = client.get_run(run_id).data.tags
    newest: dict[str, int] = {}
    for mv in client.search_model_versions(f"run_id='{run_id}'"):
        newest[mv.name] = max(newest.get(mv.name, 0), int(mv.version))
    tags = {TOP1: f"{test_metrics['top1']:.6f}", TOP5: f"{test_metrics['top5']:.6f}", DIGEST: digest,
            "git_commit": run_tags.get("git_commit", "unknown")}
    if run_tags.get("dvc_exp_name"):
        tags["dvc_experiment"] = run_tags["dvc_exp_name"]
    for name, version in newest.items():
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, value)
        client.set_registered_model_alias(name, CANDIDATE, str(version))
    return [f"{name}/{version}" for name, version in newest.items()]


# ----------------------------------------------------------------------------------------------- serving

class ImageClassifier:
    """Encoded images in, top-k (class, probability) out, with the model file's own eval preprocessing.

    ``pyfunc_model.py`` wraps one of these for MLflow; it runs on the CPU.
    """

    def __init__(self, model_file: str | Path):
        from .inference import eval_transform
        from .modelfile import load_model_bundle

        self.model, self.ds, bundle = load_model_bundle(Path(model_file), "cpu")
        self.augment_eval = bundle["augment_eval"]
        self.transform = eval_transform(self.ds, self.augment_eval)

    def predict_one(self, image: bytes | str, k: int, name: str = "image") -> dict:
        """``{"top_k": [{"class", "probability"}, ...]}`` or ``{"error": "..."}`` for one encoded image."""
        from .inference import ImageError, preprocess, top_k

        try:
            x = preprocess(_image_bytes(image, name), self.ds, self.augment_eval, self.transform, name=name)
        except ImageError as exc:
            return {"error": str(exc)}
        pairs = top_k(lambda t: torch.softmax(self.model(t), 1), x, self.ds.classes, k)
        return {"top_k": [{"class": c, "probability": p} for c, p in pairs]}

    def __call__(self, model_input, params: dict | None = None) -> list[dict]:
        """Answer every image of a request; a request whose images all fail is refused (HTTP 400)."""
        k = int((params or {}).get("k") or DEFAULT_K)
        images = _images(model_input)
        answers = [self.predict_one(img, k, name=f"image {i}") for i, img in enumerate(images)]
        if not answers or all("error" in a for a in answers):
            from mlflow.exceptions import MlflowException
            from mlflow.protos.databricks_pb2 import BAD_REQUEST

            detail = "; ".join(a["error"] for a in answers) or f"no images (send a column {IMAGE_COLUMN!r})"
            raise MlflowException(detail, error_code=BAD_REQUEST)
        return answers


def _images(model_input) -> list:
    """The encoded images of a request, whichever of MLflow's input formats carried them."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = IMAGE_COLUMN if IMAGE_COLUMN in model_input.columns else model_input.columns[0]
        return list(model_input[column]) if len(model_input.columns) else []
    if isinstance(model_input, dict):
        model_input = model_input.get(IMAGE_COLUMN, next(iter(model_input.values()), []))
    if isinstance(model_input, bytes | str):
        return [model_input]
    if isinstance(model_input, np.ndarray | pd.Series | list | tuple):
        return list(np.asarray(model_input, dtype=object).ravel()) if not isinstance(model_input, list) else model_input
    return [model_input]


def _image_bytes(item, name: str) -> bytes:
    """Encoded image bytes from bytes, a base64 string, or a TF-serving style ``{"b64": ...}``."""
    from .inference import ImageError

    if isinstance(item, dict) and "b64" in item:
        item = item["b64"]
    if isinstance(item, bytes | bytearray):
        item = bytes(item)
        if _BASE64_TEXT.fullmatch(item):  # the "inputs"/"instances" formats hand over the base64 text as bytes
            try:
                return base64.b64decode(b"".join(item.split()), validate=True)
            except (binascii.Error, ValueError):
                pass
        return item  # decoded by MLflow (dataframe formats); no PNG or JPEG is all base64 letters
    if isinstance(item, str):
        try:
            return base64.b64decode("".join(item.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageError(f"{name}: not base64-encoded image bytes") from None
    raise ImageError(f"{name}: expected base64-encoded image bytes, got {type(item).__name__}")
