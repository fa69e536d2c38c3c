"""Attention transfer (``--distill attention``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, MethodContext, Outputs, register, sum_list
from .kd import autograd_safe

__all__ = ["Attention"]


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pools the taller of two ``[B, C, H, W]`` maps to the other's ``H × H``."""
    s_H, t_H = f_s.shape[2], f_t.shape[2]
    if s_H > t_H:
        f_s = F.adaptive_avg_pool2d(f_s, (t_H, t_H))
    elif s_H < t_H:
        f_t = F.adaptive_avg_pool2d(f_t, (s_H, s_H))
    return f_s, f_t


class Attention(nn.Module):
    """Zagoruyko & Komodakis, "Paying More Attention to Attention: Improving the Performance
    of Convolutional Neural Networks via Attention Transfer", ICLR 2017.

    Per pair: the mean squared difference of the L2-normalised attention maps
    ``mean_c(f**p)`` flattened to ``[B, H*W]``.

    Args:
        p: power applied to the activations before the channel mean.
    """

    def __init__(self, p: int = 2) -> None:
        super().__init__()
        self.p = p

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> list[torch.Tensor]:
        """Lists of ``[B, C, H, W]`` maps (channels may differ) → list of 0-d, one per pair."""
        return [self.at_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def at_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        return (self.at(f_s) - self.at(f_t)).pow(2).mean()

    def at(self, f: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → unit-norm attention map ``[B, H*W]``."""
        return F.normalize(f.pow(self.p).mean(1).reshape(f.size(0), -1))


@register("attention")
class AttentionMethod(Distiller):
    """AT over the stage features (all but the stem and the pooled vector), summed."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 1000.0  # RepDistiller scripts/run_cifar_distill.sh
    paper = "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = Attention()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        g_t = [autograd_safe(f) for f in teacher.feats[1:-1]]
        return sum_list(self.criterion(student.feats[1:-1], g_t))
