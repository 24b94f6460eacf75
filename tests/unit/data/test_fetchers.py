"""fetch: Fashion-MNIST (IDX files, Debian's package or a download), CIFAR archives, image folders."""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import http.server
import json
import os
import pickle
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import CIFAR_FOLDER, FASHION_FILES, idx_bytes, make_cifar_archive, make_fashion_source, make_image_folder
from onecycle.config import DataConfig
from onecycle.core.errors import DatasetError
from onecycle.data import fetchers as data
from onecycle.data import store as datamod

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(root=str(tmp_path / "data"), **kw)


def listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its mtime in ns."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_published(root: Path) -> None:
    """No dataset folder and no temporary folder left under data.root after a failed fetch."""
    if root.exists():
        leftovers = [p.name for p in root.iterdir() if p.name != "downloads"]
        assert leftovers == [], leftovers


# ----------------------------------------------------------------------------------------------- IDX

def test_read_idx_parses_images_and_labels():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    blob = idx_bytes(images)
    assert blob[:4] == bytes.fromhex("00000803") and blob[4:8] == (2).to_bytes(4, "big")
    out = data.read_idx(blob)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, images)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert idx_bytes(labels)[:4] == bytes.fromhex("00000801")
    assert data.read_idx(idx_bytes(labels)).tolist() == [3, 1, 4, 1, 5]


@pytest.mark.parametrize("blob", [
    pytest.param(bytes.fromhex("00000903") + bytes(12), id="int8-dtype"),
    pytest.param(bytes.fromhex("01000803") + bytes(12), id="nonzero-first-byte"),
    pytest.param(b"\x1f\x8b\x08\x00", id="still-gzipped"),
    pytest.param(b"", id="empty"),
])
def test_read_idx_refuses_a_bad_magic_number(blob):
    with pytest.raises(DatasetError, match="bad magic number"):
        data.read_idx(blob)


