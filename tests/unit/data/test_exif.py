"""An image is what its viewer shows: a phone's JPEG whose EXIF orientation says "turn me" is read turned, by the one
guard every reader goes through (predict, the served model, the demo, image-folder training)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from onecycle.data.images import open_image
from onecycle.data.loaders import ImageFileDataset
from onecycle.serving.inference import preprocess

# EXIF orientation -> what turns the stored pixels upright (PIL's own names)
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270,
           8: Image.Transpose.ROTATE_90}


def _stored(height: int = 24, width: int = 40) -> Image.Image:
    """A landscape image with a bright bar along its left edge and a mark in its top-left corner: every turn differs."""
    a = np.full((height, width, 3), 30, dtype=np.uint8)
    a[:, :6] = 220
    a[:4, :10, 0] = 255
    return Image.fromarray(a)


def _jpeg(path: Path, orientation: int | None) -> Path:
    im = _stored()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    im.save(path, format="JPEG", quality=95, exif=exif.tobytes())
    return path


def _as_stored(path: Path) -> Image.Image:
    """The JPEG's pixels as decoded, before any turn."""
    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.mark.parametrize("orientation", [2, 3, 6, 8])
def test_open_image_turns_a_jpeg_as_its_exif_orientation_says(tmp_path, orientation):
    path = _jpeg(tmp_path / "phone.jpg", orientation)
    expected = np.asarray(_as_stored(path).transpose(UPRIGHT[orientation]))
    got = open_image(path)
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)
    assert np.array_equal(open_image(path.read_bytes()), expected)  # bytes (an upload, a request) the same


def test_an_image_without_orientation_or_with_orientation_1_is_read_as_stored(tmp_path):
    for orientation in (None, 1):
        path = _jpeg(tmp_path / f"plain-{orientation}.jpg", orientation)
        assert np.array_equal(open_image(path), np.asarray(_as_stored(path)))


def test_predict_the_served_model_and_image_folder_training_see_the_phone_photo_upright(tmp_path):
    phone = _jpeg(tmp_path / "phone.jpg", 6)  # held sideways: stored landscape, shown portrait
    upright = tmp_path / "upright.png"
    _as_stored(phone).transpose(Image.Transpose.ROTATE_270).save(upright)
    ds = SimpleNamespace(name="fashion_mnist", image_shape=(28, 28, 1), classes=["a", "b"], mean=[0.3], std=[0.3])
    as_shown = preprocess(upright, ds, [])
    assert np.array_equal(preprocess(phone, ds, []), as_shown)  # predict and the demo (a path)
    assert np.array_equal(preprocess(phone.read_bytes(), ds, [], name="image 0"), as_shown)  # the served model
    assert not np.array_equal(preprocess(_jpeg(tmp_path / "flat.jpg", None), ds, []), as_shown)
    folder = ImageFileDataset(tmp_path, ["phone.jpg", "upright.png"], np.array([0, 1]), None, channels=3)
    assert folder.load(0).shape == (40, 24, 3) and np.array_equal(folder.load(0), folder.load(1))


def test_a_broken_exif_block_leaves_the_pixels_as_stored(tmp_path):
    buf = io.BytesIO()
    _stored().save(buf, format="JPEG", quality=95, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05garbage")
    path = tmp_path / "odd.jpg"
    path.write_bytes(buf.getvalue())
    assert open_image(path).shape == (24, 40, 3)
