"""Datasets as the pipeline reads them: what fetch wrote into ``data/<dataset>/``, loaded back.

* fashion_mnist, cifar10, cifar100: ``train_x.npy`` / ``test_x.npy`` (uint8, N x H x W x C),
  ``train_y.npy`` / ``test_y.npy`` (int64) and ``meta.json`` (class names, split sizes, image shape,
  per-channel mean/std of the training split in [0, 1] units, source and checksums);
* imagefolder: ``train.csv`` / ``test.csv`` (relative path, label) and ``meta.json``; images stay where
  they are (``data.source``, recorded relative to the workspace when inside it, so a clone or a moved
  workspace still finds them), the ``val/`` folder serving as the test split.

A validation split of ``data.val_size`` examples (a count, a fraction, or ``auto``: :func:`val_count`) is held
out of the training split at load time; :func:`batch_count` says what ``data.batch_size: auto`` comes to.
Writing these folders is :mod:`onecycle.data.fetchers`' job.

Every load checks what fetch recorded (:func:`fetched_problem`): meta.json's keys, its class count, each file's
md5 (re-hashed only when the file's size, mtime or inode differ from the last check, kept in
``data/.<dataset>.verified.json``), and the labels against the class count; a problem is one line naming the
file (and key), never a traceback deep in training.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onecycle.core.errors import DatasetError
from onecycle.core.values import comparable
from onecycle.data import catalog

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


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
    return isinstance(files, dict) and bool(files) and all((out / name).is_file() for name in files)


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """The MD5 hex digest of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# what every fetched meta.json holds
META_KEYS = ("classes", "num_classes", "num_train", "num_test", "image_shape", "mean", "std", "source", "files")
# a file's stamp is trusted only once its mtime is this old: a change within the filesystem's timestamp
# granularity would otherwise keep the same (size, mtime) and pass unseen (git's "racy clean" problem)
_SETTLED_NS = 2_000_000_000


def meta_problem(out: Path, meta: dict) -> str | None:
    """What is wrong with ``out/meta.json``'s content (a missing key, classes that disagree), or None."""
    path = out / "meta.json"
    if not isinstance(meta, dict):
        return f"{path} is not a JSON object"
    for key in META_KEYS:
        if key not in meta:
            return f"{path} has no `{key}`"
    classes, shape = meta["classes"], meta["image_shape"]
    if not isinstance(classes, list) or len(classes) < 2:
        return f"{path}: `classes` must list at least 2 class names"
    if meta["num_classes"] != len(classes):
        return f"{path}: `num_classes` is {meta['num_classes']} but `classes` lists {len(classes)}"
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        return f"{path}: `image_shape` must be [height, width, channels], got {shape!r}"
    for key in ("mean", "std"):
        v = meta[key]
        if not (isinstance(v, list) and len(v) == shape[2] and all(isinstance(x, int | float) for x in v)):
            return f"{path}: `{key}` must hold {shape[2]} number(s), one a channel, got {v!r}"
    if not all(x > 0 for x in meta["std"]):
        return f"{path}: `std` must be positive, got {meta['std']!r}"
    for key in ("num_train", "num_test"):
        if not isinstance(meta[key], int) or meta[key] < 1:
            return f"{path}: `{key}` must be a positive count, got {meta[key]!r}"
    return None


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def changed_file(out: Path, meta: dict) -> Path | None:
    """The first file meta.json lists whose md5 is not the one it records (changed since fetch), or None.

    A file is hashed only when its size, mtime or inode differ from the last check that found it intact
    (``data/.<dataset>.verified.json``), so a load costs a few ``stat`` calls.
    """
    cache_path = out.parent / f".{out.name}.verified.json"
    meta_digest = md5sum(out / "meta.json")
    try:
        cache = json.loads(cache_path.read_text())
        known = cache["files"] if cache.get("meta") == meta_digest else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        known = {}
    checked, now = {}, time.time_ns()
    for name, want in sorted(meta["files"].items()):
        path = out / name
        st = path.stat()
        entry = known.get(name)
        if entry != [*_stamp(st), want]:
            if md5sum(path) != want:
                return path
        if now - st.st_mtime_ns > _SETTLED_NS:
            checked[name] = [*_stamp(st), want]
    if checked != known:
        tmp = cache_path.with_name(f"{cache_path.name}.{os.getpid()}.tmp")
        try:  # only a cache: a read-only data folder is checked in full every time
            tmp.write_text(json.dumps({"meta": meta_digest, "files": checked}))
            os.replace(tmp, cache_path)
        except OSError:
            tmp.unlink(missing_ok=True)
    return None


