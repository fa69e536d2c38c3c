"""A tiny ILSVRC-2012 style folder, generated: ``root/{train,val}/<wnid>/*.JPEG``.

Three classes with real wnid names; JPEGs of mixed sizes and aspect ratios (tall, wide, one
smaller than 224); the odd files ILSVRC really contains (a grayscale JPEG, a CMYK JPEG, a
PNG named ``.JPEG``); one corrupt file; and entries the scan must ignore (a macOS ``._``
resource fork, a text file, a hidden folder). One class has a nested subfolder, and the
extensions vary in case, as ``ImageFolder`` allows.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image

WNIDS = ("n01440764", "n01443537", "n01484850")
# (height, width) of the training images of every class; val uses the first three.
SIZES = ((375, 500), (500, 375), (260, 260), (120, 90), (420, 150), (150, 450))


@dataclass
class TinyImageNet:
    """What was written, for the tests to check against.

    Attributes:
        root: the data folder.
        classes: the wnids, sorted.
        odd: ``{'gray', 'cmyk', 'png', 'corrupt'}`` -> absolute path of that training file.
        sources: absolute path -> the ``[H, W, 3]`` uint8 array it was encoded from.
    """

    root: str
    classes: tuple[str, ...]
    odd: dict[str, str] = field(default_factory=dict)
    sources: dict[str, np.ndarray] = field(default_factory=dict)


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8: a bilinear blow-up of a random 6 x 6 image plus a little noise
    (smooth enough to compress like a photo, varied enough that crops differ)."""
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    big = np.asarray(small.resize((width, height), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-8, 9, big.shape, dtype=np.int16)
    return np.clip(big + noise, 0, 255).astype(np.uint8)


def _save(path: str, pixels: np.ndarray, **options) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, **options)


def make_tiny_imagenet(root: str, seed: int = 0) -> TinyImageNet:
    """Writes the folder under ``root`` (created) and returns what it holds."""
    rng = np.random.default_rng(seed)
    info = TinyImageNet(root=root, classes=WNIDS)
    extensions = (".JPEG", ".jpg", ".jpeg", ".JPG", ".Jpeg", ".JPEG")
    for label, wnid in enumerate(WNIDS):
        for split, sizes in (("train", SIZES), ("val", SIZES[:3])):
            for k, (height, width) in enumerate(sizes):
                name = (f"{wnid}_{k}{extensions[k]}" if split == "train"
                        else f"ILSVRC2012_val_{label:04d}{k:04d}.JPEG")
                path = os.path.join(root, split, wnid, name)
                pixels = smooth_image(rng, height, width)
                _save(path, pixels, format="JPEG", quality=90)
                info.sources[path] = pixels
    train = os.path.join(root, "train")
    # A file in a nested folder: ImageFolder finds it (os.walk), so must we.
    nested = os.path.join(train, WNIDS[1], "extra", f"{WNIDS[1]}_nested.JPEG")
    info.sources[nested] = smooth_image(rng, 300, 200)
    _save(nested, info.sources[nested], format="JPEG", quality=90)

    gray = smooth_image(rng, 240, 320)[:, :, 0]
    info.odd["gray"] = os.path.join(train, WNIDS[0], f"{WNIDS[0]}_gray.JPEG")
    _save(info.odd["gray"], gray, format="JPEG", quality=90)
    info.sources[info.odd["gray"]] = np.repeat(gray[:, :, None], 3, axis=2)

    cmyk = smooth_image(rng, 250, 330)
    info.odd["cmyk"] = os.path.join(train, WNIDS[1], f"{WNIDS[1]}_cmyk.JPEG")
    os.makedirs(os.path.dirname(info.odd["cmyk"]), exist_ok=True)
    Image.fromarray(cmyk).convert("CMYK").save(info.odd["cmyk"], format="JPEG", quality=95)
    info.sources[info.odd["cmyk"]] = cmyk

    png = smooth_image(rng, 230, 310)
    info.odd["png"] = os.path.join(train, WNIDS[2], f"{WNIDS[2]}_png.JPEG")
    _save(info.odd["png"], png, format="PNG")
    info.sources[info.odd["png"]] = png

    info.odd["corrupt"] = os.path.join(train, WNIDS[2], f"{WNIDS[2]}_corrupt.JPEG")
    with open(info.odd["corrupt"], "wb") as handle:
        handle.write(b"\xff\xd8\xff\xe0 this is not really a JPEG " * 20)

    # Entries the scan ignores: a resource fork, a text file, a hidden folder.
    with open(os.path.join(train, WNIDS[0], f"._{WNIDS[0]}_0.JPEG"), "wb") as handle:
        handle.write(b"\x00\x05\x16\x07 AppleDouble")
    with open(os.path.join(train, WNIDS[0], "notes.txt"), "w") as handle:
        handle.write("not an image\n")
    os.makedirs(os.path.join(root, "val", ".ipynb_checkpoints"))
    return info


def imagefolder_reference(split_root: str) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label)])`` by torchvision ``ImageFolder``'s documented rules
    (``find_classes`` + ``make_dataset``), minus hidden entries: the scan's specification."""
    classes = sorted(e.name for e in os.scandir(split_root) if e.is_dir()
                     and not e.name.startswith("."))
    samples = []
    extensions = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    for label, wnid in enumerate(classes):
        for folder, _, files in sorted(os.walk(os.path.join(split_root, wnid), followlinks=True)):
            for name in sorted(files):
                if name.lower().endswith(extensions) and not name.startswith("."):
                    samples.append((os.path.join(folder, name), label))
    return classes, samples


LAYOUTS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "imagenet_layouts.json")
TORCHVISION_FILES = ("resnet18", "resnet34", "resnet50")  # IMAGENET1K_V1: no BatchNorm counters


def published_layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """``[(key, shape)]`` of ``name``'s published state dict, in its file's key order
    (``tests/data/imagenet_layouts.json``, written from torchvision's and mdistiller's sources)."""
    import json

    with open(LAYOUTS_JSON, encoding="utf-8") as handle:
        layout = json.load(handle)["models"][name]["state_dict"]
    return [(key, tuple(shape)) for key, shape in layout]


def published_state_dict(name: str, seed: int = 0, num_classes: Optional[int] = None) -> dict:
    """A state dict made the way the published file of ``name`` was: a plain ``dict`` (so no
    ``_metadata``), in the file's key order, random well-scaled values, and for torchvision's
    IMAGENET1K_V1 ResNets no ``num_batches_tracked`` (those 2017 weights, re-saved, hold none).
    ``num_classes`` narrows the classifier (``fc``) to that many rows."""
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in published_layout(name):
        leaf = key.rsplit(".", 1)[1]
        if key.startswith("fc.") and num_classes is not None:
            shape = (num_classes, *shape[1:])
        if leaf == "num_batches_tracked":
            if name not in TORCHVISION_FILES:
                state[key] = torch.tensor(7)
        elif leaf in ("running_var", "weight") and len(shape) == 1:  # BN scale / variance
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif leaf in ("running_mean", "bias"):
            state[key] = torch.randn(shape, generator=g) * 0.1
        else:  # conv or linear weight, He-scaled so activations stay O(1)
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state
