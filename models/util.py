"""Small trainable helpers that distillation methods attach to the student.

Class names, constructor arguments and parameter names are RepDistiller's
(``models/util.py``), so the helpers' state-dict keys match the reference:
``ConvReg`` (FitNet regressor), ``Connector`` (AB), ``Paraphraser`` / ``Translator`` (FT),
``LinearEmbed`` (CC, ITRD) and ``Embed`` (CRD: linear map, then L2 normalisation).
Shapes are ``torch.Size`` of probed features: ``[N, C, H, W]`` maps or ``[N, D]`` vectors.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["ConvReg", "Connector", "Paraphraser", "Translator", "LinearEmbed", "Embed", "Normalize"]


class ConvReg(nn.Module):
    """Convolutional regressor from a student map to a teacher map's shape (Romero et al.,
    "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    The convolution depends on the heights: a 3×3 stride-2 conv when ``s_H == 2 t_H``, a 4×4
    stride-2 transposed conv when ``2 s_H == t_H``, otherwise a valid conv with kernel
    ``(1 + s_H - t_H, 1 + s_W - t_W)``; then ``bn`` and, with ``use_relu``, a ReLU.

    Args:
        s_shape: student feature shape ``[N, C_s, H_s, W_s]``.
        t_shape: teacher feature shape ``[N, C_t, H_t, W_t]``.
        use_relu: apply a ReLU after the batch norm.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True) -> None:
        super().__init__()
        self.use_relu = use_relu
        _, s_c, s_h, s_w = s_shape
        _, t_c, t_h, t_w = t_shape
        if s_h == 2 * t_h:
            self.conv: nn.Module = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif 2 * s_h == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"ConvReg cannot map student size {s_h} to teacher size {t_h}")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C_s, H_s, W_s]`` → ``[B, C_t, H_t, W_t]``."""
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class Connector(nn.Module):
    """Per-layer connectors of AB (Heo et al., "Knowledge Transfer via Distillation of
    Activation Boundaries Formed by Hidden Neurons", AAAI 2019).

    ``connectors[i]`` is the identity (an empty ``nn.Sequential``) when the i-th student and
    teacher maps agree in channels and height, else ``ConvReg(..., use_relu=False)``.

    Args:
        s_shapes: student feature shapes ``[N, C, H, W]``, one per layer.
        t_shapes: teacher feature shapes, same length.
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError(f"Connector: {len(s_shapes)} student shapes but {len(t_shapes)} teacher shapes")
        self.s_shapes = s_shapes
        self.t_shapes = t_shapes
        self.connectors = nn.ModuleList(
            nn.Sequential() if (s[1] == t[1] and s[2] == t[2]) else ConvReg(s, t, use_relu=False)
            for s, t in zip(s_shapes, t_shapes))

    def forward(self, g_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Student maps → maps of the teacher's shapes (a list of the same length)."""
        return [conn(f) for conn, f in zip(self.connectors, g_s)]


def _factor_encoder(c_in: int, c_out: int, use_bn: bool, transpose: bool = False,
                    reverse: bool = False) -> nn.Sequential:
    """Three 3×3 same-size convs, each followed by a batch norm (or an empty placeholder, so
    that parameter indices stay 0, 3, 6 / 1, 4, 7) and LeakyReLU(0.1).

    Channels go ``c_in → c_in → c_out → c_out``, or ``c_out → c_out → c_in → c_in`` with
    ``reverse`` (the paraphraser's decoder).
    """
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    pairs = [(c_out, c_out), (c_out, c_in), (c_in, c_in)] if reverse else \
        [(c_in, c_in), (c_in, c_out), (c_out, c_out)]
    layers: list[nn.Module] = []
    for a, b in pairs:
        layers += [conv(a, b, 3, 1, 1),
                   nn.BatchNorm2d(b) if use_bn else nn.Sequential(),
                   nn.LeakyReLU(0.1, inplace=True)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """The teacher-side paraphraser of FT (Kim et al., "Paraphrasing Complex Network: Network
    Compression via Factor Transfer", NeurIPS 2018): a conv auto-encoder whose bottleneck
    (``int(C * k)`` channels, same spatial size) is the teacher factor.

    Args:
        t_shape: teacher feature shape ``[N, C, H, W]``.
        k: paraphrase rate (bottleneck channels / input channels).
        use_bn: batch norms after the convolutions.
    """

    def __init__(self, t_shape: Sequence[int], k: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        c_in, c_out = t_shape[1], int(t_shape[1] * k)
        self.encoder = _factor_encoder(c_in, c_out, use_bn)
        self.decoder = _factor_encoder(c_in, c_out, use_bn, transpose=True, reverse=True)

    def forward(self, f_s: torch.Tensor, is_factor: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, H, W]`` → ``(factor [B, C*k, H, W], reconstruction [B, C, H, W])``, or the
        factor alone when ``is_factor``."""
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """The student-side translator of FT: three convs mapping the student map to a factor of
    ``int(C_t * k)`` channels.

    Args:
        s_shape: student feature shape ``[N, C_s, H, W]``.
        t_shape: teacher feature shape ``[N, C_t, H', W']`` (sets the factor width).
        k: paraphrase rate (the paraphraser's).
        use_bn: batch norms after the convolutions.
    """

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], k: float = 0.5,
                 use_bn: bool = True) -> None:
        super().__init__()
        self.encoder = _factor_encoder(s_shape[1], int(t_shape[1] * k), use_bn)

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        """``[B, C_s, H, W]`` → factor ``[B, C_t*k, H, W]``."""
        return self.encoder(f_s)


class LinearEmbed(nn.Module):
    """A linear embedding of flattened features.

    Args:
        dim_in: input dimension (features are flattened to ``[B, dim_in]``).
        dim_out: output dimension.
    """

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` → ``[B, dim_out]``."""
        return self.linear(x.reshape(x.shape[0], -1))


class Normalize(nn.Module):
    """Divides each row by its L``power`` norm: ``[B, D]`` → ``[B, D]`` (no epsilon, as the
    reference)."""

    def __init__(self, power: int = 2) -> None:
        super().__init__()
        self.power = power

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return x.div(norm)


class Embed(LinearEmbed):
    """CRD's embedding: :class:`LinearEmbed` followed by L2 normalisation of each row.

    Args:
        dim_in: input dimension.
        dim_out: embedding dimension (``--feat_dim``).
    """

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, ...]`` → unit rows ``[B, dim_out]``."""
        return self.l2norm(super().forward(x))
