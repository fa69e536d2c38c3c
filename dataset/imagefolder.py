"""Scans and validates an ILSVRC-2012 style folder: ``DIR/{train,val}/<wnid>/*.JPEG``.

The layout is the one torchvision's ``ImageFolder`` reads: one folder per class, classes
sorted by folder name (label = position in that order), images found recursively inside
each class folder, accepted by extension, case-insensitively. Two deliberate differences:
hidden entries (names starting with ``.``, such as macOS ``._x.JPEG`` resource forks or
``.ipynb_checkpoints``) are ignored, and a layout mistake is a one-line :class:`UserError`
rather than a silently different label set.

The scan reads directory entries only (``os.scandir``; no ``stat`` or ``open`` per file, so
1.28 M files take seconds) and is deterministic: every listing is sorted.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EXPECTED = "expected DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, one folder per class"
_SHOWN = 3  # names quoted in an error before "(+N more)"


class PathList:
    """An immutable list of strings packed into two numpy arrays.

    A Python list of 1.28 M strings, copied into every DataLoader worker, is touched by
    reference counting and so duplicated page by page; two flat arrays are not, and they
    pickle in one piece for spawn-started workers.
    """

    def __init__(self, items: Sequence[str]) -> None:
        encoded = [item.encode("utf-8", "surrogateescape") for item in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(e) for e in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> str:
        start, end = self._offsets[i], self._offsets[i + 1]
        return self._buffer[start:end].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))


@dataclass(frozen=True)
class Split:
    """One split of the folder.

    Attributes:
        root: the split's folder (``DIR/train`` or ``DIR/val``).
        paths: image paths relative to ``root`` (``<wnid>/<name>``), in label order, then
            path order within a class.
        labels: ``[N]`` int64 class indices, CPU.
    """

    root: str
    paths: PathList
    labels: torch.Tensor

    def path(self, i: int) -> str:
        """The absolute path of sample ``i``."""
        return os.path.join(self.root, self.paths[i])


@dataclass(frozen=True)
class FolderIndex:
    """Both splits and their shared, sorted class names (wnids)."""

    classes: tuple[str, ...]
    train: Split
    val: Split


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _listing(folder: str) -> tuple[list[str], list[str], list[str]]:
    """``(subfolders, image files, other files)`` of ``folder``, sorted, hidden ones left out.

    ``DirEntry.is_dir`` reads the type from the directory entry itself on Linux and macOS
    file systems (no ``stat``); it follows symbolic links, as ``ImageFolder`` does.
    """
    folders, images, others = [], [], []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if entry.is_dir():
                folders.append(entry.name)
            elif _is_image(entry.name):
                images.append(entry.name)
            else:
                others.append(entry.name)
    return sorted(folders), sorted(images), sorted(others)


def _class_images(split_root: str, wnid: str) -> list[str]:
    """Image paths under ``split_root/wnid``, relative to ``split_root``.

    Ordered as ``ImageFolder`` orders them: folders by their path (``sorted(os.walk(...))``),
    files by name within a folder.
    """
    found: list[tuple[str, list[str]]] = []
    pending = [wnid]
    while pending:
        rel = pending.pop()
        folders, images, _ = _listing(os.path.join(split_root, rel))
        found.append((rel, images))
        pending.extend(os.path.join(rel, name) for name in folders)
    found.sort(key=lambda item: item[0])
    return [os.path.join(rel, name) for rel, images in found for name in images]


def _few(names: Iterable[str]) -> str:
    names = sorted(names)
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" (+{len(names) - _SHOWN} more)" if len(names) > _SHOWN else "")


def _split_classes(root: str, split: str) -> list[str]:
    """The class folders of ``root/split``, refusing layouts that are not one folder per class."""
    folder = os.path.join(root, split)
    folders, images, others = _listing(folder)
    if images:
        raw = " (the raw ILSVRC-2012 download)" if split == "val" and not folders else ""
        raise UserError(f"{folder} holds {len(images)} images directly{raw}; sort them into "
                        f"{split}/<wnid>/ class folders (the same wnids as train/); {EXPECTED}")
    tars = [name for name in others if name.lower().endswith(".tar")]
    if tars and not folders:
        raise UserError(f"{folder} holds .tar archives ({_few(tars)}), not class folders; "
                        f"extract each <wnid>.tar into {split}/<wnid>/; {EXPECTED}")
    if not folders:
        raise UserError(f"{folder} holds no class folders; {EXPECTED}")
    return folders


def _scan_split(root: str, split: str, classes: Sequence[str]) -> Split:
    folder = os.path.join(root, split)
    paths: list[str] = []
    counts: list[int] = []
    for wnid in classes:
        images = _class_images(folder, wnid)
        paths.extend(images)
        counts.append(len(images))
    empty = [wnid for wnid, count in zip(classes, counts) if count == 0]
    if empty:
        raise UserError(f"class folder(s) {_few(empty)} in {folder} hold no images (accepted: "
                        f"{' '.join(IMG_EXTENSIONS)}, any case); fill or remove them in both "
                        f"train/ and val/")
    labels = torch.repeat_interleave(torch.arange(len(classes), dtype=torch.int64),
                                     torch.tensor(counts, dtype=torch.int64))
    return Split(folder, PathList(paths), labels)


def scan_image_folder(root: str) -> FolderIndex:
    """Scans ``root/train`` and ``root/val`` and checks that they form one class set.

    Args:
        root: the data folder (``--data_folder``).

    Returns:
        The sorted wnids and both splits' relative paths and labels.

    Raises:
        UserError: ``root``, ``train/`` or ``val/`` missing; images lying directly in a split
            folder (e.g. the flat val/ of the raw download); train and val with different
            class folders; a class folder without images.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist; {EXPECTED}")
    missing = [split for split in ("train", "val") if not os.path.isdir(os.path.join(root, split))]
    if missing:
        raise UserError(f"data folder {root} has no {' or '.join(m + '/' for m in missing)} "
                        f"folder; {EXPECTED}")
    train_classes = _split_classes(root, "train")
    val_classes = _split_classes(root, "val")
    if train_classes != val_classes:
        only_train = set(train_classes) - set(val_classes)
        only_val = set(val_classes) - set(train_classes)
        parts = [f"only in train/: {_few(only_train)}"] if only_train else []
        parts += [f"only in val/: {_few(only_val)}"] if only_val else []
        raise UserError(f"train/ and val/ of {root} disagree on the classes ({'; '.join(parts)}); "
                        f"both need the same <wnid> folders")
    classes = tuple(train_classes)
    return FolderIndex(classes, _scan_split(root, "train", classes),
                       _scan_split(root, "val", classes))
