"""Neuron selectivity transfer (``--distill nst``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import pool_to_smaller
from .base import Batch, Distiller, MethodContext, Outputs, register, sum_list
from .kd import autograd_safe

__all__ = ["NSTLoss"]


class NSTLoss(nn.Module):
    """Huang & Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
    arXiv:1707.01219, 2017.

    Per pair: squared MMD with the polynomial kernel ``k(a, b) = (a·b)**2`` between the
    channels' L2-normalised spatial responses (``[B, C, H*W]``; the taller map is first
    pooled to the smaller). The teacher-teacher term is detached.
    """

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> list[torch.Tensor]:
        """Lists of ``[B, C, H, W]`` maps → list of 0-d, one per pair."""
        return [self.nst_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def nst_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        f_s = F.normalize(f_s.reshape(f_s.shape[0], f_s.shape[1], -1), dim=2)
        f_t = F.normalize(f_t.reshape(f_t.shape[0], f_t.shape[1], -1), dim=2)
        return (self.poly_kernel(f_t, f_t).mean().detach() + self.poly_kernel(f_s, f_s).mean()
                - 2 * self.poly_kernel(f_s, f_t).mean())

    @staticmethod
    def poly_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[B, Ca, N]``, ``[B, Cb, N]`` → ``[B, Cb, Ca]`` of squared dot products."""
        # bmm instead of the reference's broadcast product and sum: same values (the sum is
        # only reordered) without the [B, Cb, Ca, N] intermediate (1 GiB for B=64, C=256, N=64).
        return torch.bmm(b, a.transpose(1, 2)).pow(2)


@register("nst")
class NSTMethod(Distiller):
    """NST over the stage features (all but the stem and the pooled vector), summed."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 50.0  # RepDistiller scripts/run_cifar_distill.sh
    paper = "Huang & Wang, Like What You Like: Neuron Selectivity Transfer, arXiv 2017"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = NSTLoss()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        g_t = [autograd_safe(f) for f in teacher.feats[1:-1]]
        return sum_list(self.criterion(student.feats[1:-1], g_t))
