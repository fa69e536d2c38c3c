"""ImageNet views as tensor maths: the random draws, crop boxes, resizes, flip and normalise.

Training view: torchvision's ``RandomResizedCrop(224)`` (scale 0.08-1 of the area,
log-uniform aspect ratio 3/4-4/3, up to 10 tries, then a centred crop whose ratio is clamped
to the range), bilinear resize with antialiasing, ``RandomHorizontalFlip(0.5)``, normalise.
Evaluation view: ``Resize(256)`` (shorter side to 256) then ``CenterCrop(224)``. Both resize
bilinearly by default; ``interpolation='bicubic'`` gives timm's/DeiT's
``RandomResizedCropAndInterpolation(..., 'bicubic')`` and ``Resize(256, BICUBIC)``.

Everything random is drawn up front, in the loader's main process, as uniforms: per sample,
10 tries x (area, log-ratio, top, left) and one for the flip. The box needs the image size,
so :func:`random_resized_crop_boxes` turns uniforms into boxes wherever the image is decoded
(a CPU worker, or the main process after a GPU decode): the same numbers either way.

The code works on any device: the CPU workers and the GPU path share it.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dataset.loader import normalize
from dataset.sharding import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
RESIZE_SIZE = 256
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10
DRAWS = TRIES * 4 + 1  # uniforms per sample: 10 x (area, log-ratio, top, left), then the flip
BLOCK = 1024  # positions per independently seeded block of draws
INTERPOLATIONS = ("bilinear", "bicubic")

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels


def draw_uniforms(seed: int, rank: int, epoch: int, start: int, stop: int) -> torch.Tensor:
    """The training view's uniforms for positions ``start .. stop - 1`` of a rank's epoch.

    A pure function of ``(seed, rank, epoch, position)``: positions come in blocks of
    :data:`BLOCK`, each drawn from its own generator seeded by ``(seed, "augment", rank,
    epoch, block)``, so the draws do not depend on the batch size, the number of workers,
    or where a run was resumed.

    Returns:
        ``[stop - start, DRAWS]`` float64 uniforms on ``[0, 1)``, CPU.
    """
    return block_uniforms("augment", DRAWS, seed, rank, epoch, start, stop)


def block_uniforms(tag: str, width: int, seed: int, rank: int, epoch: int, start: int,
                   stop: int) -> torch.Tensor:
    """``[stop - start, width]`` float64 uniforms, CPU, for positions ``start .. stop - 1``:
    blocks of :data:`BLOCK` positions seeded by ``(seed, tag, rank, epoch, block)``."""
    if stop <= start:
        return torch.empty(0, width, dtype=torch.float64)
    generator = torch.Generator()
    blocks = []
    for block in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        generator.manual_seed(derive_seed(seed, tag, rank, epoch, block))
        blocks.append(torch.rand(BLOCK, width, generator=generator, dtype=torch.float64))
    offset = start - (start // BLOCK) * BLOCK
    return torch.cat(blocks)[offset:offset + stop - start]


def flips(uniforms: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool horizontal flips, Bernoulli(0.5), from ``[B, DRAWS]`` uniforms."""
    return uniforms[:, -1] < 0.5


