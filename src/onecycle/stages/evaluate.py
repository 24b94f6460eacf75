"""evaluate stage: test-split metrics of ``models/model.pt``, per class, with a confusion matrix and mistakes.

Writes ``reports/metrics.json`` (DVC metrics: the headline numbers only, see :func:`headline_class_metrics`),
``reports/evaluated_model.json`` (the digest of the model file measured: :mod:`onecycle.core.measured`),
``reports/per_class.csv``, ``reports/predictions.csv``
(actual/predicted pairs, DVC's confusion-matrix plot), ``reports/confusion_matrix.png`` and
``reports/misclassified.png``, and logs all of it into the training's MLflow run (``test_*``).
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

from onecycle.core import measured
from onecycle.core.errors import OneCycleError
from onecycle.core.files import atomic_write_text, save_figure
from onecycle.core.paths import Workspace
from onecycle.data import catalog
from onecycle.data.store import class_difference, load_info
from onecycle.serving.modelfile import load_model_bundle
from onecycle.stages.command import run_command
from onecycle.tracking.evaluation import log_evaluation, require_training_run

log = logging.getLogger(__name__)

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


def headline_class_metrics(table: list[dict]) -> dict:
    """The per-class table in three numbers for ``dvc exp show``: macro F1, and the worst class's top-1 and name.

    A dataset with 1,000 classes would make one column per class; the detail stays in reports/per_class.csv.
    Ties for the worst class go to the first in class order.
    """
    worst = min(table, key=lambda r: r["accuracy"])
    return {"macro_f1": sum(r["f1"] for r in table) / len(table), "worst_class_top1": worst["accuracy"],
            "worst_class": worst["class"]}


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
    if catalog.kind(params.data.dataset).image_folder:
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


def run(params, ws: Workspace) -> dict:
    """The evaluate stage in ``ws``: test metrics of ``ws.model``, reports, MLflow; returns metrics.json's dict."""
    from onecycle.training.engine import configure_threads, resolve_device

    configure_threads(params.train.threads)
    device = resolve_device(params.train.device)
    params = params.for_data(ws.root, note=False)
    model_sha256 = measured.file_digest(ws.model) if ws.model.is_file() else None
    model, info = _model_for_the_data(params, ws, device)
    if measured.file_digest(ws.model) != model_sha256:
        raise OneCycleError(f"{ws.model} changed while evaluate read it (a training finishing?): run evaluate again")
    run_id = _training_run(params, ws)  # before the work: a deleted run is refused now, not after the reports
    test_ds, out = _score(params, model, info, device)
    metrics, table = _write_reports(params, ws, info, test_ds, out)
    if run_id:
        log_evaluation(run_id, params.data, ws.root, metrics, table,
                       [ws.metrics_json, ws.per_class_csv, ws.confusion_png, ws.misclassified_png])
    # last: publish registers models/model.pt only if this record says a finished evaluation measured that very file
    measured.record(ws.evaluated_model_json, ws.model, model_sha256, params.evaluate.tta, ws.metrics_json)
    print(f"evaluate: test loss {out['loss']:.4f}, top1 {out['top1']:.4f}, top5 {out['top5']:.4f} on {out['n']} "
          f"images -> {ws.metrics_json}, {ws.per_class_csv}, {ws.confusion_png}, {ws.misclassified_png}")
    return metrics


def _model_for_the_data(params, ws: Workspace, device):
    """``ws.model`` on ``device`` and the fetched dataset's info; a model of other classes is refused in one line."""
    model, ds_meta, _ = load_model_bundle(ws.model, device)
    info = load_info(params.data, ws.root)
    if (difference := class_difference(ds_meta.name, ds_meta.classes, info)) is not None:
        raise OneCycleError(f"{ws.model} does not fit the data: {difference}; "
                            "retrain or point data.dataset at the model's dataset")
    return model, info


def _score(params, model, info, device) -> tuple:
    """The test split and the model's loss, top-1/top-5, logits and labels on it (with ``evaluate.tta``)."""
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.training.engine import evaluate

    test_ds = build_split(params.data, params.augment, info, "test", train_augment=False, seed=params.train.seed)
    loader = make_loader(test_ds, params.data.batch_size, shuffle=False, seed=0, num_workers=params.data.num_workers)
    if params.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    log.info("scoring the %d test images (test-time augmentation: %s)", len(test_ds), params.evaluate.tta)
    # fp32, whatever precision trained the model: predict and the served model score in fp32, so the metrics
    # (and the registry's test top-1) describe what they answer
    out = evaluate(model, loader, device, None, params.train.channels_last, collect=True, tta=params.evaluate.tta)
    return test_ds, out


def _write_reports(params, ws: Workspace, info, test_ds, out: dict) -> tuple[dict, list[dict]]:
    """metrics.json, per_class.csv, predictions.csv and the two figures; returns the metrics and per-class table."""
    logits, labels = out["logits"], out["labels"].numpy()
    probs = torch.softmax(logits, 1)
    preds = probs.argmax(1).numpy()
    k = len(info.classes)
    cm = confusion_matrix(labels, preds, k)
    table = per_class_table(cm, info.classes)
    metrics = {"test": {"loss": out["loss"], "top1": out["top1"], "top5": out["top5"], "n": out["n"],
                        **headline_class_metrics(table)}}
    atomic_write_text(ws.metrics_json, json.dumps(metrics, indent=2) + "\n")
    atomic_write_text(ws.per_class_csv, _csv([{**r, "accuracy": round(r["accuracy"], 5),
                                               "precision": round(r["precision"], 5), "recall": round(r["recall"], 5),
                                               "f1": round(r["f1"], 5)} for r in table]))
    atomic_write_text(ws.predictions_csv, _csv([{"actual": info.classes[a], "predicted": info.classes[p]}
                                                for a, p in zip(labels, preds, strict=True)]))
    plot_confusion(cm, info.classes, ws.confusion_png)
    wrong = np.flatnonzero(preds != labels)[:36]
    plot_misclassified([_raw_test_image(params, test_ds, int(i)) for i in wrong],
                       [f"{info.classes[labels[i]]} -> {info.classes[preds[i]]} ({probs[i, preds[i]]:.2f})"
                        for i in wrong], ws.misclassified_png)
    return metrics, table


def _training_run(params, ws: Workspace) -> str | None:
    """The training's MLflow run id from reports/runs.json, checked before any work (None: nothing to log to).

    A run deleted from the store (the UI's delete) is refused in one line: its test results have nowhere to go.
    """
    try:
        run_id = json.loads(ws.runs_json.read_text()).get("train")
    except (OSError, ValueError, AttributeError):
        run_id = None
    if not run_id:
        log.warning("%s names no training MLflow run; test metrics are not logged to MLflow", ws.runs_json)
        return None
    require_training_run(run_id, ws.runs_json, params.mlflow.experiment, ws.root)
    return run_id


def main(argv=None) -> int:
    return run_command("evaluate", __doc__.splitlines()[0], argv, lambda params, args: run(params, Workspace()) and 0)


if __name__ == "__main__":
    raise SystemExit(main())