@pytest.mark.parametrize(("cut", "word"), [(-1, "truncated"), (-100, "truncated")])
def test_read_idx_refuses_a_truncated_file(cut, word):
    blob = idx_bytes(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(DatasetError, match=f"{word}.*{3 * 28 * 28 + cut} bytes of data, header says {3 * 28 * 28}"):
        data.read_idx(blob[:cut])


def test_read_idx_refuses_trailing_bytes():
    with pytest.raises(DatasetError, match="1 bytes of data, header says 0"):
        data.read_idx(idx_bytes(np.zeros((0, 28, 28), np.uint8)) + b"x")


# ----------------------------------------------------------------------------------------------- fashion-mnist

def test_tiny_files_fail_the_published_checksums(tmp_path, fashion_source):
    with pytest.raises(DatasetError) as info:
        data.fetch(cfg(tmp_path, source=str(fashion_source.folder)))
    msg = str(info.value)
    assert "checksum mismatch" in msg and FASHION_FILES["train_x"] in msg and "not the published Fashion-MNIST" in msg
    assert_nothing_published(tmp_path / "data")


def test_fashion_fetch_writes_arrays_and_meta(tmp_path, fashion_checksums):
    src = fashion_checksums
    out, wrote = data.fetch(cfg(tmp_path, source=str(src.folder)))
    assert wrote and out == tmp_path / "data" / "fashion_mnist"
    for split in ("train", "test"):
        x = np.load(out / f"{split}_x.npy")
        y = np.load(out / f"{split}_y.npy")
        assert x.dtype == np.uint8 and x.shape == (len(src.arrays[f"{split}_x"]), 28, 28, 1)
        assert np.array_equal(x[..., 0], src.arrays[f"{split}_x"])
        assert y.dtype == np.int64 and y.tolist() == src.arrays[f"{split}_y"].tolist()
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == FASHION_CLASSES and meta["num_classes"] == 10
    assert (meta["num_train"], meta["num_test"], meta["image_shape"]) == (12, 6, [28, 28, 1])
    pixels = src.arrays["train_x"].astype(np.float64) / 255.0
    assert meta["mean"] == pytest.approx([pixels.mean()], abs=1e-6)
    assert meta["std"] == pytest.approx([pixels.std()], abs=1e-6)
    assert meta["source"] == str(src.folder) and meta["dataset"] == "fashion_mnist"
    assert meta["checksums"] == {name: raw for name, _, raw in src.table.values()}
    assert meta["files"] == {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in out.glob("*.npy")}
    assert len(meta["files"]) == 4
    info = datamod.load_info(cfg(tmp_path, source=str(src.folder)))
    assert (info.num_classes, info.in_channels, info.num_train) == (10, 1, 12)


def test_a_second_fetch_is_a_no_op(tmp_path, fashion_checksums):
    c = cfg(tmp_path, source=str(fashion_checksums.folder))
    out, wrote = data.fetch(c)
    before = listing(out)
    assert wrote and len(before) == 5
    assert data.fetch(c) == (out, False)
    assert listing(out) == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["fashion_mnist"]  # no temporary folders left


def test_a_deleted_output_file_is_fetched_again(tmp_path, fashion_checksums):
    c = cfg(tmp_path, source=str(fashion_checksums.folder))
    out, _ = data.fetch(c)
    (out / "test_y.npy").unlink()
    with pytest.raises(DatasetError, match="incomplete"):
        datamod.load_info(c)
    assert data.fetch(c) == (out, True)
    assert np.load(out / "test_y.npy").tolist() == fashion_checksums.arrays["test_y"].tolist()


def test_the_debian_package_is_used_when_source_is_null(tmp_path, monkeypatch, fashion_checksums):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", fashion_checksums.folder)
    monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", ["http://127.0.0.1:9/"])  # never contacted
    out, wrote = data.fetch(cfg(tmp_path))
    assert wrote and json.loads((out / "meta.json").read_text())["source"] == "debian:dataset-fashion-mnist"
    assert not (tmp_path / "data" / "downloads").exists()


def test_a_corrupted_file_is_a_checksum_mismatch(tmp_path, fashion_checksums):
    src = fashion_checksums
    labels = src.arrays["train_y"].copy()
    labels[0] = (labels[0] + 1) % 10
    src.path("train_y").write_bytes(gzip.compress(idx_bytes(labels), mtime=0))  # valid gzip, valid IDX, one label off
    with pytest.raises(DatasetError, match=f"checksum mismatch for .*{FASHION_FILES['train_y']}"):
        data.fetch(cfg(tmp_path, source=str(src.folder)))
    assert_nothing_published(tmp_path / "data")


def test_a_file_that_is_not_gzip_is_refused(tmp_path, fashion_checksums):
    fashion_checksums.path("test_x").write_bytes(b"<html>not found</html>")
    with pytest.raises(DatasetError, match=f"{FASHION_FILES['test_x']} is not a readable gzip file"):
        data.fetch(cfg(tmp_path, source=str(fashion_checksums.folder)))


def test_a_missing_source_folder_is_refused(tmp_path):
    with pytest.raises(DatasetError, match=r"data.source .*nowhere is not a folder"):
        data.fetch(cfg(tmp_path, source=str(tmp_path / "nowhere")))


def test_a_missing_file_is_named(tmp_path, fashion_checksums):
    fashion_checksums.path("test_y").unlink()
    with pytest.raises(DatasetError) as info:
        data.fetch(cfg(tmp_path, source=str(fashion_checksums.folder)))
    assert f"{FASHION_FILES['test_y']} is missing" in str(info.value)
    assert_nothing_published(tmp_path / "data")


# ----------------------------------------------------------------------------------------------- download

class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


class _Truncating(_Quiet):
    """Announces the file's full length and sends only the first 100 bytes (a dropped connection)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return self.send_error(404)
        blob = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(blob)))
        self.end_headers()
        self.wfile.write(blob[:100])
        self.close_connection = True


@contextmanager
def serve(folder: Path, handler=_Quiet):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture()
def no_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-package")


def test_download_from_a_mirror(tmp_path, monkeypatch, no_debian, fashion_checksums):
    with serve(fashion_checksums.folder) as url:
        monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", [url])
        out, wrote = data.fetch(cfg(tmp_path))
    meta = json.loads((out / "meta.json").read_text())
    assert wrote and meta["source"] == url and meta["num_train"] == 12
    assert np.array_equal(np.load(out / "train_x.npy")[..., 0], fashion_checksums.arrays["train_x"])
    downloads = tmp_path / "data" / "downloads"
    for key in FASHION_FILES:
        assert (downloads / FASHION_FILES[key]).read_bytes() == fashion_checksums.path(key).read_bytes()


def test_a_mirror_serving_wrong_bytes_leaves_no_partial_file(tmp_path, monkeypatch, no_debian, fashion_checksums):
    wrong = make_fashion_source(tmp_path / "wrong", seed=1)  # same names, other content
    with serve(wrong.folder) as url:
        monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", [url])
        with pytest.raises(DatasetError) as info:
            data.fetch(cfg(tmp_path))
    msg = str(info.value)
    assert f"checksum mismatch for {url}{FASHION_FILES['train_x']}" in msg and "partial file was removed" in msg
    assert "\n" not in msg
    assert list((tmp_path / "data" / "downloads").iterdir()) == []
    assert_nothing_published(tmp_path / "data")


def test_a_dropped_connection_leaves_no_partial_file(tmp_path, monkeypatch, no_debian, fashion_checksums):
    with serve(fashion_checksums.folder, _Truncating) as url:
        monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", [url])
        with pytest.raises(DatasetError, match="checksum mismatch|could not download"):
            data.fetch(cfg(tmp_path))
    assert list((tmp_path / "data" / "downloads").iterdir()) == []


def test_a_partial_file_from_an_interrupted_run_is_downloaded_again(tmp_path, monkeypatch, no_debian,
                                                                     fashion_checksums):
    downloads = tmp_path / "data" / "downloads"
    downloads.mkdir(parents=True)
    partial = downloads / FASHION_FILES["train_x"]
    partial.write_bytes(fashion_checksums.path("train_x").read_bytes()[:100])
    with serve(fashion_checksums.folder) as url:
        monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", [url])
        out, wrote = data.fetch(cfg(tmp_path))
    assert wrote and partial.read_bytes() == fashion_checksums.path("train_x").read_bytes()
    assert np.load(out / "train_x.npy").shape == (12, 28, 28, 1)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_mirror_says_how_to_get_the_data_offline(tmp_path, monkeypatch, no_debian):
    url = f"http://127.0.0.1:{_closed_port()}/"
    monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", [url])
    with pytest.raises(DatasetError) as info:
        data.fetch(cfg(tmp_path))
    msg = str(info.value)
    assert f"could not download {url}" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "\n" not in msg
    assert list((tmp_path / "data" / "downloads").iterdir()) == []
    assert_nothing_published(tmp_path / "data")


def test_a_404_names_the_url(tmp_path, monkeypatch, no_debian):
    empty = tmp_path / "empty"
    empty.mkdir()
    with serve(empty) as url:
        monkeypatch.setattr(data, "FASHION_MNIST_MIRRORS", [url])
        with pytest.raises(DatasetError, match=f"could not download {url}{FASHION_FILES['train_x']}: HTTP Error 404"):
            data.fetch(cfg(tmp_path))


# ----------------------------------------------------------------------------------------------- real data

DEBIAN = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_fashion_mnist_from_debian(tmp_path):
    out, wrote = data.fetch(cfg(tmp_path))  # source null: the Debian package, checked against published md5s
    meta = json.loads((out / "meta.json").read_text())
    assert wrote and meta["source"] == "debian:dataset-fashion-mnist"
    x, y = np.load(out / "train_x.npy", mmap_mode="r"), np.load(out / "train_y.npy")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.uint8 and y.shape == (60000,)
    assert np.load(out / "test_x.npy", mmap_mode="r").shape == (10000, 28, 28, 1)
    assert sorted(set(y.tolist())) == list(range(10)) and np.bincount(y).tolist() == [6000] * 10
    assert meta["classes"] == FASHION_CLASSES and meta["num_classes"] == 10
    assert meta["checksums"] == {f: raw for f, _, raw in data.FASHION_MNIST_FILES.values()}
    assert meta["mean"] == pytest.approx([0.286], abs=1e-3) and meta["std"] == pytest.approx([0.353], abs=1e-3)


# ----------------------------------------------------------------------------------------------- cifar

def test_cifar_fetch_from_an_archive(tmp_path, cifar_archive):
    a = cifar_archive
    out, wrote = data.fetch(cfg(tmp_path, dataset="cifar10", source=str(a.path.parent)))
    assert wrote
    x, y = np.load(out / "train_x.npy"), np.load(out / "train_y.npy")
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.uint8 and y.dtype == np.int64
    assert y.tolist() == a.train_labels
    # A row of a CIFAR batch is the 1024 red values, then green, then blue, each plane row by row.
    for i, r, c, ch in [(0, 0, 0, 0), (0, 5, 7, 1), (3, 31, 2, 2), (9, 17, 31, 0), (6, 31, 31, 2)]:
        assert x[i, r, c, ch] == a.train_data[i, ch * 1024 + r * 32 + c]
    test_x = np.load(out / "test_x.npy")
    assert test_x.shape == (3, 32, 32, 3) and test_x[2, 4, 9, 1] == a.test_data[2, 1024 + 4 * 32 + 9]
    assert np.load(out / "test_y.npy").tolist() == a.test_labels
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == a.names and meta["image_shape"] == [32, 32, 3]
    assert meta["checksums"] == {"cifar-10-python.tar.gz": a.md5}
    pixels = x.reshape(-1, 3).astype(np.float64) / 255
    assert meta["mean"] == pytest.approx(pixels.mean(0).tolist(), abs=1e-6)
    assert meta["std"] == pytest.approx(pixels.std(0).tolist(), abs=1e-6)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test_x.npy", "test_y.npy", "train_x.npy",
                                                     "train_y.npy"]  # the extracted batches are gone


def test_cifar_source_may_name_the_archive_itself(tmp_path, cifar_archive):
    out, _ = data.fetch(cfg(tmp_path, dataset="cifar10", source=str(cifar_archive.path)))
    assert json.loads((out / "meta.json").read_text())["source"] == str(cifar_archive.path)


def test_cifar_archive_with_the_wrong_checksum(tmp_path):
    archive = make_cifar_archive(tmp_path / "src" / "cifar-10-python.tar.gz")
    with pytest.raises(DatasetError, match=f"checksum mismatch for .*md5 {archive.md5}, expected "
                                           f"{data.CIFAR['cifar10']['md5']}"):
        data.fetch(cfg(tmp_path, dataset="cifar10", source=str(archive.path)))


def _patched_archive(tmp_path, monkeypatch, **kw):
    archive = make_cifar_archive(tmp_path / "src" / "cifar-10-python.tar.gz", **kw)
    monkeypatch.setitem(data.CIFAR["cifar10"], "md5", archive.md5)
    return archive


def test_an_archive_member_outside_the_target_is_refused(tmp_path, monkeypatch):
    archive = _patched_archive(tmp_path, monkeypatch, extra={"../evil": b"pwned", f"{CIFAR_FOLDER}/../../evil2": b"x"})
    with pytest.raises(DatasetError, match=r"archive member '../evil' would be written outside"):
        data.fetch(cfg(tmp_path, dataset="cifar10", source=str(archive.path)))
    assert [p for p in tmp_path.rglob("evil*")] == []
    assert_nothing_published(tmp_path / "data")


def test_an_archive_with_a_link_is_refused(tmp_path, monkeypatch):
    import io
    import tarfile

    archive = _patched_archive(tmp_path, monkeypatch)
    with tarfile.open(archive.path, "r:gz") as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(archive.path, "w:gz") as tar:
        for m, blob in members:
            tar.addfile(m, io.BytesIO(blob) if blob is not None else None)
        link = tarfile.TarInfo(f"{CIFAR_FOLDER}/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    monkeypatch.setitem(data.CIFAR["cifar10"], "md5", hashlib.md5(archive.path.read_bytes()).hexdigest())
    with pytest.raises(DatasetError, match="is a link or device"):
        data.fetch(cfg(tmp_path, dataset="cifar10", source=str(archive.path)))
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    evil = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2)
    archive = _patched_archive(tmp_path, monkeypatch, replace={"data_batch_3": evil})
    with pytest.raises(DatasetError, match=r"not a CIFAR python batch: refusing to load (posix|os)\.system"):
        data.fetch(cfg(tmp_path, dataset="cifar10", source=str(archive.path)))
    assert not marker.exists()
    assert_nothing_published(tmp_path / "data")


@pytest.mark.parametrize(("replace", "message"), [
    pytest.param({"batches.meta": pickle.dumps({b"num_vis": 3072}, protocol=2)}, "has no label_names", id="meta"),
    pytest.param({"data_batch_2": pickle.dumps({b"labels": [1]}, protocol=2)}, "data_batch_2 .* is not a CIFAR batch",
                 id="no-data"),
    pytest.param({"test_batch": pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [1, 2]}, protocol=2)},
                 "test_batch .* is not a CIFAR batch", id="wrong-size"),
    pytest.param({"test_batch": pickle.dumps([1, 2], protocol=2)}, "expected a dict", id="not-a-dict"),
])
def test_a_malformed_batch_is_a_dataset_error(tmp_path, monkeypatch, replace, message):
    archive = _patched_archive(tmp_path, monkeypatch, replace=replace)
    with pytest.raises(DatasetError, match=message):
        data.fetch(cfg(tmp_path, dataset="cifar10", source=str(archive.path)))


def test_cifar_source_without_the_archive(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="does not hold cifar-10-python.tar.gz"):
        data.fetch(cfg(tmp_path, dataset="cifar10", source=str(tmp_path / "empty")))


# ----------------------------------------------------------------------------------------------- imagefolder

def _rows(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        return [(r["path"], int(r["label"])) for r in csv.DictReader(f)]


def test_imagefolder_writes_index_csvs_and_meta(tmp_path, image_folder):
    c = cfg(tmp_path, dataset="imagefolder", source=str(image_folder))
    out, wrote = data.fetch(c)
    assert wrote and sorted(p.name for p in out.iterdir()) == ["meta.json", "test.csv", "train.csv"]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog", "zebra"]  # sorted, whatever order the folders were made in
    assert (meta["num_train"], meta["num_test"], meta["num_classes"]) == (9, 6, 3)
    # 40 x 30 RGB images: trained at their own short side, normalized with their own statistics
    assert meta["image_shape"] == [30, 30, 3] and meta["source"] == str(image_folder.resolve())
    assert meta["mean"] != data.IMAGENET_MEAN and len(meta["std"]) == 3
    train = _rows(out / "train.csv")
    assert train[:3] == [(f"train/cat/cat_{i}.jpg", 0) for i in range(3)]
    assert train[-1] == ("train/zebra/zebra_2.jpg", 2)
    assert sorted({lab for _, lab in train}) == [0, 1, 2]
    assert _rows(out / "test.csv")[2:4] == [("val/dog/dog_0.jpg", 1), ("val/dog/dog_1.jpg", 1)]
    root, paths, labels = datamod.load_index(datamod.load_info(c), "test")
    assert root == image_folder.resolve() and len(paths) == 6 and labels.dtype == np.int64
    assert all((root / p).is_file() for p in paths)
    assert data.fetch(c) == (out, False)


def test_an_image_folder_in_the_workspace_is_found_relative_to_it_wherever_the_workspace_moves(tmp_path):
    ws = tmp_path / "ws"
    make_image_folder(ws / "images" / "pets")
    c = DataConfig(dataset="imagefolder", source="images/pets")  # relative: the workspace's, not the cwd's
    out, wrote = data.fetch(c, ws)
    assert wrote and out == ws / "data" / "imagefolder"
    assert json.loads((out / "meta.json").read_text())["source"] == "images/pets"
    moved = ws.rename(tmp_path / "moved")
    assert data.fetch(c, moved) == (moved / "data" / "imagefolder", False)
    root, paths, _ = datamod.load_index(datamod.load_info(c, moved), "train")
    assert root == (moved / "images" / "pets").resolve() and all((root / p).is_file() for p in paths)


def test_a_missing_relative_image_folder_is_named_by_fetch(tmp_path):
    with pytest.raises(DatasetError, match=r"data.source .*ws/images/none is not a folder"):
        data.fetch(DataConfig(dataset="imagefolder", source="images/none"), tmp_path / "ws")


def test_imagefolder_with_different_classes_in_train_and_val(tmp_path):
    root = make_image_folder(tmp_path / "images")
    for f in (root / "val" / "zebra").iterdir():
        f.unlink()
    (root / "val" / "zebra").rmdir()
    with pytest.raises(DatasetError, match=r"different classes \(only in train: \['zebra'\], only in val: \[\]\)"):
        data.fetch(cfg(tmp_path, dataset="imagefolder", source=str(root)))


def test_imagefolder_with_an_unreadable_image(tmp_path, image_folder):
    bad = image_folder / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"this is not a JPEG")
    with pytest.raises(DatasetError, match=f"{bad} is not a readable image"):
        data.fetch(cfg(tmp_path, dataset="imagefolder", source=str(image_folder)))
    assert_nothing_published(tmp_path / "data")


def test_imagefolder_with_an_empty_class_folder(tmp_path, image_folder):
    (image_folder / "val" / "yak").mkdir()
    (image_folder / "train" / "yak").mkdir()
    with pytest.raises(DatasetError, match=r"train/yak holds no images"):
        data.fetch(cfg(tmp_path, dataset="imagefolder", source=str(image_folder)))


def test_imagefolder_without_a_val_folder(tmp_path):
    root = make_image_folder(tmp_path / "images", n_val=0)
    for d in (root / "val").iterdir():
        d.rmdir()
    (root / "val").rmdir()
    with pytest.raises(DatasetError, match="has no val/ folder"):
        data.fetch(cfg(tmp_path, dataset="imagefolder", source=str(root)))


# ----------------------------------------------------------------------------------------------- split

def test_split_train_val_is_seeded_disjoint_and_complete():
    train, val = datamod.split_train_val(100, 20, seed=0, train_subset=None)
    assert len(val) == 20 and len(train) == 80 and set(train).isdisjoint(val)
    assert sorted([*train, *val]) == list(range(100))
    again = datamod.split_train_val(100, 20, seed=0, train_subset=None)
    assert np.array_equal(again[1], val)
    sub, val2 = datamod.split_train_val(100, 20, seed=0, train_subset=10)
    assert len(sub) == 10 and set(sub) <= set(train) and np.array_equal(val2, val)
    with pytest.raises(DatasetError, match=r"data.val_size \(100\) must be smaller"):
        datamod.split_train_val(100, 100, seed=0, train_subset=None)


def test_imagefolder_index_follows_images_added_or_removed(tmp_path, image_folder):
    c = cfg(tmp_path, dataset="imagefolder", source=str(image_folder))
    out, _ = data.fetch(c)
    assert data.fetch(c) == (out, False)
    extra = image_folder / "train" / "cat" / "cat_9.jpg"
    extra.write_bytes((image_folder / "train" / "cat" / "cat_0.jpg").read_bytes())
    assert data.fetch(c) == (out, True)
    assert ("train/cat/cat_9.jpg", 0) in _rows(out / "train.csv")
    assert json.loads((out / "meta.json").read_text())["num_train"] == 10
    extra.unlink()
    (image_folder / "val" / "zebra" / "zebra_1.jpg").unlink()
    assert data.fetch(c) == (out, True)
    assert datamod.load_info(c).num_train == 9 and datamod.load_info(c).num_test == 5
    assert data.fetch(c) == (out, False)
