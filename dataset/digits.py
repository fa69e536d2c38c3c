"""scikit-learn's bundled 8x8 handwritten digits, shaped like CIFAR for offline demos."""
from __future__ import annotations

import numpy as np
import torch

from dataset.base import ImageDataset

TEST_FRACTION = 0.25
SPLIT_SEED = 0


def load_digits32() -> ImageDataset:
    """Loads the 1797 digits as 32x32 RGB images with a fixed stratified split.

    Pixels (0..16) are scaled to 0..255, each pixel becomes a 4x4 block (nearest-neighbour
    upsampling: exact, no blur, so every value stays one of the original 17 levels), and
    the grey plane is copied to three channels. The split is ``train_test_split`` with
    ``test_size=0.25``, stratified by class, ``random_state=0``: the same on every call.

    Returns:
        CPU tensors: train ``[1347, 3, 32, 32]`` and test ``[450, 3, 32, 32]`` uint8
        images, int64 labels 0..9, and mean/std of the training pixels on the 0..1 scale.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    images = torch.from_numpy(pixels)
    images = images.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)
    images = images[:, None].expand(-1, 3, -1, -1).contiguous()  # [1797, 3, 32, 32]
    labels = torch.from_numpy(digits.target.astype(np.int64))

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=digits.target,
        random_state=SPLIT_SEED)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    train_images = images[train_idx]
    scaled = train_images.double() / 255.0
    mean = scaled.mean(dim=(0, 2, 3)).tolist()
    std = scaled.std(dim=(0, 2, 3), correction=0).tolist()
    return ImageDataset("digits", train_images, labels[train_idx], images[test_idx],
                        labels[test_idx], 10, tuple(mean), tuple(std))
