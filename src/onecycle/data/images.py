"""Decoding an image file or its bytes, behind one guard that decides which images are read at all.

Every image is turned upright as its EXIF orientation says (:func:`upright`: a phone's photo as its viewer shows
it) and becomes 8 bits a channel here (:func:`to_8bit`): a 16-bit grayscale PNG or TIFF is scaled, not
clipped as PIL's ``convert`` would (it turns every value above 255 white). A file that is too large, declares more pixels than ``MAX_PIXELS`` (a decompression bomb), is truncated or is
not an image is refused *before* it is decoded, with one line naming it (:class:`ImageError`). Training on an
image folder, predict, the demo and the served model all read images here.
"""

from __future__ import annotations

import functools
import io
import re
import threading
import warnings
from pathlib import Path

import numpy as np

from onecycle.core.errors import OneCycleError

MAX_PIXELS = 50_000_000        # width x height; a 20000 x 20000 PNG (400 MP) is refused before decoding
MAX_BYTES = 64 * 1024 * 1024   # encoded file size
# Decoding this many pixels or more (12 MB as 8-bit RGB) marks the memory freed afterwards as worth giving back.
LARGE_PIXELS = 4_000_000
_decoded = threading.local()  # .large: this thread decoded a large image since it last gave memory back
_ORIENTATION = 0x0112  # the EXIF tag: 1 = as stored; 2-8 = mirrored and/or turned by 90, 180 or 270 degrees


class ImageError(OneCycleError):
    """One image that cannot be answered (unreadable, truncated, too large); the others still are."""

    def __init__(self, message: str = "") -> None:
        # A DataLoader worker re-raises it in the main process as ImageError("Caught ImageError in DataLoader
        # worker process 0.\nOriginal Traceback ...\nonecycle.data.images.ImageError: <message>"): keep the message.
        if message.startswith("Caught ImageError") and "\nOriginal Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split("ImageError: ", 1)[-1]
        super().__init__(message)


def open_image(source: Path | str | bytes, name: str | None = None, mode: str = "RGB") -> np.ndarray:
    """Decode ``source`` (a path or encoded bytes) to a uint8 HxWxC array in ``mode`` ("L" or "RGB").

    Raises :class:`ImageError` naming the file for anything it cannot or will not decode.
    """
    from PIL import Image, UnidentifiedImageError

    name = name or (str(source) if not isinstance(source, bytes) else "image")
    try:
        if isinstance(source, bytes):
            size = len(source)
            fp = io.BytesIO(source)
        else:
            size = Path(source).stat().st_size
            fp = open(source, "rb")  # noqa: SIM115  (closed below)
    except OSError as exc:
        raise ImageError(f"{name}: cannot read ({exc.strerror or exc})") from None
    try:
        if size > MAX_BYTES:
            raise ImageError(f"{name}: refused, {size / 2**20:.0f} MiB is larger than {MAX_BYTES // 2**20} MiB")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:  # reads the header only
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise ImageError(f"{name}: refused, {w}x{h} pixels is more than {MAX_PIXELS // 10**6} megapixels")
                if w * h >= LARGE_PIXELS:
                    _decoded.large = True
                arr = np.asarray(to_8bit(upright(im)).convert(mode))  # decodes
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own check, at open()
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        what = f"{pixels[1]} pixels" if pixels else "its declared size"
        raise ImageError(f"{name}: refused, {what} is more than {MAX_PIXELS // 10**6} megapixels") from None
    except (UnidentifiedImageError, OSError, EOFError, SyntaxError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:120] or type(exc).__name__
        raise ImageError(f"{name}: not a readable image ({detail})") from None
    finally:
        fp.close()
    return arr[:, :, None] if arr.ndim == 2 else arr


def upright(im):
    """``im`` as its viewer shows it: turned and flipped as its EXIF orientation says (a phone's photo, taken in any
    position, is stored as the sensor saw it). An image without that tag, or with an unreadable one, is unchanged."""
    from PIL import ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PIL's "Corrupt EXIF data": the tag is read or not
            orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # a broken EXIF block: the pixels are still the image
        return im
    return ImageOps.exif_transpose(im) if orientation in range(2, 9) else im


def release_memory() -> None:
    """Give the memory freed since a large image was decoded back to the operating system; a server calls it after
    each request. glibc keeps freed heap in its per-thread arenas: a burst of 49-megapixel requests on 16 threads left
    a served model holding 2.8 GB for good (0.7 GB after this). Nothing happens after small images only, or without
    glibc (macOS, Windows, musl)."""
    if not getattr(_decoded, "large", False):  # this thread's request: the last to finish trims what all freed
        return
    _decoded.large = False
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def to_8bit(im):
    """``im`` with 8 bits a channel: 16-bit and 32-bit grayscale scaled to 0-255, other modes unchanged.

    PIL's ``convert("L")`` clips ``I;16``/``I``/``F`` values to 255. Here a 16-bit image ("I;16", "I;16B",
    "I;16L", "I;16N") is divided by 257 (0-65535 onto 0-255 exactly); a 32-bit integer image ("I", PIL's mode
    for 16-bit PNGs too) the same when its values lie in 0-65535, else stretched from its min to its max; a
    float image ("F") times 255 when it lies in 0-1, else stretched likewise.
    """
    from PIL import Image

    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if im.mode.startswith("I;16") or (im.mode == "I" and lo >= 0 and hi <= 65535):
        a = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    else:  # a range of its own: stretch it (a constant image is black)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
