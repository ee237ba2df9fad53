"""Loader-like iterators over tensors already in the trial's memory: no worker processes.

:class:`TensorLoader` batches uint8 images (the decoded cache) on the trial's device, CPU or GPU,
augmenting and normalizing there (:mod:`covid_tune.data.augment`). :class:`FeatureLoader` batches
precomputed features (the feature cache). Both shuffle with a generator seeded by
``(seed, epoch)``, so an epoch's order does not depend on what ran before it: a resumed trial
sees the same batches as an uninterrupted one, and the image and feature paths of one seed see
the same order. Set the epoch with ``set_epoch`` before iterating.

:func:`make_loader` is the other pipeline: PIL decode + torchvision transforms in a ``DataLoader``
(the course's way). :func:`data_source` is a trial's data step: its train/validation loaders from
the decoded cache when it has one, from the image files otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from covid_tune.data import dataset as data_mod
from covid_tune.data.augment import COURSE, AugmentSettings, augment_settings, make_batch
from covid_tune.data.cache import DecodedSplits
from covid_tune.engine.hparams import HParams

SHUFFLE_STREAM, AUGMENT_STREAM = 0, 1


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """A CPU generator for one (seed, epoch, purpose): independent streams, reproducible anywhere."""
    state = np.random.SeedSequence([seed % 2**32, epoch, stream]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A tensor view of ``array`` without a copy, read-only memory maps and object-store views included.

    Nothing here ever writes to it (batches are gathered copies), so torch's warning about
    non-writable arrays does not apply.
    """
    if isinstance(array, torch.Tensor):
        return array
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(array))


class _Batches:
    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int) -> None:
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch, SHUFFLE_STREAM))


class TensorLoader(_Batches):
    """(images, targets) batches from uint8 ``(N, C, S, S)`` images held on ``device``.

    The images are moved to ``device`` once (on CPU a read-only array is used in place); each batch
    is gathered, augmented or centre-cropped, and normalized there.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, image_size: int,
                 batch_size: int, shuffle: bool = False, augment: bool = False, seed: int = 0,
                 device: torch.device | str = "cpu", channels_last: bool = False,
                 settings: AugmentSettings = COURSE) -> None:
        super().__init__(len(images), batch_size, shuffle, seed)
        self.device = torch.device(device)
        self.images = as_tensor(images).to(self.device)
        # as_tensor, not np.asarray: targets may already be a tensor on the GPU (the feature cache
        # re-reads a loader's own split)
        self.targets = torch.as_tensor(targets).to(self.device)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, S, S) images, got {tuple(self.images.shape)} {self.images.dtype}")
        if len(self.targets) != self.n:
            raise ValueError(f"{self.n} images but {len(self.targets)} targets")
        self.image_size, self.augment, self.channels_last, self.settings = image_size, augment, channels_last, settings

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = epoch_generator(self.seed, self.epoch, AUGMENT_STREAM) if self.augment else None
        for idx in self._order().split(self.batch_size):
            idx = idx.to(self.device)
            batch = make_batch(self.images.index_select(0, idx), self.image_size, self.augment, generator,
                               self.settings, self.channels_last)
            yield batch, self.targets.index_select(0, idx)


class FeatureLoader(_Batches):
    """(features, targets) batches from precomputed ``(N, ...)`` features, same order rule as TensorLoader."""

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, batch_size: int, shuffle: bool = False,
                 seed: int = 0) -> None:
        super().__init__(len(features), batch_size, shuffle, seed)
        self.features, self.targets = features, targets

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self._order().split(self.batch_size):
            idx = idx.to(self.features.device)
            yield self.features.index_select(0, idx), self.targets.index_select(0, idx)


def make_loader(index: data_mod.DatasetIndex, split: str, image_size: int, batch_size: int, label_mode: str,
                implies: dict, grayscale: bool = True, train: bool = False, augment: bool | str | dict = True,
                num_workers: int = 0, seed: int = 0) -> DataLoader:
    """A DataLoader over one split: shuffled and augmented for training, fixed order otherwise."""
    targets = data_mod.index_targets(index, split, label_mode, implies)
    transform = data_mod.train_transform(image_size, augment) if train else data_mod.eval_transform(image_size)
    dataset = data_mod.ImageDataset(index.paths(split), targets, transform, grayscale)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator, num_workers=num_workers,
                      persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())


def set_loader_epoch(loader, seed: int, epoch: int) -> None:
    """Make ``loader``'s order (and augmentation) for ``epoch`` depend on ``(seed, epoch)`` only."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif isinstance(loader, DataLoader) and loader.generator is not None:
        # the PIL path: reseed the shuffle per epoch too, so a resumed trial sees the same order
        loader.generator.set_state(epoch_generator(seed, epoch, SHUFFLE_STREAM).get_state())


