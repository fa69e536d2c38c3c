"""The classifier head of each convolutional network: what maps its last feature map to logits.

``classifier_head(model)(feats[-2])`` equals ``model``'s logits, where ``feats[-2]`` is the last
``[B, C, H, W]`` map of ``model(x, is_feat=True)``. Methods that feed another network's features
through a teacher's own pooling and classifier (SRRL) use it. The head shares the network's
modules (no copy): it is a view of the network, not a new trainable part.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .mobilenetv1 import MobileNetV1
from .mobilenetv2 import MobileNetV2
from .resnet import ResNet
from .resnet_imagenet import ImageNetResNet
from .resnetv2 import BottleneckResNet
from .ShuffleNetv1 import ShuffleNet
from .ShuffleNetv2 import ShuffleNetV2
from .vgg import VGG
from .wrn import WideResNet

__all__ = ["ClassifierHead", "classifier_head"]


class ClassifierHead(nn.Module):
    """``classifier(global_avg_pool(pre_pool(fmap)))``.

    Every network here pools its last map globally (a fixed ``AvgPool2d`` that covers the
    whole map at its native input size, or an adaptive one); the head pools adaptively, so it
    also accepts maps of another side (a student's, passed through a connector).

    Args:
        pre_pool: what the network applies to its last feature map before pooling
            (``nn.Identity()`` for most; WRN's final BN + ReLU, MobileNetV2's 1x1 conv,
            ShuffleNetV2's 1x1 conv + BN + ReLU).
        classifier: the network's linear classifier.
    """

    def __init__(self, pre_pool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.pre_pool = pre_pool
        self.classifier = classifier

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` last feature map → ``[B, K]`` logits."""
        return self.classifier(F.adaptive_avg_pool2d(self.pre_pool(fmap), 1).flatten(1))


def _plain(attr: str) -> Callable[[nn.Module], ClassifierHead]:
    return lambda m: ClassifierHead(nn.Identity(), getattr(m, attr))


# (network class, head builder): the path from ``feats[-2]`` to the logits in each forward.
_HEADS: tuple[tuple[type, Callable[[nn.Module], ClassifierHead]], ...] = (
    (ResNet, _plain("fc")),
    (ImageNetResNet, _plain("fc")),
    (MobileNetV1, _plain("fc")),
    (BottleneckResNet, _plain("linear")),
    (ShuffleNet, _plain("linear")),
    (VGG, _plain("classifier")),
    # WRN's group outputs are pre-activation: the final BN and ReLU come before the pooling.
    (WideResNet, lambda m: ClassifierHead(nn.Sequential(m.bn1, nn.ReLU()), m.fc)),
    (MobileNetV2, lambda m: ClassifierHead(m.conv2, m.classifier)),
    (ShuffleNetV2, lambda m: ClassifierHead(nn.Sequential(m.conv2, m.bn2, nn.ReLU()), m.linear)),
)


def classifier_head(model: nn.Module) -> ClassifierHead:
    """The module mapping ``model``'s last feature map ``[B, C, H, W]`` to its logits ``[B, K]``.

    It holds ``model``'s own modules, so its parameters *are* the network's.

    Raises:
        ValueError: the network has no such head here (the ViTs: their last feature is a
            token sequence, not a map).
    """
    for cls, build in _HEADS:
        if type(model) is cls:
            return build(model)
    raise ValueError(f"{type(model).__name__} has no classifier head over a [B, C, H, W] feature "
                     f"map (known: {', '.join(c.__name__ for c, _ in _HEADS)})")
