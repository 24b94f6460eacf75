"""The served image classifier: encoded images in, each image's top-k classes (or its error) out, with the
model file's own eval preprocessing. ``pyfunc_model.py`` wraps it for MLflow (``mlflow models serve``).

A request's images are decoded and preprocessed one by one (a bad one gets its own error), then scored together
in batches, test-time augmentation included: a ``model.onnx`` on ONNX Runtime (the registered model; no torch is
imported), a ``model.pt`` on torch.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import numpy as np

IMAGE_COLUMN = "image"
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")
DEFAULT_K = 3
# Preprocessed values per network call (16 MiB of float32 input): a request of any size is scored in batches of
# up to 5,349 28x28 grey images, or 27 RGB ones at 224x224, so its activations stay within a server's memory.
BATCH_VALUES = 1 << 22


class ImageClassifier:
    """Encoded images in, top-k (class, probability) out, with the model file's own eval preprocessing.

    ``model_file`` is a ``model.onnx`` (ONNX Runtime) or a ``model.pt`` (torch, read weights-only);
    ``pyfunc_model.py`` wraps one of these for MLflow; it runs on the CPU.
    """

    def __init__(self, model_file: str | Path):
        from onecycle.serving.inference import eval_transform, load_model_file

        # a published model file records evaluate's tta: the registry's numbers are these
        self.score, self.ds, self.augment_eval = load_model_file(Path(model_file), "cpu")
        self.transform = eval_transform(self.ds, self.augment_eval)
        h, w, c = self.ds.image_shape
        self.batch = max(1, BATCH_VALUES // (h * w * c))

    def answer(self, images: list, k: int) -> list[dict]:
        """Per encoded image, ``{"top_k": [{"class", "probability"}, ...]}`` or ``{"error": "..."}``; the readable
        images are scored together."""
        from onecycle.data.images import ImageError
        from onecycle.serving.inference import preprocess, ranked

        answers: list[dict] = [{} for _ in images]
        ready: list[tuple[int, np.ndarray]] = []
        for i, image in enumerate(images):
            name = f"image {i}"
            try:
                ready.append((i, preprocess(_image_bytes(image, name), self.ds, self.augment_eval, self.transform,
                                            name=name)))
            except ImageError as exc:
                answers[i] = {"error": str(exc)}
        for start in range(0, len(ready), self.batch):
            chunk = ready[start:start + self.batch]
            probs = self.score(np.stack([x for _, x in chunk]))
            for (i, _), p in zip(chunk, probs, strict=True):
                answers[i] = {"top_k": [{"class": c, "probability": v} for c, v in ranked(p, self.ds.classes, k)]}
        return answers

    def __call__(self, model_input, params: dict | None = None) -> list[dict]:
        """Answer every image of a request; a request whose images all fail is refused (HTTP 400)."""
        from onecycle.data.images import release_memory

        k = int((params or {}).get("k") or DEFAULT_K)
        images = _images(model_input)
        try:
            answers = self.answer(images, k)
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