def fetched_problem(out: Path, meta: dict) -> str | None:
    """What is wrong with a fetched ``out`` (meta.json's content, a file changed since fetch), or None."""
    problem = meta_problem(out, meta)
    if problem is None and (path := changed_file(out, meta)) is not None:
        problem = f"{path} has changed since it was fetched (its md5 is not the one {out / 'meta.json'} records)"
    return problem


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
    digest: str = ""  # of the fetched files' md5s: the same content, the same digest (wherever it lies)

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
    if not isinstance(meta, dict) or not outputs_intact(out, meta):
        raise DatasetError(f"{out} is incomplete: delete it and run `onecycle fetch` again")
    if (problem := fetched_problem(out, meta)) is not None:
        raise DatasetError(f"{problem}: run `onecycle fetch` (or `dvc repro fetch`) to fetch it again")
    source = str(meta["source"])
    if catalog.kind(data_cfg.dataset).image_folder and not Path(source).is_absolute():  # written relative to the workspace
        source = str(in_workspace(source, root))
    return DatasetInfo(name=data_cfg.dataset, classes=list(meta["classes"]), num_train=int(meta["num_train"]),
                       num_test=int(meta["num_test"]), image_shape=tuple(meta["image_shape"]),
                       mean=list(meta["mean"]), std=list(meta["std"]), source=source, folder=out,
                       digest=hashlib.md5(json.dumps(meta["files"], sort_keys=True).encode()).hexdigest()[:16])


def class_difference(trained_name: str, trained: list[str], info: DatasetInfo) -> str | None:
    """How a model's classes (trained on ``trained_name``) differ from the fetched dataset's, or None if they do not."""
    trained, fetched = list(trained), list(info.classes)
    if [comparable(c) for c in trained] == [comparable(c) for c in fetched]:  # as users see names (NFC, case)
        return None
    if trained_name != info.name:
        return f"it was trained on {trained_name} but data.dataset is {info.name}"
    if len(trained) != len(fetched):
        return f"it was trained on {len(trained)} {trained_name} classes, {info.folder / 'meta.json'} lists {len(fetched)}"
    i = next(i for i, (a, b) in enumerate(zip(trained, fetched, strict=True)) if a != b)
    return (f"its {trained_name} classes differ from {info.folder / 'meta.json'}'s: class {i} is {trained[i]!r} in "
            f"the model, {fetched[i]!r} in the data")


_REFETCH = "delete {folder} and run `onecycle fetch` again"


def _check_labels(info: DatasetInfo, labels: np.ndarray, path: Path, n: int | None = None) -> np.ndarray:
    """``labels`` if they fit ``info`` (a count of ``n`` when given, each a class index), else a one-line error."""
    where = f"{info.folder / 'meta.json'}"
    fix = _REFETCH.format(folder=info.folder)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(f"{path} does not hold integer labels (shape {labels.shape}, {labels.dtype}): {fix}")
    if n is not None and len(labels) != n:
        raise DatasetError(f"{path} holds {len(labels)} labels for {n} images: {fix}")
    if len(labels) and (labels.min() < 0 or labels.max() >= info.num_classes):
        bad = int(labels.min()) if labels.min() < 0 else int(labels.max())
        raise DatasetError(f"{path} has label {bad}, out of range for the {info.num_classes} `classes` of {where}: {fix}")
    return labels


def _load_npy(path: Path, info: DatasetInfo) -> np.ndarray:
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as exc:  # truncated, not a .npy, a pickle
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise DatasetError(f"{path} is unreadable ({detail}): {_REFETCH.format(folder=info.folder)}") from None


