"""ImageNet from an ILSVRC-style folder: the data set object and its streaming loaders.

The files do not fit on the device decoded, so they stream: ``torch.utils.data.DataLoader``
worker processes (started once, reused every epoch) read them; where a CUDA device and
``torchvision.io.decode_jpeg`` are present, the main process decodes on the GPU and crops
there, otherwise the workers decode with PIL and crop on the CPU. Either way the loader
yields what :class:`~dataset.loader.DeviceLoader` yields: ``(images float32 [B, 3, 224,
224], labels [B] int64, index [B] int64)`` on the device.

Order and randomness follow ``DeviceLoader``: one permutation per epoch from ``(seed,
epoch)``, padded to a multiple of ``world_size``, rank r taking ``perm[r::world_size]``; the
training draws are a pure function of ``(seed, rank, epoch, position)`` made in the main
process (:func:`~dataset.imagenet_transforms.draw_uniforms`). The batches are therefore the
same for any number of workers, and the state is the epoch counter.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Sampler

from dataset.augment_recipe import TrainAugment
from dataset.imagefolder import FolderIndex, Split, scan_image_folder
from dataset.imagenet_batches import BatchRequest, ImageBatches, Skipped, finish_bytes_batch
from dataset.imagenet_decode import BatchDecoder, nvjpeg_available
from dataset.imagenet_transforms import (IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS,
                                         RESIZE_SIZE, block_uniforms, draw_uniforms,
                                         flip_normalize)
from dataset.randaugment import UNIFORMS_PER_LAYER
from dataset.sharding import EpochState, derive_seed, epoch_order, shard_size

DECODE_MODES = ("auto", "workers", "device")


class UndecodableImageWarning(UserWarning):
    """A file that could not be read or decoded was left out of its batch."""


def _as_is(batch: dict) -> dict:
    """The DataLoader's collate function: workers already return whole batches."""
    return batch


class _Requests(Sampler):
    """Yields one epoch's :class:`BatchRequest` s in order, in the main process.

    Training draws are made here, batch by batch, so that no worker draws anything.
    """

    def __init__(self, num_samples: int, batch_size: int, drop_last: bool, train: bool,
                 seed: int, rank: int, augment_width: int = 0) -> None:
        self.num_samples, self.batch_size, self.drop_last = num_samples, batch_size, drop_last
        self.train, self.seed, self.rank = train, seed, rank
        self.augment_width = augment_width  # RandAugment uniforms per sample (0: none)
        self.order = torch.empty(0, dtype=torch.int64)
        self.epoch = 0

    def start(self, order: torch.Tensor, epoch: int) -> None:
        """Sets the epoch that the next ``iter()`` (made by the DataLoader) produces."""
        if len(order) != self.num_samples:
            raise ValueError(f"order has {len(order)} samples, expected {self.num_samples}")
        self.order, self.epoch = order, epoch

    def __len__(self) -> int:
        n, size = self.num_samples, self.batch_size
        return n // size if self.drop_last else -(-n // size)

    def __iter__(self) -> Iterator[BatchRequest]:
        size = self.batch_size
        for begin in range(0, len(self) * size, size):
            index = self.order[begin:begin + size]
            stop = begin + len(index)
            uniforms = draw_uniforms(self.seed, self.rank, self.epoch, begin, stop) \
                if self.train else None
            augment = None
            if self.train and self.augment_width:
                augment = block_uniforms("randaugment", self.augment_width, self.seed, self.rank,
                                         self.epoch, begin, stop)
            yield BatchRequest(index, uniforms, augment)


