"""Untrusted input: secrets in odd URLs, tampered or inconsistent data, a stale LR report, 16-bit
images and params files that say nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

from tiny import tiny_params, write_fetched

# ------------------------------------------------------------------------------------------ secrets

# every character a URL's userinfo may hold (escaped or not, as people write them), and some that are not ASCII
ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
            "/@?#:%+=&-._~!$'()*,;[]\"<>\\^`{|}" + "éßøΩ密码🙂")


def _passwords(n: int = 300, seed: int = 28) -> list[str]:
    rng = random.Random(seed)
    found = ["Xy/9kP+q2w", "p@ss@word", "a?b#c:d/e", "%2F%40%3F", "==&&::@@", "密码/@?#x"]
    while len(found) < n:
        found.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(6, 24))))
    return found


def _contexts(pw: str) -> list[tuple[str, str]]:
    """(text as it reaches redact, what must stay readable in it) for one password."""
    raw = f"postgresql+psycopg://optuna:{pw}@db-host:5432/optuna"
    quoted = f"postgresql://optuna:{urllib.parse.quote(pw, safe='')}@db-host/optuna?sslmode=require"
    query = f"postgresql://db-host/optuna?user=optuna&sslpassword={urllib.parse.quote(pw, safe='')}&sslmode=require"
    return [
        (raw, "@db-host:5432/optuna"),
        (f"tune.storage: cannot open {raw}: connection refused", "@db-host:5432/optuna: connection refused"),
        (quoted, "@db-host/optuna?sslmode=require"),
        (query, "postgresql://db-host/optuna?user=optuna&sslpassword=***&sslmode=require"),
        (json.dumps({"password": pw, "host": "db-host"}), '"host": "db-host"'),
        (repr({"password": pw, "host": "db-host"}), "'host': 'db-host'"),
        (f"PGPASSWORD={urllib.parse.quote(pw, safe='')} psql -h db-host", " psql -h db-host"),
    ]


def test_no_password_survives_redact_whatever_its_characters():
    from onecycle.core.redact import redact

    for pw in _passwords():
        variants = {pw, urllib.parse.quote(pw, safe=""), json.dumps(pw)[1:-1], repr(pw)[1:-1]}
        for text, readable in _contexts(pw):
            masked = redact(text)
            assert readable in masked, (pw, text, masked)
            assert not [v for v in variants if v in masked], (pw, text, masked)
        # a mapping (MLflow params, a parsed config): the value under a secret's name, the URL in any other
        out = redact({"tune.storage": f"postgresql://optuna:{pw}@db-host/optuna", "db": {"password": pw},
                      "sslpassword": pw, "n": 3})
        assert out == {"tune.storage": "postgresql://optuna:***@db-host/optuna", "db": {"password": "***"},
                       "sslpassword": "***", "n": 3}, pw


def test_a_storage_url_from_the_environment_is_masked_in_the_one_line_error(tmp_path, monkeypatch, capsys):
    """$OPTUNA_STORAGE with a "/" in its password, a database that does not answer: the error line hides it."""
    from onecycle.config import parse_params
    from onecycle.core.redact import redact
    from onecycle.stages.command import guarded
    from onecycle.tuning import studies

    url = "postgresql://optuna:Xy/9kP+q2w@127.0.0.1:1/optuna?connect_timeout=2"
    monkeypatch.setenv(studies.STORAGE_ENV, url)
    params = parse_params({})
    got, source = studies.storage_url(params)
    assert (got, source) == (url, "OPTUNA_STORAGE")
    assert guarded("tune", lambda: studies.open_storage(got, tmp_path / "journal.log", key=source)) == 2
    err = capsys.readouterr().err
    assert err.startswith("onecycle tune: error: OPTUNA_STORAGE: cannot open postgresql://optuna:***@127.0.0.1:1/")
    assert "Xy/9kP+q2w" not in err and "9kP" not in err and len(err.strip().splitlines()) == 1
    # what train and tune log as MLflow params
    flat = redact(parse_params({"tune": {"storage": url.replace("127.0.0.1:1", "db-host")}}).flat())
    assert flat["tune.storage"] == "postgresql://optuna:***@db-host/optuna?connect_timeout=2"


# ------------------------------------------------------------------------------------------ image modes

def _gradient16() -> np.ndarray:
    """A 16-bit grayscale gradient over the whole 0-65535 range (0 and 65535 included)."""
    return np.linspace(0, 65535, 32 * 48).round().astype(np.uint16).reshape(32, 48)


def _write(path: Path, im) -> Path:
    im.save(path)
    return path


def test_16_bit_and_float_images_are_scaled_to_8_bits_not_clipped(tmp_path):
    from PIL import Image

    from onecycle.data.images import open_image
    from onecycle.data.loaders import ImageFileDataset

    g = _gradient16()
    want = np.rint(g / 257.0).astype(np.uint8)
    files = {
        "I;16": _write(tmp_path / "png16.png", Image.fromarray(g)),  # a real 16-bit PNG
        "I;16B": _write(tmp_path / "big.tif", Image.frombytes("I;16B", (48, 32), g.astype(">u2").tobytes())),
        "I": _write(tmp_path / "int32.tif", Image.fromarray(g.astype(np.int32))),
        "F": _write(tmp_path / "float.tif", Image.fromarray((g / 65535.0).astype(np.float32))),
    }
    for mode, path in files.items():
        with Image.open(path) as im:
            assert im.mode == mode, path
        gray = open_image(path, mode="L")
        assert gray.shape == (32, 48, 1) and gray.dtype == np.uint8
        assert np.abs(gray[..., 0].astype(int) - want).max() <= 1, mode  # old: every non-zero pixel 255
        rgb = open_image(path.read_bytes(), name=path.name, mode="RGB")
        assert (rgb == gray).all(), mode
    # image-folder training reads through the same guard
    ds = ImageFileDataset(tmp_path, ["png16.png"], np.zeros(1, dtype=np.int64), transform=None, channels=1)
    assert np.abs(ds.load(0)[..., 0].astype(int) - want).max() <= 1
    # a 32-bit image beyond 16 bits is stretched from its min to its max; 8-bit images are untouched
    wide = _write(tmp_path / "wide.tif", Image.fromarray(np.linspace(-1e6, 3e6, 32 * 48).reshape(32, 48).astype(np.int32)))
    assert open_image(wide, mode="L").min() == 0 and open_image(wide, mode="L").max() == 255
    eight = (g // 257).astype(np.uint8)
    assert (open_image(_write(tmp_path / "l8.png", Image.fromarray(eight)), mode="L")[..., 0] == eight).all()


# ------------------------------------------------------------------------------------------ what a message says

def _err_lines(capsys, stage: str) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"onecycle {stage}")]


def test_a_model_whose_classes_differ_from_the_same_datasets_is_refused_naming_the_class(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from onecycle.config import parse_params
    from onecycle.serving.modelfile import save_model
    from onecycle.stages import evaluate
    from onecycle.training.models import build_model

    write_fetched(tmp_path / "data", n_train=300, n_test=40)
    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path)
    classes = [f"class{i}" for i in range(10)]
    classes[3] = "cat"
    info = SimpleNamespace(name="fashion_mnist", classes=classes, image_shape=(28, 28, 1), mean=[0.3], std=[0.3])
    small = parse_params({"model": {"width": 0.125}})
    save_model(small.model, small.augment, info, build_model(small.model, 10, 1).state_dict(),
               tmp_path / "models/model.pt")
    assert evaluate.main(["--params", "params.yaml"]) == 1
    err = _err_lines(capsys, "evaluate")
    assert len(err) == 1, err
    assert "class 3 is 'cat' in the model, 'class3' in the data" in err[0], err  # old: "trained on X, but ... is X"


@pytest.mark.parametrize("text", ["", "# all defaults?\n\n# nothing else\n", "{}\n"])
def test_an_empty_params_file_is_refused_and_nothing_is_overwritten(tmp_path, monkeypatch, capsys, text):
    from onecycle.config import load_params
    from onecycle.stages import lr_find

    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/lr_find.json").write_text('{"suggested_lr": 0.05}')
    (tmp_path / "params.yaml").write_text(text)
    assert lr_find.main(["--params", "params.yaml"]) == 2
    assert _err_lines(capsys, "lr-find") == ["onecycle lr-find: error: params.yaml is empty (or only comments): put the "
                                             "sections to use in it (the repository's: `git checkout params.yaml`)"]
    assert (tmp_path / "reports/lr_find.json").read_text() == '{"suggested_lr": 0.05}'
    (tmp_path / "params.yaml").write_text("# a few keys: the rest are defaults\ntrain:\n  epochs: 3\n")
    assert load_params("params.yaml").train.epochs == 3


# ------------------------------------------------------------------------------------------ tampered data

def _age(folder: Path, seconds: float = 3600) -> None:
    """Every file of ``folder`` as if written an hour ago (settled: its stamp may be trusted)."""
    for p in folder.iterdir():
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns - int(seconds * 1e9)))


def test_fetch_fetches_a_changed_array_again_instead_of_saying_up_to_date(tmp_path, fashion_checksums, write_params,
                                                                          capsys, caplog):
    from onecycle.cli import main

    params = write_params(tmp_path, data={"source": str(fashion_checksums.folder)})
    assert main(["fetch", "--params", str(params)]) == 0
    out = tmp_path / "data" / "fashion_mnist"
    original = (out / "train_x.npy").read_bytes()
    assert capsys.readouterr().out.startswith("fetched fashion_mnist")
    assert main(["fetch", "--params", str(params)]) == 0
    assert capsys.readouterr().out.startswith("up to date: fashion_mnist")
    _age(out)
    assert main(["fetch", "--params", str(params)]) == 0  # the stamps say intact: no hashing needed to say so
    assert capsys.readouterr().out.startswith("up to date: fashion_mnist")
    x = np.load(out / "train_x.npy")
    x[0, 0, 0, 0] ^= 0xFF  # same size; a newer mtime
    np.save(out / "train_x.npy", x)
    assert main(["fetch", "--params", str(params)]) == 0
    assert capsys.readouterr().out.startswith("fetched fashion_mnist")  # old: "up to date"
    assert f"{out / 'train_x.npy'} has changed since it was fetched" in caplog.text
    assert (out / "train_x.npy").read_bytes() == original


def _lr_find_error(tmp_path, monkeypatch, capsys) -> str:
    from onecycle.stages import lr_find

    monkeypatch.chdir(tmp_path)
    tiny_params(tmp_path)
    rc = lr_find.main(["--params", "params.yaml"])
    err = _err_lines(capsys, "lr-find")
    assert rc == 1 and len(err) == 1, (rc, err)
    assert not (tmp_path / "reports/lr_find.json").exists()
    return err[0]


def _rewrite(out: Path, name: str, arr: np.ndarray, meta_changes: dict | None = None) -> None:
    """Change ``name`` *and* record its new md5, as a bad source (not a tampered copy) would arrive."""
    np.save(out / name, arr)
    meta = json.loads((out / "meta.json").read_text())
    meta["files"][name] = hashlib.md5((out / name).read_bytes()).hexdigest()
    meta.update(meta_changes or {})
    (out / "meta.json").write_text(json.dumps(meta))


def test_a_changed_or_truncated_array_stops_a_stage_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    out = write_fetched(tmp_path / "data", n_train=300, n_test=40)
    blob = (out / "test_x.npy").read_bytes()
    (out / "test_x.npy").write_bytes(blob[: len(blob) // 2])
    assert _lr_find_error(tmp_path, monkeypatch, capsys) == (
        f"onecycle lr-find: error: {out / 'test_x.npy'} has changed since it was fetched (its md5 is not the one "
        f"{out / 'meta.json'} records): run `onecycle fetch` (or `dvc repro fetch`) to fetch it again")


def test_labels_beyond_the_classes_and_a_meta_json_that_disagrees_are_named(tmp_path, monkeypatch, capsys):
    out = write_fetched(tmp_path / "data", n_train=300, n_test=40)
    meta = json.loads((out / "meta.json").read_text())

    def error(**changes) -> str:
        (out / "meta.json").write_text(json.dumps({k: v for k, v in {**meta, **changes}.items() if v is not None}))
        return _lr_find_error(tmp_path, monkeypatch, capsys).removeprefix("onecycle lr-find: error: ")

    assert error(std=None).startswith(f"{out / 'meta.json'} has no `std`: run `onecycle fetch`")
    assert error(num_classes=None).startswith(f"{out / 'meta.json'} has no `num_classes`: run `onecycle fetch`")
    assert error(classes=meta["classes"][:9]).startswith(
        f"{out / 'meta.json'}: `num_classes` is 10 but `classes` lists 9: ")
    assert error(classes=meta["classes"][:9], num_classes=9).startswith(
        f"{out / 'train_y.npy'} has label 9, out of range for the 9 `classes` of {out / 'meta.json'}: delete {out}")
    (out / "meta.json").write_text(json.dumps(meta))
    y = np.load(out / "train_y.npy")
    y[5] = 12
    _rewrite(out, "train_y.npy", y)
    assert _lr_find_error(tmp_path, monkeypatch, capsys).startswith(
        f"onecycle lr-find: error: {out / 'train_y.npy'} has label 12, out of range for the 10 `classes`")
    _rewrite(out, "train_y.npy", y[:-3])
    assert _lr_find_error(tmp_path, monkeypatch, capsys).startswith(
        f"onecycle lr-find: error: {out / 'train_y.npy'} holds 297 labels for 300 images: delete {out}")


def test_an_intact_dataset_is_hashed_once_then_known_by_its_stamps(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from onecycle.core.errors import DatasetError
    from onecycle.data import store

    out = write_fetched(tmp_path / "data", n_train=300, n_test=40)
    cfg = SimpleNamespace(root=str(tmp_path / "data"), dataset="fashion_mnist")
    hashed = []
    real = store.md5sum
    monkeypatch.setattr(store, "md5sum", lambda p: hashed.append(Path(p).name) or real(p))
    store.load_info(cfg)
    assert sorted(hashed) == ["meta.json", "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    hashed.clear()
    store.load_info(cfg)  # files written just now: not trusted by their stamps yet (a change could hide in them)
    assert len(hashed) == 5
    _age(out)
    store.load_info(cfg)
    hashed.clear()
    store.load_info(cfg)
    assert hashed == ["meta.json"]  # stat calls only
    x = np.load(out / "train_x.npy")
    x[1, 2, 3, 0] ^= 1
    np.save(out / "train_x.npy", x)
    _age(out, 1800)  # a different, old mtime
    with pytest.raises(DatasetError, match="train_x.npy has changed since it was fetched"):
        store.load_info(cfg)


# ------------------------------------------------------------------------------------------ a stale LR report

def _two_datasets(tmp_path: Path) -> None:
    write_fetched(tmp_path / "data", n_train=300, n_test=40)
    write_fetched(tmp_path / "data", dataset="cifar10", n_train=300, n_test=40, size=32, channels=3)


def _report(tmp_path: Path, params, **record_changes) -> Path:
    """reports/lr_find.json as lr_find writes it for ``params`` (the record changed by ``record_changes``)."""
    from onecycle.data.store import load_info
    from onecycle.training.lr_report import measured_on

    record = {**measured_on(params.flat(), load_info(params.data, tmp_path).digest), **record_changes}
    path = tmp_path / "reports/lr_find.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"suggested_lr": 0.336, "suggestion": "valley", "measured_on": record}))
    return path


def test_train_refuses_an_lr_report_measured_on_another_dataset(tmp_path, monkeypatch, capsys):
    from onecycle.stages import train

    _two_datasets(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/lr_find.json").write_text(json.dumps({  # the old dataset's (its loss: 310361 in epoch 1)
        "suggested_lr": 0.336, "suggestion": "valley", "measured_on": {"data.dataset": "cifar10", "model.width": 0.125}}))
    tiny_params(tmp_path, schedule={"max_lr": "auto"})  # data.dataset switched back to fashion_mnist
    assert train.main(["--params", "params.yaml"]) == 1
    assert _err_lines(capsys, "train") == [
        'onecycle train: error: reports/lr_find.json was measured with data.dataset = "cifar10", but the params say '
        '"fashion_mnist"; run `onecycle lr-find` (or `dvc repro lr_find`) to measure it again, or set schedule.max_lr '
        'to a number']
    assert not (tmp_path / "checkpoints/last.pt").exists() and not (tmp_path / "mlflow.db").exists()


def test_what_an_lr_report_was_measured_on_decides_whether_train_uses_it(tmp_path):
    from onecycle.config import load_params
    from onecycle.core.errors import OneCycleError
    from onecycle.training.lr_report import resolve_max_lr

    _two_datasets(tmp_path)
    params = load_params(tiny_params(tmp_path, schedule={"max_lr": "auto"}))
    path = _report(tmp_path, params)

    def used(p=params) -> float:
        from onecycle.data.store import load_info
        from onecycle.training.lr_report import measured_on

        return resolve_max_lr(p.schedule.max_lr, path,
                              measured_now=measured_on(p.flat(), load_info(p.data, tmp_path).digest))

    assert used() == 0.336
    # what does not change the suggestion: the seed, the device, the number of epochs, where the data lies
    assert used(params.replace(train={"seed": 7, "device": "cpu", "epochs": 9, "threads": 2})) == 0.336
    with pytest.raises(OneCycleError, match=r"^.*lr_find.json was measured with data.batch_size = 64, but the params "
                                            r"say 128; run `onecycle lr-find`"):
        used(params.replace(data={"batch_size": 128}))
    with pytest.raises(OneCycleError, match=r"measured with model.width = 0.125, but the params say 0.25"):
        used(params.replace(model={"width": 0.25}))
    with pytest.raises(OneCycleError, match=r"measured with train.amp = \"auto\", but the params say true"):
        used(params.replace(train={"amp": True}))
    _report(tmp_path, params, **{"data.digest": "0123456789abcdef"})  # the same dataset fetched again, other files
    with pytest.raises(OneCycleError, match=r"measured on other fashion_mnist data, but the dataset has been "
                                            r"fetched again with other content since"):
        used()
    path.write_text(json.dumps({"suggested_lr": 0.05}))  # no record: not trusted to fit these params
    with pytest.raises(OneCycleError, match=r"^.*lr_find.json does not record what it was measured on \(its "
                                            r"`measured_on`\); run `onecycle lr-find`"):
        used()


@pytest.mark.slow
def test_lr_find_records_what_it_measured_on(tmp_path, monkeypatch):
    from onecycle.config import load_params
    from onecycle.data.store import load_info
    from onecycle.stages import lr_find
    from onecycle.training.lr_report import measured_on

    write_fetched(tmp_path / "data", n_train=300, n_test=40)
    monkeypatch.chdir(tmp_path)
    params = load_params(tiny_params(tmp_path, schedule={"max_lr": "auto"}))
    assert lr_find.main(["--params", "params.yaml"]) == 0
    report = json.loads((tmp_path / "reports/lr_find.json").read_text())
    assert report["measured_on"] == json.loads(json.dumps(measured_on(params.flat(), load_info(params.data).digest)))
    assert report["measured_on"]["data.dataset"] == "fashion_mnist" and report["measured_on"]["data.batch_size"] == 64
