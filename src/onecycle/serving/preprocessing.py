"""A model's eval transforms without albumentations: what predict, demo and the served model run.

Serving needs only resize, crop and normalize, so the eval transforms the pipeline uses (the dataset's
standard eval recipe, and ``augment.eval`` lists made of ``Resize``, ``SmallestMaxSize``, ``LongestMaxSize``
and ``CenterCrop`` with their default interpolation) run here with NumPy alone: the serving
environment needs neither albumentations nor OpenCV (~190 MB with SciPy), nor torch. They compute what
albumentations computes: the same output sizes and crop boxes, bilinear resizing as OpenCV's ``INTER_LINEAR`` (up to one
grey level: OpenCV rounds in fixed point), the same normalization.

Any other eval transform goes through albumentations (:func:`needs_albumentations` says when; the served
model then lists it in its requirements).
"""

from __future__ import annotations

from typing import Any

import numpy as np

INTER_LINEAR = 1  # cv2.INTER_LINEAR, albumentations' default interpolation
# transform name -> the arguments the lean version takes (with albumentations' defaults where it has one)
_SUPPORTED: dict[str, dict[str, Any]] = {
    "Resize": {"height": None, "width": None, "interpolation": INTER_LINEAR, "p": 1},
    "SmallestMaxSize": {"max_size": None, "interpolation": INTER_LINEAR, "p": 1},
    "LongestMaxSize": {"max_size": None, "interpolation": INTER_LINEAR, "p": 1},
    "CenterCrop": {"height": None, "width": None, "p": 1},
}


def _split(item: dict[str, Any] | str) -> tuple[str, dict[str, Any]]:
    if isinstance(item, str):
        return item, {}
    (name, args), = item.items()
    return str(name), dict(args or {})


def _lean(item: dict[str, Any] | str) -> tuple[str, dict[str, Any]] | None:
    """``(name, args)`` when this module runs the transform as albumentations would, else None."""
    name, args = _split(item)
    allowed = _SUPPORTED.get(name)
    if allowed is None or set(args) - set(allowed):
        return None
    full = {**allowed, **args}
    if any(v is None for v in full.values()) or full["p"] != 1 or full.get("interpolation", INTER_LINEAR) != INTER_LINEAR:
        return None
    if not all(isinstance(full[k], int) and not isinstance(full[k], bool) and full[k] > 0
               for k in full if k in ("height", "width", "max_size")):
        return None  # e.g. a list of max sizes (a random choice): albumentations' own
    return name, full


def needs_albumentations(spec: list) -> bool:
    """Whether an eval spec lists a transform this module does not run."""
    return any(_lean(item) is None for item in spec)


def _taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bilinear source indices and weights along one axis: half-pixel centres, edges clamped (OpenCV's)."""
    src = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.intp), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """HWC uint8 -> bilinear (OpenCV INTER_LINEAR: half-pixel centres, no antialiasing), rounded to uint8.

    Rows first, gathered from the uint8 image, so a large image is never converted to floats whole.
    """
    if image.shape[:2] == (height, width):
        return image
    top, bottom, wy = _taps(image.shape[0], height)
    rows = image[top].astype(np.float32) * (1 - wy)[:, None, None] + image[bottom].astype(np.float32) * wy[:, None, None]
    left, right, wx = _taps(image.shape[1], width)
    out = rows[:, left] * (1 - wx)[None, :, None] + rows[:, right] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _apply_one(name: str, args: dict[str, Any], image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    if name == "Resize":
        return _resize(image, args["height"], args["width"])
    if name in ("SmallestMaxSize", "LongestMaxSize"):
        scale = args["max_size"] / (min(h, w) if name == "SmallestMaxSize" else max(h, w))
        return _resize(image, max(1, round(h * scale)), max(1, round(w * scale)))
    ch, cw = args["height"], args["width"]  # CenterCrop
    if ch > h or cw > w:
        raise ValueError(f"CenterCrop {ch}x{cw} is larger than the {h}x{w} image")
    y, x = (h - ch) // 2, (w - cw) // 2
    return image[y:y + ch, x:x + cw]


class EvalTransform:
    """Called as an albumentations pipeline is (``t(image=hwc_uint8)["image"]``): HWC float32, normalized."""

    def __init__(self, spec: list, mean: list[float], std: list[float]):
        self.steps = [_lean(item) for item in spec]
        if any(step is None for step in self.steps):
            raise ValueError("needs albumentations")  # callers check needs_albumentations() first
        self.mean = np.asarray(mean, dtype=np.float32) * 255.0
        self.denominator = np.reciprocal(np.asarray(std, dtype=np.float32) * 255.0)

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        for name, args in self.steps:
            image = _apply_one(name, args, image)
        out = (image.astype(np.float32) - self.mean) * self.denominator
        return {"image": out}
