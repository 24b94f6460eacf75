"""From an image (a file or its bytes) to class probabilities, as predict, demo and the served model do it.

Images pass the guard of :mod:`onecycle.data.images` (refused before decoding, one line naming them), are
converted to the model's channels and size and go through the model's own eval transforms and
normalization, exactly as in training; the network scores them through
:func:`onecycle.training.models.tta_logits` with the model's test-time augmentation, as evaluate does, so the
probabilities served are the ones the registry's test metrics were measured with.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from onecycle.core.errors import OneCycleError
from onecycle.data import catalog
from onecycle.data.images import open_image


def eval_transform(ds, augment_eval: list):
    """The model's eval transforms (its own list, or the dataset's default) with its normalization.

    Resize, crop and normalize run without albumentations (:mod:`onecycle.serving.preprocessing`); only an
    ``augment.eval`` list with other transforms imports it, and says so in one line where it is not installed.
    """
    from onecycle.serving.preprocessing import EvalTransform, needs_albumentations

    spec = augment_eval or catalog.kind(ds.name).eval_spec()
    if not needs_albumentations(spec):
        return EvalTransform(spec, ds.mean, ds.std)
    try:
        import albumentations  # noqa: F401
    except ImportError:
        raise OneCycleError(f"this model's eval transforms ({', '.join(map(str, spec))}) need albumentations, "
                            "which is not installed: pip install albumentations") from None
    from onecycle.config import AugmentConfig
    from onecycle.data.transforms import build_eval_transforms

    return build_eval_transforms(AugmentConfig(eval=augment_eval), ds.name, ds.mean, ds.std)


def preprocess(source: Path | str | bytes, ds, augment_eval: list, transform=None, name: str | None = None) -> torch.Tensor:
    """One image -> a normalized CHW float tensor the model accepts."""
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
    return torch.from_numpy(apply(transform, arr))


def _module_device(module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def load_predictor(model_path: Path | None, model_uri: str | None, device: torch.device, root: Path | None = None,
                   tta: str = "none"):
    """``(images -> probabilities, dataset description, eval spec)`` from a model file or an MLflow model URI.

    The test-time augmentation is the model's own when it records one (a published model: the registered
    classifier), else ``tta`` (``evaluate.tta``, for ``models/model.pt``, which evaluate scores with it). Inputs are
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
            module = mlflow.pytorch.load_model(model_uri, map_location=device) if meta else None
        except OneCycleError:
            raise
        except Exception as exc:
            raise OneCycleError(f"cannot load {model_uri}: {' '.join(str(exc).split())[:200]}") from None
        if not meta:
            raise OneCycleError(f"{model_uri} was not logged by onecycle (no class names or preprocessing in its metadata)")
        where = _module_device(module)  # the raw network (softmax output), as logged: no test-time augmentation
        return (lambda x: module(x.to(where))), SimpleNamespace(**meta["dataset"]), meta["augment_eval"]
    from onecycle.serving.modelfile import load_model_bundle

    model, ds, bundle = load_model_bundle(model_path, device)
    return _scorer(model, bundle.get("tta", tta)), ds, bundle["augment_eval"]


def _scorer(model, tta: str):
    """images -> class probabilities, through the one scoring function (test-time augmentation included)."""
    from onecycle.training.models import tta_logits

    where = _module_device(model)
    return lambda x: torch.softmax(tta_logits(model, x.to(where), tta), 1)


def _predictor_from_model_file(mlflow, artifact_uri: str, device: torch.device, tta: str):
    """``load_predictor``'s answer for a model.pt logged with the image classifier (copied locally, read weights-only)."""
    import tempfile

    from onecycle.serving.modelfile import load_model_bundle

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp)
        model, ds, bundle = load_model_bundle(Path(path), device)
    return _scorer(model, bundle.get("tta", tta)), ds, bundle["augment_eval"]


def top_k(predict, x: torch.Tensor, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one preprocessed image, as (name, probability)."""
    with torch.no_grad():
        probs = predict(x[None]).float().cpu()[0]
    k = max(1, min(k, len(classes)))
    top = torch.topk(probs, k)
    return [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
