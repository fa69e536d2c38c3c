"""Transformed Teacher Matching (``--distill ttm`` / ``--add ttm``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["TTM"]


def power_transform(y_t: torch.Tensor, l: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits ``[B, K]`` → (``softmax(y_t)**l`` renormalised ``[B, K]``, its power sum
    ``U = sum(softmax(y_t)**l)`` ``[B]``). Equals ``softmax(y_t * l)``, i.e. temperature 1/l."""
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    return p_t / norm.unsqueeze(1), norm


def per_sample_kl(y_s: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    """``KL(p_t || softmax(y_s))`` per sample: logits and probabilities ``[B, K]`` → ``[B]``."""
    return torch.sum(F.kl_div(F.log_softmax(y_s, dim=1), p_t, reduction="none"), dim=1)


class TTM(nn.Module):
    """Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024.

    ``KL(p_t**l / U || softmax(y_s))``: the temperature acts on the teacher only, the student
    softmax is unscaled and there is no ``T**2`` factor; summed over classes, batch mean.

    Args:
        l: the power γ = 1/T applied to the teacher's probabilities.
    """

    def __init__(self, l: float) -> None:
        super().__init__()
        self.l = l

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """Student and teacher logits ``[B, K]`` → 0-d loss (nats)."""
        p_t, _ = power_transform(y_t, self.l)
        return torch.mean(per_sample_kl(y_s, p_t))


@register("ttm")
class TTMMethod(Distiller):
    """TTM on the logits with power ``--ttm_l``."""

    feature_kind = None
    logit_only = True
    default_weight = 8.0  # the most common -b of the paper's TTM recipes (Tables 8-9)
    paper = "Zheng & Yang, Knowledge Distillation Based on Transformed Teacher Matching, ICLR 2024"

    flags = (Flag("--ttm_l", float, 1.0, "TTM/WTTM power exponent γ = 1/T", minimum=0),)
    loss_class: type[nn.Module] = TTM  # WTTM reuses this adapter with its own loss

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = self.loss_class(float(ctx.cfg.ttm_l))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.criterion(student.logits, autograd_safe(teacher.logits))
