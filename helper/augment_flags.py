"""The training-batch augmentation flags of image-folder data (the DeiT recipe's) and the
:class:`~dataset.augment_recipe.TrainAugment` they describe.

Every flag is off by default, so the ResNet recipes run exactly as before. The same tensor
ops run on the device after nvJPEG decoding and in the CPU workers (``dataset/``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from dataset import INTERPOLATIONS
from dataset.augment_recipe import TrainAugment

AUGMENT_FLAGS = ("aa", "reprob", "remode", "recount", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob")


def add_arguments(group: Any) -> None:
    """Adds the augmentation flags to an argparse group."""
    group.add_argument("--aa", default=None,
                       help="image-folder data: RandAugment as timm spells it, e.g. rand-m9-mstd0.5-inc1 "
                            "(DeiT's: 2 ops, magnitude 9, std 0.5, the increasing op set); unset: none")
    group.add_argument("--reprob", type=float, default=0.0,
                       help="image-folder data: random erasing probability per image (DeiT 0.25)")
    group.add_argument("--remode", default="pixel", choices=("pixel", "rand", "const"),
                       help="random erasing fill: per-pixel normal noise, per-channel, or zeros")
    group.add_argument("--recount", type=int, default=1, help="random erasing boxes per erased image")
    group.add_argument("--mixup", type=float, default=0.0,
                       help="image-folder data: mixup Beta alpha (0: off; DeiT's main.py 0.8)")
    group.add_argument("--cutmix", type=float, default=0.0,
                       help="image-folder data: CutMix Beta alpha (0: off; DeiT's main.py 1.0)")
    group.add_argument("--mixup_prob", type=float, default=1.0, help="chance a batch is mixed")
    group.add_argument("--mixup_switch_prob", type=float, default=0.5,
                       help="chance of CutMix rather than mixup when both are on")
    group.add_argument("--train_interpolation", default="bilinear", choices=INTERPOLATIONS,
                       help="image-folder data: resampling of the training crops and RandAugment's "
                            "geometric ops (DeiT: bicubic)")
    group.add_argument("--eval_interpolation", default="bilinear", choices=INTERPOLATIONS,
                       help="image-folder data: resampling of the evaluation resize (DeiT: bicubic)")


def train_augment(flags: Mapping[str, Any]) -> Optional[TrainAugment]:
    """The batch augmentations the flags ask for, or None when all are off.

    Mixed targets fold in ``--smoothing`` (timm's ``Mixup``), so the CE term then reads them
    as they are.

    Raises:
        ValueError: a value out of range, or augmentations asked of a data set that is not an
            image folder (CIFAR-100 and digits keep their reference augmentation).
    """
    asked = (flags.get("aa") is not None or flags.get("reprob", 0.0) > 0 or flags.get("mixup", 0.0) > 0
             or flags.get("cutmix", 0.0) > 0)
    if not asked:
        return None
    if flags.get("dataset") != "imagenet":
        raise ValueError("--aa, --reprob, --mixup and --cutmix act on image-folder data (--dataset imagenet); "
                         f"--dataset {flags.get('dataset')} keeps its reference augmentation")
    return TrainAugment(rand_augment=flags.get("aa"), reprob=flags.get("reprob", 0.0),
                        remode=flags.get("remode", "pixel"), recount=flags.get("recount", 1),
                        mixup=flags.get("mixup", 0.0), cutmix=flags.get("cutmix", 0.0),
                        mixup_prob=flags.get("mixup_prob", 1.0),
                        mixup_switch_prob=flags.get("mixup_switch_prob", 0.5),
                        smoothing=flags.get("smoothing", 0.0))
