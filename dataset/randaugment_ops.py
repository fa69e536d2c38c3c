"""RandAugment's image operations as batched tensor maths, with PIL's definitions.

timm (``timm/data/auto_augment.py``, v1.0.28) runs each op through PIL on one image; here one
call transforms ``n`` images that drew the same op, each with its own parameter. Images are
``[n, 3, H, W]`` uint8 on any device; parameters are ``[n]`` tensors on that device.

The pixel-wise ops reproduce PIL 13 bit for bit (checked in ``tests/datasets/test_augment_ops.py``):

- lookup tables (``ImageOps.autocontrast``, ``equalize``, ``invert``, ``posterize``,
  ``solarize``, timm's ``solarize_add``), with PIL's float and integer arithmetic;
- ``ImageEnhance``'s ``Color``, ``Contrast``, ``Brightness``, ``Sharpness``: ``Image.blend``
  of a degenerate image and the image, in float32 and truncated as ``ImagingBlend`` does.
  The degenerates: RGB -> L with ``(19595 R + 38470 G + 7471 B + 2^15) >> 16`` (PIL's
  ``rgb2l``); a constant grey ``int(mean(L) + 0.5)``; black; the ``SMOOTH`` 3 x 3 filter
  (weights 1 and centre 5, over 13, rounded) with the one-pixel border left unchanged.

The geometric ops map each output pixel centre through PIL's inverse affine matrix (as
``Image.transform(..., AFFINE)`` does, in float64), fill samples that land outside the image
with ``fill``, and interpolate inside with PIL's own filters (edge-clamped taps; bilinear, or
the a = -1 cubic of PIL's transforms, which ``grid_sample``'s a = -0.75 bicubic would miss by
up to ~25 grey levels on noise), truncating like PIL; they agree with PIL to a grey level.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# PIL's rgb2l weights (16-bit fixed point, sum 65536) and rounding constant.
_L_WEIGHTS = (19595, 38470, 7471)
_INTERPOLATIONS = ("bilinear", "bicubic")


def _per_image(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return values.to(dtype).view(-1, 1, 1, 1)


def invert(images: torch.Tensor) -> torch.Tensor:
    """``ImageOps.invert``: ``255 - v``."""
    return 255 - images


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keeps the ``bits`` (``[n]``, 0..8) most significant bits: ``v & ~(2^(8 - bits) - 1)``.

    Zero bits give a black image, as PIL did before it began refusing ``bits=0`` (timm's
    ``PosterizeIncreasing`` asks for 0 bits at magnitude 10).
    """
    low = (1 << (8 - bits.clamp(0, 8).long())) - 1
    mask = (255 - low).to(torch.uint8)
    return images & mask.view(-1, 1, 1, 1)


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``ImageOps.solarize``: ``v`` below ``threshold`` (``[n]``, 0..256), else ``255 - v``."""
    return torch.where(images.long() < _per_image(threshold, torch.long), images, 255 - images)


def solarize_add(images: torch.Tensor, add: torch.Tensor, threshold: int = 128) -> torch.Tensor:
    """timm's ``solarize_add``: ``min(255, v + add)`` below ``threshold``, else ``v``."""
    raised = (images.long() + _per_image(add, torch.long)).clamp_(max=255).to(torch.uint8)
    return torch.where(images < threshold, raised, images)


