"""ShuffleNet v2 for CIFAR: ``ShuffleV2`` (width 1x).

Ma, Zhang, Zheng and Sun, "ShuffleNet V2: Practical Guidelines for Efficient CNN
Architecture Design", ECCV 2018: channel split, a 1x1 - depthwise 3x3 - 1x1 branch on one
half, concatenation and channel shuffle; stage widths 116/232/464 (3, 7, 3 units after each
down-sampling unit) and a 1024-channel 1x1 head, with a 1x1 stem and no max pooling for
32x32 inputs, as in RepDistiller. Weights keep PyTorch's default initialisation, like the
reference.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import feature_output, run_stages, register_model
from .ShuffleNetv1 import ShuffleBlock


class BasicBlock(nn.Module):
    """Stride-1 unit: ``[B, C, H, W] -> [B, C, H, W]``.

    The first half of the channels passes through, the second goes through the branch; the
    halves are concatenated and shuffled (2 groups). The last unit of a stage (``is_last``)
    returns ``(out, preact)``, where ``preact`` is the concatenation with the branch taken
    before its final ReLU and *before* the shuffle (the reference's definition).
    """

    def __init__(self, in_channels: int, is_last: bool = False):
        super().__init__()
        self.is_last = is_last
        c = in_channels // 2
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: torch.Tensor):
        c = x.shape[1] // 2
        x1, x2 = x[:, :c], x[:, c:]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        branch_pre = self.bn3(self.conv3(out))
        out = self.shuffle(torch.cat([x1, F.relu(branch_pre)], 1))
        if self.is_last:
            return out, torch.cat([x1, branch_pre], 1)
        return out


class DownBlock(nn.Module):
    """Stride-2 unit: ``[B, C_in, H, W] -> [B, C_out, H/2, W/2]``.

    Left branch: depthwise 3x3 (stride 2), 1x1; right branch: 1x1, depthwise 3x3 (stride 2),
    1x1; each gives ``C_out / 2`` channels; concatenated and shuffled.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        # left
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=1,
                               groups=in_channels, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        # right
        self.conv3 = nn.Conv2d(in_channels, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ShuffleBlock(groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = F.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNet v2 for 32x32 inputs.

    Args:
        out_channels: widths of the three stages and of the 1x1 head.
        num_blocks: stride-1 units per stage (each stage starts with a ``DownBlock``).
        num_classes: size of the classifier output.
    """

    def __init__(self, out_channels: Sequence[int], num_blocks: Sequence[int], num_classes: int = 100):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels, is_last=i == num_blocks - 1) for i in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def get_feat_modules(self) -> nn.ModuleList:
        """Stem (conv, BN) and the three stages, in forward order."""
        return nn.ModuleList([self.conv1, self.bn1, self.layer1, self.layer2, self.layer3])

    def get_bn_before_relu(self):
        """Not supported, as in the reference (no "Overhaul" distillation from ShuffleNets)."""
        raise NotImplementedError('ShuffleNetV2 currently is not supported for "Overhaul" teacher')

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 32, 32]`` -> logits ``[B, K]``, or ``(5 features, logits)`` with ``is_feat``.

        Features: stem output, the three stage outputs (or with ``preact`` the unshuffled
        pre-activation concatenation of each stage's last unit), and the pooled vector
        ``[B, 1024]`` taken after the 1x1 head.
        """
        x = F.relu(self.bn1(self.conv1(x)))
        x, feats, pre = run_stages(x, (self.layer1, self.layer2, self.layer3))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.avg_pool2d(x, 4).flatten(1)
        return feature_output(feats, pre, x, self.linear(x), is_feat, preact)


@register_model("ShuffleV2")
def ShuffleV2(num_classes: int = 100) -> ShuffleNetV2:
    """ShuffleNet v2 1x: stages of 3, 7, 3 units, widths 116/232/464, head 1024."""
    return ShuffleNetV2((116, 232, 464, 1024), (3, 7, 3), num_classes)
