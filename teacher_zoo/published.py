"""The published teachers as data: names, files, where they live and their published top-1.

A leaf module without torch: the fetch script's helpers, the paper tables' runner and the
teacher commands all read it, and it imports nothing of theirs.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

# Published top-1 (%) of RepDistiller's teachers on the CIFAR-100 test set (paper Tables 1-4).
PUBLISHED_TOP1 = {
    "wrn_40_2": 75.61,
    "resnet56": 72.34,
    "resnet110": 74.31,
    "resnet32x4": 79.42,
    "vgg13": 74.64,
    "ResNet50": 79.34,
}
TEACHER_ROOT = os.path.join("save", "models")
TEACHER_FILE = os.path.join("{arch}_vanilla", "ckpt_epoch_240.pth")  # RepDistiller's layout
EXIT_INVALID = 3


class ImagenetTeacher(NamedTuple):
    """A torchvision ImageNet-1k weight file (a bare state dict; the 8 hex digits after the
    last '-' of its name start its SHA-256)."""

    file: str
    top1: float  # torchvision's published top-1 (%) on the ImageNet val set
    teacher: bool  # fetched by default (a teacher of the paper's ImageNet table)


# torchvision's IMAGENET1K_V1 weights; the paper quotes 73.31 (ResNet-34) and 76.16 (ResNet-50).
# ResNet-18 is the student of the ResNet-34 pair, listed for evaluation and fetched on request.
IMAGENET_URL = "https://download.pytorch.org/models/"
IMAGENET_TEACHERS = {
    "resnet18": ImagenetTeacher("resnet18-f37072fd.pth", 69.758, teacher=False),
    "resnet34": ImagenetTeacher("resnet34-b627a593.pth", 73.314, teacher=True),
    "resnet50": ImagenetTeacher("resnet50-0676ba61.pth", 76.130, teacher=True),
    # the stronger teachers of the paper's ResNet-18 table (torchvision's V1 files and top-1)
    "resnet101": ImagenetTeacher("resnet101-63fe2227.pth", 77.374, teacher=False),
    "resnet152": ImagenetTeacher("resnet152-394f9c45.pth", 78.312, teacher=False),
}


# The DeiT table's teacher: mmcls's DeiT III-S (ImageNet-21k pre-trained, fine-tuned on 1k;
# converted from Facebook's deit_3_small_224_21k.pth), the file cls_KD's config loads. mmcls
# lists 83.06 top-1 (its test pipeline: shorter side 224, bicubic, crop 224); the table's 82.76
# is at the student's 256 -> 224 pipeline. A '{"meta", "state_dict"}' checkpoint in mmcls's keys.
DEIT_URL = "https://download.openmmlab.com/mmclassification/v0/deit3/"
DEIT_TEACHERS = {
    "deit3_small_patch16_224": ImagenetTeacher(
        "deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth", 83.06, teacher=True),
}

# The paper's figures where they differ from the file's own (shown beside the verdict).
PAPER_IMAGENET_TOP1 = {"resnet50": 76.16, "deit3_small_patch16_224": 82.76}


def published_file(arch: str) -> ImagenetTeacher:
    """The published ImageNet-1k file of ``arch`` (torchvision's, or mmcls's DeiT III-S).

    Raises:
        KeyError: no published file is listed for ``arch``.
    """
    if arch in IMAGENET_TEACHERS:
        return IMAGENET_TEACHERS[arch]
    return DEIT_TEACHERS[arch]


def imagenet_teacher_path(root: str, arch: str, file: Optional[str] = None) -> str:
    """Where an ImageNet teacher lives: ``<root>/<arch>_imagenet/<published file name>``."""
    return os.path.join(root, f"{arch}_imagenet", file or published_file(arch).file)




def teacher_checkpoint(root: str, arch: str, dataset: str = "cifar100") -> str:
    """Where a teacher lives: ``<root>/<arch>_vanilla/ckpt_epoch_240.pth`` for CIFAR-100,
    ``<root>/<arch>_imagenet/<torchvision's file name>`` for ImageNet."""
    if dataset == "imagenet":
        return imagenet_teacher_path(root, arch)
    return os.path.join(root, TEACHER_FILE.format(arch=arch))
