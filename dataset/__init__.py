"""Data sets and their loaders, behind one registry.

``load_dataset(name, data_folder)`` returns either an :class:`ImageDataset` (CIFAR-100,
digits: whole uint8 tensors on the CPU; move it with ``.to(device)``) or an
:class:`~dataset.imagenet_loader.ImageFolderData` (ImageNet: file lists and labels, pixels
streamed from disk). Both answer ``name``, ``num_classes``, ``image_size``, ``train_labels``
and ``loaders(batch_size, eval_batch_size, seed, rank, world_size, device, memory_format,
workers, decode)``, which returns this rank's training and test loaders; both loaders yield
``(images [B, 3, S, S] float32, labels [B] int64, index [B] int64)`` on the device.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.cifar100 import CIFAR100_MD5, CIFAR100_URL, load_cifar100
from dataset.digits import load_digits32
from dataset.augment_recipe import DEIT, TrainAugment
from dataset.imagenet_loader import DECODE_MODES, ImageFolderData, load_imagenet
from dataset.imagenet_transforms import INTERPOLATIONS
from dataset.loader import DeviceLoader, augment, draw_augmentation, normalize
from errors import UserError

Data = Union[ImageDataset, ImageFolderData]
"""What :func:`load_dataset` returns: in memory, or streamed from an image folder."""


class _Entry(NamedTuple):
    load: Callable[[str, bool], Data]  # (data_folder, download) -> the data set
    help: str  # one phrase for --help


_REGISTRY: dict[str, _Entry] = {
    "cifar100": _Entry(lambda folder, download: load_cifar100(folder, download),
                       "CIFAR-100, downloaded into --data_folder"),
    "digits": _Entry(lambda folder, download: load_digits32(),
                     "scikit-learn's digits at 32x32, bundled (offline)"),
    "imagenet": _Entry(lambda folder, download: load_imagenet(folder),
                       "ILSVRC-2012 folder --data_folder with train/<wnid>/ and val/<wnid>/, "
                       "streamed from disk"),
}
DATASETS = tuple(_REGISTRY)


def dataset_help() -> str:
    """``name (what it is); ...`` for every registered data set (the ``--dataset`` help)."""
    return "; ".join(f"{name} ({entry.help})" for name, entry in _REGISTRY.items())


def load_dataset(name: str, data_folder: str, download: bool = True) -> Data:
    """Loads a registered data set: CPU tensors, or the scanned file lists of an image folder.

    Args:
        name: one of :data:`DATASETS` (``'cifar100'``, ``'digits'``, ``'imagenet'``).
        data_folder: where the archive (CIFAR-100) or the image folder (ImageNet) lives
            (ignored by ``'digits'``, which ships with scikit-learn).
        download: whether a missing archive may be downloaded (ImageNet is never downloaded).

    Raises:
        UserError: unknown name, or the data cannot be obtained (missing archive, a folder
            without the expected layout).
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _REGISTRY[name].load(data_folder, download)


__all__ = [
    "CIFAR100_MD5", "CIFAR100_MEAN", "CIFAR100_STD", "CIFAR100_URL", "DATASETS", "DECODE_MODES",
    "Data", "DeviceLoader", "ImageDataset", "ImageFolderData", "augment", "dataset_help",
    "draw_augmentation", "load_cifar100", "load_dataset", "load_digits32", "load_imagenet",
    "normalize", "DEIT", "INTERPOLATIONS", "TrainAugment",
]
