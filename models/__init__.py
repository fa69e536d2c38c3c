"""The CIFAR-100 networks of RepDistiller and the TTM paper, and the ImageNet networks of
torchvision and mdistiller, behind a name registry.

Every network maps images ``[B, 3, H, W]`` (``H = W = 32`` for CIFAR, 224 for ImageNet; see
:func:`input_size`) through
``forward(x, is_feat=False, preact=False)`` to logits ``[B, K]``, or with ``is_feat=True`` to
``(features, logits)``: ``features`` lists the per-stage maps ``[B, C, H, W]`` and, last, the
pooled vector ``[B, D]`` that feeds the classifier; ``preact=True`` swaps in the
pre-activation maps where the architecture defines them. State-dict keys are RepDistiller's
(CIFAR), torchvision's (``resnet18/34/50``) and mdistiller's (``mobilenet_v1``), so the
published weights load with ``model.load_state_dict(state_dict)``.

Architectures register themselves with :func:`register_model` when their file is imported
(at the bottom of this file); ``model_dict``, ``model_names()`` and the CLI choices all come
from that one registry.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

__all__ = ["model_dict", "register_model", "model_names", "input_size", "create_model", "feature_shapes"]

ModelBuilder = Callable[..., nn.Module]

model_dict: dict[str, ModelBuilder] = {}
"""Name -> builder called as ``model_dict[name](num_classes=100)`` (the RepDistiller contract)."""

_input_sizes: dict[str, int] = {}
"""Name -> side in pixels of the square images the network is built for (filled with ``model_dict``)."""


def register_model(name: str, input_size: int = 32) -> Callable[[ModelBuilder], ModelBuilder]:
    """Decorator that adds a builder ``fn(num_classes: int) -> nn.Module`` under ``name``.

    Args:
        name: the registry name (``--model``, ``--model_s``).
        input_size: side of the images the network is designed for, in pixels: 32 for the
            CIFAR networks, 224 for the ImageNet ones.
    """

    def add(fn: ModelBuilder) -> ModelBuilder:
        if name in model_dict:
            raise ValueError(f"model {name!r} is registered twice")
        model_dict[name] = fn
        _input_sizes[name] = input_size
        return fn

    return add


def model_names(input_size: int | None = None) -> list[str]:
    """The registered architecture names, sorted (argparse choices, test parametrisation).

    Args:
        input_size: keep only the networks built for this image side (32 or 224); all when None.
    """
    return sorted(n for n in model_dict if input_size is None or _input_sizes[n] == input_size)


def _unknown(name: str) -> KeyError:
    return KeyError(f"unknown model {name!r}; choose from {', '.join(model_names())}")


def input_size(name: str) -> int:
    """Side in pixels of the square images the architecture ``name`` takes (32 or 224).

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
    """
    try:
        return _input_sizes[name]
    except KeyError:
        raise _unknown(name) from None


def create_model(name: str, num_classes: int, drop_path_rate: float = 0.0) -> nn.Module:
    """Builds the architecture ``name`` with a ``num_classes``-way classifier.

    Args:
        drop_path_rate: stochastic depth of the networks that have it (the ViTs); any other
            network takes only 0.

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
        ValueError: a drop path for a network without one.
    """
    try:
        builder = model_dict[name]
    except KeyError:
        raise _unknown(name) from None
    if drop_path_rate:
        try:
            return builder(num_classes=num_classes, drop_path_rate=drop_path_rate)
        except TypeError:
            raise ValueError(f"{name} has no stochastic depth (drop path)") from None
    return builder(num_classes=num_classes)


@torch.no_grad()
def feature_shapes(model: nn.Module, image_size: int = 32, preact: bool = False) -> list[torch.Size]:
    """Shapes of ``model(x, is_feat=True, preact=preact)[0]`` for a batch of 2 zero images.

    Methods size their connectors and embeddings from these (``[2, C, H, W]`` per stage, then
    ``[2, D]``); probe at the network's own side, ``input_size(name)`` (224 for ImageNet).
    The probe runs in eval mode, so no BatchNorm statistics move, and every submodule's
    train/eval flag is restored afterwards.
    """
    modes = [(m, m.training) for m in model.modules()]
    ref = next(model.parameters(), None)
    x = torch.zeros(2, 3, image_size, image_size,
                    device=None if ref is None else ref.device,
                    dtype=None if ref is None else ref.dtype)
    model.eval()
    try:
        feats, _ = model(x, is_feat=True, preact=preact)
    finally:
        for m, training in modes:
            m.training = training
    return [f.shape for f in feats]


def he_init_(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Initialises ``model`` in place the way RepDistiller's architectures do.

    Convolutions get He-normal weights (fan-out, ReLU gain) and zero bias, batch norms weight 1
    and bias 0. Linear layers keep PyTorch's default unless ``linear_std`` is given (weights
    ``N(0, linear_std**2)`` and zero bias) or ``zero_linear_bias`` is set.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(m.bias)


def run_stages(x: torch.Tensor, stages) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Runs residual stages whose last block returns ``(out, preact)``.

    Args:
        x: the stem output ``[B, C, H, W]`` (the first feature of both lists).
        stages: modules mapping a map to ``(out, preact)``.

    Returns:
        The last stage's output, and the feature lists without and with pre-activation:
        ``[stem, stage outputs...]`` and ``[stem, stage preacts...]``.
    """
    feats, pre = [x], [x]
    for stage in stages:
        x, x_pre = stage(x)
        feats.append(x)
        pre.append(x_pre)
    return x, feats, pre


def feature_output(feats: list[torch.Tensor], pre: list[torch.Tensor], pooled: torch.Tensor,
                   logits: torch.Tensor, is_feat: bool, preact: bool):
    """The contract return of ``forward``: logits, or ``(features + [pooled], logits)``."""
    if not is_feat:
        return logits
    return (pre if preact else feats) + [pooled], logits


# Importing the architecture files fills ``model_dict`` (they use the helpers above).
from . import resnet, resnetv2, wrn, vgg, mobilenetv2, ShuffleNetv1, ShuffleNetv2  # noqa: E402,F401
from . import resnet_imagenet, mobilenetv1  # noqa: E402,F401
from . import vit  # noqa: E402,F401
