"""Exporting a ``models/model.pt`` to ``model.onnx`` and checking the export against torch: what publish and the
Hugging Face Space export run (they need torch, onnx and onnxscript: the training environment).

:func:`export_onnx` exports :func:`onecycle.training.models.tta_logits` followed by a softmax (the function
evaluate scores with, test-time augmentation included: the flip is a tensor op, so it is part of the graph) with
``torch.onnx.export`` (the ``torch.export`` based exporter), for any batch size, and writes the model file's
metadata into the ONNX file (:mod:`onecycle.serving.onnx_model` reads it). Decoding, resizing and normalizing
are not tensor ops of the network and stay in NumPy (:mod:`onecycle.serving.preprocessing`), the same code for
both runtimes. :func:`check_onnx` scores images with both runtimes and refuses an export that disagrees.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from onecycle.core.errors import OneCycleError
from onecycle.serving.modelfile import bundle_metadata, load_model_bundle
from onecycle.serving.onnx_model import INPUT, METADATA_KEY, OUTPUT, OnnxScorer
from onecycle.training import checkpoint as ckpt

log = logging.getLogger(__name__)

# The export is checked on the test split's first CHECK_IMAGES images: all of Fashion-MNIST's or CIFAR's 10,000,
# the first 10,000 of a larger split (a few seconds on a CPU for the default network; enough to see one image in
# 10,000 change its top-1 class).
CHECK_IMAGES = 10_000
TOLERANCE = 1e-4  # largest difference allowed between ONNX Runtime's and torch's probabilities
TOP1_PER_IMAGES = 10_000  # at most one image in this many may change its top-1 class (a near tie at float32)


class OnnxExportError(OneCycleError):
    """The network cannot be exported to ONNX, or its export does not score as torch does."""


class _Scored(torch.nn.Module):
    """The network as evaluate scores it: softmax of :func:`tta_logits` with the model's test-time augmentation."""

    def __init__(self, net: torch.nn.Module, tta: str):
        super().__init__()
        self.net, self.tta = net, tta

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from onecycle.training.models import tta_logits

        return torch.softmax(tta_logits(self.net, images, self.tta), 1)


def export_onnx(model_file: Path, out: Path, tta: str = "none") -> Path:
    """Write ``out`` (a ``model.onnx``): the network of ``model_file`` with its test-time augmentation (its own,
    else ``tta``) and softmax, for any batch size, with the model file's metadata. Returns ``out``."""
    net, ds, bundle = load_model_bundle(Path(model_file), "cpu")
    bundle = {**bundle, "tta": bundle.get("tta", tta)}
    h, w, c = ds.image_shape
    example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))  # 2: the batch stays a variable
    scored = _Scored(net, bundle["tta"]).eval()
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), torch.no_grad():  # the exporter prints its progress
            program = torch.onnx.export(
                scored, (example,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1 << 20)}},
                external_data=False, verbose=False)
    except Exception as exc:  # torch.export and the ONNX translation raise many kinds
        log.debug("ONNX export output:\n%s", quiet.getvalue())
        raise OnnxExportError(f"{model_file}: the network ({bundle['model']['name']}) cannot be exported to ONNX: "
                              f"{' '.join(str(exc).split())[:300]}") from None
    program.model.metadata_props[METADATA_KEY] = json.dumps(bundle_metadata(bundle))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    program.save(out, external_data=False)
    return out


def check_onnx(onnx_file: Path, model_file: Path, batches, limit: int = CHECK_IMAGES) -> dict:
    """Score ``batches`` (normalized N x C x H x W images, arrays or tensors; the first ``limit`` images) with the
    ONNX export and with torch, as evaluate does; raise :class:`OnnxExportError` unless every probability is within
    :data:`TOLERANCE` and at most one image in :data:`TOP1_PER_IMAGES` changes its top-1 class.

    Returns ``{"images", "top1_differ", "max_abs_diff"}``.
    """
    from onecycle.serving.inference import load_model_file

    scorer = OnnxScorer(onnx_file)
    reference, _, _ = load_model_file(Path(model_file), "cpu", scorer.tta)
    n, differ, worst = 0, 0, 0.0
    for batch in batches:
        x = np.asarray(batch, dtype=np.float32)[: limit - n]
        if not len(x):
            break
        ours, theirs = scorer(x), reference(x)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        differ += int((ours.argmax(1) != theirs.argmax(1)).sum())
        n += len(x)
    if n == 0:
        raise OnnxExportError(f"{onnx_file}: no images to check the export on")
    result = {"images": n, "top1_differ": differ, "max_abs_diff": worst}
    if worst > TOLERANCE or differ > n // TOP1_PER_IMAGES:
        raise OnnxExportError(
            f"{onnx_file} does not score as {model_file} does on {n} images: top-1 differs on {differ}, "
            f"probabilities by up to {worst:.2g} (allowed: {n // TOP1_PER_IMAGES} and {TOLERANCE:g})")
    return result


def split_batches(data, info, model_file: Path, batch_size: int = 256):
    """The test split's images as evaluate's loader gives them (normalized, the model file's eval transforms)."""
    from onecycle.config import AugmentConfig
    from onecycle.data.loaders import build_split, make_loader

    augment = AugmentConfig(eval=ckpt.load(Path(model_file))["augment_eval"])
    test = build_split(data, augment, info, "test", train_augment=False, seed=0)
    for images, _ in make_loader(test, batch_size, shuffle=False, seed=0, num_workers=0):
        yield images


def export_for_serving(model_file: Path, out: Path, tta: str, data, info) -> tuple[Path | None, dict]:
    """``(model.onnx, check)`` for the registered model: :func:`export_onnx`, then :func:`check_onnx` on the test
    split of ``data`` (``info``: the fetched dataset). A network that cannot be exported, or whose export disagrees
    with torch, gives ``(None, {"error": why})``: the caller serves it on torch."""
    try:
        return export_onnx(model_file, out, tta), check_onnx(out, model_file, split_batches(data, info, model_file))
    except OnnxExportError as exc:
        return None, {"error": str(exc)}
