"""MobileNetV2 for CIFAR (RepDistiller's ``MobileNetV2`` = ``mobile_half``).

Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018, in the CIFAR form of Jin et al., "Knowledge Distillation via Route
Constrained Optimization", ICCV 2019, used by RepDistiller: stride-2 stem, the seven
inverted-residual stages of the paper with strides 1, 1, 2, 2, 1, 2, 1, and a 1280-channel
1x1 head. ``MobileNetV2`` in ``model_dict`` has expansion 6 and width multiplier 0.5.
"""
from __future__ import annotations

import torch
from torch import nn

from . import he_init_, register_model

# (output channels at width 1, blocks, stride of the first block) per stage. The first stage
# does not expand; the others expand by the model's ``expansion``.
STAGES = ((16, 1, 1), (24, 2, 1), (32, 3, 2), (64, 4, 2), (96, 3, 1), (160, 3, 2), (320, 1, 1))
# Stages whose outputs are returned as features (and whose last BN is "before ReLU").
FEATURE_STAGES = (1, 2, 4, 6)


def conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) - BN - ReLU, ``padding = kernel_size // 2``."""
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=True),
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) - depthwise 3x3 - linear project (1x1), residual when shapes agree.

    ``[B, inp, H, W] -> [B, oup, H/stride, W/stride]``; ``self.conv`` holds the eight layers
    (conv, BN, ReLU, dw conv, BN, ReLU, conv, BN) at the reference's indices.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(nn.Module):
    """MobileNetV2 with expansion ``expansion`` and width multiplier ``width_mult``.

    Args:
        expansion: expansion ratio of stages 2 to 7.
        num_classes: size of the classifier output.
        width_mult: multiplier of every width except the 1280-channel head (which only grows).
        input_size: image side the final pooling is sized for (a multiple of 32).
    """

    def __init__(self, expansion: int, num_classes: int = 100, width_mult: float = 1.0, input_size: int = 32):
        super().__init__()
        if input_size % 32 != 0:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        channels = int(32 * width_mult)
        self.conv1 = conv_bn_relu(3, channels, 3, stride=2)
        self.blocks = nn.ModuleList()
        for k, (c, n, s) in enumerate(STAGES):
            out_channels = int(c * width_mult)
            t = 1 if k == 0 else expansion
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, t))
                channels = out_channels
            self.blocks.append(nn.Sequential(*stage))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = conv_bn_relu(channels, self.last_channel, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        # The stem and three stride-2 stages divide the side by 16.
        self.avgpool = nn.AvgPool2d(input_size // 16, ceil_mode=True)
        he_init_(self, linear_std=0.01)

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The projecting batch norm closing stages 2, 3, 5 and 7 (feature points 1 to 4)."""
        return [self.blocks[i][-1].conv[-1] for i in FEATURE_STAGES]

    def get_feat_modules(self) -> nn.ModuleList:
        """The stem and the ``ModuleList`` of all seven stages."""
        return nn.ModuleList([self.conv1, self.blocks])

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, 32, 32]`` -> logits ``[B, K]``, or ``(6 features, logits)`` with ``is_feat``.

        Features: stem output and the outputs of stages 2, 3, 5 and 7 (the projections are
        linear, so ``preact`` changes nothing), then the pooled vector ``[B, 1280]``.
        """
        out = self.conv1(x)
        feats = [out]
        for i, stage in enumerate(self.blocks):
            out = stage(out)
            if i in FEATURE_STAGES:
                feats.append(out)
        out = self.avgpool(self.conv2(out)).flatten(1)
        feats.append(out)
        logits = self.classifier(out)
        if is_feat:
            return feats, logits
        return logits


@register_model("MobileNetV2")
def mobile_half(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 with expansion 6 and width 0.5 (RepDistiller's ``mobile_half``)."""
    return MobileNetV2(6, num_classes, width_mult=0.5)