def auto_contrast(images: torch.Tensor) -> torch.Tensor:
    """``ImageOps.autocontrast`` (no cut-off), per image and channel.

    ``lo``/``hi`` are the channel's extremes; ``v -> int(v * s + o)`` with ``s = 255 / (hi -
    lo)`` and ``o = -lo * s``, computed in float64 in that order as PIL does, then clamped.
    A flat channel is left as is.
    """
    flat = images.flatten(2)
    lo = flat.amin(dim=2).double()[..., None, None]
    hi = flat.amax(dim=2).double()[..., None, None]
    flat_channel = hi <= lo
    scale = 255.0 / torch.where(flat_channel, torch.ones_like(hi), hi - lo)
    offset = -lo * scale
    mapped = (images.double() * scale + offset).trunc_().clamp_(0, 255).to(torch.uint8)
    return torch.where(flat_channel, images, mapped)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """``ImageOps.equalize`` per image and channel.

    With the channel's histogram ``h`` and ``last`` the count of its highest level present:
    ``step = (sum(h) - last) // 255``; level ``i`` maps to ``(step // 2 + sum(h[:i])) //
    step``, clipped to 255 (``Image.point``). Fewer than two levels present, or ``step == 0``:
    unchanged.
    """
    n, channels = images.shape[:2]
    rows = n * channels
    flat = images.reshape(rows, -1).long()
    offsets = torch.arange(rows, device=images.device)[:, None] * 256
    hist = torch.bincount((flat + offsets).view(-1), minlength=rows * 256).view(rows, 256)
    top = flat.amax(dim=1, keepdim=True)
    step = (flat.shape[1] - hist.gather(1, top)) // 255  # [rows, 1]
    keep = ((hist > 0).sum(dim=1, keepdim=True) <= 1) | (step == 0)
    before = torch.cumsum(hist, dim=1) - hist  # pixels below each level
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp_(max=255)
    lut = torch.where(keep, torch.arange(256, device=images.device), lut)
    return lut.gather(1, flat).to(torch.uint8).view_as(images)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L: ``[n, 1, H, W]`` int32 ``(19595 R + 38470 G + 7471 B + 32768) >> 16``."""
    weights = torch.tensor(_L_WEIGHTS, dtype=torch.int32, device=images.device).view(1, 3, 1, 1)
    return ((images.int() * weights).sum(dim=1, keepdim=True, dtype=torch.int32) + 32768) >> 16


def blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, images, factor)``: ``d + f * (v - d)`` in float32, truncated.

    Factors outside [0, 1] extrapolate and are clipped to 0..255 first, as ``ImagingBlend``.

    Args:
        degenerate: int or uint8, broadcastable to ``images`` ``[n, 3, H, W]`` uint8.
        factor: ``[n]`` float.
    """
    base = degenerate.float()
    alpha = _per_image(factor, torch.float32)
    mixed = base + alpha * (images.float() - base)
    return mixed.clamp_(0, 255).trunc_().to(torch.uint8)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Color``: blend with the image converted to L and back to RGB."""
    return blend(grayscale(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Contrast``: blend with the grey level ``int(mean(L) + 0.5)``."""
    luma = grayscale(images).flatten(1)
    mean = (luma.sum(dim=1, dtype=torch.int64).double() / luma.shape[1] + 0.5).floor()
    return blend(mean.view(-1, 1, 1, 1), images, factor)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Brightness``: blend with black."""
    return blend(torch.zeros((), dtype=torch.uint8, device=images.device), images, factor)


def smooth(images: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH``: ``round(sum(w * v) / 13)`` with weights 1 (centre 5) on the
    interior, the one-pixel border copied. The exact quotient is never a half (13 is odd), so
    integer rounding equals PIL's float32 sum rounded half up."""
    n, channels, height, width = images.shape
    if height < 3 or width < 3:
        return images.clone()
    kernel = torch.ones(3, 3, dtype=torch.float32, device=images.device)
    kernel[1, 1] = 5
    kernel = kernel.expand(channels, 1, 3, 3)
    # Sums of at most 13 * 255 are exact in float32.
    total = F.conv2d(images.float(), kernel, groups=channels).long()
    out = images.clone()
    out[:, :, 1:-1, 1:-1] = ((2 * total + 13) // 26).to(torch.uint8)
    return out


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``ImageEnhance.Sharpness``: blend with :func:`smooth`."""
    return blend(smooth(images), images, factor)


def rotation_matrix(degrees: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``Image.rotate(degrees)``'s inverse map about the centre ``(W / 2, H / 2)``: ``[n, 2, 3]``
    float64 (cos and sin rounded to 15 decimals, as PIL does)."""
    angle = -torch.deg2rad(torch.remainder(degrees.double(), 360.0))  # PIL: angle % 360
    cos = torch.round(torch.cos(angle), decimals=15)
    sin = torch.round(torch.sin(angle), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    tx = cos * -cx + sin * -cy + cx
    ty = -sin * -cx + cos * -cy + cy
    return torch.stack([torch.stack([cos, sin, tx], -1), torch.stack([-sin, cos, ty], -1)], 1)


def shear_matrix(factor: torch.Tensor, axis: int) -> torch.Tensor:
    """timm's ``shear_x`` (``axis=0``: ``(1, f, 0, 0, 1, 0)``) or ``shear_y`` (``axis=1``:
    ``(1, 0, 0, f, 1, 0)``): ``[n, 2, 3]`` float64."""
    matrix = _identity(factor)
    matrix[:, axis, 1 - axis] = factor.double()
    return matrix


def translate_matrix(pixels: torch.Tensor, axis: int) -> torch.Tensor:
    """Inverse map of a shift by ``-pixels`` along x (``axis=0``) or y (``axis=1``)."""
    matrix = _identity(pixels)
    matrix[:, axis, 2] = pixels.double()
    return matrix


def _identity(like: torch.Tensor) -> torch.Tensor:
    eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64, device=like.device)
    return eye.repeat(len(like), 1, 1)


def affine(images: torch.Tensor, matrix: torch.Tensor, fill: Sequence[int],
           interpolation: str, along: Optional[int] = None) -> torch.Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor=fill)`` for a batch.

    Output pixel ``(x, y)`` reads the input at ``matrix @ (x + 0.5, y + 0.5, 1)`` (continuous
    coordinates, pixel ``i`` spanning ``[i, i + 1)``); a point outside ``[0, W) x [0, H)``
    takes ``fill``, a point inside is interpolated by :func:`sample`.

    Args:
        images: ``[n, 3, H, W]`` uint8.
        matrix: ``[n, 2, 3]`` float64 inverse maps (PIL's ``data`` tuple, row by row).
        fill: ``(r, g, b)`` grey levels.
        interpolation: ``'bilinear'`` or ``'bicubic'``.
        along: the one axis the map moves, if so (see :func:`sample`).
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    n, channels, height, width = images.shape
    device = images.device
    ys = (torch.arange(height, dtype=torch.float64, device=device) + 0.5).view(1, -1, 1)
    xs = (torch.arange(width, dtype=torch.float64, device=device) + 0.5).view(1, 1, -1)
    m = matrix.to(device=device, dtype=torch.float64)[:, :, :, None, None]  # [n, 2, 3, 1, 1]
    # PIL's affine_transform, in its order of operations: a0 * x + a1 * y + a2.
    u = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]
    v = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height)  # [n, H, W]
    sampled = sample(images, u, v, interpolation, along).to(torch.uint8)
    fill_t = torch.tensor(list(fill), dtype=torch.uint8, device=device).view(1, channels, 1, 1)
    return torch.where(inside[:, None], sampled, fill_t)


