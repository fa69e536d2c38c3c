"""Reading a teacher file into its architecture, and scoring it on a data set."""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

import models
from errors import UserError
from helper.checkpoint import load_checkpoint, load_weights, state_dict_of
from helper.evaluate import evaluate
from helper.run import close_loaders
from teacher_zoo.published import IMAGENET_TEACHERS, imagenet_teacher_path, teacher_checkpoint


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
        state = state_dict_of(ckpt, path)
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


def score(model: nn.Module, data, device: torch.device, batch_size: int = 250,
          workers: int = 0, decode: str = "auto") -> float:
    """Top-1 (%) of ``model`` on the test (ImageNet: val) split of ``data``, a loaded data set
    (``dataset.load_dataset``); ``workers`` and ``decode`` act on image-folder data only."""
    train, test = data.loaders(batch_size, batch_size, seed=0, device=device, workers=workers,
                               decode=decode)
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
    if arch in IMAGENET_TEACHERS:
        return imagenet_teacher_path(root, arch)
    folder = os.path.join(root, f"{arch}_imagenet")
    found = sorted(f for f in os.listdir(folder) if f.endswith(".pth")) if os.path.isdir(folder) else []
    return os.path.join(folder, found[0] if len(found) == 1 else f"{arch}.pth")
