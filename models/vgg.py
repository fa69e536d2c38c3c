"""VGG with batch norm for CIFAR: vgg8, vgg11, vgg13, vgg16, vgg19.

Simonyan and Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015 (configurations A, B, D, E, plus RepDistiller's 8-layer "S"), with
batch norm after every convolution, the fully connected head replaced by global average
pooling and one linear layer, as in RepDistiller.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import he_init_, register_model

# Output widths of the 3x3 convolutions in each of the five blocks.
CFGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def make_block(widths: Sequence[int], in_channels: int) -> nn.Sequential:
    """Conv(bias)-BN-ReLU per width, without the last ReLU, so the block ends on a batch norm."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """Five conv blocks separated by 2x2 max pooling, global average pooling, linear head.

    Args:
        cfg: per block, the widths of its 3x3 convolutions (see ``CFGS``); the last block
            must have 512 channels.
        num_classes: size of the classifier output.
    """

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int = 100):
        super().__init__()
        in_channels = [3] + [widths[-1] for widths in cfg[:-1]]
        self.block0 = make_block(cfg[0], in_channels[0])
        self.block1 = make_block(cfg[1], in_channels[1])
        self.block2 = make_block(cfg[2], in_channels[2])
        self.block3 = make_block(cfg[3], in_channels[3])
        self.block4 = make_block(cfg[4], in_channels[4])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)  # used for 64x64 inputs only
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.classifier = nn.Linear(512, num_classes)
        he_init_(self, linear_std=0.01)

    def get_feat_modules(self) -> nn.ModuleList:
        """Blocks and poolings, in forward order."""
        return nn.ModuleList([self.block0, self.pool0, self.block1, self.pool1, self.block2,
                              self.pool2, self.block3, self.pool3, self.block4, self.pool4])

    def get_bn_before_relu(self) -> list[nn.BatchNorm2d]:
        """The closing batch norm of blocks 1 to 4."""
        return [self.block1[-1], self.block2[-1], self.block3[-1], self.block4[-1]]

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        """``x [B, 3, H, W]`` -> logits ``[B, K]``, or ``(6 features, logits)`` with ``is_feat``.

        Features: block 0's activated output, the outputs of blocks 1 to 4 after their ReLU
        (or with ``preact`` before it), and the pooled vector ``[B, 512]``. For 32x32 inputs
        blocks 3 and 4 both run at 4x4; ``pool3`` between them is applied only when
        ``H == 64``.
        """
        apply_pool3 = x.shape[2] == 64
        x = F.relu(self.block0(x))
        feats, pre = [x], [x]
        stages = ((self.pool0, self.block1), (self.pool1, self.block2),
                  (self.pool2, self.block3), (self.pool3, self.block4))
        for pool, block in stages:
            if pool is not self.pool3 or apply_pool3:
                x = pool(x)
            x = block(x)
            pre.append(x)
            x = F.relu(x)
            feats.append(x)
        x = self.pool4(x).flatten(1)
        feats.append(x)
        pre.append(x)
        logits = self.classifier(x)
        if is_feat:
            return (pre if preact else feats), logits
        return logits


@register_model("vgg8")
def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with batch norm (configuration S: one conv per block)."""
    return VGG(CFGS["vgg8"], num_classes)


@register_model("vgg11")
def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with batch norm (configuration A)."""
    return VGG(CFGS["vgg11"], num_classes)


@register_model("vgg13")
def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with batch norm (configuration B)."""
    return VGG(CFGS["vgg13"], num_classes)


@register_model("vgg16")
def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with batch norm (configuration D)."""
    return VGG(CFGS["vgg16"], num_classes)


@register_model("vgg19")
def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with batch norm (configuration E)."""
    return VGG(CFGS["vgg19"], num_classes)
