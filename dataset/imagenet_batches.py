"""What a DataLoader worker does with one batch request, and how the main process finishes it.

The main process sends a :class:`BatchRequest` (sample indices, and for training the
uniforms already drawn for them); a worker answers with a plain dict of tensors:

- ``"pixels"`` mode (CPU path): the worker reads, decodes (PIL), crops and resizes, and
  returns ``uint8 [b, 3, S, S]``; the main process only flips and normalises.
- ``"bytes"`` mode (GPU path): the worker reads the files and returns their bytes packed in
  one tensor (one shared-memory segment per batch, not one per image); files nvJPEG should
  not see (grayscale, CMYK, non-JPEG) are decoded by PIL in the worker. The main process
  decodes the rest on the device and makes the views there, with the same crop code.

With a RandAugment policy, the flip is applied to the uint8 crop and RandAugment runs right
after it (timm's order: crop, flip, RandAugment), in the worker or on the device, with the
same tensor ops; the main process then only normalises.

A file that cannot be read or decoded is left out of the batch and named in ``"skipped"``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from dataset.imagefolder import Split
from dataset.imagenet_decode import (BatchDecoder, DecodeError, decode_bytes, decode_file,
                                     gpu_decodable, read_bytes)
from dataset.imagenet_transforms import DRAWS, eval_views, flips, stack, train_views
from dataset.randaugment import RandAugmentConfig, rand_augment

Skipped = list[tuple[str, str]]  # (path, reason)


class BatchRequest(NamedTuple):
    """One batch, as the sampler hands it to a worker.

    Attributes:
        index: ``[B]`` int64 sample indices into the split.
        uniforms: ``[B, DRAWS]`` float64 training draws, or None for evaluation views.
        augment: ``[B, layers * 5]`` float64 RandAugment draws, or None without it.
    """

    index: torch.Tensor
    uniforms: Optional[torch.Tensor]
    augment: Optional[torch.Tensor] = None


def augment_views(pixels: torch.Tensor, flip: torch.Tensor, augment: Optional[torch.Tensor],
                  config: Optional[RandAugmentConfig]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips then RandAugments ``[b, 3, S, S]`` uint8 crops when a policy is given.

    Returns:
        ``(pixels, flip)``: unchanged without a policy; else the augmented crops and an
        all-False ``flip`` (already applied).
    """
    if config is None or augment is None or len(pixels) == 0:
        return pixels, flip
    flip_dev = flip.to(pixels.device).view(-1, 1, 1, 1)
    pixels = torch.where(flip_dev, pixels.flip(-1), pixels)
    return rand_augment(pixels, augment, config), torch.zeros_like(flip)


