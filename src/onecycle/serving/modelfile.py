"""``models/model.pt``: the trained network's file format, written by train and read by evaluate, predict and demo.

The file holds the best weights plus what rebuilds the network and its eval preprocessing: the model
section of params, the dataset's classes, image shape and normalization, and the eval transforms. It is
read with a weights-only load, so no code from the file ever runs.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from onecycle.config import AugmentConfig, ModelConfig
from onecycle.core.errors import OneCycleError
from onecycle.training import checkpoint as ckpt

FORMAT = "onecycle-model/1"


def model_bundle(model: ModelConfig, augment: AugmentConfig, info, state_dict: dict,
                 tta: str | None = None, trained: dict | None = None) -> dict[str, Any]:
    """What models/model.pt holds: best weights plus what rebuilds the model (``model``) and its eval transforms
    (``augment.eval``); a published model also says its test-time augmentation (``tta``, as evaluate scored it);
    ``trained`` names the training that wrote it (:func:`onecycle.serving.provenance.trained_by`)."""
    return {
        "format": FORMAT, "state_dict": state_dict,
        "model": model.model_dump(mode="json"),
        "dataset": {"name": info.name, "classes": info.classes, "image_shape": list(info.image_shape),
                    "mean": info.mean, "std": info.std},
        "augment_eval": augment.model_dump(mode="json")["eval"],
        **({"tta": tta} if tta is not None else {}),
        **({"trained": trained} if trained is not None else {}),
    }


def bundle_metadata(bundle: dict) -> dict:
    """A bundle without its weights: what an MLflow model's metadata carries (classes, preprocessing, tta)."""
    return {k: v for k, v in bundle.items() if k != "state_dict"}


def save_model(model: ModelConfig, augment: AugmentConfig, info, state_dict: dict, path: Path,
               tta: str | None = None, trained: dict | None = None) -> None:
    """Write the bundle atomically."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ckpt.save(model_bundle(model, augment, info, state_dict, tta, trained), path)


def load_model_bundle(path: Path, device: torch.device | str = "cpu"):
    """``(model, dataset description, bundle)``: the network in eval mode on ``device``."""
    from onecycle.training.models import build_model

    if not Path(path).is_file():
        raise OneCycleError(f"{path} does not exist: run `onecycle train` (or `dvc repro train`) first")
    bundle = ckpt.load(path)
    if bundle.get("format") != FORMAT:
        raise OneCycleError(f"{path} is not a onecycle model file (no {FORMAT} format marker)")
    ds = bundle["dataset"]
    model = build_model(ModelConfig(**bundle["model"]), len(ds["classes"]), ds["image_shape"][2])
    model.load_state_dict(bundle["state_dict"])
    model.to(device).eval()
    return model, SimpleNamespace(**ds), bundle
