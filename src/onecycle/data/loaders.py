"""PyTorch datasets and loaders over what ``fetch`` wrote.

Randomness is tied to the epoch and the batch, not to how many batches came before: the shuffle
order of epoch ``e`` derives from ``(seed, e)`` and the augmentation RNG of a batch from
``(seed, e, first index of the batch)``. A run resumed at epoch ``e`` therefore sees exactly the
batches an uninterrupted run would have seen, whatever the number of DataLoader workers.

The epoch travels with every batch of indices (:class:`Keys`), from the batch sampler in the main
process to the dataset in whichever process loads it, so DataLoader workers can be persistent (kept
across epochs, as forked copies of the dataset) and still augment epoch ``e`` as epoch ``e``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from onecycle.data import catalog
from onecycle.data.store import DatasetInfo, load_arrays, load_index, split_train_val
from onecycle.data.transforms import apply, batch_pipeline, build_eval_transforms, build_train_transforms

# The train/val split is fixed across seeds so that every run and trial is judged on the same examples.
SPLIT_SEED = 0


class Batch(NamedTuple):
    """A batch a dataset built whole (the batched augmentation path); collated as is."""

    images: torch.Tensor
    labels: torch.Tensor


def collate(batch):
    """Stack a batch of (image, label) pairs into two tensors."""
    if isinstance(batch, Batch):
        return batch.images, batch.labels
    return default_collate(batch)


class ArrayDataset(Dataset):
    """uint8 N x H x W x C images in memory, transformed into CHW float32 tensors.

    With ``batch_transform`` (the standard recipe, :class:`~onecycle.transforms.BatchAugment`) a whole batch
    is augmented at once; otherwise each image goes through the albumentations ``transform``.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform, seed: int = 0, batch_transform=None):
        self.images, self.labels, self.transform, self.seed = images, labels, transform, seed
        self.batch_transform = batch_transform
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the augmentation of the following batches depend on ``epoch``."""
        self.epoch = epoch

    def _seed(self, first_index: int, epoch: int | None = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        return (self.seed * 1_000_003 + epoch * 100_003 + int(first_index)) % 2**32

    def __getitems__(self, indices: list[int]):
        """One batch; the DataLoader calls this instead of __getitem__ per index. Seeds once per batch.

        ``indices`` tagged with an epoch (:class:`Keys`, from :class:`EpochBatches`) set the epoch first.
        """
        epoch = getattr(indices, "epoch", None)
        if epoch is not None:
            self.epoch = epoch
        if self.batch_transform is not None:
            g = torch.Generator().manual_seed(self._seed(indices[0]))
            return Batch(self.batch_transform(self.images[indices], g), torch.from_numpy(self.labels[indices]))
        self.transform.set_random_seed(self._seed(indices[0]))
        return [self[i] for i in indices]

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def __getitem__(self, i: int):
        if self.batch_transform is not None:
            g = torch.Generator().manual_seed(self._seed(i))
            return self.batch_transform(self.images[i:i + 1], g)[0], int(self.labels[i])
        return torch.from_numpy(apply(self.transform, self.load(i))), int(self.labels[i])


class ImageFileDataset(ArrayDataset):
    """Images read from files (an image folder), converted to RGB or grayscale as the model expects."""

    def __init__(self, root: Path, paths: list[str], labels: np.ndarray, transform, channels: int = 3, seed: int = 0):
        self.root, self.paths, self.channels = Path(root), paths, channels
        super().__init__(None, labels, transform, seed)

    def load(self, i: int) -> np.ndarray:
        """One image through the same guard as predict (size, pixel count, truncation checked before decoding).

        A bad file stops the epoch with one line naming it (an ``ImageError``); the last checkpoint stays, so
        the run resumes once the file is removed or replaced (and ``onecycle fetch`` has re-indexed the folder).
        """
        from onecycle.data.images import ImageError, open_image

        path = self.root / self.paths[i]
        try:
            return open_image(path, mode="L" if self.channels == 1 else "RGB")
        except ImageError as exc:
            raise ImageError(f"{exc}; remove or replace it, run `onecycle fetch` and train again to resume") from None


class EpochSampler(Sampler[int]):
    """Shuffles (or not) the same way for the same (seed, epoch); ``set_epoch`` as with DistributedSampler.

    ``batch_size`` is the global batch. Under DDP (``world`` > 1) each rank takes its ``batch_size/world``
    share of every global batch, so all ranks together see exactly the batches of a single process with
    the same batch size; the incomplete last global batch is dropped there (every rank must take the same
    number of steps). ``skip_batches`` resumes an interrupted epoch after that many global batches.
    """

    def __init__(self, n: int, shuffle: bool, seed: int, batch_size: int = 1, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.epoch = n, shuffle, seed, 0
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self):
        order = self._order()
        start = self.skip_batches * self.batch_size
        if self.world == 1:
            return iter(order[start:])
        share = self.batch_size // self.world
        full = self.n // self.batch_size * self.batch_size
        return iter(i for k in range(start, full, self.batch_size)
                    for i in order[k + self.rank * share: k + (self.rank + 1) * share])

    def __len__(self) -> int:
        if self.world == 1:
            return max(self.n - self.skip_batches * self.batch_size, 0)
        return (self.n // self.batch_size - self.skip_batches) * (self.batch_size // self.world)


class ShardSampler(Sampler[int]):
    """Evaluation under DDP: rank r takes examples r, r + world, ... (every example exactly once overall)."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = n, rank, world

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class Keys(list):
    """The indices of one batch, tagged with the epoch they belong to (pickled to workers with it)."""

    def __init__(self, indices, epoch: int):
        super().__init__(indices)
        self.epoch = epoch


