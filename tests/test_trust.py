"""Issue #28's trust findings: secrets in odd URLs, tampered or inconsistent data, a stale LR report, 16-bit
images and params files that say nothing."""

from __future__ import annotations

import json
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
    save_model(parse_params({"model": {"width": 0.125}}), info,
               build_model(parse_params({"model": {"width": 0.125}}).model, 10, 1).state_dict(), tmp_path / "models/model.pt")
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
