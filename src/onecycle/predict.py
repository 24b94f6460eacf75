"""predict: top-k classes of image files, with the trained model's own eval preprocessing.

``onecycle predict a.png b.jpg`` reads ``models/model.pt`` by default, or a registered MLflow model with
``--model-uri models:/NAME/VERSION``. Images are converted to the model's channels (grayscale or RGB) and
size, then go through the same eval transforms and normalization as in training. An unreadable file gets
its own error line; the others are still answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from .cli import run_command
from .errors import OneCycleError


def preprocess(path: Path, ds, augment_eval: list, transform=None) -> torch.Tensor:
    """One image file -> a normalized CHW tensor the model accepts."""
    from PIL import Image, UnidentifiedImageError

    from .transforms import apply

    h, w, c = ds.image_shape
    try:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB")
            if not augment_eval and ds.name != "imagefolder" and im.size != (w, h):
                im = im.resize((w, h), Image.BILINEAR)  # small datasets: the model expects their exact size
            arr = np.asarray(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise OneCycleError(f"{path}: not a readable image ({' '.join(str(exc).split())[:120]})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(apply(transform, arr))


def _eval_transform(ds, augment_eval: list):
    from .config import AugmentConfig
    from .transforms import build_eval_transforms

    return build_eval_transforms(AugmentConfig(eval=augment_eval), ds.name, ds.mean, ds.std)


def load_predictor(model_path: Path | None, model_uri: str | None, device: torch.device):
    """(callable images -> probabilities, dataset description, eval spec) from a model file or MLflow URI."""
    if model_uri:
        import mlflow

        from .tracking import configure, quiet_mlflow

        quiet_mlflow()
        configure("onecycle")  # only to point MLflow at the project's store (or MLFLOW_TRACKING_URI)
        try:
            info = mlflow.models.get_model_info(model_uri)
            module = mlflow.pytorch.load_model(model_uri, map_location=device)
        except Exception as exc:
            raise OneCycleError(f"cannot load {model_uri}: {' '.join(str(exc).split())[:200]}") from None
        meta = (info.metadata or {}).get("onecycle")
        if not meta:
            raise OneCycleError(f"{model_uri} was not logged by onecycle (no class names or preprocessing in its metadata)")
        ds = SimpleNamespace(**meta["dataset"])
        return (lambda x: module(x.to(device))), ds, meta["augment_eval"]
    from .evaluate import load_model_bundle

    model, ds, bundle = load_model_bundle(model_path, device)
    return (lambda x: torch.softmax(model(x.to(device)), 1)), ds, bundle["augment_eval"]


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="image files")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=Path("models/model.pt"), help="model file (default: models/model.pt)")
    src.add_argument("--model-uri", help="an MLflow model URI, e.g. models:/onecycle-resnet/1")
    p.add_argument("-k", "--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")


def _run(params, args) -> int:
    from .engine import resolve_device

    device = resolve_device(params.train.device)
    predict, ds, augment_eval = load_predictor(args.model, args.model_uri, device)
    transform = _eval_transform(ds, augment_eval)
    failures = 0
    k = max(1, min(args.top_k, len(ds.classes)))
    for path in args.images:
        try:
            x = preprocess(path, ds, augment_eval, transform)
        except OneCycleError as exc:
            print(f"onecycle predict: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        with torch.no_grad():
            probs = predict(x[None]).float().cpu()[0]
        top = torch.topk(probs, k)
        pairs = [(ds.classes[int(i)], float(p)) for p, i in zip(top.values, top.indices, strict=True)]
        if args.json:
            print(json.dumps({"image": str(path), "top_k": [{"class": c, "probability": p} for c, p in pairs]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in pairs))
    return 1 if failures else 0


def main(argv=None) -> int:
    return run_command("predict", __doc__.splitlines()[0], argv, _run, _add_args, params_optional=True)


if __name__ == "__main__":
    raise SystemExit(main())