class EpochBatches(Sampler[list[int]]):
    """Groups ``sampler``'s indices into batches of ``batch_size`` tagged with the epoch (:class:`Keys`).

    ``set_epoch`` and ``skip_batches`` reach the index sampler; the tag reaches the dataset, wherever it runs.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int):
        self.sampler, self.batch_size, self.epoch = sampler, batch_size, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    @property
    def skip_batches(self) -> int:
        return getattr(self.sampler, "skip_batches", 0)

    @skip_batches.setter
    def skip_batches(self, n: int) -> None:
        self.sampler.skip_batches = n

    def __iter__(self):
        batch = []
        for i in self.sampler:
            batch.append(i)
            if len(batch) == self.batch_size:
                yield Keys(batch, self.epoch)
                batch = []
        if batch:
            yield Keys(batch, self.epoch)

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)


def _subset(ds: ArrayDataset, idx: np.ndarray) -> ArrayDataset:
    if ds.images is not None:
        ds.images = ds.images[idx]
    else:
        ds.paths = [ds.paths[i] for i in idx]
    ds.labels = ds.labels[idx]
    return ds


def build_split(data, augment, info: DatasetInfo, split: str, *, train_augment: bool,
                seed: int) -> ArrayDataset:
    """The ``train``, ``val`` or ``test`` split as a dataset, with train or eval transforms; ``seed`` (``train.seed``)
    seeds the per-image augmentation."""
    h, w, c = info.image_shape

    def per_image_transforms():  # albumentations (a 3 s import): only when a pipeline needs it
        if train_augment:
            return build_train_transforms(augment, data.dataset, h, info.mean, info.std)
        return build_eval_transforms(augment, data.dataset, info.mean, info.std, h)

    source_split = "test" if split == "test" else "train"
    if catalog.kind(data.dataset).image_folder:
        root, paths, labels = load_index(info, source_split)
        ds: ArrayDataset = ImageFileDataset(root, paths, labels, per_image_transforms(), channels=c, seed=seed)
    else:
        images, labels = load_arrays(info, source_split)
        fast = batch_pipeline(augment, data.dataset, info.mean, info.std, train=train_augment)
        ds = ArrayDataset(images, labels, None if fast else per_image_transforms(), seed=seed,
                          batch_transform=fast)
    if split != "test":
        train_idx, val_idx = split_train_val(len(ds), data.val_size, SPLIT_SEED, data.train_subset)
        ds = _subset(ds, train_idx if split == "train" else val_idx)
    return ds


def make_loader(ds: ArrayDataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int,
                pin_memory: bool = False, rank: int = 0, world: int = 1) -> DataLoader:
    """A DataLoader whose order and augmentation depend only on (seed, epoch); call ``set_epoch`` each epoch.

    ``batch_size`` is global; under DDP each rank's loader yields its share (see :class:`EpochSampler`).
    Training loaders shuffle; evaluation loaders (``shuffle=False``) are sharded example by example.
    Workers (``num_workers`` > 0) persist across epochs and prefetch 4 batches each.
    """
    if world > 1 and not shuffle:
        sampler: Sampler = ShardSampler(len(ds), rank, world)
    else:
        sampler = EpochSampler(len(ds), shuffle, seed, batch_size, rank, world)
    extra = {"persistent_workers": True, "prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(ds, batch_sampler=EpochBatches(sampler, max(batch_size // world, 1)), num_workers=num_workers,
                      pin_memory=pin_memory, collate_fn=collate, **extra)


class DeviceLoader:
    """An array dataset held on the training device as uint8, augmented a whole batch at a time there
    (``data.on_device``): no DataLoader, no per-batch host-to-device copy.

    The batches are the DataLoader path's: the same index order (the same :class:`EpochBatches`), the same
    per-batch seeds, and on the CPU the same augmentation bit for bit. ``set_epoch``/``skip_batches`` work
    as for a DataLoader.
    """

    def __init__(self, ds: ArrayDataset, batch_sampler: EpochBatches, device: torch.device):
        if ds.batch_transform is None or ds.images is None:
            raise ValueError("DeviceLoader needs an array dataset with a batched augmentation")
        self.dataset, self.batch_sampler, self.device = ds, batch_sampler, device
        self.images = torch.from_numpy(np.ascontiguousarray(ds.images)).to(device)
        self.labels = torch.from_numpy(np.ascontiguousarray(ds.labels)).to(device)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self):
        for keys in self.batch_sampler:
            idx = torch.as_tensor(list(keys), device=self.device)
            g = torch.Generator(device=self.device).manual_seed(self.dataset._seed(keys[0], keys.epoch))
            yield self.dataset.batch_transform(self.images[idx], g), self.labels[idx]


def make_device_loader(ds: ArrayDataset, batch_size: int, *, shuffle: bool, seed: int, device: torch.device,
                       rank: int = 0, world: int = 1) -> DeviceLoader:
    """:func:`make_loader`'s batches, from ``ds`` held on ``device`` (see :class:`DeviceLoader`)."""
    if world > 1 and not shuffle:
        sampler: Sampler = ShardSampler(len(ds), rank, world)
    else:
        sampler = EpochSampler(len(ds), shuffle, seed, batch_size, rank, world)
    return DeviceLoader(ds, EpochBatches(sampler, max(batch_size // world, 1)), device)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reseed a loader's shuffle order and augmentation for ``epoch`` (the batches carry it to the dataset)."""
    loader.batch_sampler.set_epoch(epoch)


def skip_batches(loader: DataLoader, n: int) -> None:
    """Resume the loader's next epoch after ``n`` (global) batches."""
    loader.batch_sampler.skip_batches = n
