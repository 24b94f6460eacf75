"""``model.onnx``: the evaluated network with its test-time augmentation and softmax, as ONNX, scored on ONNX Runtime.

What the registered model runs (``mlflow models serve``, and ``onecycle predict``/``demo`` for its URI or an
exported Space). The graph is :func:`onecycle.training.models.tta_logits` followed by a softmax, exported by
:mod:`onecycle.serving.onnx_export`: the function evaluate scores the test split with. It takes normalized
N x C x H x W float32 images (input ``images``, any N) and gives N x classes probabilities (output
``probabilities``). The file describes itself, as ``models/model.pt`` does: its metadata property ``onecycle``
holds the model file's metadata (classes, image shape, normalization, eval transforms, ``tta``), so decoding and
preprocessing need nothing else. Importing this module and scoring import neither torch nor onnx.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from onecycle.core.errors import OneCycleError

INPUT = "images"
OUTPUT = "probabilities"
METADATA_KEY = "onecycle"


class OnnxScorer:
    """A ``model.onnx`` on ONNX Runtime's CPU provider: a batch of preprocessed images -> class probabilities.

    ``ds``, ``augment_eval`` and ``tta`` come from the file's metadata. Thread-safe (ONNX Runtime's ``run`` is).
    """

    def __init__(self, path: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise OneCycleError(f"{path} runs on ONNX Runtime, which is not installed: pip install onnxruntime") from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no notes about unused initializers on every start
        # idle pool threads sleep instead of spinning: a server shares its cores with decoding and other requests
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime raises its own exception types
            raise OneCycleError(f"{path} is not a loadable ONNX model: {' '.join(str(exc).split())[:200]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if not meta:
            raise OneCycleError(f"{path} was not exported by onecycle (no {METADATA_KEY!r} metadata)")
        self.metadata = json.loads(meta)
        self.ds = SimpleNamespace(**self.metadata["dataset"])
        self.augment_eval = self.metadata["augment_eval"]
        self.tta = self.metadata.get("tta", "none")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """N x C x H x W float32 (normalized) -> N x classes float32 probabilities."""
        x = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run([OUTPUT], {INPUT: x})[0]

