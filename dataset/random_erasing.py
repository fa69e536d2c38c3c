"""Random Erasing (Zhong et al., AAAI 2020) on a normalised batch, with timm's maths.

timm's ``RandomErasing`` (``timm/data/random_erasing.py``, v1.0.28), per image: with
probability ``p`` erase ``count`` boxes (``count`` uniform on ``min_count .. max_count``);
each box takes up to 10 tries of area ``U(min_area, max_area) * H * W / count`` and aspect
``exp(U(log r, -log r))`` (r = 0.3), ``h = round(sqrt(area * aspect))``, ``w =
round(sqrt(area / aspect))``; the first try with ``h < H`` and ``w < W`` is placed at ``top``
uniform on ``0 .. H - h``, ``left`` on ``0 .. W - w``; if none fits, that box is skipped.
The box is filled per ``mode``: ``'pixel'`` per-pixel N(0, 1), ``'rand'`` one N(0, 1) per
channel, ``'const'`` zeros (all in normalised units). DeiT: p 0.25, ``'pixel'``, one box.

Here the boxes of a whole batch come from one ``[B, 2 + 40 * max_count]`` draw of uniforms,
and the noise from one normal draw over the images that erase anything; a later box overwrites
an earlier one with fresh noise, which is what timm's sequential writes do too.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TRIES = 10
MODES = ("const", "rand", "pixel")


@dataclass(frozen=True)
class RandomErasing:
    """Erases boxes of ``[B, C, H, W]`` float batches in place.

    Attributes:
        probability: chance that an image is erased at all (timm's ``re_prob``).
        min_area, max_area: box area range as fractions of the image (before ``/ count``).
        min_aspect: aspect ``h / w`` range is ``[min_aspect, max_aspect or 1 / min_aspect]``.
        mode: ``'pixel'``, ``'rand'`` or ``'const'``.
        min_count, max_count: boxes per erased image (``max_count`` None: ``min_count``).
    """

    probability: float = 0.5
    min_area: float = 0.02
    max_area: float = 1 / 3
    min_aspect: float = 0.3
    max_aspect: float | None = None
    mode: str = "const"
    min_count: int = 1
    max_count: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"random erasing mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.probability <= 1 or not 0 < self.min_area <= self.max_area:
            raise ValueError("need 0 <= probability <= 1 and 0 < min_area <= max_area")
        if self.min_count < 1 or self.counts[1] < self.min_count:
            raise ValueError("need 1 <= min_count <= max_count")

    @property
    def counts(self) -> tuple[int, int]:
        return self.min_count, self.max_count or self.min_count

    @property
    def uniforms_per_image(self) -> int:
        return 2 + TRIES * 4 * self.counts[1]

    def boxes(self, uniforms: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Boxes from ``[B, uniforms_per_image]`` float64 uniforms.

        Returns:
            ``[B, max_count, 4]`` int64 ``(top, left, h, w)``; ``h = w = 0`` where nothing is
            erased (not drawn by ``p``, a slot beyond the image's count, or no try fitted).
        """
        lo, hi = self.counts
        u = uniforms.to(torch.float64)
        erase = u[:, 0] <= self.probability  # timm skips when random() > p
        count = lo + torch.floor(u[:, 1] * (hi - lo + 1)).clamp_(max=hi - lo)
        tries = u[:, 2:].reshape(-1, hi, TRIES, 4)
        max_aspect = self.max_aspect or 1 / self.min_aspect
        log_lo, log_hi = math.log(self.min_aspect), math.log(max_aspect)
        area = (self.min_area + (self.max_area - self.min_area) * tries[..., 0]) \
            * (height * width) / count.view(-1, 1, 1)
        aspect = torch.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
        h = torch.round(torch.sqrt(area * aspect))
        w = torch.round(torch.sqrt(area / aspect))
        fits = (w < width) & (h < height)  # [B, hi, TRIES]
        first = fits.to(torch.int8).argmax(dim=2, keepdim=True)
        pick = lambda t: t.gather(2, first).squeeze(2)  # noqa: E731
        h, w = pick(h), pick(w)
        top = torch.floor(pick(tries[..., 2]) * (height - h + 1))
        left = torch.floor(pick(tries[..., 3]) * (width - w + 1))
        slot = torch.arange(hi, device=u.device).view(1, -1)
        keep = fits.any(dim=2) & erase.view(-1, 1) & (slot < count.view(-1, 1))
        box = torch.stack([top, left, h, w], dim=2) * keep.unsqueeze(2)
        return box.to(torch.int64)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Erases in place and returns ``images`` ``[B, C, H, W]`` float.

        ``generator`` must live on the images' device (the boxes' uniforms and the noise are
        drawn from it).
        """
        batch, channels, height, width = images.shape
        uniforms = torch.rand(batch, self.uniforms_per_image, generator=generator,
                              dtype=torch.float64, device=images.device)
        boxes = self.boxes(uniforms, height, width)
        mask = box_mask(boxes, height, width)  # [B, 1, H, W]
        chosen = torch.nonzero(mask.flatten(1).any(dim=1)).squeeze(1)  # a host sync
        if len(chosen) == 0:
            return images
        shape = {"pixel": (len(chosen), channels, height, width),
                 "rand": (len(chosen), channels, 1, 1)}.get(self.mode)
        if shape is None:
            noise = images.new_zeros(())
        else:
            noise = torch.randn(shape, generator=generator, dtype=images.dtype,
                                device=images.device)
        erased = torch.where(mask.index_select(0, chosen), noise, images.index_select(0, chosen))
        images.index_copy_(0, chosen, erased)
        return images


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, 1, H, W]`` bool union of ``[B, K, 4]`` boxes ``(top, left, h, w)``."""
    rows = torch.arange(height, device=boxes.device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=boxes.device).view(1, 1, 1, -1)
    top, left, h, w = (boxes[..., i, None, None] for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    return inside.any(dim=1, keepdim=True)