class ImageBatches(torch.utils.data.Dataset):
    """The map-style data set the DataLoader workers index with :class:`BatchRequest` s.

    Args:
        split: file list of the split.
        mode: ``"pixels"`` (decode and crop here) or ``"bytes"`` (read only, mostly).
        size: output side in pixels (224).
        resize_size: shorter side before the evaluation centre crop (256).
        interpolation: of the crop or evaluation resize (``'bilinear'``, ``'bicubic'``).
        rand_augment: RandAugment policy for training crops (``"pixels"`` mode), or None.
    """

    def __init__(self, split: Split, mode: str, size: int, resize_size: int,
                 interpolation: str = "bilinear",
                 rand_augment: Optional[RandAugmentConfig] = None) -> None:
        if mode not in ("pixels", "bytes"):
            raise ValueError(f"mode must be 'pixels' or 'bytes', got {mode!r}")
        self.split, self.mode, self.size, self.resize_size = split, mode, size, resize_size
        self.interpolation, self.rand_augment = interpolation, rand_augment

    def __len__(self) -> int:
        return len(self.split.paths)

    def __getitem__(self, request: BatchRequest) -> dict:
        if self.mode == "pixels":
            return self._pixels(request)
        return self._bytes(request)

    def _pixels(self, request: BatchRequest) -> dict:
        images, kept, skipped = [], [], []
        for row, i in enumerate(request.index.tolist()):
            path = self.split.path(i)
            try:
                images.append(decode_file(path))
            except DecodeError as err:
                skipped.append((path, str(err)))
                continue
            kept.append(row)
        kept_t = torch.tensor(kept, dtype=torch.int64)
        if request.uniforms is None:
            pixels = eval_views(images, self.size, self.resize_size, self.interpolation)
            flip = torch.zeros(len(kept), dtype=torch.bool)
        else:
            uniforms = request.uniforms[kept_t]
            pixels = train_views(images, uniforms, self.size, self.interpolation)
            augment = None if request.augment is None else request.augment[kept_t]
            pixels, flip = augment_views(pixels, flips(uniforms), augment, self.rand_augment)
        return {"pixels": pixels, "flip": flip, "index": request.index[kept_t], "skipped": skipped}

    def _bytes(self, request: BatchRequest) -> dict:
        encoded, decoded, on_device, kept, skipped = [], [], [], [], []
        for row, i in enumerate(request.index.tolist()):
            path = self.split.path(i)
            try:
                data = read_bytes(path)
                to_device = gpu_decodable(data)
                if to_device:
                    encoded.append(data)
                else:
                    decoded.append(decode_bytes(data))
            except DecodeError as err:
                skipped.append((path, str(err)))
                continue
            on_device.append(to_device)
            kept.append(row)
        kept_t = torch.tensor(kept, dtype=torch.int64)
        offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
        torch.cumsum(torch.tensor([len(d) for d in encoded], dtype=torch.int64), 0,
                     out=offsets[1:])
        data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if encoded \
            else torch.empty(0, dtype=torch.uint8)
        uniforms = (torch.empty(len(kept), 0, dtype=torch.float64) if request.uniforms is None
                    else request.uniforms[kept_t])
        index = request.index[kept_t]
        augment = None if request.augment is None else request.augment[kept_t]
        return {"data": data, "offsets": offsets, "decoded": decoded,
                "on_device": torch.tensor(on_device, dtype=torch.bool), "uniforms": uniforms,
                "augment": augment, "index": index,
                "paths": [self.split.path(i) for i in index.tolist()],
                "skipped": skipped}


def finish_bytes_batch(raw: dict, decoder: BatchDecoder, train: bool, size: int, resize_size: int,
                       interpolation: str = "bilinear",
                       rand_augment: Optional[RandAugmentConfig] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Skipped]:
    """Main process, ``"bytes"`` mode: decode on the device, then crop and resize there (and
    flip and RandAugment, with a policy).

    Returns:
        ``(pixels [b, 3, size, size] uint8 on the device, flip [b] bool, index [b] int64,
        skipped)`` where ``skipped`` adds the files the device decoder could not decode.
    """
    data, offsets = raw["data"], raw["offsets"].tolist()
    encoded = [data[offsets[k]:offsets[k + 1]] for k in range(len(offsets) - 1)]
    from_device = iter(decoder.decode(encoded))
    from_worker = iter(raw["decoded"])
    images, kept, skipped = [], [], list(raw["skipped"])
    for row, (on_device, path) in enumerate(zip(raw["on_device"].tolist(), raw["paths"])):
        image = next(from_device) if on_device else next(from_worker).to(decoder.device)
        if isinstance(image, DecodeError):
            skipped.append((path, str(image)))
            continue
        images.append(image)
        kept.append(row)
    kept_t = torch.tensor(kept, dtype=torch.int64)
    index = raw["index"][kept_t]
    if not train:
        pixels = (eval_views(images, size, resize_size, interpolation) if images
                  else stack([], size))
        return pixels.to(decoder.device), torch.zeros(len(kept), dtype=torch.bool), index, skipped
    uniforms = raw["uniforms"][kept_t]
    if uniforms.shape[1] != DRAWS:
        raise ValueError(f"training batches need {DRAWS} draws per sample")
    pixels = train_views(images, uniforms, size, interpolation) if images else stack([], size)
    augment = None if raw.get("augment") is None else raw["augment"][kept_t]
    pixels, flip = augment_views(pixels.to(decoder.device), flips(uniforms), augment,
                                 rand_augment)
    return pixels, flip, index, skipped
