"""ResNet-50 for 32x32 inputs (RepDistiller's ``ResNet50``).

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016: the
ImageNet bottleneck ResNet-50 (stages of 3, 4, 6, 3 blocks, widths 256 to 2048) with the
7x7 stride-2 stem and max pooling replaced by one 3x3 stride-1 convolution, so the four stages
run on 32x32, 16x16, 8x8 and 4x4 maps.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import feature_output, run_stages, he_init_, register_model


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride ``stride``), 1x1 expand, plus shortcut.

    ``[B, in_planes, H, W] -> [B, 4 * planes, H / stride, W / stride]``. The last block of a
    stage (``is_last``) returns ``(out, preact)`` with ``preact`` the residual sum before the
    final ReLU.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, is_last: bool = False):
        super().__init__()
        out_planes = self.expansion * planes
        self.is_last = is_last
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # identity
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + self.shortcut(x)
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class BottleneckResNet(nn.Module):
    """Four-stage bottleneck ResNet with a 3x3 stride-1 stem.

    Args:
        num_blocks: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: size of the classifier output.
    """

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 100):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(512 * Bottleneck.expansion, num_classes)
        he_init_(self)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            layers.append(Bottleneck(self.in_planes, planes, stride if i == 0 else 1, i == num_blocks - 1))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Stem (conv, BN) and the four stages, in forward order."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last batch norm of each stage (it feeds the stage's final ReLU)."""
        return [layer[-1].bn3 for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 32, 32]`` -> logits ``[B, K]``, or ``(6 features, logits)`` with ``is_feat``.

        Features: stem output, the four stage outputs (or with ``preact`` their residual sums
        before the last ReLU), and the pooled vector ``[B, 2048]``. The reference returns a
        list ``[features, logits]`` when ``preact`` is set; this returns a tuple throughout.
        """
        x = F.relu(self.bn1(self.conv1(x)))
        x, feats, pre = run_stages(x, (self.layer1, self.layer2, self.layer3, self.layer4))
        x = self.avgpool(x).flatten(1)
        return feature_output(feats, pre, x, self.linear(x), is_feat, preact)


@register_model("ResNet50")
def ResNet50(num_classes: int = 100) -> BottleneckResNet:
    """ResNet-50: bottleneck stages of 3, 4, 6 and 3 blocks, pooled feature 2048."""
    return BottleneckResNet((3, 4, 6, 3), num_classes)
