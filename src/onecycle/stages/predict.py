"""predict: top-k classes of image files, with the trained model's own eval preprocessing.

``onecycle predict a.png b.jpg`` reads ``models/model.pt`` by default, or a registered MLflow model with
``--model-uri models:/NAME@ALIAS``. Images are converted to the model's channels (grayscale or RGB) and
size, then go through the same eval transforms and normalization as in training. An unreadable, truncated
or oversized file gets its own error line; the others are still answered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onecycle.data.images import ImageError
from onecycle.serving.inference import eval_transform, load_predictor, preprocess, top_k
from onecycle.serving.provenance import describe
from onecycle.stages.command import run_command


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", type=Path, help="image files")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=Path("models/model.pt"), help="model file (default: models/model.pt)")
    src.add_argument("--model-uri", help="an MLflow model URI, e.g. models:/onecycle-fashion_mnist@champion")
    p.add_argument("-k", "--top-k", type=int, default=3, help="classes to show per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")


def _run(params, args) -> int:
    # models/model.pt is scored with evaluate.tta, as evaluate scores it; a registered model with its own.
    # train.device matters to a torch model only: a model.onnx (the registered model's) runs on ONNX Runtime
    predict, ds, augment_eval = load_predictor(args.model, args.model_uri, params.train.device, tta=params.evaluate.tta)
    print(f"predict: {describe(args.model, args.model_uri)}", file=sys.stderr, flush=True)  # which model answers
    transform = eval_transform(ds, augment_eval)
    failures = 0
    for path in args.images:
        try:
            x = preprocess(path, ds, augment_eval, transform)
        except ImageError as exc:
            print(f"onecycle predict: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        pairs = top_k(predict, x, ds.classes, args.top_k)
        if args.json:
            print(json.dumps({"image": str(path), "top_k": [{"class": c, "probability": p} for c, p in pairs]}))
        else:
            print(f"{path}: " + ", ".join(f"{c} {p:.3f}" for c, p in pairs), flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    return run_command("predict", __doc__.splitlines()[0], argv, _run, _add_args, params_optional=True)


if __name__ == "__main__":
    raise SystemExit(main())
