"""The training-batch augmentations of a transformer recipe, as one validated value.

DeiT's (``facebookresearch/deit`` ``main.py`` defaults, through timm's ``create_transform``
and ``Mixup``): RandAugment ``rand-m9-mstd0.5-inc1``, random erasing p 0.25 mode ``pixel``
count 1, mixup 0.8, CutMix 1.0, switch 0.5, mixup/cutmix prob 1, label smoothing 0.1, with
bicubic interpolation for the crop, RandAugment and the evaluation resize.

Where each runs (:mod:`dataset.imagenet_loader`): RandAugment on the uint8 crops after the
flip (in the CPU workers, or on the device after a GPU decode), random erasing after
normalisation and mixup/CutMix last, both on the device in the main process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from dataset.mixup import Mixup
from dataset.randaugment import RandAugmentConfig, parse_rand_augment
from dataset.random_erasing import RandomErasing


@dataclass(frozen=True)
class TrainAugment:
    """Options of the batch augmentations (all off by default).

    Attributes:
        rand_augment: timm RandAugment spec (``'rand-m9-mstd0.5-inc1'``), or None.
        reprob: random erasing probability (0: off); remode: ``'pixel'``, ``'rand'`` or
            ``'const'``; recount: boxes per erased image.
        mixup, cutmix: Beta alphas (0: off); cutmix_minmax: CutMix box side range instead.
        mixup_prob: chance a batch is mixed; mixup_switch_prob: chance of CutMix over mixup.
        smoothing: label smoothing folded into the mixed targets (used only when mixing).
    """

    rand_augment: Optional[str] = None
    reprob: float = 0.0
    remode: str = "pixel"
    recount: int = 1
    mixup: float = 0.0
    cutmix: float = 0.0
    cutmix_minmax: Optional[tuple[float, float]] = None
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        if not 0 <= self.reprob <= 1:
            raise ValueError(f"reprob must be in [0, 1], got {self.reprob}")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        RandomErasing(probability=self.reprob, mode=self.remode, max_count=self.recount)
        self.mixing(2)  # validates the mixup numbers
        if self.rand_augment is not None:
            self.rand_augment_config((0.5, 0.5, 0.5), "bilinear")

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (targets become ``[B, K]`` soft labels)."""
        return self.mixup > 0 or self.cutmix > 0 or self.cutmix_minmax is not None

    def rand_augment_config(self, mean: Sequence[float], interpolation: str
                            ) -> Optional[RandAugmentConfig]:
        """The RandAugment policy (fill from ``mean``), or None when off."""
        if self.rand_augment is None:
            return None
        return parse_rand_augment(self.rand_augment, mean, interpolation)

    def erasing(self) -> Optional[RandomErasing]:
        """timm's ``RandomErasing(reprob, mode=remode, max_count=recount)``, or None."""
        if self.reprob <= 0:
            return None
        return RandomErasing(probability=self.reprob, mode=self.remode, max_count=self.recount)

    def mixing(self, num_classes: int) -> Optional[Mixup]:
        """timm's batch-mode ``Mixup`` for ``num_classes``, or None when off."""
        if not self.mixes:
            return None
        return Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix,
                     cutmix_minmax=self.cutmix_minmax, prob=self.mixup_prob,
                     switch_prob=self.mixup_switch_prob, label_smoothing=self.smoothing,
                     num_classes=num_classes)


DEIT = TrainAugment(rand_augment="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1,
                    mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1)
"""DeiT's training augmentations (use with ``interpolation='bicubic'``)."""
