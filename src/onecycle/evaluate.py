"""evaluate stage: test-split metrics of ``models/model.pt``, per class, with a confusion matrix and mistakes.

Writes ``reports/metrics.json`` (DVC metrics), ``reports/per_class.csv``, ``reports/predictions.csv``
(actual/predicted pairs, DVC's confusion-matrix plot), ``reports/confusion_matrix.png`` and
``reports/misclassified.png``, and logs all of it into the training's MLflow run (``test/*``).
The test split is touched here and nowhere else.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .cli import run_command
from .data import atomic_write_text, load_info
from .errors import OneCycleError
from .files import save_figure

log = logging.getLogger(__name__)

REPORTS = Path("reports")
METRICS_JSON = REPORTS / "metrics.json"
PER_CLASS_CSV = REPORTS / "per_class.csv"
PREDICTIONS_CSV = REPORTS / "predictions.csv"
CONFUSION_PNG = REPORTS / "confusion_matrix.png"
MISCLASSIFIED_PNG = REPORTS / "misclassified.png"


def load_model_bundle(path: Path, device: torch.device | str = "cpu"):
    """Rebuild the network stored in models/model.pt (weights-only load: no code runs from the file)."""
    from types import SimpleNamespace

    from .config import ModelConfig
    from .models import build_model

    if not Path(path).is_file():
        raise OneCycleError(f"{path} does not exist: run `onecycle train` (or `dvc repro train`) first")
    bundle = ckpt.load(path)
    if bundle.get("format") != "onecycle-model/1":
        raise OneCycleError(f"{path} is not a onecycle model file (no onecycle-model/1 format marker)")
    ds = bundle["dataset"]
    model = build_model(ModelConfig(**bundle["model"]), len(ds["classes"]), ds["image_shape"][2])
    model.load_state_dict(bundle["state_dict"])
    model.to(device).eval()
    return model, SimpleNamespace(**ds), bundle


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, k: int) -> np.ndarray:
    """counts[true, predicted]."""
    return np.bincount(labels * k + preds, minlength=k * k).reshape(k, k)


def per_class_table(cm: np.ndarray, classes: list[str]) -> list[dict]:
    """Accuracy (= recall), precision, recall and support of each class from a confusion matrix."""
    rows = []
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        support = int(cm[i].sum())
        predicted = int(cm[:, i].sum())
        recall = tp / support if support else 0.0
        precision = tp / predicted if predicted else 0.0
        rows.append({"class": name, "support": support, "accuracy": recall, "precision": precision,
                     "recall": recall, "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0})
    return rows


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    """Row-normalized confusion matrix (each true class sums to 1), with class names; saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    k = len(classes)
    size = max(5.0, 0.45 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    if k <= 30:
        ax.set_xticks(range(k), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), classes, fontsize=8)
        for i in range(k):
            for j in range(k):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (normalized over true class)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    save_figure(fig, path)


def plot_misclassified(images: list[np.ndarray], titles: list[str], path: Path, cols: int = 6) -> None:
    """A grid of misclassified test images titled 'true -> predicted (p)'."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(images), 1)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.9, rows * 2.1), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(img.squeeze(), cmap="gray" if img.shape[-1] == 1 else None)
        ax.set_title(title, fontsize=7)
    if not images:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center")
    fig.suptitle("misclassified test images: true -> predicted (probability)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def _raw_test_image(params, dataset, i: int) -> np.ndarray:
    """The i-th test image as stored (uint8 HWC), for display."""
    if params.data.dataset == "imagefolder":
        arr = dataset.load(i)
        from PIL import Image

        im = Image.fromarray(arr.squeeze()) if arr.shape[-1] == 1 else Image.fromarray(arr)
        im.thumbnail((128, 128))
        out = np.asarray(im)
        return out[:, :, None] if out.ndim == 2 else out
    return dataset.images[i]


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _run(params, args) -> int:
    from .engine import amp_dtype, configure_threads, evaluate, resolve_device
    from .loaders import build_split, make_loader
    from .train import MODEL_PATH, TRAIN_JSON

    configure_threads(params.train.threads)
    device = resolve_device(params.train.device)
    model, ds_meta, _ = load_model_bundle(MODEL_PATH, device)
    info = load_info(params.data)
    if list(info.classes) != list(ds_meta.classes):
        raise OneCycleError(f"{MODEL_PATH} was trained on {ds_meta.name} classes, but data.dataset is {info.name}; "
                            "retrain or point data.dataset at the model's dataset")
    test_ds = build_split(params, info, "test", train_augment=False)
    loader = make_loader(test_ds, params.data.batch_size, shuffle=False, seed=0, num_workers=params.data.num_workers)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    out = evaluate(model, loader, device, amp_dtype(params.train.amp, device), params.train.channels_last,
                   collect=True)
    logits, labels = out["logits"], out["labels"].numpy()
    probs = torch.softmax(logits, 1)
    preds = probs.argmax(1).numpy()
    k = len(info.classes)
    cm = confusion_matrix(labels, preds, k)
    table = per_class_table(cm, info.classes)
    metrics = {"test": {"loss": out["loss"], "top1": out["top1"], "top5": out["top5"], "n": out["n"]},
               "per_class_top1": {r["class"]: r["accuracy"] for r in table}}
    REPORTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(METRICS_JSON, json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(PER_CLASS_CSV, _csv([{**r, "accuracy": round(r["accuracy"], 5), "precision": round(r["precision"], 5),
                                            "recall": round(r["recall"], 5), "f1": round(r["f1"], 5)} for r in table]))
    atomic_write_text(PREDICTIONS_CSV, _csv([{"actual": info.classes[a], "predicted": info.classes[p]}
                                             for a, p in zip(labels, preds, strict=True)]))
    plot_confusion(cm, info.classes, CONFUSION_PNG)
    wrong = np.flatnonzero(preds != labels)[:36]
    plot_misclassified([_raw_test_image(params, test_ds, int(i)) for i in wrong],
                       [f"{info.classes[labels[i]]} -> {info.classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
                        for i in wrong], MISCLASSIFIED_PNG)
    _log_to_training_run(params, TRAIN_JSON, metrics, table)
    print(f"evaluate: test loss {out['loss']:.4f}, top1 {out['top1']:.4f}, top5 {out['top5']:.4f} on {out['n']} "
          f"images -> {METRICS_JSON}, {PER_CLASS_CSV}, {CONFUSION_PNG}, {MISCLASSIFIED_PNG}")
    return 0


def _log_to_training_run(params, train_json: Path, metrics: dict, table: list[dict]) -> None:
    """Add the test metrics and images to the training's MLflow run (its id is in reports/train.json)."""
    import mlflow

    from .tracking import configure, quiet_mlflow

    try:
        run_id = json.loads(train_json.read_text()).get("mlflow_run_id")
    except (OSError, ValueError):
        run_id = None
    if not run_id:
        log.warning("%s names no MLflow run; test metrics are not logged to MLflow", train_json)
        return
    quiet_mlflow()
    configure(params.mlflow.experiment)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metrics({f"test/{k}": v for k, v in metrics["test"].items() if k != "n"})
        mlflow.log_metrics({f"test/class_top1/{r['class'].replace('/', '_')}": r["accuracy"] for r in table})
        for path in (METRICS_JSON, PER_CLASS_CSV, CONFUSION_PNG, MISCLASSIFIED_PNG):
            mlflow.log_artifact(str(path), artifact_path="evaluate")


def main(argv=None) -> int:
    return run_command("evaluate", __doc__.splitlines()[0], argv, _run)


if __name__ == "__main__":
    raise SystemExit(main())
