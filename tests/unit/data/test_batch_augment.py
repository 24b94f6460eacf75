"""The batched standard recipe: the same crops, flips and holes as the albumentations pipeline, per batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onecycle.config import AugmentConfig
from onecycle.data import catalog
from onecycle.data.transforms import BatchAugment, apply, batch_pipeline, build_eval_transforms


def _images(n, size, channels, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def _undo(x, mean, std):
    """Back to pixel values (H x W x C float) from a normalized C x H x W tensor."""
    return (x.numpy().transpose(1, 2, 0) * np.asarray(std) * 255 + np.asarray(mean) * 255)


def _windows(padded, size):
    """Every size x size window of a padded image, and its mirror image."""
    n = padded.shape[0] - size + 1
    for oy in range(n):
        for ox in range(n):
            w = padded[oy:oy + size, ox:ox + size]
            yield w
            yield w[:, ::-1]


def test_eval_path_equals_albumentations_normalize():
    mean, std = [0.286], [0.353]
    imgs = _images(16, 28, 1)
    fast = BatchAugment(catalog.kind("fashion_mnist").batch_recipe, mean, std, train=False)(imgs, torch.Generator().manual_seed(0))
    slow = build_eval_transforms(AugmentConfig(), "fashion_mnist", mean, std)
    for i in range(16):
        np.testing.assert_allclose(fast[i].numpy(), apply(slow, imgs[i]), atol=1e-5)


def test_fashion_crops_are_windows_of_the_zero_padded_image_maybe_flipped():
    mean, std = [0.5], [0.25]
    imgs = _images(32, 28, 1)
    out = BatchAugment(catalog.kind("fashion_mnist").batch_recipe, mean, std, train=True)(imgs, torch.Generator().manual_seed(1))
    assert out.shape == (32, 1, 28, 28) and out.dtype == torch.float32
    for i in range(32):
        got = np.rint(_undo(out[i], mean, std))
        padded = np.pad(imgs[i].astype(float), ((2, 2), (2, 2), (0, 0)))
        assert any(np.array_equal(got, w) for w in _windows(padded, 28)), i


def test_cifar_has_reflect_padding_and_exactly_one_8x8_hole_inside_the_image():
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    imgs = np.full((64, 32, 32, 3), 200, dtype=np.uint8)  # constant: crops and flips keep it, the hole does not
    out = BatchAugment(catalog.kind("cifar10").batch_recipe, mean, std, train=True)(imgs, torch.Generator().manual_seed(2))
    assert out.shape == (64, 3, 32, 32)
    for i in range(64):
        pix = np.rint(_undo(out[i], mean, std))
        zero = (pix == 0).all(axis=2)
        assert zero.sum() == 64  # one 8 x 8 hole, fully inside
        ys, xs = np.nonzero(zero)
        assert ys.max() - ys.min() == 7 and xs.max() - xs.min() == 7
        assert (pix[~zero] == 200).all()  # reflect padding of a constant image adds no new values


def test_same_seed_same_batch_and_offsets_and_flips_are_uniform():
    aug = BatchAugment(catalog.kind("fashion_mnist").batch_recipe, [0.5], [0.25], train=True)
    imgs = _images(2000, 28, 1, seed=3)
    a = aug(imgs, torch.Generator().manual_seed(7))
    b = aug(imgs, torch.Generator().manual_seed(7))
    c = aug(imgs, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the same generator draws (oy, ox, flip) in this order: check their spread directly
    g = torch.Generator().manual_seed(7)
    oy = torch.randint(0, 5, (2000,), generator=g)
    torch.randint(0, 5, (2000,), generator=g)
    flips = torch.rand(2000, generator=g) < 0.5
    assert set(oy.tolist()) == {0, 1, 2, 3, 4}
    assert 0.45 < flips.float().mean().item() < 0.55


@pytest.mark.parametrize("train_spec, dataset, expect", [
    ([], "fashion_mnist", True),
    ([], "cifar10", True),
    (["HorizontalFlip"], "fashion_mnist", False),  # a listed pipeline always runs through albumentations
    ([], "imagefolder", False),
])
def test_the_fast_path_only_replaces_the_standard_recipe(train_spec, dataset, expect):
    augment = AugmentConfig(train=train_spec)
    assert (batch_pipeline(augment, dataset, [0.5], [0.25], train=True) is not None) is expect


def test_loader_yields_batches_from_the_fast_path(tmp_path):
    from onecycle.config import parse_params
    from onecycle.data.loaders import build_split, make_loader
    from onecycle.data.store import load_info
    from tiny import write_fetched

    write_fetched(tmp_path / "data", n_train=300, n_test=50)
    params = parse_params({"data": {"root": str(tmp_path / "data"), "val_size": 44, "batch_size": 64}})
    info = load_info(params.data)
    ds = build_split(params.data, params.augment, info, "train", train_augment=True, seed=params.train.seed)
    assert ds.batch_transform is not None
    loader = make_loader(ds, 64, shuffle=True, seed=0, num_workers=0)
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [64, 64, 64, 64]  # 256 images
    x, y = batches[0]
    assert x.shape == (64, 1, 28, 28) and y.dtype == torch.int64
