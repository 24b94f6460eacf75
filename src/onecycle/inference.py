"""From an image (a file or its bytes) to class probabilities, as predict, demo and the served model do it.

One guard decides which images are answered: a file that is too large, declares more pixels than
``MAX_PIXELS`` (a decompression bomb), is truncated or is not an image is refused *before* it is
decoded, with one line naming it. Accepted images are converted to the model's channels and size and go
through the model's own eval transforms and normalization, exactly as in training.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .errors import OneCycleError

MAX_PIXELS = 50_000_000        # width x height; a 20000 x 20000 PNG (400 MP) is refused before decoding
MAX_BYTES = 64 * 1024 * 1024   # encoded file size


class ImageError(OneCycleError):
    """One image that cannot be answered (unreadable, truncated, too large); the others still are."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker re-raises it in the main process as ImageError("Caught ImageError in DataLoader
        # worker process 0.\nOriginal Traceback ...\nonecycle.inference.ImageError: <message>"): keep the message.
        if message.startswith("Caught ImageError") and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split("ImageError: ", 1)[-1]
        super().__init__(message)


def open_image(source: Path | str | bytes, name: str | None = None, mode: str = "RGB") -> np.ndarray:
    """Decode ``source`` (a path or encoded bytes) to a uint8 HxWxC array in ``mode`` ("L" or "RGB").

    Raises :class:`ImageError` naming the file for anything it cannot or will not decode.
    """
    from PIL import Image, UnidentifiedImageError

    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        if isinstance(source, bytes):
            size = len(source)
            fp = io.BytesIO(source)
        else:
            size = Path(source).stat().st_size
            fp = open(source, "rb")  # noqa: SIM115  (closed below)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    try:
        if size > MAX_BYTES:
            raise ImageError(f"{name}: refused, {size / 2**20:.0f} MiB is larger than {MAX_BYTES // 2**20} MiB")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:  # reads the header only
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{name}: refused, {w}x{h} pixels is more than {MAX_PIXELS // 10**6} megapixels")
                im = im.convert(mode)  # decodes
                arr = np.asarray(im)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own check, at open()
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{pixels[1]} pixels" if pixels else "its declared size"
        raise ImageError(f"{name}: refused, {what} is more than {MAX_PIXELS // 10**6} megapixels") from None
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ImageError(f"{name}: not a readable image ({detail})") from None
    finally:
        fp.close()
    return arr[:, :, None] if arr.ndim == 2 else arr


def eval_transform(ds, augment_eval: list):
    """The model's eval transforms (its own list, or the dataset's default) with its normalization."""
    from .config import AugmentConfig
    from .transforms import build_eval_transforms

    return build_eval_transforms(AugmentConfig(eval=augment_eval), ds.name, ds.mean, ds.std)


def preprocess(source: Path | str | bytes, ds, augment_eval: list, transform=None, name: str | None = None) -> torch.Tensor:
    """One image -> a normalized CHW float tensor the model accepts."""
    from PIL import Image

    from .transforms import apply

    h, w, c = ds.image_shape
    arr = open_image(source, name, "L" if c == 1 else "RGB")
    if not augment_eval and ds.name != "imagefolder" and arr.shape[:2] != (h, w):
        # small datasets: the model expects their exact size
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


def load_predictor(model_path: Path | None, model_uri: str | None, device: torch.device, root: Path | None = None):
    """``(images -> probabilities, dataset description, eval spec)`` from a model file or an MLflow model URI.

    Inputs are moved to wherever the loaded network's weights are (an MLflow pt2 model may stay on the CPU).
    """
    if model_uri:
        import mlflow

        from .tracking import configure

        configure(None, root)  # only to point MLflow at the project's store (or MLFLOW_TRACKING_URI)
        try:
            info = mlflow.models.get_model_info(model_uri)
            meta = (info.metadata or {}).get("onecycle")
            model_file = ((info.flavors.get("python_function") or {}).get("artifacts") or {}).get("model_file")
            if meta and model_file:  # the registered image classifier: its model.pt, read as models/model.pt is
                return _predictor_from_model_file(mlflow, f"{model_uri.rstrip('/')}/{model_file['path']}", device)
            module = mlflow.pytorch.load_model(model_uri, map_location=device) if meta else None
        except OneCycleError:
            raise
        except Exception as exc:
            raise OneCycleError(f"cannot load {model_uri}: {' '.join(str(exc).split())[:200]}") from None
        if not meta:
            raise OneCycleError(f"{model_uri} was not logged by onecycle (no class names or preprocessing in its metadata)")
        where = _module_device(module)
        return (lambda x: module(x.to(where))), SimpleNamespace(**meta["dataset"]), meta["augment_eval"]
    from .modelfile import load_model_bundle

    model, ds, bundle = load_model_bundle(model_path, device)
    where = _module_device(model)
    return (lambda x: torch.softmax(model(x.to(where)), 1)), ds, bundle["augment_eval"]


def _predictor_from_model_file(mlflow, artifact_uri: str, device: torch.device):
    """``load_predictor``'s answer for a model.pt logged with the image classifier (copied locally, read weights-only)."""
    import tempfile

    from .modelfile import load_model_bundle

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tmp)
        model, ds, bundle = load_model_bundle(Path(path), device)
    where = _module_device(model)
    return (lambda x: torch.softmax(model(x.to(where)), 1)), ds, bundle["augment_eval"]


def top_k(predict, x: torch.Tensor, classes: list[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable classes of one preprocessed image, as (name, probability)."""
    with torch.no_grad():
        probs = predict(x[None]).float().cpu()[0]
    k = max(1, min(k, len(classes)))
    top = torch.topk(probs, k)
    return [(classes[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
