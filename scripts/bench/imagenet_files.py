"""ILSVRC-style JPEGs for the ImageNet loader rows: ``root/{train,val}/<wnid>/<wnid>_<k>.JPEG``.

The files have ILSVRC's typical geometry and weight: 500 x 375 (one in four portrait,
375 x 500), RGB, quality 90, about 110 KB each (decode cost follows the compressed size).
Their pixels are a bicubic blow-up of a random 24 x 24 image plus uniform noise of ±40,
which lands at that size. ``unique`` files are encoded; the rest of the split are hard links
to them (a copy where links are refused), so a large split costs little to write. Decoding
is what the rows measure: the files sit in the page cache, disk reads are not measured.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

WIDTH, HEIGHT, QUALITY = 500, 375, 90
NOISE, GRID = 40, 24  # measured: about 110 KB per file at quality 90
MAX_CLASSES = 10


@dataclass(frozen=True)
class GeneratedFolder:
    """What :func:`write_ilsvrc_folder` wrote.

    Attributes:
        root: the data folder (``train/`` and ``val/`` inside).
        train_files: entries of the training split (encoded files and links to them).
        unique_files: distinct JPEGs encoded.
        classes: class folders (synthetic wnids).
        mean_kb: mean size of the encoded files in KiB.
        seconds: time spent writing.
    """

    root: str
    train_files: int
    unique_files: int
    classes: int
    mean_kb: float
    seconds: float


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels that compress like a photograph at quality 90."""
    small = Image.fromarray(rng.integers(0, 256, (GRID, GRID, 3), dtype=np.uint8))
    big = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16)
    noise = rng.integers(-NOISE, NOISE + 1, big.shape, dtype=np.int16)
    return np.clip(big + noise, 0, 255).astype(np.uint8)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_ilsvrc_folder(root: str, train_files: int, unique_files: int, seed: int = 0) -> GeneratedFolder:
    """Writes ``train_files`` training entries (``unique_files`` of them encoded) over up to
    ten classes, and one validation file per class, under ``root`` (created).

    Raises:
        ValueError: ``train_files`` or ``unique_files`` below 1.
    """
    if train_files < 1 or unique_files < 1:
        raise ValueError("need at least one training file and one unique file")
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    unique_files = min(unique_files, train_files)
    wnids = [f"n{10000000 + k:08d}" for k in range(min(MAX_CLASSES, train_files))]
    encoded, sizes = [], []
    for k in range(train_files):
        wnid = wnids[k % len(wnids)]
        path = os.path.join(root, "train", wnid, f"{wnid}_{k}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if k < unique_files:
            height, width = (WIDTH, HEIGHT) if k % 4 == 3 else (HEIGHT, WIDTH)
            Image.fromarray(photo_like(rng, height, width)).save(path, "JPEG", quality=QUALITY)
            encoded.append(path)
            sizes.append(os.path.getsize(path))
        else:
            _link_or_copy(encoded[k % unique_files], path)
    for i, wnid in enumerate(wnids):
        path = os.path.join(root, "val", wnid, f"ILSVRC2012_val_{i:08d}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _link_or_copy(encoded[i % unique_files], path)
    return GeneratedFolder(root, train_files, unique_files, len(wnids), float(np.mean(sizes)) / 1024,
                           time.perf_counter() - start)
