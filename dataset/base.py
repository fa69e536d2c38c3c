"""The in-memory image data set (CIFAR-100, digits): whole uint8 tensors, on-device loaders."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from dataset.loader import DeviceLoader

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)


@dataclass(frozen=True)
class ImageDataset:
    """A small image classification data set held as whole tensors.

    Attributes:
        name: registry name, e.g. ``'cifar100'``.
        train_images: ``[N, 3, H, W]`` uint8 pixels (0..255, RGB, CHW).
        train_labels: ``[N]`` int64 class indices in ``0 .. num_classes - 1``.
        test_images: ``[M, 3, H, W]`` uint8 pixels.
        test_labels: ``[M]`` int64 class indices.
        num_classes: number of classes.
        mean: per-channel mean of the training pixels on the 0..1 scale.
        std: per-channel standard deviation on the 0..1 scale.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"{split}_images must be uint8 [N, 3, H, W], got "
                                 f"{images.dtype} {tuple(images.shape)}")
            if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
                raise ValueError(f"{split}_labels must be int64 [{images.shape[0]}], got "
                                 f"{labels.dtype} {tuple(labels.shape)}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need one value per channel (3)")

    @property
    def image_size(self) -> int:
        """The side of the (square) images in pixels: 32 for CIFAR-100 and digits."""
        return int(self.train_images.shape[-1])

    def to(self, device: Union[str, torch.device]) -> "ImageDataset":
        """Returns a copy whose tensors live on ``device`` (those already there are shared)."""
        return dataclasses.replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )

    def loaders(self, batch_size: int, eval_batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1, device: Optional[Union[str, torch.device]] = None,
                memory_format: torch.memory_format = torch.contiguous_format, workers: int = 0,
                decode: str = "auto") -> tuple[DeviceLoader, DeviceLoader]:
        """This rank's training loader (shuffled, augmented) and test loader.

        The same call as ``ImageFolderData.loaders``, so a run builds its loaders one way for
        every data set. Both are sharded by rank: training as :class:`DeviceLoader` shards it
        (one permutation, padded), test as ``r, r + world_size, ...`` without padding, so the
        per-rank sums of an evaluation add up to the whole test set.

        Args:
            batch_size: training samples per batch on this rank.
            eval_batch_size: test samples per batch on this rank.
            seed: base seed, the same on every rank.
            rank, world_size: this process's shard.
            device: where the loaders run; the tensors are moved there (no copy when they
                already live there). None: where they are.
            memory_format: layout of the yielded images.
            workers, decode: accepted for the common signature and unused: there are no
                files to read or decode.
        """
        data = self if device is None else self.to(device)
        train = DeviceLoader(data.train_images, data.train_labels, batch_size, data.mean, data.std,
                             train=True, seed=seed, rank=rank, world_size=world_size,
                             memory_format=memory_format)
        test = DeviceLoader(data.test_images, data.test_labels, eval_batch_size, data.mean, data.std,
                            train=False, seed=seed, rank=rank, world_size=world_size,
                            memory_format=memory_format)
        return train, test