def load_arrays(info: DatasetInfo, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x H x W x C uint8, labels int64) of the ``train`` or ``test`` split of an array dataset."""
    x_path, y_path = info.folder / f"{split}_x.npy", info.folder / f"{split}_y.npy"
    images = _load_npy(x_path, info)
    want = (getattr(info, f"num_{split}"), *info.image_shape)
    if images.dtype != np.uint8 or tuple(images.shape) != want:
        raise DatasetError(f"{x_path} holds {images.dtype} images of shape {tuple(images.shape)}, not the uint8 "
                           f"{want} that {info.folder / 'meta.json'} records: {_REFETCH.format(folder=info.folder)}")
    return images, _check_labels(info, _load_npy(y_path, info), y_path, len(images))


def load_index(info: DatasetInfo, split: str) -> tuple[Path, list[str], np.ndarray]:
    """(image root, relative paths, labels) of the ``train`` or ``test`` split of an image folder."""
    paths, labels = [], []
    path = info.folder / f"{split}.csv"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                paths.append(row["path"])
                labels.append(int(row["label"]))
    except (KeyError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path} is not the index fetch writes ({type(exc).__name__}: {exc}): "
                           f"{_REFETCH.format(folder=info.folder)}") from None
    return Path(info.source), paths, _check_labels(info, np.asarray(labels, dtype=np.int64), path)


# data.val_size auto: a tenth of the training split, at most 5000 (what Fashion-MNIST and CIFAR hold out)
AUTO_VAL_FRACTION, AUTO_VAL_MAX = 0.1, 5000
# data.batch_size auto: 256, or fewer on small data, so that an epoch has at least 8 optimizer steps
AUTO_BATCH, MIN_STEPS_PER_EPOCH = 256, 8


def val_count(val_size: int | float | str, n: int) -> int:
    """The examples ``data.val_size`` holds out of a training split of ``n``: a count as given, a fraction of ``n``
    (at least one), or ``auto`` (:data:`AUTO_VAL_FRACTION` of ``n``, at most :data:`AUTO_VAL_MAX`); a count the
    split cannot spare is one line naming the key."""
    if isinstance(val_size, str):  # auto
        count = min(AUTO_VAL_MAX, max(1, round(n * AUTO_VAL_FRACTION)))
    elif isinstance(val_size, float):
        count = max(1, round(n * val_size))
    else:
        count = int(val_size)
    if count >= n:
        fix = "set data.val_size to auto or a fraction (0.1)" if isinstance(val_size, int) else "add images"
        raise DatasetError(f"data.val_size ({val_size}) must be smaller than the training split ({n} "
                           f"example{'s' if n != 1 else ''}): {fix}")
    return count


def batch_count(batch_size: int | str, n_train: int, processes: int = 1) -> int:
    """The global batch ``data.batch_size`` means for ``n_train`` training examples: a number as given, or ``auto``
    (:data:`AUTO_BATCH`, fewer so an epoch has at least :data:`MIN_STEPS_PER_EPOCH` steps, a multiple of
    ``processes``)."""
    if not isinstance(batch_size, str):
        return int(batch_size)
    batch = min(AUTO_BATCH, max(1, -(-n_train // MIN_STEPS_PER_EPOCH)))
    return -(-batch // processes) * processes


def sized(data_cfg, num_train: int, processes: int = 1, *, note: bool = False):
    """``data_cfg`` (the data section) with ``val_size`` and ``batch_size`` as the counts they come to on a training
    split of ``num_train`` examples (:func:`val_count`, :func:`batch_count`); with ``note``, one line says what auto
    chose when the data is small."""
    val = val_count(data_cfg.val_size, num_train)
    left = num_train - val if data_cfg.train_subset is None else min(data_cfg.train_subset, num_train - val)
    batch = batch_count(data_cfg.batch_size, left, processes)
    if (val, batch) == (data_cfg.val_size, data_cfg.batch_size) and isinstance(data_cfg.val_size, int):
        return data_cfg
    if note and data_cfg.batch_size == "auto" and batch < AUTO_BATCH:
        log.info("small data: %d training examples, so batches of %d (data.batch_size auto: %d steps an epoch), "
                 "%d held out for validation (data.val_size %s)", num_train, batch, -(-left // batch), val,
                 data_cfg.val_size)
    return data_cfg.model_copy(update={"val_size": val, "batch_size": batch})


def dataset_label(data_cfg) -> str:
    """The dataset as people name it: ``data.dataset``, or an image folder's own folder name (``images/pets``: pets),
    in the characters a registered model's name may hold."""
    source = data_cfg.source or ""
    if not catalog.kind(data_cfg.dataset).image_folder or not source.strip(" /."):
        return data_cfg.dataset
    folder = Path(source).expanduser().resolve().name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder).strip("-.") or data_cfg.dataset


def split_train_val(n: int, val_size: int | float | str, seed: int, train_subset: int | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the training and validation parts of a training split of ``n`` examples.

    The validation part is the first :func:`val_count` of a seeded permutation (the same for every stage and
    trial, so lr_find, train and tune agree); ``train_subset`` keeps only that many of the rest.
    """
    val_size = val_count(val_size, n)
    perm = np.random.default_rng(seed).permutation(n)
    val, train = perm[:val_size], perm[val_size:]
    if train_subset is not None:
        train = train[:train_subset]
    return np.sort(train), np.sort(val)
