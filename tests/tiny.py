"""Tiny, learnable datasets in the exact form ``onecycle fetch`` writes, and params files around them.

Class ``c`` is a bright square at a class-specific place on a noisy background: a small ResNet learns it
in an epoch or two, so tests can check that training really trains, in seconds on 2 CPU cores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import yaml


def synthetic_images(n: int, num_classes: int = 10, size: int = 28, channels: int = 1, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    images = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    cells = int(np.ceil(np.sqrt(num_classes)))
    step = size // cells
    for i, c in enumerate(labels):
        r, col = divmod(int(c), cells)
        images[i, r * step + 1: r * step + step - 1, col * step + 1: col * step + step - 1, :] = 230
    return images, labels.astype(np.int64)


def write_fetched(root: Path, dataset: str = "fashion_mnist", n_train: int = 640, n_test: int = 200,
                  size: int = 28, channels: int = 1, num_classes: int = 10) -> Path:
    """Write ``root/<dataset>/`` exactly as fetch would (npy arrays + meta.json with checksums)."""
    out = Path(root) / dataset
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y = synthetic_images(n_train, num_classes, size, channels, seed=1)
    test_x, test_y = synthetic_images(n_test, num_classes, size, channels, seed=2)
    arrays = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    flat = train_x.reshape(-1, channels) / 255.0
    meta = {
        "classes": [f"class{i}" for i in range(num_classes)], "source": "synthetic", "checksums": {},
        "num_train": n_train, "num_test": n_test, "image_shape": [size, size, channels],
        "mean": [float(m) for m in flat.mean(0)], "std": [float(s) for s in flat.std(0)],
        "files": {f"{k}.npy": hashlib.md5((out / f"{k}.npy").read_bytes()).hexdigest() for k in arrays},
        "dataset": dataset, "source_param": None, "format": 1, "num_classes": num_classes,
    }
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def tiny_params(workdir: Path, **sections: dict[str, Any]) -> Path:
    """A params.yaml in ``workdir`` for a seconds-long CPU run on the synthetic data in ``workdir/data``."""
    base: dict[str, Any] = {
        "data": {"root": str(Path(workdir) / "data"), "val_size": 128, "batch_size": 64},
        "model": {"width": 0.125},
        "lr_find": {"num_iter": 12},
        "schedule": {"max_lr": 0.05},
        "train": {"epochs": 2, "device": "cpu", "deterministic": True, "threads": 1},
        "mlflow": {"experiment": "test", "registered_model": None},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    path = Path(workdir) / "params.yaml"
    path.write_text(yaml.safe_dump(base, sort_keys=False))
    return path



def fit_tiny(workdir: Path, *, hooks=None, resume_state=None, should_stop=None, step_fn=None, **train):
    """``fit`` of tiny params (2 epochs, ``train`` overrides) in ``workdir`` with max_lr 0.05: ``(result, setup)``."""
    from onecycle.config import load_params
    from onecycle.training.engine import build_setup, train_step
    from onecycle.training.loop import fit

    params = load_params(tiny_params(workdir, train={"epochs": 2, **train}))
    setup = build_setup(params.data, params.augment, params.model, params.train, root=workdir)
    return fit(setup, 0.05, train=params.train, schedule=params.schedule, optimizer=params.optimizer, hooks=hooks,
               resume_state=resume_state, should_stop=should_stop, progress=False,
               step_fn=step_fn or train_step), setup


def untrained_model_workspace(root: Path) -> Path:
    """``root`` as a project: a tiny fetched Fashion-MNIST, tiny params and an untrained models/model.pt (seed 0)."""
    import torch

    from onecycle.config import load_params
    from onecycle.serving.modelfile import save_model
    from onecycle.training.models import build_model

    write_fetched(root / "data", n_train=40, n_test=30)
    tiny_params(root)
    params = load_params(root / "params.yaml")
    meta = json.loads((root / "data" / "fashion_mnist" / "meta.json").read_text())
    info = SimpleNamespace(name="fashion_mnist", classes=meta["classes"], image_shape=meta["image_shape"],
                           mean=meta["mean"], std=meta["std"])
    torch.manual_seed(0)
    model = build_model(params.model, len(info.classes), info.image_shape[2])
    save_model(params.model, params.augment, info, model.state_dict(), root / "models" / "model.pt")
    return root
