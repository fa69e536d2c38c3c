"""CIFAR ResNets: resnet8 ... resnet110, resnet8x4 and resnet32x4.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016: the
6n+2-layer CIFAR network of section 4.2 (three stages of ``n`` basic blocks on 32x32, 16x16
and 8x8 maps), with 1x1-convolution projection shortcuts as in RepDistiller (Tian, Krishnan
and Isola, "Contrastive Representation Distillation", ICLR 2020), whose ``x4`` variants
quadruple the widths.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import feature_output, run_stages, he_init_, register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual sum: ``[B, inplanes, H, W] -> [B, planes, H/s, W/s]``.

    The last block of a stage (``is_last``) returns ``(out, preact)``, ``preact`` being the
    residual sum before the final ReLU; the model collects it for ``preact=True``.
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        preact = out + (x if self.downsample is None else self.downsample(x))
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ResNet(nn.Module):
    """CIFAR ResNet of depth ``6n+2``.

    Args:
        depth: total number of weighted layers, ``6n + 2``.
        num_filters: widths of the stem and of the three stages, e.g. ``(16, 16, 32, 64)``.
        num_classes: size of the classifier output.
    """

    def __init__(self, depth: int, num_filters: Sequence[int], num_classes: int = 100):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n+2 (8, 14, 20, ...), got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(num_filters[3], num_classes)
        he_init_(self)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, is_last=blocks == 1)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, is_last=i == blocks - 1) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Stem (conv, BN, ReLU) and the three stages, in forward order."""
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last batch norm of each stage (it feeds the stage's final ReLU)."""
        return [self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 32, 32]`` -> logits ``[B, K]``, or ``(5 features, logits)`` with ``is_feat``.

        Features: stem output, the three stage outputs (or with ``preact`` their residual
        sums before the last ReLU), and the pooled vector ``[B, C3]``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x, feats, pre = run_stages(x, (self.layer1, self.layer2, self.layer3))
        x = self.avgpool(x).flatten(1)
        return feature_output(feats, pre, x, self.fc(x), is_feat, preact)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model("resnet8")
def resnet8(num_classes: int = 100) -> ResNet:
    """ResNet-8 (one block per stage), widths 16/32/64."""
    return ResNet(8, _THIN, num_classes)


@register_model("resnet14")
def resnet14(num_classes: int = 100) -> ResNet:
    """ResNet-14 (two blocks per stage), widths 16/32/64."""
    return ResNet(14, _THIN, num_classes)


@register_model("resnet20")
def resnet20(num_classes: int = 100) -> ResNet:
    """ResNet-20 (three blocks per stage), widths 16/32/64."""
    return ResNet(20, _THIN, num_classes)


@register_model("resnet32")
def resnet32(num_classes: int = 100) -> ResNet:
    """ResNet-32 (five blocks per stage), widths 16/32/64."""
    return ResNet(32, _THIN, num_classes)


@register_model("resnet44")
def resnet44(num_classes: int = 100) -> ResNet:
    """ResNet-44 (seven blocks per stage), widths 16/32/64."""
    return ResNet(44, _THIN, num_classes)


@register_model("resnet56")
def resnet56(num_classes: int = 100) -> ResNet:
    """ResNet-56 (nine blocks per stage), widths 16/32/64."""
    return ResNet(56, _THIN, num_classes)


@register_model("resnet110")
def resnet110(num_classes: int = 100) -> ResNet:
    """ResNet-110 (18 blocks per stage), widths 16/32/64."""
    return ResNet(110, _THIN, num_classes)


@register_model("resnet8x4")
def resnet8x4(num_classes: int = 100) -> ResNet:
    """ResNet-8 with 4x widths: stem 32, stages 64/128/256."""
    return ResNet(8, _WIDE, num_classes)


@register_model("resnet32x4")
def resnet32x4(num_classes: int = 100) -> ResNet:
    """ResNet-32 with 4x widths: stem 32, stages 64/128/256."""
    return ResNet(32, _WIDE, num_classes)
