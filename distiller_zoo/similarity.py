"""Similarity-preserving distillation (``--distill similarity``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, MethodContext, Outputs, register, sum_list
from .kd import autograd_safe

__all__ = ["Similarity"]


class Similarity(nn.Module):
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

    Per pair: the batch Gram matrices ``[B, B]`` of the flattened features, each row
    L2-normalised; the squared Frobenius distance divided by ``B**2``.
    """

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> list[torch.Tensor]:
        """Lists of ``[B, ...]`` features → list of ``[1]`` tensors, one per pair."""
        return [self.similarity_loss(f_s, f_t) for f_s, f_t in zip(g_s, g_t)]

    def similarity_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        bsz = f_s.shape[0]
        f_s = f_s.reshape(bsz, -1)  # reshape: features may be channels_last
        f_t = f_t.reshape(bsz, -1)
        G_s = F.normalize(torch.mm(f_s, f_s.t()))
        G_t = F.normalize(torch.mm(f_t, f_t.t()))
        G_diff = G_t - G_s
        # the reference keeps a [1] shape by summing a [B*B, 1] view over dim 0
        return (G_diff * G_diff).reshape(-1, 1).sum(0) / (bsz * bsz)


@register("similarity")
class SimilarityMethod(Distiller):
    """SP on the last stage feature map (the one before the pooled vector)."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 3000.0  # RepDistiller scripts/run_cifar_distill.sh
    paper = "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = Similarity()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        losses = self.criterion([student.feats[-2]], [autograd_safe(teacher.feats[-2])])
        return sum_list(losses)
