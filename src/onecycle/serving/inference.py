"""From an image (a file or its bytes) to class probabilities, as predict, demo and the served model do it.

Images pass the guard of :mod:`onecycle.data.images` (refused before decoding, one line naming them), are
converted to the model's channels and size and go through the model's own eval transforms and
normalization, exactly as in training, into NumPy arrays; a batch of them is scored by the network with the
model's test-time augmentation, as evaluate does (:func:`onecycle.training.models.tta_logits`), so the
probabilities served are the ones the registry's test metrics were measured with. A ``model.onnx``
(:mod:`onecycle.serving.onnx_model`, the registered model) is that same function exported, run on ONNX Runtime;
a ``models/model.pt`` runs on torch. Importing this module imports no torch: the ONNX path never does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from onecycle.core.errors import OneCycleError
from onecycle.data import catalog
from onecycle.data.images import open_image

if TYPE_CHECKING:
    import torch

# a batch of preprocessed images (N x C x H x W float32) -> their class probabilities (N x classes)
Scorer = Callable[[np.ndarray], np.ndarray]


def eval_transform(ds, augment_eval: list):
    """The model's eval transforms (its own list, or the dataset's default) with its normalization.

    Resize, crop and normalize run without albumentations (:mod:`onecycle.serving.preprocessing`); only an
    ``augment.eval`` list with other transforms imports it, and says so in one line where it is not installed.
    """
    from onecycle.serving.preprocessing import EvalTransform, needs_albumentations

    spec = augment_eval or catalog.kind(ds.name).eval_spec(ds.image_shape[0])
    if not needs_albumentations(spec):
        return EvalTransform(spec, ds.mean, ds.std)
    try:
        import albumentations  # noqa: F401
    except ImportError:
        raise OneCycleError(f"this model's eval transforms ({', '.join(map(str, spec))}) need albumentations, "
                            "which is not installed: pip install albumentations") from None
    from onecycle.config import AugmentConfig
    from onecycle.data.transforms import build_eval_transforms

    return build_eval_transforms(AugmentConfig(eval=augment_eval), ds.name, ds.mean, ds.std, ds.image_shape[0])


def preprocess(source: Path | str | bytes, ds, augment_eval: list, transform=None, name: str | None = None) -> np.ndarray:
    """One image -> a normalized CHW float32 array the model accepts."""
    from PIL import Image

    from onecycle.data.transforms import apply

    h, w, c = ds.image_shape
    arr = open_image(source, name, "L" if c == 1 else "RGB")
    if not augment_eval and not catalog.kind(ds.name).image_folder and arr.shape[:2] != (h, w):
        # array datasets: the model expects their exact size
        im = Image.fromarray(arr.squeeze(-1) if c == 1 else arr).resize((w, h), Image.BILINEAR)
        arr = np.asarray(im)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
    if transform is None:
        transform = eval_transform(ds, augment_eval)
    return apply(transform, arr)


def _module_device(module) -> torch.device:
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _device(device: torch.device | str) -> torch.device:
    """A torch device from a torch device or a ``train.device`` name (``auto`` picks one)."""
    import torch

    if isinstance(device, torch.device):
        return device
    from onecycle.training.engine import resolve_device

    return resolve_device(str(device))


def load_model_file(path: Path, device: torch.device | str = "cpu", tta: str = "none") -> tuple[Scorer, SimpleNamespace, list]:
    """``(scorer, dataset description, eval spec)`` of a model file: a ``.onnx`` export runs on ONNX Runtime (on the
    CPU, no torch imported), a ``models/model.pt`` on torch on ``device``, with its own ``tta`` if it records one."""
    if Path(path).suffix == ".onnx":
        from onecycle.serving.onnx_model import OnnxScorer

        scorer = OnnxScorer(path)
        return scorer, scorer.ds, scorer.augment_eval
    from onecycle.serving.modelfile import load_model_bundle

    model, ds, bundle = load_model_bundle(path, _device(device))
    return torch_scorer(model, bundle.get("tta", tta)), ds, bundle["augment_eval"]


def load_predictor(model_path: Path | None, model_uri: str | None, device: torch.device | str,
                   root: Path | None = None, tta: str = "none") -> tuple[Scorer, SimpleNamespace, list]:
    """``(images -> probabilities, dataset description, eval spec)`` from a model file or an MLflow model URI.

    The registered classifier scores with its logged model file: ``model.onnx`` on ONNX Runtime (what
    ``mlflow models serve`` runs), or a ``model.pt`` on torch. The test-time augmentation is the model's own when
    it records one (a published model), else ``tta`` (``evaluate.tta``, for ``models/model.pt``, which evaluate
    scores with it). ``device`` (a torch device or a ``train.device`` name) is resolved only for torch; inputs are
    moved to wherever the loaded network's weights are (an MLflow pt2 model may stay on the CPU).
    """
    if model_uri:
        import mlflow

        from onecycle.tracking.store import configure

        configure(None, root)  # only to point MLflow at the project's store (or MLFLOW_TRACKING_URI)
        try:
            info = mlflow.models.get_model_info(model_uri)
            meta = (info.metadata or {}).get("onecycle")
            model_file = ((info.flavors.get("python_function") or {}).get("artifacts") or {}).get("model_file")
            if meta and model_file:  # the registered image classifier: its model.pt, read as models/model.pt is
                return _predictor_from_model_file(mlflow, f"{model_uri.rstrip('/')}/{model_file['path']}", device,
                                                  tta)
            if meta:  # the raw network (pt2), read without unpickling: anything else is refused
                from onecycle.serving.network import load_network

                module = load_network(model_uri)
        except OneCycleError:
            raise
        except Exception as exc:
            raise OneCycleError(f"cannot load {model_uri}: {' '.join(str(exc).split())[:200]}") from None
        if not meta:
            raise OneCycleError(f"{model_uri} was not logged by onecycle (no class names or preprocessing in its metadata)")
        return _torch_call(module, lambda x: module(x)), SimpleNamespace(**meta["dataset"]), meta["augment_eval"]
    return load_model_file(model_path, device, tta)


def _torch_call(module, fn) -> Scorer:
    """A NumPy (or tensor) batch in, on ``module``'s device, without gradients; float32 NumPy probabilities out."""
    import torch

    where = _module_device(module)

    def score(x):
        with torch.inference_mode():
            return fn(torch.as_tensor(x).to(where)).float().cpu().numpy()
    return score


def torch_scorer(model, tta: str) -> Scorer:
    """images -> class probabilities, through the one scoring function (test-time augmentation included)."""
    import torch

    from onecycle.training.models import tta_logits

    return _torch_call(model, lambda x: torch.softmax(tta_logits(model, x, tta), 1))


def _predictor_from_model_file(mlflow, artifact_uri: str, device: torch.device | str, tta: str):
    """``load_predictor``'s answer for the model file logged with the image classifier (copied locally; a model.pt
    is read weights-only)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp)
        return load_model_file(Path(path), device, tta)


def ranked(probs: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one image's probabilities, as (name, probability), most probable first."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-np.asarray(probs, dtype=np.float32), kind="stable")[:k]
    return [(classes[int(i)], float(probs[i])) for i in order]


def top_k(predict: Scorer, x: np.ndarray, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one preprocessed image, as (name, probability)."""
    return ranked(np.asarray(predict(x[None]))[0], classes, k)
