"""Reading a teacher file into its architecture, and scoring it on a data set."""
from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import torch
from torch import nn

import models
from dataset import ImageFolderData
from errors import UserError
from helper.checkpoint import load_checkpoint, load_weights, model_state_of
from helper.evaluate import evaluate
from helper.data_setup import close_loaders
from teacher_zoo.published import (DEIT_TEACHERS, IMAGENET_TEACHERS, PAPER_IMAGENET_TOP1,
                                   imagenet_teacher_path, teacher_checkpoint)


class InvalidCheckpoint(Exception):
    """The file exists but is not a loadable checkpoint of the expected architecture."""


def _classifier_width(state: dict[str, torch.Tensor]) -> int:
    """The number of classes: rows of the last 2-D weight (the classifier, registered last)."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    if not matrices:
        raise InvalidCheckpoint("no classifier weight in the state dict")
    return int(matrices[-1].shape[0])


def load_teacher_file(path: str, arch: str, num_classes: Optional[int] = None
                      ) -> tuple[nn.Module, dict]:
    """Builds ``arch`` and loads ``path`` into it strictly, on the CPU.

    Args:
        path: a ``{'model': state_dict, ...}`` checkpoint.
        arch: the architecture the file must hold.
        num_classes: expected classifier width; None reads it from the file.

    Returns:
        The loaded model (eval mode) and the checkpoint dict.

    Raises:
        UserError: ``arch`` is not a known architecture.
        InvalidCheckpoint: missing, truncated, not plain data, or keys/shapes that differ.
    """
    if arch not in models.model_dict:
        raise UserError(f"unknown architecture {arch!r}; choose from {', '.join(models.model_names())}")
    try:
        ckpt = load_checkpoint(path, f"{arch} checkpoint")
        state = model_state_of(ckpt, path, arch)
        model = models.create_model(arch, num_classes or _classifier_width(state))
        load_weights(model, state, arch, path)
    except UserError as err:
        raise InvalidCheckpoint(str(err)) from None
    return model.eval(), ckpt


def stored_accuracy(ckpt: dict) -> Optional[float]:
    """The accuracy a checkpoint records (ours: ``best_acc``; RepDistiller's: ``accuracy``)."""
    for key in ("best_acc", "accuracy"):
        value = ckpt.get(key)
        if isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
            return float(value)
    return None


class EvalPipeline(NamedTuple):
    """How validation images become network inputs: shorter side to ``resize_size``
    (``interpolation``), then a 224 centre crop (crop ratio 224 / ``resize_size``)."""

    suffix: str  # appended to the arch in the expected table and the printed rows
    resize_size: int
    interpolation: str
    note: str


# torchvision's ImageNet evaluation (Resize(256), bilinear, CenterCrop(224)).
TORCHVISION_EVAL = EvalPipeline("", 256, "bilinear", "")
# The DeiT teacher is scored twice: with mmcls's DeiT III test pipeline (ResizeEdge short side
# 224, pillow bicubic, CenterCrop 224: open-mmlab/mmpretrain configs/_base_/datasets/
# imagenet_bs256_deit3.py with the 224 overrides of configs/deit3/deit3-small-p16_64xb64_in1k.py),
# the one its listed 83.06 comes from; and with the student's (256 -> 224 bicubic), the
# pipeline of the table's 82.76.
DEIT_EVALS = (
    EvalPipeline("", 224, "bicubic", "shorter side 224 bicubic, centre crop 224 (crop ratio 1.0, mmcls)"),
    EvalPipeline("@256", 256, "bicubic", "shorter side 256 bicubic, centre crop 224 (the student's)"),
)


def deit_expected() -> dict[str, float]:
    """Expected top-1 of each DeiT teacher per pipeline: ``ARCH`` (mmcls's figure) and
    ``ARCH@256`` (the paper's)."""
    table = {arch: row.top1 for arch, row in DEIT_TEACHERS.items()}
    table.update({arch + DEIT_EVALS[1].suffix: PAPER_IMAGENET_TOP1[arch] for arch in DEIT_TEACHERS})
    return table


def score(model: nn.Module, data, device: torch.device, batch_size: int = 250,
          workers: int = 0, decode: str = "auto",
          pipeline: EvalPipeline = TORCHVISION_EVAL) -> float:
    """Top-1 (%) of ``model`` on the test (ImageNet: val) split of ``data``, a loaded data set
    (``dataset.load_dataset``); ``workers``, ``decode`` and ``pipeline`` act on image-folder
    data only."""
    if isinstance(data, ImageFolderData):
        data = dataclasses.replace(data, resize_size=pipeline.resize_size)
        views = dict(eval_interpolation=pipeline.interpolation)
    else:
        views = {}
    train, test = data.loaders(batch_size, batch_size, seed=0, device=device, workers=workers,
                               decode=decode, **views)
    try:
        return evaluate(model.to(device), test)["acc1"]
    finally:
        close_loaders(train, test)


def teacher_path(root: str, arch: str, imagenet: bool) -> str:
    """Where ``verify`` looks for ``arch``: ``<root>/<arch>_vanilla/ckpt_epoch_240.pth``, or for
    ImageNet torchvision's file in ``<root>/<arch>_imagenet/`` (another architecture's: the
    one ``.pth`` file that folder holds)."""
    if not imagenet:
        return teacher_checkpoint(root, arch)
    if arch in IMAGENET_TEACHERS or arch in DEIT_TEACHERS:
        return imagenet_teacher_path(root, arch)
    folder = os.path.join(root, f"{arch}_imagenet")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
    return os.path.join(folder, found[0] if len(found) == 1 else f"{arch}.pth")
