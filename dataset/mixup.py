"""Mixup (Zhang et al., ICLR 2018) and CutMix (Yun et al., ICCV 2019) on a normalised batch,
with timm's maths (``timm/data/mixup.py``, v1.0.28, ``mode='batch'``).

Per batch: with probability ``prob`` mix, choosing CutMix with probability ``switch_prob``
when both are on; ``lam ~ Beta(alpha, alpha)`` of the chosen one. The partner of sample i is
sample ``B - 1 - i`` (the batch flipped). Mixup: ``x * lam + flip(x) * (1 - lam)``. CutMix:
a box of side ``int(H * sqrt(1 - lam))`` x ``int(W * sqrt(1 - lam))`` centred at a uniform
pixel, clipped to the image, is pasted from the partner, and ``lam`` becomes the kept area
fraction (``correct_lam``). Targets: ``lam * y + (1 - lam) * flip(y)`` with label-smoothed
one-hots (``off = smoothing / K``, ``on = 1 - smoothing + off``). DeiT: mixup 0.8, cutmix
1.0, prob 1, switch 0.5, smoothing 0.1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

_GAMMA_CANDIDATES = 32  # Marsaglia-Tsang accepts > 95% of candidates for shape >= 1


def sample_gamma(shape: float, generator: torch.Generator) -> float:
    """One ``Gamma(shape, 1)`` draw from ``generator`` (Marsaglia & Tsang, 2000; for a shape
    below 1, ``Gamma(shape + 1) * U^(1 / shape)``)."""
    if shape <= 0:
        raise ValueError(f"gamma shape must be positive, got {shape}")
    boost = shape < 1
    a = shape + 1 if boost else shape
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = torch.randn(_GAMMA_CANDIDATES, generator=generator, dtype=torch.float64,
                        device=generator.device).cpu()
        u = torch.rand(_GAMMA_CANDIDATES + 1, generator=generator, dtype=torch.float64,
                       device=generator.device).cpu()
        v = (1.0 + c * z) ** 3
        ok = (v > 0) & (torch.log(u[1:]) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp(1e-300)))
        if bool(ok.any()):
            value = d * float(v[int(ok.to(torch.int8).argmax())])
            return value * float(u[0]) ** (1.0 / shape) if boost else value


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One ``Beta(alpha, alpha)`` draw, as ``G1 / (G1 + G2)`` of two gamma draws."""
    if alpha == 1.0:  # Beta(1, 1) is uniform
        return float(torch.rand((), generator=generator, dtype=torch.float64,
                                device=generator.device))
    g1, g2 = sample_gamma(alpha, generator), sample_gamma(alpha, generator)
    return g1 / (g1 + g2)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """``[B, K]`` float32: ``1 - smoothing + smoothing / K`` at the label, ``smoothing / K``
    elsewhere (timm's ``one_hot`` with on/off values)."""
    off = smoothing / num_classes
    out = torch.full((len(labels), num_classes), off, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def mix_targets(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float
                ) -> torch.Tensor:
    """timm's ``mixup_target``: ``lam * y + (1 - lam) * flip(y)``, ``[B, K]`` float32."""
    y = smooth_one_hot(labels, num_classes, smoothing)
    return y * lam + y.flip(0) * (1.0 - lam)


@dataclass(frozen=True)
class Mixup:
    """Batch-mode Mixup/CutMix: ``Mixup(...)(images, labels, generator) -> (images,
    targets [B, K] float32)``.

    Attributes:
        mixup_alpha: Beta parameter of mixup (0: off).
        cutmix_alpha: Beta parameter of CutMix (0: off).
        cutmix_minmax: box side range as fractions of the image; when set, boxes are drawn
            from it instead of from ``lam`` (and ``cutmix_alpha`` counts as 1, as in timm).
        prob: chance that a batch is mixed at all.
        switch_prob: chance of CutMix rather than mixup when both are on.
        label_smoothing: smoothing of the one-hot targets before they are mixed.
        num_classes: ``K``.
        correct_lam: set ``lam`` to the kept area after the CutMix box is clipped.
    """

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    num_classes: int = 1000
    correct_lam: bool = True

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not 0 <= self.prob <= 1:
            raise ValueError("need mixup_alpha >= 0, cutmix_alpha >= 0 and 0 <= prob <= 1")
        if not (self.mixup_alpha > 0 or self.cutmix_alpha > 0 or self.cutmix_minmax):
            raise ValueError("Mixup needs mixup_alpha > 0, cutmix_alpha > 0 or cutmix_minmax")
        if self.cutmix_minmax is not None and len(self.cutmix_minmax) != 2:
            raise ValueError("cutmix_minmax must be (min, max)")

    def params(self, generator: torch.Generator) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch (timm's ``_params_per_batch``)."""
        cutmix_alpha = 1.0 if self.cutmix_minmax is not None else self.cutmix_alpha
        if _uniform(generator) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and cutmix_alpha > 0:
            use_cutmix = _uniform(generator) < self.switch_prob
        else:
            use_cutmix = cutmix_alpha > 0
        return sample_beta(cutmix_alpha if use_cutmix else self.mixup_alpha, generator), \
            use_cutmix

    def box(self, lam: float, height: int, width: int, generator: torch.Generator
            ) -> tuple[int, int, int, int]:
        """``(top, bottom, left, right)`` of the CutMix box (timm's ``rand_bbox`` or, with
        ``cutmix_minmax``, ``rand_bbox_minmax``)."""
        if self.cutmix_minmax is not None:
            lo, hi = self.cutmix_minmax
            cut_h = _randint(int(height * lo), int(height * hi), generator)
            cut_w = _randint(int(width * lo), int(width * hi), generator)
            top, left = _randint(0, height - cut_h, generator), _randint(0, width - cut_w,
                                                                         generator)
            return top, top + cut_h, left, left + cut_w
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = _randint(0, height, generator), _randint(0, width, generator)
        clip = lambda v, size: min(max(v, 0), size)  # noqa: E731
        return (clip(cy - cut_h // 2, height), clip(cy + cut_h // 2, height),
                clip(cx - cut_w // 2, width), clip(cx + cut_w // 2, width))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixes ``[B, C, H, W]`` float images in place; ``labels`` ``[B]`` int64.

        ``generator`` may live anywhere: the draws are a few scalars (a CPU generator avoids a
        device sync per batch).

        Returns:
            ``(images, targets [B, K] float32)`` on the images' device.
        """
        lam, use_cutmix = self.params(generator)
        if lam != 1.0:
            if use_cutmix:
                top, bottom, left, right = self.box(lam, *images.shape[-2:], generator)
                images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom,
                                                                      left:right]
                if self.correct_lam or self.cutmix_minmax is not None:
                    area = (bottom - top) * (right - left)
                    lam = 1.0 - area / float(images.shape[-2] * images.shape[-1])
            else:
                partner = images.flip(0).mul_(1.0 - lam)
                images.mul_(lam).add_(partner)
        targets = mix_targets(labels.to(images.device), self.num_classes, lam,
                              self.label_smoothing)
        return images, targets


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """Uniform on ``low .. high - 1`` (numpy's ``randint``)."""
    if high <= low:
        raise ValueError(f"empty range {low} .. {high - 1}")
    return int(torch.randint(low, high, (), generator=generator, device=generator.device))