def random_resized_crop_boxes(uniforms: torch.Tensor, heights: torch.Tensor,
                              widths: torch.Tensor, scale: Sequence[float] = SCALE,
                              ratio: Sequence[float] = RATIO) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` of torchvision, for a batch, from given uniforms.

    Try ``t`` takes area ``H * W * U(scale)`` and aspect ratio ``exp(U(log ratio))``, rounds
    ``w = round(sqrt(area * ratio))`` and ``h = round(sqrt(area / ratio))`` half to even (as
    Python's ``round``), and is accepted when ``0 < w <= W`` and ``0 < h <= H``; the first
    accepted try wins, with offsets uniform on ``0 .. H - h`` and ``0 .. W - w``. After 10
    failures: ``W / H`` below the ratio range keeps the full width and ``h = round(W /
    min(ratio))``, above it keeps the full height and ``w = round(H * max(ratio))``, else the
    whole image; the box is centred with ``(H - h) // 2`` and ``(W - w) // 2``.

    Args:
        uniforms: ``[B, DRAWS]`` (or ``[B, 40]``) float64 uniforms on ``[0, 1)``.
        heights, widths: ``[B]`` image sizes in pixels.

    Returns:
        ``[B, 4]`` int64 boxes ``(top, left, height, width)``, CPU.
    """
    u = uniforms[:, :TRIES * 4].to(device="cpu", dtype=torch.float64).view(-1, TRIES, 4)
    H = torch.as_tensor(heights, dtype=torch.float64).view(-1, 1)
    W = torch.as_tensor(widths, dtype=torch.float64).view(-1, 1)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    area = H * W * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)  # [B, TRIES]
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first accepted try
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    h, w = pick(h), pick(w)
    top = torch.floor(pick(u[..., 2]) * (H.squeeze(1) - h + 1))
    left = torch.floor(pick(u[..., 3]) * (W.squeeze(1) - w + 1))

    H, W = H.squeeze(1), W.squeeze(1)
    in_ratio = W / H
    tall, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fb_w = torch.where(wide, torch.round(H * max(ratio)), W)
    fb_h = torch.where(tall, torch.round(W / min(ratio)), H)
    fb_top = torch.div(H - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(W - fb_w, 2, rounding_mode="floor")
    accepted = ok.any(dim=1)
    box = torch.stack([torch.where(accepted, top, fb_top), torch.where(accepted, left, fb_left),
                       torch.where(accepted, h, fb_h), torch.where(accepted, w, fb_w)], dim=1)
    return box.to(torch.int64)


def resize_shorter(height: int, width: int, size: int = RESIZE_SIZE) -> tuple[int, int]:
    """Output ``(height, width)`` of torchvision's ``Resize(size)`` for an int ``size``.

    The shorter side becomes ``size`` and the longer ``int(size * long / short)`` (truncated,
    e.g. 375 x 500 -> 256 x 341).
    """
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def center_crop_offsets(height: int, width: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """``(top, left)`` of torchvision's ``CenterCrop(size)``: ``round((H - size) / 2)``,
    rounding half to even as Python does (a 341-wide image gives ``left = round(58.5) = 58``).
    """
    if height < size or width < size:
        raise ValueError(f"center crop {size} needs an image at least that large, got "
                         f"{height} x {width}")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize(image: torch.Tensor, height: int, width: int,
           uint8_kernel: Optional[bool] = None, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize with antialiasing (``F.interpolate(..., antialias=True)``), bilinear or bicubic.

    On the CPU the uint8 kernel runs directly (about 4x faster than float32 on a 500 x 375
    image, measured; torchvision's tensor path uses it too; it may differ from float32 by one
    grey level); elsewhere the image goes through float32 and is rounded back (CUDA has no
    uint8 kernel). The float32 bicubic runs as PIL does, width then height, rounded and
    clipped to uint8 in between (the cubic overshoots; one 2-D pass differs from PIL by up
    to ~18 grey levels on noise, measured). Same size: returned as is.

    Args:
        image: ``[3, H, W]`` uint8 pixels.
        uint8_kernel: force the kernel choice (default: uint8 exactly when on the CPU).
        interpolation: ``'bilinear'`` or ``'bicubic'``.

    Returns:
        ``[3, height, width]`` uint8 pixels on the image's device.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if tuple(image.shape[-2:]) == (height, width):
        return image
    if uint8_kernel is None:
        uint8_kernel = image.device.type == "cpu"
    batch = image.unsqueeze(0)
    if uint8_kernel:
        batch = batch.contiguous(memory_format=torch.channels_last)
        out = F.interpolate(batch, size=(height, width), mode=interpolation,
                            align_corners=False, antialias=True)
        return out[0]
    if interpolation == "bicubic":
        steps = [(image.shape[-2], width), (height, width)]
    else:
        steps = [(height, width)]
    for size in steps:
        if tuple(batch.shape[-2:]) != size:
            batch = F.interpolate(batch.float(), size=size, mode=interpolation,
                                  align_corners=False, antialias=True)
            batch = batch.round_().clamp_(0, 255).to(torch.uint8)
    return batch[0]


def crop_resize(image: torch.Tensor, box: Box, size: int = IMAGE_SIZE,
                interpolation: str = "bilinear") -> torch.Tensor:
    """Crops ``box = (top, left, height, width)`` from ``[3, H, W]`` uint8 and resizes it to
    ``[3, size, size]`` uint8 (torchvision's ``resized_crop``)."""
    top, left, height, width = box
    return resize(image[:, top:top + height, left:left + width], size, size,
                  interpolation=interpolation)


def eval_view(image: torch.Tensor, size: int = IMAGE_SIZE, resize_size: int = RESIZE_SIZE,
              interpolation: str = "bilinear") -> torch.Tensor:
    """``Resize(resize_size)`` then ``CenterCrop(size)``: ``[3, H, W]`` -> ``[3, size, size]``
    uint8. The whole image is resized first (the antialiasing filter reaches past the crop)."""
    new_h, new_w = resize_shorter(image.shape[-2], image.shape[-1], resize_size)
    resized = resize(image, new_h, new_w, interpolation=interpolation)
    top, left = center_crop_offsets(new_h, new_w, size)
    return resized[:, top:top + size, left:left + size]


def train_views(images: Sequence[torch.Tensor], uniforms: torch.Tensor,
                size: int = IMAGE_SIZE, interpolation: str = "bilinear") -> torch.Tensor:
    """Random resized crops of decoded images (flips are applied later, batched).

    Args:
        images: ``B`` uint8 ``[3, H_i, W_i]`` images, all on one device.
        uniforms: ``[B, DRAWS]`` float64 draws from :func:`draw_uniforms`.
        interpolation: of the resize, ``'bilinear'`` or ``'bicubic'``.

    Returns:
        ``[B, 3, size, size]`` uint8 on the images' device.
    """
    heights = torch.tensor([im.shape[-2] for im in images], dtype=torch.float64)
    widths = torch.tensor([im.shape[-1] for im in images], dtype=torch.float64)
    boxes = random_resized_crop_boxes(uniforms, heights, widths).tolist()
    return stack([crop_resize(im, box, size, interpolation)
                  for im, box in zip(images, boxes)], size)


def eval_views(images: Sequence[torch.Tensor], size: int = IMAGE_SIZE,
               resize_size: int = RESIZE_SIZE, interpolation: str = "bilinear") -> torch.Tensor:
    """:func:`eval_view` of each image, stacked: ``[B, 3, size, size]`` uint8."""
    return stack([eval_view(im, size, resize_size, interpolation) for im in images], size)


def stack(views: Sequence[torch.Tensor], size: int) -> torch.Tensor:
    """``[B, 3, size, size]`` uint8 (an empty batch when every image was skipped)."""
    if not views:
        return torch.empty(0, 3, size, size, dtype=torch.uint8)
    return torch.stack(list(views))


def flip_normalize(pixels: torch.Tensor, flip: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD,
                   memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Mirrors the samples where ``flip`` and maps uint8 to float32 ``(x / 255 - mean) / std``.

    Args:
        pixels: ``[B, 3, S, S]`` uint8.
        flip: ``[B]`` bool, on any device.

    Returns:
        ``[B, 3, S, S]`` float32 in ``memory_format``, on the pixels' device.
    """
    flip = flip.to(device=pixels.device, dtype=torch.bool).view(-1, 1, 1, 1)
    return normalize(torch.where(flip, pixels.flip(-1), pixels), mean, std, memory_format)

