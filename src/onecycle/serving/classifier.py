"""The served image classifier: encoded images in, each image's top-k classes (or its error) out, with the
model file's own eval preprocessing. ``pyfunc_model.py`` wraps it for MLflow (``mlflow models serve``).
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import torch

IMAGE_COLUMN = "image"
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")
DEFAULT_K = 3


class ImageClassifier:
    """Encoded images in, top-k (class, probability) out, with the model file's own eval preprocessing.

    ``pyfunc_model.py`` wraps one of these for MLflow; it runs on the CPU.
    """

    def __init__(self, model_file: str | Path):
        from onecycle.serving.inference import eval_transform
        from onecycle.serving.modelfile import load_model_bundle

        self.model, self.ds, bundle = load_model_bundle(Path(model_file), "cpu")
        self.augment_eval = bundle["augment_eval"]
        self.tta = bundle.get("tta", "none")  # published with evaluate's: the registry's numbers are these
        self.transform = eval_transform(self.ds, self.augment_eval)

    def predict_one(self, image: bytes | str, k: int, name: str = "image") -> dict:
        """``{"top_k": [{"class", "probability"}, ...]}`` or ``{"error": "..."}`` for one encoded image."""
        from onecycle.data.images import ImageError
        from onecycle.serving.inference import preprocess, top_k

        try:
            x = preprocess(_image_bytes(image, name), self.ds, self.augment_eval, self.transform, name=name)
        except ImageError as exc:
            return {"error": str(exc)}
        from onecycle.training.models import tta_logits

        pairs = top_k(lambda t: torch.softmax(tta_logits(self.model, t, self.tta), 1), x, self.ds.classes, k)
        return {"top_k": [{"class": c, "probability": p} for c, p in pairs]}

    def __call__(self, model_input, params: dict | None = None) -> list[dict]:
        """Answer every image of a request; a request whose images all fail is refused (HTTP 400)."""
        from onecycle.data.images import release_memory

        k = int((params or {}).get("k") or DEFAULT_K)
        images = _images(model_input)
        try:
            answers = [self.predict_one(img, k, name=f"image {i}") for i, img in enumerate(images)]
        finally:
            release_memory()  # after a large image, the server gives the decoding memory back
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
    from onecycle.data.images import ImageError

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
