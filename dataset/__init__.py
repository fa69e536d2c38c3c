"""Data sets as whole uint8 tensors, and the on-device loader that batches and augments them.

``load_dataset(name, data_folder)`` returns an :class:`ImageDataset` of CPU tensors; move it
with ``.to(device)`` and wrap each split in a :class:`~dataset.loader.DeviceLoader`.
"""
from __future__ import annotations

from typing import Callable

from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.cifar100 import CIFAR100_MD5, CIFAR100_URL, load_cifar100
from dataset.digits import load_digits32
from dataset.loader import DeviceLoader, augment, draw_augmentation, normalize
from errors import UserError

_LOADERS: dict[str, Callable[[str, bool], ImageDataset]] = {
    "cifar100": lambda data_folder, download: load_cifar100(data_folder, download),
    "digits": lambda data_folder, download: load_digits32(),
}
DATASETS = tuple(_LOADERS)


def load_dataset(name: str, data_folder: str, download: bool = True) -> ImageDataset:
    """Loads a registered data set as CPU tensors.

    Args:
        name: one of :data:`DATASETS` (``'cifar100'``, ``'digits'``).
        data_folder: where archives live (ignored by ``'digits'``, which ships with
            scikit-learn).
        download: whether a missing archive may be downloaded.

    Raises:
        UserError: unknown name, or the data cannot be obtained.
    """
    if name not in _LOADERS:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _LOADERS[name](data_folder, download)


__all__ = [
    "CIFAR100_MD5", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR100_URL", "DATASETS",
    "DeviceLoader", "ImageDataset", "augment", "draw_augmentation", "load_cifar100",
    "load_dataset", "load_digits32", "normalize",
]
