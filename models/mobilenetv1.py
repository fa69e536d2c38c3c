"""The ImageNet MobileNet (v1) student of CRD, DKD and mdistiller: ``mobilenet_v1``.

Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
Applications", 2017, Table 1 (width multiplier 1): a 3x3 stride-2 convolution to 32
channels, 13 depthwise-separable blocks (64, 128 s2, 128, 256 s2, 256, 512 s2, 5x512,
1024 s2, 1024), global average pooling and a 1024-way linear classifier.

The state-dict layout is mdistiller's (``mdistiller/models/imagenet/mobilenetv1.py``), so its
released students load unchanged: one ``nn.Sequential`` named ``model`` whose item 0 is
``[conv, bn, relu]``, items 1..13 are ``[depthwise conv, bn, relu, pointwise conv, bn, relu]``
and item 14 is the pooling, then ``fc``. As there, the initialisation is PyTorch's default.
Stages end at items 3, 5, 11 and 13 (56, 28, 14 and 7 pixel maps for a 224 input).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from . import feature_output, register_model, run_stages

# (input channels, output channels, stride) of the 13 depthwise-separable blocks.
_BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
           (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1), (512, 512, 1),
           (512, 1024, 2), (1024, 1024, 1))
# Half-open ranges of ``model`` items forming the four stages (the stem is item 0).
_STAGES = ((1, 4), (4, 6), (6, 12), (12, 14))


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU: ``[B, inp, H, W] -> [B, oup, H/s, W/s]``."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup),
                         nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """Depthwise 3x3 (stride ``stride``) then pointwise 1x1, each with batch norm and ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNetV1 with the feature interface of this package.

    Args:
        num_classes: size of the classifier output.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        # An adaptive pool equals mdistiller's AvgPool2d(7) at 224 and also runs on small probes.
        self.model = nn.Sequential(_conv_bn(3, 32, 2), *(_conv_dw(*b) for b in _BLOCKS),
                                   nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(1024, num_classes)

    def _stage(self, start: int, stop: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``start..stop-1``; returns ``(out, preact)``, ``preact`` before the last ReLU."""
        for i in range(start, stop - 1):
            x = self.model[i](x)
        last = self.model[stop - 1]
        for j in range(len(last) - 1):
            x = last[j](x)
        return F.relu(x), x

    def get_feat_modules(self) -> nn.ModuleList:
        """The stem and the 13 depthwise-separable blocks, in forward order."""
        return nn.ModuleList(list(self.model)[:14])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The pointwise batch norm of the last block of each stage (mdistiller's)."""
        return [self.model[stop - 1][4] for _, stop in _STAGES]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 224, 224]`` -> logits ``[B, K]``, or ``(6 features, logits)`` with ``is_feat``.

        Features at 224: stem ``[B, 32, 112, 112]``, stages ``[B, 128, 56, 56]``,
        ``[B, 256, 28, 28]``, ``[B, 512, 14, 14]``, ``[B, 1024, 7, 7]`` (with ``preact``, before
        their last ReLU), pooled ``[B, 1024]``.
        """
        x = self.model[0](x)
        x, feats, pre = run_stages(x, [partial(self._stage, a, b) for a, b in _STAGES])
        x = self.model[14](x).flatten(1)
        return feature_output(feats, pre, x, self.fc(x), is_feat, preact)


@register_model("mobilenet_v1", input_size=224)
def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    """MobileNetV1 (width 1.0), 4,231,976 parameters for 1000 classes."""
    return MobileNetV1(num_classes)
