"""ImageNet ResNets with torchvision's layout: resnet18, resnet34 and resnet50.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016, Table 1:
a 7x7 stride-2 stem, then four stages (3x3 max pooling opens the first) on 56, 28, 14 and 7
pixel maps for a 224 input. Module names, shapes, initialisation and forward are torchvision's
(``torchvision/models/resnet.py``; ResNet-50 is its "v1.5", with the stride on the 3x3
convolution of the bottleneck), so torchvision's ImageNet weight files load with
``load_state_dict(state_dict, strict=True)``.

Features follow mdistiller's ImageNet ResNet (``mdistiller/models/imagenet/resnet.py``): the
stem before max pooling ``[B, 64, H/2, W/2]``, the four stage outputs and the pooled vector;
with ``preact`` the stage outputs are the residual sums before their last ReLU.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import feature_output, he_init_, register_model, run_stages
from .resnet import BasicBlock


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 with the stride, 1x1 expand (x4), plus the shortcut ``downsample``.

    ``[B, inplanes, H, W] -> [B, 4 * planes, H / stride, W / stride]``. The last block of a
    stage (``is_last``) returns ``(out, preact)``, ``preact`` being the residual sum before the
    final ReLU.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        preact = self.bn3(self.conv3(out)) + (x if self.downsample is None else self.downsample(x))
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ImageNetResNet(nn.Module):
    """torchvision's ResNet with the feature interface of this package.

    Args:
        block: :class:`~models.resnet.BasicBlock` (ResNet-18/34) or :class:`Bottleneck` (ResNet-50).
        layers: blocks per stage, e.g. ``(3, 4, 6, 3)``.
        num_classes: size of the classifier output.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: Sequence[int],
                 num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        he_init_(self)  # torchvision's: He-normal fan-out convs, BN 1/0, default Linear

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        width = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != width:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, width, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(width),
            )
        layers = [block(self.inplanes, planes, stride, downsample, is_last=blocks == 1)]
        self.inplanes = width
        layers += [block(width, planes, is_last=i == blocks - 1) for i in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stage1(self, x: torch.Tensor):
        # The paper's conv2_x stage opens with the max pooling.
        return self.layer1(self.maxpool(x))

    def get_feat_modules(self) -> nn.ModuleList:
        """Stem (conv, BN, ReLU, max pooling) and the four stages, in forward order."""
        return nn.ModuleList([self.conv1, self.bn1, self.relu, self.maxpool,
                              self.layer1, self.layer2, self.layer3, self.layer4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The last batch norm of each of the four stages (it feeds the stage's final ReLU)."""
        last = "bn3" if isinstance(self.layer1[0], Bottleneck) else "bn2"
        return [getattr(layer[-1], last) for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 224, 224]`` -> logits ``[B, K]``, or ``(6 features, logits)`` with ``is_feat``.

        Features at 224: stem ``[B, 64, 112, 112]``, stages ``[B, C, 56, 56]`` ...
        ``[B, C, 7, 7]`` (``C`` = 64..512, times 4 for ResNet-50), pooled ``[B, C4]``.
        Any input side works (the pooling is adaptive); maps scale with it.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x, feats, pre = run_stages(x, (self._stage1, self.layer2, self.layer3, self.layer4))
        x = self.avgpool(x).flatten(1)
        return feature_output(feats, pre, x, self.fc(x), is_feat, preact)


@register_model("resnet18", input_size=224)
def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-18: basic blocks (2, 2, 2, 2), 11,689,512 parameters for 1000 classes."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("resnet34", input_size=224)
def resnet34(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-34: basic blocks (3, 4, 6, 3), 21,797,672 parameters for 1000 classes."""
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model("resnet50", input_size=224)
def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-50 (v1.5): bottlenecks (3, 4, 6, 3), 25,557,032 parameters for 1000 classes."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes)


@register_model("resnet101", input_size=224)
def resnet101(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-101 (v1.5): bottlenecks (3, 4, 23, 3), 44,549,160 parameters for 1000 classes
    (the stronger-teacher table's teacher)."""
    return ImageNetResNet(Bottleneck, (3, 4, 23, 3), num_classes)


@register_model("resnet152", input_size=224)
def resnet152(num_classes: int = 1000) -> ImageNetResNet:
    """ResNet-152 (v1.5): bottlenecks (3, 8, 36, 3), 60,192,808 parameters for 1000 classes."""
    return ImageNetResNet(Bottleneck, (3, 8, 36, 3), num_classes)
