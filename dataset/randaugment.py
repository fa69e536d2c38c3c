"""RandAugment (Cubuk et al., 2020) with timm's policy maths, applied to a batch op by op.

timm's ``rand_augment_transform`` (``timm/data/auto_augment.py``, v1.0.28), per image: pick
``n`` ops uniformly *with replacement* from the op set; each op, in turn, is skipped with
probability ``1 - p``, else draws its magnitude (``m``, or ``N(m, mstd)``, or ``U(0, m)`` when
``mstd > 100``; clipped to ``[0, mmax or 10]``), maps it to its argument with the op's level
function (a random sign where the op has one) and runs. ``rand-m9-mstd0.5-inc1`` (DeiT) is
2 ops, magnitude 9, std 0.5, the "increasing" op set, p 0.5.

Here the choices are drawn for a whole batch at once as uniforms (``[n, layers, 5]``: op,
apply, magnitude, sign, interpolation), and each layer runs grouped by op: the images that
drew op k are gathered, transformed in one batched call, and written back, so a layer costs a
few kernels per op and one host sync (the group sizes).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from dataset import randaugment_ops as ops

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude m means level m / 10
UNIFORMS_PER_LAYER = 5  # op, apply, magnitude, sign, interpolation
INTERPOLATIONS = ("bilinear", "bicubic", "random")

Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "RandAugmentConfig", str], torch.Tensor]


def _frac(m: torch.Tensor) -> torch.Tensor:
    return m / LEVEL_DENOM


def _signed(value: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    return torch.where(negate, -value, value)


def _enhance(m: torch.Tensor) -> torch.Tensor:  # timm _enhance_level_to_arg: [0.1, 1.9]
    return _frac(m) * 1.8 + 0.1


def _enhance_increasing(m: torch.Tensor, negate: torch.Tensor) -> torch.Tensor:
    return torch.clamp(1.0 + _signed(_frac(m) * 0.9, negate), min=0.1)


def _solarize_threshold(m: torch.Tensor) -> torch.Tensor:  # [0, 256], milder as m grows
    return torch.clamp(torch.trunc(_frac(m) * 256), max=256)


def _geometric(matrix: Callable[[torch.Tensor, torch.Tensor, "RandAugmentConfig", int, int],
                                torch.Tensor], along: Optional[int] = None) -> Op:
    def run(images, m, negate, config, interpolation):
        height, width = images.shape[-2:]
        return ops.affine(images, matrix(m, negate, config, height, width), config.fill,
                          interpolation, along)
    return run


def _translate(axis: int):
    def matrix(m, negate, config, height, width):
        pct = _signed(_frac(m) * config.translate_pct, negate)
        return ops.translate_matrix(pct * (width if axis == 0 else height), axis)
    return matrix


def _enhancer(fn, increasing: bool) -> Op:
    def run(images, m, negate, config, interpolation):
        return fn(images, _enhance_increasing(m, negate) if increasing else _enhance(m))
    return run


OPS: dict[str, Op] = {
    "AutoContrast": lambda x, m, s, c, i: ops.auto_contrast(x),
    "Equalize": lambda x, m, s, c, i: ops.equalize(x),
    "Invert": lambda x, m, s, c, i: ops.invert(x),
    "Rotate": _geometric(lambda m, s, c, h, w: ops.rotation_matrix(
        _signed(_frac(m) * 30.0, s), h, w)),
    "Posterize": lambda x, m, s, c, i: ops.posterize(x, torch.trunc(_frac(m) * 4).long()),
    "PosterizeIncreasing": lambda x, m, s, c, i: ops.posterize(
        x, 4 - torch.trunc(_frac(m) * 4).long()),
    "Solarize": lambda x, m, s, c, i: ops.solarize(x, _solarize_threshold(m).long()),
    "SolarizeIncreasing": lambda x, m, s, c, i: ops.solarize(
        x, 256 - _solarize_threshold(m).long()),
    "SolarizeAdd": lambda x, m, s, c, i: ops.solarize_add(
        x, torch.clamp(torch.trunc(_frac(m) * 110), max=128).long()),
    "Color": _enhancer(ops.color, False),
    "ColorIncreasing": _enhancer(ops.color, True),
    "Contrast": _enhancer(ops.contrast, False),
    "ContrastIncreasing": _enhancer(ops.contrast, True),
    "Brightness": _enhancer(ops.brightness, False),
    "BrightnessIncreasing": _enhancer(ops.brightness, True),
    "Sharpness": _enhancer(ops.sharpness, False),
    "SharpnessIncreasing": _enhancer(ops.sharpness, True),
    "ShearX": _geometric(lambda m, s, c, h, w: ops.shear_matrix(_signed(_frac(m) * 0.3, s), 0),
                         along=0),
    "ShearY": _geometric(lambda m, s, c, h, w: ops.shear_matrix(_signed(_frac(m) * 0.3, s), 1),
                         along=1),
    "TranslateXRel": _geometric(_translate(0), along=0),
    "TranslateYRel": _geometric(_translate(1), along=1),
}
GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS, in timm's order.
RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                   "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
                   "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclass(frozen=True)
class RandAugmentConfig:
    """One RandAugment policy.

    Attributes:
        ops: op names (keys of :data:`OPS`), chosen uniformly.
        num_layers: ops per image (``n``).
        magnitude: ``m`` on timm's 0..10 scale.
        magnitude_std: std of the per-application magnitude noise; ``inf``: ``U(0, m)``.
        magnitude_max: upper clip of the magnitude (timm's ``mmax``, default 10).
        prob: probability that a chosen op runs (``p``).
        fill: grey levels ``(r, g, b)`` where geometric ops uncover the image (timm's
            ``img_mean``: the normalisation mean x 255, rounded).
        interpolation: ``'bilinear'``, ``'bicubic'``, or ``'random'`` (one of the two per
            application, timm's default when no interpolation is given).
        translate_pct: largest translation as a fraction of the side (0.45).
    """

    ops: tuple[str, ...] = RAND_INCREASING_TRANSFORMS
    num_layers: int = 2
    magnitude: float = 10.0
    magnitude_std: float = 0.0
    magnitude_max: float = LEVEL_DENOM
    prob: float = 0.5
    fill: tuple[int, int, int] = (128, 128, 128)
    interpolation: str = "random"
    translate_pct: float = 0.45

    def __post_init__(self) -> None:
        unknown = [name for name in self.ops if name not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {', '.join(OPS)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got "
                             f"{self.interpolation!r}")
        if self.num_layers < 0 or not 0 <= self.prob <= 1 or self.magnitude_std < 0:
            raise ValueError("need num_layers >= 0, 0 <= prob <= 1 and magnitude_std >= 0")


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """timm's ``img_mean``: ``min(255, round(255 * mean))`` per channel (half to even)."""
    return tuple(min(255, round(255 * x)) for x in mean)  # type: ignore[return-value]


def parse_rand_augment(spec: str, mean: Sequence[float], interpolation: str = "random"
                       ) -> RandAugmentConfig:
    """A config from timm's spec string, e.g. ``'rand-m9-mstd0.5-inc1'``.

    Sections after ``rand`` (any order): ``m`` magnitude (int), ``n`` layers (int), ``p`` op
    probability, ``mstd`` magnitude std (above 100: uniform), ``mmax`` magnitude clip (int),
    ``inc`` the increasing op set. As in timm, any ``inc<digits>`` turns it on (timm tests
    ``bool`` of the string), and a section without digits is ignored.

    Raises:
        ValueError: not a ``rand`` spec, an unknown section, or a bad number.
    """
    sections = spec.split("-")
    if sections[0] != "rand":
        raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
    values: dict = {"magnitude_max": LEVEL_DENOM}
    increasing = False
    keys = {"m": ("magnitude", int), "n": ("num_layers", int), "p": ("prob", float),
            "mmax": ("magnitude_max", int)}
    for section in sections[1:]:
        parts = re.split(r"(\d.*)", section)
        if len(parts) < 2:
            continue
        key, value = parts[:2]
        try:
            if key == "mstd":
                std = float(value)
                values["magnitude_std"] = math.inf if std > 100 else std
            elif key == "inc":
                increasing = increasing or bool(value)
            elif key in keys:
                values[keys[key][0]] = keys[key][1](value)
            else:
                raise ValueError(f"unknown RandAugment section {section!r} in {spec!r}")
        except ValueError as err:
            raise ValueError(f"bad RandAugment spec {spec!r}: {err}") from None
    values["magnitude_max"] = values["magnitude_max"] or LEVEL_DENOM  # mmax0: timm's `or`
    return RandAugmentConfig(ops=RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS,
                             fill=mean_fill(mean), interpolation=interpolation, **values)


def draw_rand_augment(n: int, config: RandAugmentConfig, generator: torch.Generator
                      ) -> torch.Tensor:
    """``[n, layers * 5]`` float64 uniforms on the generator's device: every choice of ``n``
    images (see :func:`rand_augment`)."""
    return torch.rand(n, config.num_layers * UNIFORMS_PER_LAYER, generator=generator,
                      dtype=torch.float64, device=generator.device)


def magnitudes(u: torch.Tensor, config: RandAugmentConfig) -> torch.Tensor:
    """Per-application magnitudes from uniforms ``u``: ``m``, ``m + std * Phi^-1(u)`` or
    ``m * u``, clipped to ``[0, magnitude_max]`` (float64)."""
    m = torch.full_like(u, float(config.magnitude))
    if math.isinf(config.magnitude_std):
        m = m * u
    elif config.magnitude_std > 0:
        m = m + config.magnitude_std * math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return m.clamp(0.0, float(config.magnitude_max))


def rand_augment(images: torch.Tensor, uniforms: torch.Tensor, config: RandAugmentConfig
                 ) -> torch.Tensor:
    """Applies the policy to a batch, layer by layer, grouped by op.

    Args:
        images: ``[n, 3, H, W]`` uint8 on any device.
        uniforms: ``[n, layers * 5]`` from :func:`draw_rand_augment` (or any ``U[0, 1)``
            source); per layer: op ``floor(u * K)``, runs when ``u <= p``, magnitude, sign
            (negative when ``u > 0.5``, as timm's ``_randomly_negate``), bicubic when ``u >=
            0.5`` (interpolation ``'random'`` only).

    Returns:
        ``[n, 3, H, W]`` uint8, a new tensor.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("rand_augment takes [n, 3, H, W] uint8 images")
    u = uniforms.to(device=images.device, dtype=torch.float64)
    u = u.view(len(images), config.num_layers, UNIFORMS_PER_LAYER)
    out = images.clone()
    for layer in range(config.num_layers):
        out = _layer(out, u[:, layer], config)
    return out


class Choices(NamedTuple):
    """One layer's draws for ``n`` images, decoded from uniforms ``[n, 5]``."""

    op: torch.Tensor  # [n] int64 index into config.ops
    applied: torch.Tensor  # [n] bool
    magnitude: torch.Tensor  # [n] float64, clipped
    negate: torch.Tensor  # [n] bool
    bicubic: torch.Tensor  # [n] bool


def choices(u: torch.Tensor, config: RandAugmentConfig) -> Choices:
    """Decodes one layer's uniforms ``[n, 5]``: op ``floor(u * K)``; runs when ``u <= p``
    (timm skips when ``random() > p``); magnitude (:func:`magnitudes`); negative when ``u >
    0.5`` (timm's ``_randomly_negate``); bicubic when ``u >= 0.5`` under ``'random'``."""
    k = len(config.ops)
    op = (u[:, 0] * k).long().clamp_(max=k - 1)
    if config.interpolation == "random":
        bicubic = u[:, 4] >= 0.5
    else:
        bicubic = torch.full_like(op, config.interpolation == "bicubic", dtype=torch.bool)
    return Choices(op, u[:, 1] <= config.prob, magnitudes(u[:, 2], config), u[:, 3] > 0.5,
                   bicubic)


def _layer(images: torch.Tensor, u: torch.Tensor, config: RandAugmentConfig) -> torch.Tensor:
    k = len(config.ops)
    drawn = choices(u, config)
    geometric = torch.tensor([name in GEOMETRIC for name in config.ops], device=images.device)
    key = drawn.op * 2 + (drawn.bicubic & geometric[drawn.op]).long()
    key = torch.where(drawn.applied, key, torch.full_like(key, 2 * k))
    counts = torch.bincount(key, minlength=2 * k + 1).tolist()  # the layer's one host sync
    order = torch.argsort(key, stable=True)
    start = 0
    for group, count in enumerate(counts[:-1]):
        if count:
            idx = order[start:start + count]
            interpolation = "bicubic" if group % 2 else "bilinear"
            result = OPS[config.ops[group // 2]](images.index_select(0, idx),
                                                drawn.magnitude[idx], drawn.negate[idx], config,
                                                interpolation)
            images.index_copy_(0, idx, result)
        start += count
    return images


class RandAugment:
    """``RandAugment(config)(images, generator)``: draws and applies in one call."""

    def __init__(self, config: RandAugmentConfig) -> None:
        self.config = config

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None
                 ) -> torch.Tensor:
        generator = generator or torch.default_generator
        return rand_augment(images, draw_rand_augment(len(images), self.config, generator),
                            self.config)

    def __repr__(self) -> str:
        return f"RandAugment({self.config})"
