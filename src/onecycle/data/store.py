"""Datasets as the pipeline reads them: what fetch wrote into ``data/<dataset>/``, loaded back.

* fashion_mnist, cifar10, cifar100: ``train_x.npy`` / ``test_x.npy`` (uint8, N x H x W x C),
  ``train_y.npy`` / ``test_y.npy`` (int64) and ``meta.json`` (class names, split sizes, image shape,
  per-channel mean/std of the training split in [0, 1] units, source and checksums);
* imagefolder: ``train.csv`` / ``test.csv`` (relative path, label) and ``meta.json``; images stay where
  they are (``data.source``, recorded relative to the workspace when inside it, so a clone or a moved
  workspace still finds them), the ``val/`` folder serving as the test split.

A validation split of ``data.val_size`` examples is held out of the training split at load time.
Writing these folders is :mod:`onecycle.data.fetchers`' job.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onecycle.core.errors import DatasetError
from onecycle.data import catalog

FORMAT_VERSION = 1


def in_workspace(path: str | Path, root: Path | None = None) -> Path:
    """``path`` made absolute (``~`` expanded), a relative one taken from the workspace ``root`` (default: the cwd)."""
    p = Path(path).expanduser()
    return (p if p.is_absolute() else Path(root if root is not None else ".") / p).resolve()


def workspace_relative(path: Path, root: Path | None = None) -> str:
    """``path`` relative to the workspace ``root`` when inside it (so valid in any clone of it), else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path(root if root is not None else ".").resolve()).as_posix()
    except ValueError:
        return str(path)


def dataset_dir(data_cfg, root: Path | None = None) -> Path:
    """``data.root``/``data.dataset``, with a relative ``data.root`` taken from ``root`` (default: the cwd)."""
    base = Path(data_cfg.root).expanduser()
    if not base.is_absolute() and root is not None:
        base = Path(root) / base
    return base / data_cfg.dataset


def outputs_intact(out: Path, meta: dict) -> bool:
    """Whether every file meta.json lists is there."""
    files = meta.get("files") or {}
    return bool(files) and all((out / name).is_file() for name in files)


@dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the pipeline needs to know about a fetched dataset (from meta.json)."""

    name: str
    classes: list[str]
    num_train: int
    num_test: int
    image_shape: tuple[int, int, int]  # H, W, C
    mean: list[float]
    std: list[float]
    source: str
    folder: Path = Path(".")  # where it was loaded from

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.image_shape[2]


def load_info(data_cfg, root: Path | None = None) -> DatasetInfo:
    """Read ``data/<dataset>/meta.json`` (under ``root``); a clear error says how to fetch it when it is missing."""
    out = dataset_dir(data_cfg, root)
    path = out / "meta.json"
    if not path.is_file():
        raise DatasetError(f"{out} has not been fetched: run `onecycle fetch` (or `dvc repro fetch`) first")
    try:
        meta = json.loads(path.read_text())
    except ValueError:
        raise DatasetError(f"{path} is corrupt: delete {out} and run `onecycle fetch` again") from None
    if not outputs_intact(out, meta):
        raise DatasetError(f"{out} is incomplete: delete it and run `onecycle fetch` again")
    source = str(meta["source"])
    if catalog.kind(data_cfg.dataset).image_folder and not Path(source).is_absolute():  # written relative to the workspace
        source = str(in_workspace(source, root))
    return DatasetInfo(name=data_cfg.dataset, classes=list(meta["classes"]), num_train=int(meta["num_train"]),
                       num_test=int(meta["num_test"]), image_shape=tuple(meta["image_shape"]),
                       mean=list(meta["mean"]), std=list(meta["std"]), source=source, folder=out)


def class_difference(trained_name: str, trained: list[str], info: DatasetInfo) -> str | None:
    """How a model's classes (trained on ``trained_name``) differ from the fetched dataset's, or None if they do not."""
    trained, fetched = list(trained), list(info.classes)
    if trained == fetched:
        return None
    if trained_name != info.name:
        return f"it was trained on {trained_name} but data.dataset is {info.name}"
    if len(trained) != len(fetched):
        return f"it was trained on {len(trained)} {trained_name} classes, {info.folder / 'meta.json'} lists {len(fetched)}"
    i = next(i for i, (a, b) in enumerate(zip(trained, fetched, strict=True)) if a != b)
    return (f"its {trained_name} classes differ from {info.folder / 'meta.json'}'s: class {i} is {trained[i]!r} in "
            f"the model, {fetched[i]!r} in the data")


def load_arrays(info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x H x W x C uint8, labels int64) of the ``train`` or ``test`` split of an array dataset."""
    return np.load(info.folder / f"{split}_x.npy"), np.load(info.folder / f"{split}_y.npy")


def load_index(info: DatasetInfo, split: str) -> tuple[Path, list[str], np.ndarray]:
    """(image root, relative paths, labels) of the ``train`` or ``test`` split of an image folder."""
    paths, labels = [], []
    with open(info.folder / f"{split}.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            paths.append(row["path"])
            labels.append(int(row["label"]))
    return Path(info.source), paths, np.asarray(labels, dtype=np.int64)


def split_train_val(n: int, val_size: int, seed: int, train_subset: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation parts of a training split of ``n`` examples.

    The validation part is the first ``val_size`` of a seeded permutation (the same for every stage and
    trial, so lr_find, train and tune agree); ``train_subset`` keeps only that many of the rest.
    """
    if val_size >= n:
        raise DatasetError(f"data.val_size ({val_size}) must be smaller than the training split ({n} examples)")
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        train = train[:train_subset]
    return np.sort(train), np.sort(val)
