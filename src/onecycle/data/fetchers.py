"""Fetching a dataset into ``data/<dataset>/`` in a fast-to-load, checksummed form: one fetcher per dataset
(named by its record in :mod:`onecycle.data.catalog`) and :func:`fetch`, which publishes what it wrote.

Fashion-MNIST comes from ``data.source``, Debian's ``dataset-fashion-mnist`` or the official mirror (IDX
files, md5-checked); CIFAR-10/100 from the official archive (md5, member-checked extraction, a restricted
unpickler); an image folder is indexed in place (``train/<class>/*``, ``val/<class>/*``). Writes go to a
temporary folder renamed into place, so a crash leaves the old output or the new one. The format of
what is written is :mod:`onecycle.data.store`'s.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import io
import json
import logging
import os
import pickle
import random
import shutil
import tarfile
import tempfile
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np

from onecycle.core.errors import DatasetError
from onecycle.core.values import comparable, shown
from onecycle.data import catalog
from onecycle.data.store import (
    FORMAT_VERSION,
    dataset_dir,
    fetched_problem,
    in_workspace,
    md5sum,
    meta_problem,
    outputs_intact,
    workspace_relative,
)

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MIRRORS = ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"]
# name: (file, md5 of the published .gz, md5 of the decompressed IDX payload). Debian's package ships
# the same payload recompressed, so either checksum proves the content.
FASHION_MNIST_FILES = {
    "train_x": ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
    "train_y": ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
    "test_x": ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
    "test_y": ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]

CIFAR = {
    "cifar10": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "filename": "cifar-10-python.tar.gz", "md5": "c58f30108f718f92721af3b95e74349a",
        "folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
        "meta": "batches.meta", "labels": "labels", "names": "label_names",
    },
    "cifar100": {
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "filename": "cifar-100-python.tar.gz", "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "folder": "cifar-100-python", "train": ["train"], "test": ["test"],
        "meta": "meta", "labels": "fine_labels", "names": "fine_label_names",
    },
}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
# the modes PIL opens grayscale images in (1-bit, 8-bit, with alpha, 16- and 32-bit integer, float)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
STATS_IMAGES = 512  # training images an image folder's mean and std are measured on (images smaller than ImageNet's)


# ----------------------------------------------------------------------------------------------- utils

def _publish_dir(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place, replacing any previous output."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N x H x W x C images, in [0, 1] units (float64 accumulation)."""
    c = images.shape[-1]
    flat = images.reshape(-1, c)
    mean = np.zeros(c)
    sq = np.zeros(c)
    for start in range(0, flat.shape[0], 1 << 22):  # chunks keep memory flat for big arrays
        block = flat[start:start + (1 << 22)].astype(np.float64) / 255.0
        mean += block.sum(0)
        sq += (block ** 2).sum(0)
    n = flat.shape[0]
    mean /= n
    std = np.sqrt(np.maximum(sq / n - mean ** 2, 0))
    return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def _download(url: str, folder: Path, filename: str, md5: str) -> Path:
    """Download with torchvision's code into ``folder``; remove the file unless its md5 matches."""
    from torchvision.datasets.utils import download_url

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    if path.exists() and md5sum(path) == md5:
        return path
    # torchvision skips the download when a file of that name exists and no md5 is given, so a partial file
    # left by an interrupted run would be "downloaded" as is: remove it first.
    path.unlink(missing_ok=True)
    try:
        download_url(url, str(folder), filename, md5=None)
    except (OSError, http.client.HTTPException, RecursionError, RuntimeError) as exc:  # URLError is an OSError
        path.unlink(missing_ok=True)
        detail = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", None) or repr(exc)
        raise DatasetError(f"could not download {url}: {detail}") from None
    except BaseException:  # Ctrl-C mid-download: leave no partial file behind
        path.unlink(missing_ok=True)
        raise
    got = md5sum(path)
    if got != md5:
        path.unlink(missing_ok=True)
        raise DatasetError(f"checksum mismatch for {url}: md5 {got}, expected {md5}; the partial file was removed, run fetch again")
    return path


# ----------------------------------------------------------------------------------------------- fashion

