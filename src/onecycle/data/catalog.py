"""The datasets onecycle knows, one record each: how a dataset is stored and fetched, its standard
augmentation recipes, and the batched form of its training recipe.

This is the only place that knows a dataset by name: config validates ``data.dataset`` against
:data:`DATASETS`, fetch calls the record's fetcher, the loaders and transforms ask the record for its
storage and recipes. Adding a dataset is a record here plus its fetcher in :mod:`onecycle.data.fetchers`.
Importing this module imports nothing beyond the standard library (params load without numpy or torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Spec = list[dict[str, Any] | str]


@dataclass(frozen=True)
class PadCropFlip:
    """The standard small-image training recipe: pad, random crop back to size, horizontal flip, and an
    optional square cutout. Runs as whole-batch torch ops (:class:`onecycle.data.transforms.BatchAugment`)
    or, spelled as albumentations transforms (:meth:`spec`), image by image."""

    pad: int  # pixels on each side
    reflect: bool  # reflect-101 padding (albumentations' border_mode 4); False = zeros
    hole: int = 0  # side of the one cutout hole in pixels; 0 = none

    def spec(self, image_size: int) -> Spec:
        border = {"border_mode": 4} if self.reflect else {"border_mode": 0, "fill": 0}
        size = image_size + 2 * self.pad
        spec: Spec = [
            {"PadIfNeeded": {"min_height": size, "min_width": size, **border}},
            {"RandomCrop": {"height": image_size, "width": image_size}},
            {"HorizontalFlip": {"p": 0.5}},
        ]
        if self.hole:
            hole = [self.hole, self.hole]
            spec.append({"CoarseDropout": {"num_holes_range": [1, 1], "hole_height_range": hole,
                                           "hole_width_range": hole, "p": 1.0}})
        return spec


@dataclass(frozen=True)
class DatasetKind:
    """What the pipeline needs to know about one dataset."""

    name: str
    fetcher: str  # the function of onecycle.data.fetchers that writes data/<name>/ (imported when fetch runs)
    # True: indexed in place from data.source (train/<class>/*, val/<class>/*), images decoded as they are read;
    # False: uint8 arrays written by fetch, held in memory.
    image_folder: bool = False
    # The standard training augmentation in its batched form; None = only the per-image ``train_recipe``.
    batch_recipe: PadCropFlip | None = None
    train_recipe: tuple = ()  # the standard per-image training recipe when there is no batch_recipe
    eval_recipe: tuple = ()  # the standard (deterministic) eval preprocessing

    def train_spec(self, image_size: int) -> Spec:
        """The standard training augmentation, as albumentations transforms."""
        if self.image_folder and image_size < IMAGENET_SIDE:
            return _small_images_train(image_size)
        return self.batch_recipe.spec(image_size) if self.batch_recipe else list(self.train_recipe)

    def eval_spec(self, image_size: int | None = None) -> Spec:
        """The standard (deterministic) eval preprocessing; an image folder's depends on its ``image_size``
        (the side fetch measured: ImageNet's resize-and-crop for 224 and up, when None too)."""
        if self.image_folder and image_size is not None and image_size < IMAGENET_SIDE:
            return [{"Resize": {"height": image_size, "width": image_size}}]
        return list(self.eval_recipe)

    def fetch_function(self) -> Callable:
        return getattr(importlib.import_module("onecycle.data.fetchers"), self.fetcher)


_IMAGENET_EVAL = ({"SmallestMaxSize": {"max_size": 256}}, {"CenterCrop": {"height": 224, "width": 224}})
# An image folder whose images are smaller than this (fetch measures their side) trains at their own size, with
# the small-image recipe (:func:`_small_images_train`); from this side up, ImageNet's recipes at 224 x 224.
IMAGENET_SIDE = 224


def _small_images_train(side: int) -> Spec:
    """An image folder of small images: each resized to ``side`` x ``side`` (fetch's measure), then the standard
    small-image recipe (reflect-pad by an eighth of the side, random crop back, flip)."""
    return [{"Resize": {"height": side, "width": side}},
            *PadCropFlip(pad=max(1, side // 8), reflect=True).spec(side)]

KINDS = {kind.name: kind for kind in (
    # Debian's dataset-fashion-mnist or the official mirror; 28x28x1. Pad 2 with zeros, crop 28, flip.
    DatasetKind("fashion_mnist", "fetch_fashion_mnist", batch_recipe=PadCropFlip(pad=2, reflect=False)),
    # The official archives; 32x32x3. The DAWNBench ResNet9 recipe: reflect-pad 4, crop 32, flip, one 8x8 cutout.
    DatasetKind("cifar10", "fetch_cifar", batch_recipe=PadCropFlip(pad=4, reflect=True, hole=8)),
    DatasetKind("cifar100", "fetch_cifar", batch_recipe=PadCropFlip(pad=4, reflect=True, hole=8)),
    # A user's folder in the ImageNet layout: torchvision's ImageNet recipes at 224x224 for ImageNet-sized images,
    # the images' own size and the small-image recipe below that (IMAGENET_SIDE).
    DatasetKind("imagefolder", "fetch_imagefolder", image_folder=True,
                train_recipe=({"RandomResizedCrop": {"size": [224, 224]}}, {"HorizontalFlip": {"p": 0.5}}),
                eval_recipe=_IMAGENET_EVAL),
)}
DATASETS = tuple(KINDS)  # the values data.dataset takes


def kind(name: str) -> DatasetKind:
    """The record of dataset ``name`` (a value config has already validated)."""
    return KINDS[name]