def sample(images: torch.Tensor, u: torch.Tensor, v: torch.Tensor, interpolation: str,
           along: Optional[int] = None) -> torch.Tensor:
    """PIL's transform filters at continuous points ``(u, v)`` ``[n, H', W']`` float64.

    Taps around ``(u - 0.5, v - 0.5)`` with indices clamped to the image (PIL's ``XCLIP``,
    ``YCLIP``), weighted in float64: linear ``(1 - d, d)``, or the cubic convolution with
    a = -1 of PIL's transforms (``grid_sample``'s bicubic has a = -0.75, up to ~25 grey
    levels away on noise, hence not used). The result is clipped to 0..255 and truncated, as
    PIL stores it.

    Args:
        along: 0 (1) when only x (y) varies from the identity, as in shears and translations:
            the other axis then sits on pixel centres, its weights are exactly (0, 1, 0, 0),
            and one tap there gives the same numbers for a quarter of the work.

    Returns:
        ``[n, C, H', W']`` float64 whole numbers.
    """
    n, channels, height, width = images.shape
    taps, first = (2, 0) if interpolation == "bilinear" else (4, -1)
    rows, dy = _taps(v, height, taps, first, fixed=along == 0)  # [ty, n, H', W'], [n * P]
    cols, dx = _taps(u, width, taps, first, fixed=along == 1)
    start = (torch.arange(n, device=images.device) * (height * width)).view(1, n, 1, 1)
    index = ((rows * width + start).unsqueeze(1) + cols.unsqueeze(0)).view(-1)
    # 1-D index_select on float32 planes (exact for 0..255): measured ~10x faster on CPU than
    # on float64 planes or on [C]-long pixel rows.
    planes = images.transpose(0, 1).reshape(channels, -1).float()
    combine = _lerp if taps == 2 else _cubic
    out = []
    for c in range(channels):
        values = planes[c].index_select(0, index).view(len(rows), len(cols), -1).double()
        values = combine(values.unbind(1), dx) if dx is not None else values[:, 0]
        out.append(combine(values.unbind(0), dy) if dy is not None else values[0])
    result = torch.stack(out).clamp_(0, 255).trunc_()  # [C, n * P]
    return result.view(channels, n, *u.shape[1:]).transpose(0, 1)


def _taps(coord: torch.Tensor, size: int, taps: int, first: int, fixed: bool
          ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Clamped tap indices ``[taps, n, H', W']`` along one axis and the fractional offsets
    ``[n * P]`` (one tap and no offsets when ``fixed``)."""
    base = torch.floor(coord - 0.5)
    if fixed:
        return base.long().clamp_(0, size - 1).unsqueeze(0), None
    offsets = torch.arange(first, first + taps, device=coord.device).view(-1, 1, 1, 1)
    index = (base.long().unsqueeze(0) + offsets).clamp_(0, size - 1)
    return index, ((coord - 0.5) - base).reshape(-1)


def _lerp(values: Sequence[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    """PIL's ``BILINEAR``: ``a + (b - a) d``."""
    a, b = values
    return a + (b - a) * d


def _cubic(values: Sequence[torch.Tensor], d: torch.Tensor) -> torch.Tensor:
    """PIL's ``BICUBIC`` (a = -1), in its nested form and order of operations, so that sums
    that are whole numbers come out as PIL's do before truncation."""
    v1, v2, v3, v4 = values
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return v2 + d * (p2 + d * (p3 + d * p4))