@dataclass(frozen=True)
class DataSource:
    """A trial's train and validation loaders, from the decoded cache (``decoded``) or the image files."""

    train: TensorLoader | DataLoader
    validation: TensorLoader | DataLoader
    decoded: bool
    index: data_mod.DatasetIndex
    hp: HParams
    device: torch.device
    channels_last: bool = False
    cache_keys: tuple = ()  # the decoded cache's content keys of train and validation, if it is the source

    def identity(self) -> list:
        """What this source's un-augmented batches depend on (a feature cache's key): the split files, the
        decoded cache's keys, the crop, grayscale, the targets' encoding (label mode, implied labels)."""
        hp = self.hp
        return [self.index.paths("train"), self.index.paths("validation"), self.decoded, list(self.cache_keys),
                hp.image_size, hp.grayscale, hp.label_mode,
                sorted((k, sorted(v)) for k, v in (hp.implies or {}).items())]

    def train_in_order(self) -> TensorLoader | DataLoader:
        """The train split in a fixed order without augmentation (the evaluation crop), for the feature cache."""
        hp = self.hp
        if not self.decoded:
            return make_loader(self.index, "train", hp.image_size, hp.batch_size, hp.label_mode, hp.implies,
                               grayscale=hp.grayscale, num_workers=hp.num_workers)
        # the train split already on the device (no second copy)
        return TensorLoader(self.train.images, self.train.targets, hp.image_size, hp.batch_size,
                            device=self.device, channels_last=self.channels_last)


def data_source(hp: HParams, index: data_mod.DatasetIndex, device: torch.device,
                decoded: DecodedSplits | None = None, channels_last: bool = False) -> DataSource:
    """``hp``'s train (shuffled, augmented as ``hp.augment`` says) and validation loaders over ``index``:
    device-resident :class:`TensorLoader` s over ``decoded`` (checked against ``index`` first), else
    PIL :func:`make_loader` s."""
    if decoded is None:
        common = dict(image_size=hp.image_size, batch_size=hp.batch_size, label_mode=hp.label_mode,
                      implies=hp.implies, grayscale=hp.grayscale, num_workers=hp.num_workers, seed=hp.seed)
        train = make_loader(index, "train", train=True, augment=hp.augment, **common)
        return DataSource(train, make_loader(index, "validation", **common), False, index, hp, device)
    decoded.check(index, hp.image_size, hp.grayscale)
    settings = augment_settings(hp.augment)

    def tensors(split: str, train: bool) -> TensorLoader:
        targets = data_mod.index_targets(index, split, hp.label_mode, hp.implies)
        return TensorLoader(decoded[split], targets, hp.image_size, hp.batch_size, shuffle=train,
                            augment=train and settings is not None, seed=hp.seed, device=device,
                            channels_last=channels_last, settings=settings or COURSE)

    keys = tuple(decoded.keys.get(split) for split in ("train", "validation"))
    return DataSource(tensors("train", True), tensors("validation", False), True, index, hp, device, channels_last,
                      keys)
