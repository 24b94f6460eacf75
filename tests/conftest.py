"""Shared fixtures: params files written into ``tmp_path``, and tiny datasets in the real file formats.

* Fashion-MNIST: the four IDX files (magic 0x00000803 for N x 28 x 28 uint8 images, 0x00000801 for labels),
  gzip-compressed under their published names.
* CIFAR-10: ``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/data_batch_1..5``, ``test_batch`` and
  ``batches.meta``, each a pickled dict as in the official archive.
* An image folder: ``train/<class>/*.jpg`` and ``val/<class>/*.jpg`` written with PIL.

``data.py`` checks files against the published checksums, which tiny files cannot match: the
``fashion_checksums`` and ``cifar_archive`` fixtures monkeypatch the expected checksums to the tiny files'.
"""

from __future__ import annotations

import copy
import glob
import gzip
import hashlib
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import tiny
from onecycle.config import parse_params
from onecycle.data import fetchers as data

PYTHON = sys.executable
# The published names (Debian's package and the official mirror use the same ones).
FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


# ----------------------------------------------------------------------------------------------- params

def defaults() -> dict[str, Any]:
    """Every params section with its default values, as params.yaml spells them."""
    return parse_params({}).model_dump(mode="json")


def _write_params(tmp_path: Path, **sections: Any) -> Path:
    """Write ``tmp_path/params.yaml``: the defaults with data.root inside tmp_path, then ``sections`` merged in.

    A section given as a dict updates the default section key by key; anything else replaces it whole
    (so tests can write a section that is not a mapping).
    """
    raw = copy.deepcopy(defaults())
    raw["data"]["root"] = str(Path(tmp_path) / "data")
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(name), dict):
            raw[name] = {**raw[name], **values}
        else:
            raw[name] = values
    path = Path(tmp_path) / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture()
def write_params():
    """``write_params(tmp_path, data={...}, model={...})`` -> path of a params.yaml built from the defaults."""
    return _write_params


# ----------------------------------------------------------------------------------------------- fashion-mnist

def idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file: 0x00 0x00, dtype 0x08 (uint8), ndim, the dims as big-endian uint32, then the data."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


@dataclass
class FashionSource:
    folder: Path
    arrays: dict[str, np.ndarray]  # train_x / test_x: N x 28 x 28 uint8; train_y / test_y: N uint8
    # The table data.FASHION_MNIST_FILES would hold for these files: key -> (file, md5 of .gz, md5 of IDX).
    table: dict[str, tuple[str, str, str]] = field(default_factory=dict)

    def path(self, key: str) -> Path:
        return self.folder / FASHION_FILES[key]


