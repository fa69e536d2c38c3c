"""The CIFAR data pipeline: our on-device ``DeviceLoader`` against the seed's per-sample one.

Images are synthetic uint8 CIFAR-shaped tensors (timing does not depend on pixel values).
"""
from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch

from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from helper.speed import memory_format
from scripts.bench.timing import Clock, summarize

BATCH = 64  # the recipe's batch size


def synthetic_data(n_train: int, n_test: int, classes: int = 100) -> ImageDataset:
    """CIFAR-shaped uint8 images ``[N, 3, 32, 32]`` with balanced labels (``i % classes``), CPU."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (max(n_test, 1), 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset("synthetic", train, torch.arange(n_train) % classes, test,
                        torch.arange(test.shape[0]) % classes, classes, CIFAR100_MEAN, CIFAR100_STD)


class ReferenceStyleCIFAR(torch.utils.data.Dataset):
    """The seed's training pipeline per sample, written here without torchvision: PIL image,
    RandomCrop(32, padding=4) with zero fill, RandomHorizontalFlip(), ToTensor(),
    Normalize(mean, std); random draws from torch as torchvision makes them. Falls back to
    the same steps in numpy when Pillow is missing (the row says so)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, C] as CIFAR's arrays
        self.labels = labels.cpu().tolist()
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(image [3, 32, 32] float32 normalised, label, index)``."""
        top, left = (int(v) for v in torch.randint(0, 9, (2,)))
        flip = bool(torch.rand(1) < 0.5)
        try:
            from PIL import Image
        except ImportError:
            padded = np.zeros((40, 40, 3), np.uint8)
            padded[4:36, 4:36] = self.images[index]
            pixels = padded[top:top + 32, left:left + 32][:, ::-1 if flip else 1]
        else:
            padded = Image.new("RGB", (40, 40))
            padded.paste(Image.fromarray(self.images[index]), (4, 4))
            img = padded.crop((left, top, left + 32, top + 32))
            if flip:
                img = img.transpose(getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT)
            pixels = np.array(img, copy=True)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), self.labels[index], index


def loader_row(name: str, images: int, workers: int, batches: int, samples: list[float],
               **extra: Any) -> dict[str, Any]:
    """A data-pipeline row from the seconds of each timed pass over ``images`` images."""
    med = statistics.median(samples)
    return {"pipeline": name, "images": images, "workers": workers, "s_per_pass": summarize(samples),
            "images_per_s": images / med, "ms_per_batch": 1e3 * med / max(batches, 1), **extra}


def device_loader_rows(data: ImageDataset, clock: Clock, n_images: int, repeats: int) -> list[dict[str, Any]]:
    """Images/s of our on-device loader over the first ``n_images`` images, in both layouts."""
    n = min(n_images, data.train_images.shape[0])
    images, labels = data.train_images[:n].to(clock.device), data.train_labels[:n].to(clock.device)
    rows = []
    for cl in (False, True):
        loader = DeviceLoader(images, labels, BATCH, data.mean, data.std, train=True, seed=0,
                              memory_format=memory_format(cl))

        def drain(loader: DeviceLoader = loader) -> None:
            for _ in loader:
                pass
        drain()
        samples = [clock.seconds(drain, events=False) for _ in range(repeats)]
        rows.append(loader_row("ours: DeviceLoader" + (", channels_last" if cl else ""), n, 0, len(loader), samples))
    return rows


def reference_loader_row(data: ImageDataset, clock: Clock, n_images: int, workers: int,
                         repeats: int) -> dict[str, Any]:
    """Images/s of the reference-style pipeline on the same images (workers started first)."""
    n = min(n_images, data.train_images.shape[0])
    dataset = ReferenceStyleCIFAR(data.train_images[:n], data.train_labels[:n])
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)

    def drain() -> None:
        for images, labels, _ in loader:  # the seed copies each batch to the device
            images.to(clock.device), labels.to(clock.device)
    drain()  # starts the workers
    samples = [clock.seconds(drain, events=False) for _ in range(repeats)]
    try:
        import PIL  # noqa: F401
        kind = "PIL"
    except ImportError:
        kind = "numpy (Pillow missing)"
    return loader_row(f"reference-style: {kind} per sample, DataLoader", n, workers, len(loader), samples)