def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic 0x0000 + dtype 0x08 (uint8) + ndim, then big-endian dims."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError("not an IDX uint8 file (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise DatasetError(f"IDX file is truncated or padded: {len(data) - offset} bytes of data, header says {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def _fashion_source(data_cfg, cache: Path, workspace: Path | None) -> tuple[Path, str]:
    if data_cfg.source:
        src = in_workspace(data_cfg.source, workspace)
        if not src.is_dir():
            raise DatasetError(f"data.source {src} is not a folder; point it at the four Fashion-MNIST .gz files "
                               "or set it to null to use the Debian package / download")
        return src, workspace_relative(src, workspace)
    if all((DEBIAN_FASHION_MNIST / f).is_file() for f, _, _ in FASHION_MNIST_FILES.values()):
        return DEBIAN_FASHION_MNIST, "debian:dataset-fashion-mnist"
    log.info("Debian's dataset-fashion-mnist is not installed; downloading Fashion-MNIST")
    errors = []
    for mirror in FASHION_MNIST_MIRRORS:
        try:
            for filename, md5, _ in FASHION_MNIST_FILES.values():
                _download(mirror + filename, cache, filename, md5)
            return cache, mirror
        except DatasetError as exc:
            errors.append(str(exc))
    raise DatasetError(f"{errors[-1]}; with no network, install it with `apt-get install dataset-fashion-mnist` "
                       "or set data.source to a folder holding the four .gz files")


def fetch_fashion_mnist(data_cfg, tmp: Path, cache: Path, workspace: Path | None = None) -> dict[str, Any]:
    """Fashion-MNIST's IDX files (Debian's package, a folder or the official download) as arrays."""
    src, origin = _fashion_source(data_cfg, cache, workspace)
    checksums = {}
    for key, (filename, gz_md5, raw_md5) in FASHION_MNIST_FILES.items():
        path = src / filename
        if not path.is_file():
            raise DatasetError(f"{path} is missing; data.source must hold {', '.join(f for f, _, _ in FASHION_MNIST_FILES.values())}")
        try:
            raw = gzip.decompress(path.read_bytes())
        except (OSError, EOFError) as exc:
            raise DatasetError(f"{path} is not a readable gzip file ({exc}); fetch it again") from None
        got_gz, got_raw = md5sum(path), hashlib.md5(raw).hexdigest()
        if got_gz != gz_md5 and got_raw != raw_md5:
            raise DatasetError(f"checksum mismatch for {path}: md5 {got_gz} (payload {got_raw}), expected {gz_md5} "
                               f"(payload {raw_md5}); the file is not the published Fashion-MNIST")
        checksums[filename] = got_raw
        arr = read_idx(raw)
        if key.endswith("_x"):
            arr = arr[..., None]  # N x 28 x 28 x 1
        else:
            arr = arr.astype(np.int64)
        np.save(tmp / f"{key}.npy", arr)
    return {"classes": FASHION_MNIST_CLASSES, "source": origin, "checksums": checksums}


# ----------------------------------------------------------------------------------------------- cifar

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches (dicts of lists, bytes and numpy arrays) and nothing that could run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _unpickle(data: bytes) -> dict:
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DatasetError(f"not a CIFAR python batch: {exc}") from None
    if not isinstance(obj, dict):
        raise DatasetError("not a CIFAR python batch: expected a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def safe_members(tar: tarfile.TarFile, target: Path) -> list[tarfile.TarInfo]:
    """The archive's regular files and folders, refusing any member that would land outside ``target``."""
    target = target.resolve()
    members = []
    for m in tar.getmembers():
        dest = (target / m.name).resolve()
        if not (dest == target or target in dest.parents):
            raise DatasetError(f"archive member {m.name!r} would be written outside {target}; refusing to extract")
        if m.issym() or m.islnk() or m.isdev():
            raise DatasetError(f"archive member {m.name!r} is a link or device; refusing to extract")
        members.append(m)
    return members


def fetch_cifar(data_cfg, tmp: Path, cache: Path, workspace: Path | None = None) -> dict[str, Any]:
    """A CIFAR archive (a folder or the official download, md5-checked) as arrays."""
    spec = CIFAR[data_cfg.dataset]
    if data_cfg.source:
        src = in_workspace(data_cfg.source, workspace)
        archive = src / spec["filename"] if src.is_dir() else src
        if not archive.is_file():
            raise DatasetError(f"data.source {src} does not hold {spec['filename']}; set data.source to null to download it")
        origin = workspace_relative(archive, workspace)
    else:
        archive = _download(spec["url"], cache, spec["filename"], spec["md5"])
        origin = spec["url"]
    got = md5sum(archive)
    if got != spec["md5"]:
        raise DatasetError(f"checksum mismatch for {archive}: md5 {got}, expected {spec['md5']}")
    extract = tmp / "_extract"
    extract.mkdir()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(extract, members=safe_members(tar, extract), filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"{archive} is not a readable tar.gz archive ({exc})") from None
    folder = extract / spec["folder"]

    def load(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for name in names:
            path = folder / name
            if not path.is_file():
                raise DatasetError(f"{archive} has no {spec['folder']}/{name}; it is not the official archive")
            batch = _unpickle(path.read_bytes())
            try:
                x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                y = np.asarray(batch[spec["labels"]], dtype=np.int64)
            except (KeyError, ValueError, TypeError) as exc:
                raise DatasetError(f"{spec['folder']}/{name} in {archive} is not a CIFAR batch ({exc!r})") from None
            if len(x) != len(y):
                raise DatasetError(f"{spec['folder']}/{name} in {archive} has {len(x)} images but {len(y)} labels")
            xs.append(x)
            ys.append(y)
        return np.ascontiguousarray(np.concatenate(xs)), np.concatenate(ys)

    train_x, train_y = load(spec["train"])
    test_x, test_y = load(spec["test"])
    if not (folder / spec["meta"]).is_file():
        raise DatasetError(f"{archive} has no {spec['folder']}/{spec['meta']}; it is not the official archive")
    meta = _unpickle((folder / spec["meta"]).read_bytes())
    if spec["names"] not in meta:
        raise DatasetError(f"{spec['folder']}/{spec['meta']} in {archive} has no {spec['names']}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[spec["names"]]]
    for key, arr in (("train_x", train_x), ("train_y", train_y), ("test_x", test_x), ("test_y", test_y)):
        np.save(tmp / f"{key}.npy", arr)
    shutil.rmtree(extract)
    return {"classes": classes, "source": origin, "checksums": {spec["filename"]: got}}


# ----------------------------------------------------------------------------------------------- imagefolder

def _list_split(root: Path, split: str) -> tuple[list[str], list[tuple[str, str]]]:
    """``(class names, [(relative path, class name)])`` of ``split``/: each class folder named as users see it
    (:func:`onecycle.core.values.shown`: Unicode NFC, no outer spaces), in that name's order; two folders that are
    one name so (``café`` written by macOS and by Linux, ``Cat`` and ``cat``) are refused, naming both."""
    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"data.source {root} has no {split}/ folder; expected {split}/<class>/<image> (the ImageNet layout)")
    by_name: dict[str, Path] = {}
    for d in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
        same = next((other for other in by_name.values() if comparable(other.name) == comparable(d.name)), None)
        if same is not None or not shown(d.name):
            why = f"{same.name!r} and {d.name!r} name one class" if same else f"{d.name!r} is no name"
            raise DatasetError(f"data.source {root}: in {split}/, {why} (class names are compared as users see them: "
                               "Unicode form, case and outer spaces aside); rename or merge the folders")
        by_name[shown(d.name)] = d
    if not by_name:
        raise DatasetError(f"{folder} holds no class folders; expected {split}/<class>/<image>")
    classes = sorted(by_name)
    items = []
    for cls in classes:
        files = sorted(p for p in by_name[cls].rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise DatasetError(f"{by_name[cls]} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        items += [(str(p.relative_to(root)), cls) for p in files]
    return classes, items


def _imagefolder_index(data_cfg, workspace: Path | None = None
                       ) -> tuple[Path, list[str], dict[str, list[tuple[str, str]]], dict[str, str]]:
    """(root, classes, {split: [(relative path, class)]}, {csv name: csv text}) of an image folder."""
    root = in_workspace(data_cfg.source, workspace)
    if not root.is_dir():
        raise DatasetError(f"data.source {root} is not a folder; it must hold train/<class>/ and val/<class>/")
    train_classes, train_items = _list_split(root, "train")
    if len(train_classes) < 2:
        raise DatasetError(f"data.source {root}: train/ holds 1 class folder ({train_classes[0]}), and a classifier "
                           "needs 2 or more: add a folder of images for each other class to train/ and val/")
    val_classes, val_items = _list_split(root, "val")
    in_train = {comparable(c): c for c in train_classes}
    if set(in_train) != {comparable(c) for c in val_classes}:
        only_train = sorted(c for c in train_classes if comparable(c) not in set(map(comparable, val_classes)))[:5]
        only_val = sorted(c for c in val_classes if comparable(c) not in in_train)[:5]
        raise DatasetError(f"train/ and val/ of {root} have different classes (only in train: {only_train}, "
                           f"only in val: {only_val})")
    val_items = [(rel, in_train[comparable(c)]) for rel, c in val_items]  # val/cat is train/Cat's class
    index = {c: i for i, c in enumerate(train_classes)}
    texts = {}
    for split, items in (("train", train_items), ("test", val_items)):
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerow(["path", "label"])
        w.writerows((rel, index[c]) for rel, c in items)
        texts[f"{split}.csv"] = buf.getvalue()
    return root, train_classes, {"train": train_items, "test": val_items}, texts


def _imagefolder_unchanged(data_cfg, old_meta: dict, workspace: Path | None) -> bool:
    """Whether the image folder still lists exactly the images the fetched index holds."""
    try:
        *_, texts = _imagefolder_index(data_cfg, workspace)
    except DatasetError:
        return False  # fetch again, and let it report what is wrong
    return old_meta.get("checksums") == {name: hashlib.md5(text.encode()).hexdigest() for name, text in texts.items()}


def _image_folder_shape(root: Path, train_items: list[tuple[str, str]], side: int, channels: int, rng: random.Random
                        ) -> tuple[list[int], list[float], list[float]]:
    """``(image_shape, mean, std)`` an image folder trains with, from its images' typical short ``side`` and
    ``channels`` (1 when every sampled image is grayscale): ImageNet's 224 x 224 and statistics for RGB images of
    ImageNet's size (:data:`catalog.IMAGENET_SIDE` and up), else the images' own side and channels, with the mean and
    std of up to :data:`STATS_IMAGES` training images."""
    from onecycle.data.images import open_image

    side = min(side, catalog.IMAGENET_SIDE)
    if side == catalog.IMAGENET_SIDE and channels == 3:
        return [side, side, 3], IMAGENET_MEAN, IMAGENET_STD
    total, squares, n = np.zeros(channels), np.zeros(channels), 0
    for rel, _ in rng.sample(train_items, min(STATS_IMAGES, len(train_items))):
        pixels = open_image(root / rel, mode="L" if channels == 1 else "RGB").reshape(-1, channels) / 255.0
        total += pixels.sum(0)
        squares += (pixels ** 2).sum(0)
        n += len(pixels)
    mean = total / n
    std = np.sqrt(np.maximum(squares / n - mean ** 2, 0))
    std = np.where(std > 0, std, 1.0)  # a folder of flat images: normalize by 1, never divide by 0
    return [side, side, channels], [round(float(m), 6) for m in mean], [round(float(s), 6) for s in std]


def fetch_imagefolder(data_cfg, tmp: Path, cache: Path, workspace: Path | None = None, sample: int = 32
                       ) -> dict[str, Any]:
    """An image folder (``train/<class>/``, ``val/<class>/``) indexed, its images measured."""
    from PIL import Image

    root, train_classes, items, texts = _imagefolder_index(data_cfg, workspace)
    train_items, val_items = items["train"], items["test"]
    rng = random.Random(0)
    sides, grey = [], True
    for rel, _ in rng.sample(train_items, min(sample, len(train_items))) + rng.sample(val_items, min(sample, len(val_items))):
        try:
            with Image.open(root / rel) as im:
                sides.append(min(im.size))
                grey = grey and im.mode in GREY_MODES
                im.verify()
        except Exception as exc:  # PIL raises many types for broken files
            raise DatasetError(f"{root / rel} is not a readable image ({exc}); remove or replace it") from None
    for name, text in texts.items():
        (tmp / name).write_bytes(text.encode())
    shape, mean, std = _image_folder_shape(root, train_items, int(np.median(sides)), 1 if grey else 3, rng)
    return {
        "classes": train_classes, "source": workspace_relative(root, workspace), "num_train": len(train_items), "num_test": len(val_items),
        "image_shape": shape, "mean": mean, "std": std, "measured_shape": True,
        "checksums": {"train.csv": md5sum(tmp / "train.csv"), "test.csv": md5sum(tmp / "test.csv")},
    }


# ----------------------------------------------------------------------------------------------- fetch

def fetch(data_cfg, workspace: Path | None = None) -> tuple[Path, bool]:
    """Fetch ``data.dataset`` into ``data/<dataset>/``; return (folder, whether anything was written)."""
    kind = catalog.kind(data_cfg.dataset)
    out = dataset_dir(data_cfg, workspace)
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "downloads"
    wanted = {"dataset": data_cfg.dataset, "source_param": data_cfg.source, "format": FORMAT_VERSION}
    meta_path = out / "meta.json"
    old_out = out.with_name(f".{out.name}.old")
    if not out.exists() and old_out.is_dir():  # a fetch killed between its two renames: the previous data is back
        os.replace(old_out, out)
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError:
            old = {}
        # An image folder is read in place: images added or removed since the last fetch change the index (and an
        # index that took ImageNet's size for granted, without measuring the images, is made again).
        if (isinstance(old, dict) and all(old.get(k) == v for k, v in wanted.items()) and outputs_intact(out, old)
                and (not kind.image_folder or (old.get("measured_shape")
                                               and _imagefolder_unchanged(data_cfg, old, workspace)))):
            problem = fetched_problem(out, old)  # changed or inconsistent since fetch: fetch it again
            if problem is None:
                return out, False
            log.warning("%s; fetching %s again", problem, data_cfg.dataset)
    tmp = Path(tempfile.mkdtemp(prefix=f".{data_cfg.dataset}.", dir=root))
    try:
        try:
            _fetched_meta(kind, data_cfg, tmp, cache, workspace, wanted)
        except DatasetError as exc:  # every refusal leaves the data fetched before as it was
            kept = f"; the data fetched before in {out} is kept as it was" if meta_path.is_file() else ""
            raise DatasetError(f"{exc}{kept}") from None
        _publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, True


def _fetched_meta(kind, data_cfg, tmp: Path, cache: Path, workspace: Path | None, wanted: dict) -> dict[str, Any]:
    """Fetch into ``tmp`` and write its meta.json; a result that loading would refuse (one class, no images) is
    refused here, before it replaces anything."""
    meta = kind.fetch_function()(data_cfg, tmp, cache, workspace)
    if not kind.image_folder:
        train_x = np.load(tmp / "train_x.npy", mmap_mode="r")
        test_x = np.load(tmp / "test_x.npy", mmap_mode="r")
        mean, std = _channel_stats(np.asarray(train_x))
        meta.update(num_train=int(train_x.shape[0]), num_test=int(test_x.shape[0]),
                    image_shape=list(train_x.shape[1:]), mean=mean, std=std)
        meta["files"] = {f.name: md5sum(f) for f in sorted(tmp.glob("*.npy"))}
    else:
        meta["files"] = {f.name: md5sum(f) for f in sorted(tmp.glob("*.csv"))}
    meta.update(wanted)
    meta["num_classes"] = len(meta["classes"])
    if (problem := meta_problem(dataset_dir(data_cfg, workspace), meta)) is not None:
        where = f"data.source {data_cfg.source}" if data_cfg.source else data_cfg.dataset
        raise DatasetError(f"{where} gives data that cannot be trained on: {problem}")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    tmp.chmod(0o755)
    return meta
