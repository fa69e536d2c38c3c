"""Weighted Transformed Teacher Matching (``--distill wttm`` / ``--add wttm``)."""
from __future__ import annotations

import torch
from torch import nn

from .base import register
from .ttm import TTMMethod, per_sample_kl, power_transform

__all__ = ["WTTM"]


class WTTM(nn.Module):
    """Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching", ICLR 2024.

    TTM with each sample's KL weighted by the teacher's power sum ``U = sum(softmax(y_t)**l)``
    (from 1 for a one-hot teacher up to ``K**(1 - l)`` for a uniform one) before the batch mean.

    Args:
        l: the power γ = 1/T applied to the teacher's probabilities.
    """

    def __init__(self, l: float) -> None:
        super().__init__()
        self.l = l

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """Student and teacher logits ``[B, K]`` → 0-d loss."""
        p_t, norm = power_transform(y_t, self.l)
        return torch.mean(norm * per_sample_kl(y_s, p_t))


@register("wttm")
class WTTMMethod(TTMMethod):
    """WTTM on the logits with power ``--ttm_l`` (TTM's adapter with the WTTM loss)."""

    loss_class = WTTM
    default_weight = 3.0  # the most common -b of the paper's WTTM recipes (Tables 8-9)
