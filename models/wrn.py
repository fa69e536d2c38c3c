"""Wide residual networks: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016: pre-activation basic blocks
(BN-ReLU-conv, twice) in three groups of ``n = (depth - 4) / 6`` blocks with widths
``16k, 32k, 64k`` for widening factor ``k``, as used by RepDistiller.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import he_init_, register_model


class BasicBlock(nn.Module):
    """Pre-activation block: ``[B, in_planes, H, W] -> [B, out_planes, H/s, W/s]``.

    When the width changes, the 1x1 projection shortcut (``convShortcut``) reads the
    activated input ``relu(bn1(x))``; otherwise the identity shortcut reads ``x`` itself.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        out = F.relu(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return shortcut + self.conv2(out)


class NetworkBlock(nn.Module):
    """A group of ``nb_layers`` blocks (``self.layer``); the first changes width and stride."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(*[
            BasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
            for i in range(nb_layers)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs.

    Args:
        depth: ``6n + 4`` (16, 22, 28, 40, ...).
        num_classes: size of the classifier output.
        widen_factor: width multiplier ``k``.
        drop_rate: dropout between the two convolutions of each block (0 in RepDistiller).
    """

    def __init__(self, depth: int, num_classes: int = 100, widen_factor: int = 1, drop_rate: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"depth must be 6n+4 (16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        he_init_(self, zero_linear_bias=True)

    def get_feat_modules(self) -> nn.ModuleList:
        """Stem convolution and the three groups, in forward order."""
        return nn.ModuleList([self.conv1, self.block1, self.block2, self.block3])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The batch norm that opens the next group, and the final one, after each group."""
        return [self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 32, 32]`` -> logits ``[B, K]``, or ``(5 features, logits)`` with ``is_feat``.

        Features: stem output, the three group outputs, and the pooled vector ``[B, 64k]``.
        With ``preact`` the group outputs are passed through the batch norm that follows
        each (``get_bn_before_relu()``), as the reference does; in train mode that second call
        updates those batch norms' running statistics a second time.
        """
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        out = F.avg_pool2d(F.relu(self.bn1(f3)), 8).flatten(1)
        logits = self.fc(out)
        if not is_feat:
            return logits
        if preact:
            f1, f2, f3 = (bn(f) for bn, f in zip(self.get_bn_before_relu(), (f1, f2, f3)))
        return [f0, f1, f2, f3, out], logits


@register_model("wrn_16_1")
def wrn_16_1(num_classes: int = 100) -> WideResNet:
    """WRN-16-1: two blocks per group, widths 16/32/64."""
    return WideResNet(16, num_classes, widen_factor=1)


@register_model("wrn_16_2")
def wrn_16_2(num_classes: int = 100) -> WideResNet:
    """WRN-16-2: two blocks per group, widths 32/64/128."""
    return WideResNet(16, num_classes, widen_factor=2)


@register_model("wrn_40_1")
def wrn_40_1(num_classes: int = 100) -> WideResNet:
    """WRN-40-1: six blocks per group, widths 16/32/64."""
    return WideResNet(40, num_classes, widen_factor=1)


@register_model("wrn_40_2")
def wrn_40_2(num_classes: int = 100) -> WideResNet:
    """WRN-40-2: six blocks per group, widths 32/64/128."""
    return WideResNet(40, num_classes, widen_factor=2)