class ImageFolderLoader(EpochState):
    """Iterates ``(images, labels, index)`` batches of one split, streamed from disk.

    Args:
        split: the split's file list and labels.
        batch_size: samples per batch on this rank.
        train: shuffle and draw training views (True), or evaluation views in order.
        seed: base seed; the same on every rank.
        rank, world_size: this process's shard.
        device: where batches are yielded.
        memory_format: layout of the yielded images.
        workers: DataLoader worker processes (0: read and decode in this process).
        decode: ``"auto"`` (on the device when it is CUDA and torchvision's nvJPEG decoder
            imports, else in the workers), ``"workers"`` (PIL in the workers), ``"device"``
            (workers read bytes, this process decodes: nvJPEG on CUDA, else PIL).
        drop_last: drop this rank's last partial batch.
        mean, std: per-channel statistics on the 0..1 scale.
        size: output side in pixels; resize_size: shorter side before the evaluation crop.
        interpolation: of the training crop's resize (and RandAugment's geometric ops) or of
            the evaluation resize: ``'bilinear'`` (torchvision's default) or ``'bicubic'``
            (DeiT's).
        augment: the training batch augmentations (training loaders only); with mixup or
            CutMix, ``num_classes`` is needed and the loader yields soft targets.
    """

    def __init__(self, split: Split, batch_size: int, train: bool, seed: int, rank: int = 0,
                 world_size: int = 1, device: Union[str, torch.device] = "cpu",
                 memory_format: torch.memory_format = torch.contiguous_format, workers: int = 0,
                 decode: str = "auto", drop_last: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 size: int = IMAGE_SIZE, resize_size: int = RESIZE_SIZE,
                 interpolation: str = "bilinear", augment: Optional[TrainAugment] = None,
                 num_classes: Optional[int] = None) -> None:
        if batch_size < 1 or workers < 0 or not 0 <= rank < world_size:
            raise ValueError("need batch_size >= 1, workers >= 0 and 0 <= rank < world_size")
        if decode not in DECODE_MODES:
            raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, got {decode!r}")
        if memory_format not in (torch.contiguous_format, torch.channels_last):
            raise ValueError("memory_format must be torch.contiguous_format or torch.channels_last")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got "
                             f"{interpolation!r}")
        augment = augment or TrainAugment()
        if augment != TrainAugment() and not train:
            raise ValueError("batch augmentations apply to training loaders only")
        if augment.mixes and not num_classes:
            raise ValueError("mixup/CutMix needs num_classes")
        self.device = torch.device(device)
        self.split, self.labels, self.n = split, split.labels, len(split.labels)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.memory_format = rank, world_size, memory_format
        self.mean, self.std, self.size, self.resize_size = mean, std, size, resize_size
        self.epoch = 0  # epochs started so far; the next epoch's randomness depends on it
        on_device = decode == "device" or (decode == "auto" and nvjpeg_available(self.device))
        self.mode = "bytes" if on_device else "pixels"
        self._decoder = BatchDecoder(self.device) if on_device else None
        self._skipped: dict[str, str] = {}
        self.interpolation = interpolation
        self.rand_augment = augment.rand_augment_config(mean, interpolation)
        self.erasing, self.mixing = augment.erasing(), augment.mixing(num_classes or 0)
        width = self.rand_augment.num_layers * UNIFORMS_PER_LAYER if self.rand_augment else 0
        self._requests = _Requests(self.num_samples, batch_size, drop_last, train, seed, rank,
                                   width)
        self._loader = DataLoader(
            ImageBatches(split, self.mode, size, resize_size, interpolation, self.rand_augment),
            batch_size=None,
            sampler=self._requests, num_workers=workers, collate_fn=_as_is,
            pin_memory=self.device.type == "cuda" and self.mode == "pixels",
            persistent_workers=workers > 0)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch (including repeats that pad the last shard),
        before any undecodable file is left out."""
        return shard_size(self.n, self.rank, self.world_size, self.train)

    def __len__(self) -> int:
        return len(self._requests)

    @property
    def skipped(self) -> dict[str, str]:
        """Files left out so far (path -> reason), in the order they were met."""
        return dict(self._skipped)

    @property
    def num_skipped(self) -> int:
        return len(self._skipped)

    def order(self, epoch: int) -> torch.Tensor:
        """``[num_samples]`` int64 sample indices of this rank for ``epoch``, CPU."""
        return epoch_order(self.n, self.seed, epoch, self.rank, self.world_size, self.train,
                           torch.Generator())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yields ``(images [B, 3, S, S] float32, labels [B] int64, index [B] int64)``;
        with mixup/CutMix, ``labels`` are ``[B, K]`` float32 mixed, smoothed targets.

        All three on the device; ``index`` is each sample's position in the split's file
        list. A batch is shorter by the files that could not be decoded (each is warned
        about once, with :class:`UndecodableImageWarning`); a batch left empty is not yielded.
        """
        epoch, self.epoch = self.epoch, self.epoch + 1
        self._requests.start(self.order(epoch), epoch)
        return self._batches(iter(self._loader), epoch)

    def _batches(self, raw_batches: Iterator[dict], epoch: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        erase_gen = mix_gen = None
        if self.erasing is not None:  # on the device: it draws the erased pixels' noise too
            erase_gen = torch.Generator(self.device)
            erase_gen.manual_seed(derive_seed(self.seed, "erase", self.rank, epoch))
        if self.mixing is not None:  # a few scalars per batch: CPU, no device sync
            mix_gen = torch.Generator().manual_seed(derive_seed(self.seed, "mix", self.rank, epoch))
        for raw in raw_batches:
            if self._decoder is None:
                pixels = raw["pixels"].to(self.device, non_blocking=True)
                flip, index, skipped = raw["flip"], raw["index"], raw["skipped"]
            else:
                pixels, flip, index, skipped = finish_bytes_batch(
                    raw, self._decoder, self.train, self.size, self.resize_size,
                    self.interpolation, self.rand_augment)
            self._note(skipped)
            if len(index) == 0:
                continue
            images = flip_normalize(pixels, flip, self.mean, self.std, self.memory_format)
            labels = self.labels.index_select(0, index.cpu()).to(self.device, non_blocking=True)
            if erase_gen is not None:
                images = self.erasing(images, erase_gen)
            if mix_gen is not None:
                images, labels = self.mixing(images, labels, mix_gen)
            yield images, labels, index.to(self.device, non_blocking=True)

    def _note(self, skipped: Skipped) -> None:
        for path, reason in skipped:
            if path not in self._skipped:
                self._skipped[path] = reason
                warnings.warn(f"skipping {path}: cannot decode it ({reason})",
                              UndecodableImageWarning, stacklevel=3)

    def close(self) -> None:
        """Stops the worker processes now (they also end with this process)."""
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None

    def __enter__(self) -> "ImageFolderLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class ImageFolderData:
    """An ILSVRC-style image folder: labels in memory, pixels streamed by its loaders.

    Attributes:
        name: registry name (``'imagenet'``).
        folder: the scanned file lists (:func:`~dataset.imagefolder.scan_image_folder`).
        image_size: side of the network input in pixels (224).
        resize_size: shorter side before the evaluation centre crop (256).
        mean, std: per-channel statistics on the 0..1 scale (ImageNet's).
    """

    name: str
    folder: FolderIndex
    image_size: int = IMAGE_SIZE
    resize_size: int = RESIZE_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def classes(self) -> list[str]:
        """Sorted class folder names (wnids); label i is ``classes[i]``."""
        return list(self.folder.classes)

    @property
    def num_classes(self) -> int:
        return len(self.folder.classes)

    @property
    def train_labels(self) -> torch.Tensor:
        """``[N]`` int64 training labels, CPU, in file-list (``index``) order."""
        return self.folder.train.labels

    @property
    def test_labels(self) -> torch.Tensor:
        """``[M]`` int64 validation labels, CPU."""
        return self.folder.val.labels

    def loaders(self, batch_size: int, eval_batch_size: int, seed: int, rank: int = 0,
                world_size: int = 1, device: Union[str, torch.device] = "cpu",
                memory_format: torch.memory_format = torch.contiguous_format, workers: int = 0,
                decode: str = "auto", train_interpolation: str = "bilinear",
                eval_interpolation: str = "bilinear", augment: Optional[TrainAugment] = None
                ) -> tuple[ImageFolderLoader, ImageFolderLoader]:
        """This rank's training loader (shuffled, augmented) and validation loader.

        Both are sharded by rank: training as ``DeviceLoader`` shards it, validation as
        ``r, r + world_size, ...`` (no padding; sum the per-rank counts). ``batch_size`` and
        ``eval_batch_size`` are per rank. ``train_interpolation`` resizes the training crops
        (and drives RandAugment's geometric ops), ``eval_interpolation`` the validation resize;
        ``augment`` applies to training only (DeiT: both interpolations ``'bicubic'`` and
        :data:`~dataset.augment_recipe.DEIT`). See :class:`ImageFolderLoader` for the rest.
        """
        common = dict(seed=seed, rank=rank, world_size=world_size, device=device,
                      memory_format=memory_format, workers=workers, decode=decode,
                      mean=self.mean, std=self.std, size=self.image_size,
                      resize_size=self.resize_size)
        return (ImageFolderLoader(self.folder.train, batch_size, train=True,
                                  interpolation=train_interpolation, augment=augment,
                                  num_classes=self.num_classes, **common),
                ImageFolderLoader(self.folder.val, eval_batch_size, train=False,
                                  interpolation=eval_interpolation, **common))


def load_imagenet(data_folder: str) -> ImageFolderData:
    """Scans ``data_folder`` (``train/<wnid>/*``, ``val/<wnid>/*``); reads no image.

    Raises:
        UserError: the folder does not have that layout (the message says what is wrong).
    """
    return ImageFolderData("imagenet", scan_image_folder(data_folder))
