"""Correlation congruence (``--distill correlation``)."""
from __future__ import annotations

import torch
from torch import nn

from models.util import LinearEmbed

from .base import FEAT_DIM, Batch, Distiller, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["Correlation"]


class Correlation(nn.Module):
    """Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang, "Correlation Congruence for Knowledge
    Distillation", ICCV 2019.

    RepDistiller's simplified form: with ``d = |f_s - f_t|`` ``[B, D]``, the batch mean of
    ``sum_j d[i, j] * d[i + 1, j]`` over consecutive sample pairs.
    """

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Embedded student and teacher features ``[B, D]`` → 0-d loss."""
        delta = torch.abs(f_s - f_t)
        return torch.mean((delta[:-1] * delta[1:]).sum(1))


@register("correlation")
class CorrelationMethod(Distiller):
    """CC on the pooled features, each side embedded to ``--feat_dim`` by its own trainable
    ``LinearEmbed`` (the teacher's embedding is trained too, as in RepDistiller)."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 0.02  # RepDistiller scripts/run_cifar_distill.sh
    flags = (FEAT_DIM,)
    paper = "Peng et al., Correlation Congruence for Knowledge Distillation, ICCV 2019"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        feat_dim = int(ctx.cfg.feat_dim)
        self.embed_s = LinearEmbed(ctx.student_shapes[-1][1], feat_dim).to(ctx.device)
        self.embed_t = LinearEmbed(ctx.teacher_shapes[-1][1], feat_dim).to(ctx.device)
        self.criterion = Correlation()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        f_s = self.embed_s(student.pooled)
        f_t = self.embed_t(autograd_safe(teacher.pooled))
        return self.criterion(f_s, f_t)
