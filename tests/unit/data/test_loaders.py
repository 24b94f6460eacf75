"""Loaders: persistent DataLoader workers see every epoch's seed, so workers change nothing but speed."""

from __future__ import annotations

import pytest
import torch

from onecycle.config import parse_params
from onecycle.data.loaders import build_split, make_loader, set_epoch, skip_batches
from onecycle.data.store import load_info
from tiny import write_fetched

# the standard recipe (batched fast path) and a listed albumentations pipeline (per image)
PIPELINES = {"batched": [], "albumentations": [{"PadIfNeeded": {"min_height": 32, "min_width": 32}},
                                                {"RandomCrop": {"height": 28, "width": 28}}, "HorizontalFlip"]}


def _loader(tmp_path, pipeline: str, workers: int):
    root = tmp_path / "data"
    if not root.exists():
        write_fetched(root, n_train=300, n_test=50)
    params = parse_params({"data": {"root": str(root), "val_size": 44, "batch_size": 64},
                           "augment": {"train": PIPELINES[pipeline]}})
    ds = build_split(params.data, params.augment, load_info(params.data), "train", train_augment=True,
                     seed=params.train.seed)
    assert (ds.batch_transform is not None) is (pipeline == "batched")
    return make_loader(ds, 64, shuffle=True, seed=3, num_workers=workers)


def _epoch(loader, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    set_epoch(loader, epoch)
    skip_batches(loader, skip)
    try:
        return list(loader)
    finally:
        skip_batches(loader, 0)


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True))


@pytest.mark.parametrize("pipeline", sorted(PIPELINES))
def test_persistent_workers_load_exactly_what_the_main_process_loads_epoch_by_epoch(tmp_path, pipeline):
    main = _loader(tmp_path, pipeline, workers=0)
    pooled = _loader(tmp_path, pipeline, workers=2)
    assert pooled.persistent_workers and not main.persistent_workers
    expected = [_epoch(main, e) for e in range(3)]
    assert not _same(expected[1], expected[2])  # epochs really differ (order and augmentation)

    got = [_epoch(pooled, 0)]
    workers = [w.pid for w in pooled._iterator._workers]
    # epoch 1 broken off after two batches (an interrupted epoch); the workers must drop what they prefetched
    set_epoch(pooled, 1)
    for i, _ in enumerate(pooled):
        if i == 1:
            break
    got += [_epoch(pooled, 1), _epoch(pooled, 2)]
    assert [w.pid for w in pooled._iterator._workers] == workers  # the same worker processes all along
    for e in range(3):
        assert _same(got[e], expected[e]), f"epoch {e} differs with persistent workers"


def test_a_resumed_epoch_skips_its_first_batches_with_workers(tmp_path):
    whole = _epoch(_loader(tmp_path, "batched", workers=0), 2)
    pooled = _loader(tmp_path, "batched", workers=2)
    _epoch(pooled, 0)
    resumed = _epoch(pooled, 2, skip=2)
    assert len(pooled) == len(whole)  # the skip lasts one epoch
    assert _same(resumed, whole[2:])
