"""The in-memory image data set that every loader returns."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch

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