def make_fashion_source(folder: Path, n_train: int = 12, n_test: int = 6, seed: int = 0) -> FashionSource:
    """The four Fashion-MNIST .gz files with random images and labels, in ``folder``."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    src = FashionSource(folder, arrays)
    for key, arr in arrays.items():
        raw = idx_bytes(arr)
        gz = gzip.compress(raw, mtime=0)
        src.path(key).write_bytes(gz)
        src.table[key] = (FASHION_FILES[key], md5(gz), md5(raw))
    return src


@pytest.fixture()
def fashion_source(tmp_path) -> FashionSource:
    """Tiny Fashion-MNIST files (12 train, 6 test) in tmp_path/fashion-src; checksums NOT patched."""
    return make_fashion_source(tmp_path / "fashion-src")


@pytest.fixture()
def fashion_checksums(monkeypatch, fashion_source) -> FashionSource:
    """The tiny Fashion-MNIST files, with data.py expecting their checksums instead of the published ones."""
    monkeypatch.setattr(data, "FASHION_MNIST_FILES", dict(fashion_source.table))
    return fashion_source


# ----------------------------------------------------------------------------------------------- cifar

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_NAMES = [f"class-{i}" for i in range(10)]  # not the real names: proves they are read from batches.meta


@dataclass
class CifarArchive:
    path: Path
    md5: str
    train_data: np.ndarray  # N x 3072 uint8, rows as in the batches (R plane, G plane, B plane; row-major)
    train_labels: list[int]
    test_data: np.ndarray
    test_labels: list[int]
    names: list[str]


def _add(tar: tarfile.TarFile, name: str, blob: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(blob)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(blob))


def make_cifar_archive(path: Path, n_per_batch: int = 2, n_test: int = 3, seed: int = 0,
                       replace: dict[str, bytes] | None = None, extra: dict[str, bytes] | None = None) -> CifarArchive:
    """A cifar-10-python.tar.gz in the official layout; ``replace`` swaps a member's bytes, ``extra`` adds members."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    train_data, train_labels = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, n_per_batch)]
        train_data.append(x)
        train_labels += y
        batch = {b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                 b"filenames": [f"img_{i}_{j}.png".encode() for j in range(n_per_batch)]}
        members[f"data_batch_{i}"] = pickle.dumps(batch, protocol=2)
    test_x = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_y = [int(v) for v in rng.integers(0, 10, n_test)]
    members["test_batch"] = pickle.dumps({b"batch_label": b"testing batch 1 of 1", b"labels": test_y, b"data": test_x},
                                         protocol=2)
    members["batches.meta"] = pickle.dumps({b"num_cases_per_batch": n_per_batch, b"num_vis": 3072,
                                            b"label_names": [n.encode() for n in CIFAR_NAMES]}, protocol=2)
    members.update(replace or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo(CIFAR_FOLDER)
        folder.type = tarfile.DIRTYPE
        folder.mode = 0o755
        tar.addfile(folder)
        for name, blob in members.items():
            _add(tar, f"{CIFAR_FOLDER}/{name}", blob)
        for name, blob in (extra or {}).items():
            _add(tar, name, blob)
    return CifarArchive(path, md5(path.read_bytes()), np.concatenate(train_data), train_labels, test_x, test_y,
                        list(CIFAR_NAMES))


@pytest.fixture()
def cifar_archive(tmp_path, monkeypatch) -> CifarArchive:
    """A tiny cifar-10-python.tar.gz (10 train, 3 test) in tmp_path/cifar-src, its md5 the expected one."""
    archive = make_cifar_archive(tmp_path / "cifar-src" / "cifar-10-python.tar.gz")
    monkeypatch.setitem(data.CIFAR["cifar10"], "md5", archive.md5)
    return archive


# ----------------------------------------------------------------------------------------------- image folder

def make_image_folder(root: Path, classes: tuple[str, ...] = ("dog", "cat", "zebra"), n_train: int = 3,
                      n_val: int = 2, size: tuple[int, int] = (40, 30)) -> Path:
    """``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg`` (the ImageNet layout), one colour per class."""
    from PIL import Image

    for split, n in (("train", n_train), ("val", n_val)):
        for c, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = (40 * c % 256, 255 - 30 * i, 90)
                Image.new("RGB", size, colour).save(folder / f"{cls}_{i}.jpg", quality=90)
    return root


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    """A tiny image folder in tmp_path/images: 3 classes, 3 train and 2 val JPEGs each."""
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def isolated_tracking_uri(monkeypatch):
    """mlflow.set_tracking_uri() copies its URI into MLFLOW_TRACKING_URI; keep one test's store out of the next."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A working folder holding a tiny fetched dataset (600 train / 100 test images), made the cwd."""
    tiny.write_fetched(tmp_path / "data", n_train=600, n_test=100)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ----------------------------------------------------------------------------------------------- services on loopback

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL cluster on loopback (Debian's server binaries), with an empty database.

    Skipped only when no server is installed (``make setup`` installs Debian's ``postgresql`` as root);
    a server that is installed but does not start fails the test. As root, the server runs as ``postgres``.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
    if found[-1] is None:
        pytest.skip("no PostgreSQL server installed: `make setup` as root installs Debian's postgresql")
    bindir = Path(found[-1]).parent
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    home = Path(tempfile.mkdtemp(prefix="onecycle-pg-"))  # not under pytest's tmp: that is private to root
    if as_user:
        shutil.chown(home, "postgres", "postgres")
    port, db = free_port(), home / "db"

    def run(*cmd):
        subprocess.run(as_user + [str(c) for c in cmd], check=True, capture_output=True, text=True, timeout=120)

    run(bindir / "initdb", "-D", db, "-A", "trust", "-U", "onecycle", "-E", "UTF8", "--no-sync")
    run(bindir / "pg_ctl", "-D", db, "-l", home / "server.log", "-w", "-t", "60",
        "-o", f"-h 127.0.0.1 -p {port} -k {home} -c fsync=off", "start")
    try:
        run(bindir / "createdb", "-h", "127.0.0.1", "-p", port, "-U", "onecycle", "optuna")
        yield f"postgresql://onecycle@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(as_user + [str(bindir / "pg_ctl"), "-D", str(db), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)


def fresh_database(url: str, name: str) -> str:
    """A new empty database on the server of ``url``; its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"
