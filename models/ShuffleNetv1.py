"""ShuffleNet (v1) for CIFAR: ``ShuffleV1``.

Zhang, Zhou, Lin and Sun, "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018: grouped 1x1 convolutions with channel shuffle, g = 3 groups,
stage widths 240/480/960 (4, 8, 4 units), with a 1x1 stem and no max pooling for 32x32 inputs,
as in RepDistiller. Weights keep PyTorch's default initialisation, like the reference.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import feature_output, run_stages, register_model


class ShuffleBlock(nn.Module):
    """Channel shuffle: ``[N, C, H, W]`` viewed as ``[N, g, C/g, H, W]``, transposed, flattened back."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class Bottleneck(nn.Module):
    """ShuffleNet unit: grouped 1x1, shuffle, depthwise 3x3, grouped 1x1, plus shortcut.

    With ``stride == 2`` the shortcut is a 3x3 average pooling whose output is concatenated
    (so the unit adds ``out_planes`` channels to ``in_planes``); otherwise it is added. The
    first unit after the 24-channel stem uses an ungrouped first convolution. The last unit
    of a stage (``is_last``) returns ``(out, preact)``, ``preact`` being the sum or
    concatenation before the final ReLU.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        self.stride = stride
        mid_planes = out_planes // 4
        g = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.shuffle1 = ShuffleBlock(groups=g)
        self.conv2 = nn.Conv2d(mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1,
                               groups=mid_planes, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()  # identity
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor):
        out = self.shuffle1(F.relu(self.bn1(self.conv1(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
        out = F.relu(preact)
        return (out, preact) if self.is_last else out


class ShuffleNet(nn.Module):
    """ShuffleNet v1 for 32x32 inputs.

    Args:
        out_planes: output width of each of the three stages.
        num_blocks: units per stage (the first of each has stride 2).
        groups: groups of the 1x1 convolutions.
        num_classes: size of the classifier output.
    """

    def __init__(self, out_planes: Sequence[int], num_blocks: Sequence[int], groups: int,
                 num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            # The first unit concatenates its (pooled) input, so it only computes the rest.
            branch_planes = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(Bottleneck(self.in_planes, branch_planes, stride=2 if i == 0 else 1,
                                     groups=groups, is_last=i == num_blocks - 1))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Stem (conv, BN) and the three stages, in forward order."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        """Not supported, as in the reference (no "Overhaul" distillation from ShuffleNets)."""
        raise NotImplementedError('ShuffleNet currently is not supported for "Overhaul" teacher')

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 32, 32]`` -> logits ``[B, K]``, or ``(5 features, logits)`` with ``is_feat``.

        Features: stem output, the three stage outputs (or with ``preact`` their values before
        the last ReLU), and the pooled vector ``[B, 960]``.
        """
        x = F.relu(self.bn1(self.conv1(x)))
        x, feats, pre = run_stages(x, (self.layer1, self.layer2, self.layer3))
        x = F.avg_pool2d(x, 4).flatten(1)
        return feature_output(feats, pre, x, self.linear(x), is_feat, preact)


@register_model("ShuffleV1")
def ShuffleV1(num_classes: int = 100) -> ShuffleNet:
    """ShuffleNet v1 with g = 3: stages of 4, 8, 4 units, widths 240/480/960."""
    return ShuffleNet((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)
