"""Augmentations: the default recipes' shapes and values, determinism of eval, seeding, and spec errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from onecycle.config import AugmentConfig
from onecycle.data import catalog
from onecycle.data.transforms import (
    apply,
    build_eval_transforms,
    build_train_transforms,
    check_spec,
)

RNG = np.random.default_rng(0)
GRAY = RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
RGB32 = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
PHOTO = RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)
FASHION = ("fashion_mnist", 28, [0.286], [0.353])
CIFAR = ("cifar10", 32, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])


def train_tf(dataset, size, mean, std, spec=None):
    return build_train_transforms(AugmentConfig(train=spec or []), dataset, size, mean, std)


def eval_tf(dataset, mean, std, spec=None):
    return build_eval_transforms(AugmentConfig(eval=spec or []), dataset, mean, std)


@pytest.mark.parametrize(("image", "dataset", "size", "mean", "std", "shape"), [
    pytest.param(GRAY, *FASHION, (1, 28, 28), id="fashion_mnist"),
    pytest.param(RGB32, *CIFAR, (3, 32, 32), id="cifar10"),
    pytest.param(PHOTO, "imagefolder", 224, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], (3, 224, 224),
                 id="imagefolder"),
])
def test_default_pipelines_give_chw_float32(image, dataset, size, mean, std, shape):
    for tf in (train_tf(dataset, size, mean, std), eval_tf(dataset, mean, std)):
        out = apply(tf, image)
        assert out.shape == shape and out.dtype == np.float32 and out.flags["C_CONTIGUOUS"]
        assert np.isfinite(out).all()


def test_small_image_eval_is_exactly_normalization():
    mean, std = [0.2], [0.5]
    out = apply(eval_tf("fashion_mnist", mean, std), GRAY)
    assert np.allclose(out[0], (GRAY[..., 0] / 255.0 - 0.2) / 0.5, atol=1e-6)
    out = apply(eval_tf("cifar10", CIFAR[2], CIFAR[3]), RGB32)
    expected = (RGB32 / 255.0 - np.array(CIFAR[2])) / np.array(CIFAR[3])
    assert np.allclose(out, expected.transpose(2, 0, 1), atol=1e-5)


def test_imagefolder_eval_resizes_the_short_side_to_256_and_center_crops():
    # A 300 x 400 image becomes 256 x 341; the 224 center crop starts at row 16, column 58.
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255  # left half black, right half white
    out = apply(eval_tf("imagefolder", [0, 0, 0], [1, 1, 1]), img)
    assert out.shape == (3, 224, 224)
    assert out[:, :, :100].max() == 0 and out[:, :, 130:].min() == 1.0  # the edge stays near column 112


@pytest.mark.parametrize(("image", "dataset", "mean", "std"), [
    (GRAY, "fashion_mnist", [0.286], [0.353]),
    (RGB32, "cifar10", [0.5] * 3, [0.25] * 3),
    (PHOTO, "imagefolder", [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
])
def test_eval_pipeline_is_deterministic(image, dataset, mean, std):
    tf = eval_tf(dataset, mean, std)
    first = apply(tf, image)
    tf.set_random_seed(123)
    assert np.array_equal(first, apply(tf, image))
    assert np.array_equal(first, apply(eval_tf(dataset, mean, std), image))


def test_cifar_default_cuts_out_exactly_one_8x8_hole():
    # mean 0, std 1: the output is the pixel / 255, so the hole's zeros are visible as zeros.
    tf = train_tf("cifar10", 32, [0, 0, 0], [1, 1, 1])
    white = np.full((32, 32, 3), 255, np.uint8)  # padding (reflect) and cropping keep it all white
    corners = set()
    for seed in range(8):
        tf.set_random_seed(seed)
        out = apply(tf, white)
        zero = (out == 0).all(0)
        assert zero.sum() == 64 and ((out == 0) | (out == 1)).all() and (out == 0).sum() == 3 * 64
        rows, cols = np.nonzero(zero)
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7  # one square, all channels
        corners.add((rows.min(), cols.min()))
    assert len(corners) > 1  # the hole moves


def test_fashion_default_pads_with_zeros_and_crops_back():
    tf = train_tf("fashion_mnist", 28, [0], [1])
    white = np.full((28, 28, 1), 255, np.uint8)
    shifts = set()
    for seed in range(20):
        tf.set_random_seed(seed)
        out = apply(tf, white)[0]
        assert out.shape == (28, 28) and set(np.unique(out)) <= {0.0, 1.0}
        ones = np.nonzero(out == 1)
        # The white image moved by at most 2 pixels each way: a 26..28 square of ones, zeros only at the edges.
        assert 26 <= np.ptp(ones[0]) + 1 <= 28 and 26 <= np.ptp(ones[1]) + 1 <= 28
        assert (out == 1).sum() >= 26 * 26
        shifts.add((ones[0].min(), ones[1].min(), ones[0].max(), ones[1].max()))
    assert len(shifts) > 1


def test_set_random_seed_makes_training_augmentation_reproducible():
    batch = np.random.default_rng(1).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)

    def run(seed):
        tf = train_tf(*CIFAR)
        tf.set_random_seed(seed)
        return np.stack([apply(tf, img) for img in batch])

    a, b, c = run(7), run(7), run(8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_user_spec_replaces_the_default():
    tf = train_tf("cifar10", 32, [0, 0, 0], [1, 1, 1], spec=[{"Resize": {"height": 16, "width": 16}}])
    assert apply(tf, RGB32).shape == (3, 16, 16)
    names = [type(t).__name__ for t in tf.transforms]
    assert names == ["Resize", "Normalize"]


def test_default_specs_are_valid_and_only_train_is_random():
    for dataset, size in (("fashion_mnist", 28), ("cifar10", 32), ("cifar100", 32), ("imagefolder", 224)):
        kind = catalog.kind(dataset)
        check_spec(kind.train_spec(size), "augment.train")
        check_spec(kind.eval_spec(), "augment.eval", deterministic=True)
        with pytest.raises(ValueError, match=r"augment.eval\[\d\] \w+ is random"):
            check_spec(kind.train_spec(size), "augment.eval", deterministic=True)


def _name(item) -> str:
    return item if isinstance(item, str) else next(iter(item))


RANDOM_EVEN_WITH_P1 = [
    "HorizontalFlip", {"RandomCrop": {"height": 8, "width": 8}}, {"HorizontalFlip": {"p": 1.0}},
    # p=1 and no "Random" in the name, yet they draw angles, kernels, offsets or scales at random:
    {"Rotate": {"limit": 15, "p": 1.0}}, {"GaussianBlur": {"p": 1.0}}, {"Sharpen": {"p": 1.0}},
    {"Perspective": {"p": 1.0}}, {"ColorJitter": {"p": 1.0}}, {"Downscale": {"scale_range": [0.3, 0.9], "p": 1.0}},
]


@pytest.mark.parametrize("item", RANDOM_EVEN_WITH_P1, ids=[_name(i) for i in RANDOM_EVEN_WITH_P1])
def test_random_transforms_are_refused_in_eval(item):
    with pytest.raises(ValueError, match=r"^augment.eval\[1\] \w+ is random; the eval pipeline must be deterministic$"):
        check_spec([{"ToGray": {"p": 1.0}}, item], "augment.eval", deterministic=True)


DETERMINISTIC = [
    {"Resize": {"height": 40, "width": 40}}, {"CenterCrop": {"height": 24, "width": 24}},
    {"PadIfNeeded": {"min_height": 40, "min_width": 40, "border_mode": 0}}, {"SmallestMaxSize": {"max_size": 64}},
    {"ToGray": {"p": 1.0}}, {"InvertImg": {"p": 1.0}}, {"Downscale": {"p": 1.0}},  # Downscale: fixed 0.25 by default
]


@pytest.mark.parametrize("item", DETERMINISTIC, ids=[_name(i) for i in DETERMINISTIC])
def test_deterministic_transforms_are_accepted_in_eval(item):
    check_spec([item], "augment.eval", deterministic=True)
    tf = eval_tf("cifar10", [0.5] * 3, [0.25] * 3, spec=[item])
    assert np.array_equal(apply(tf, RGB32), apply(tf, RGB32))


@pytest.mark.parametrize(("spec", "message"), [
    pytest.param(["HorizontalFlip", "HorizontalFlp"], r"^augment.train\[1\] unknown transform 'HorizontalFlp'; "
                                                      r"did you mean HorizontalFlip", id="typo"),
    pytest.param(["NoSuchThingAtAll"], r"^augment.train\[0\] unknown transform 'NoSuchThingAtAll'; see albumentations",
                 id="unknown"),
    pytest.param([{"RandomCrop": {"height": 8}}], r"^augment.train\[0\].RandomCrop bad arguments: width is required",
                 id="missing-arg"),
    pytest.param([{"RandomCrop": {"height": 8, "width": 8, "size": 3}}],
                 r"^augment.train\[0\].RandomCrop has no argument 'size'", id="unknown-arg"),
    pytest.param([{"RandomCrop": {"height": 0, "width": 8}}],
                 r"^augment.train\[0\].RandomCrop bad arguments: height: input should be greater than or equal to 1, "
                 r"got 0$", id="bad-value"),
    pytest.param([{"HorizontalFlip": 0.5}], r"^augment.train\[0\].HorizontalFlip arguments must be a mapping", id="args"),
    pytest.param([{"A": {}, "B": {}}], r"^augment.train\[0\] must be a transform name or a one-key mapping", id="two-keys"),
])
def test_bad_specs_raise_value_error_naming_the_item(spec, message):
    with pytest.raises(ValueError, match=message):
        check_spec(spec, "augment.train")
    # Building the pipeline (not only checking it) gives the same message.
    with pytest.raises(ValueError, match=message):
        build_train_transforms(SimpleNamespace(train=spec, eval=[]), "cifar10", 32, [0.5] * 3, [0.25] * 3)


def test_a_transform_applied_with_probability_below_one_is_random():
    with pytest.raises(ValueError, match="InvertImg is random"):
        check_spec(["InvertImg"], "augment.eval", deterministic=True)  # p defaults to 0.5
