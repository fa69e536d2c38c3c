"""DIST: inter- and intra-class Pearson relations of the softened logits (``--distill dist``)."""
from __future__ import annotations


import torch
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["DIST"]


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of matching rows of ``[N, M]`` tensors → ``[N]``; ``eps`` guards the
    product of the centred norms."""
    a = a - a.mean(1).unsqueeze(1)
    b = b - b.mean(1).unsqueeze(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


class DIST(nn.Module):
    """Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher",
    NeurIPS 2022.

    With ``y = softmax(z / tau)``: ``tau**2 * (beta * (1 - mean_i pearson(y_s[i], y_t[i]))
    + gamma * (1 - mean_k pearson(y_s[:, k], y_t[:, k])))``.

    Args:
        beta: weight of the inter-class relation (rows: one sample's class distribution).
        gamma: weight of the intra-class relation (columns: one class over the batch).
        tau: temperature of both softmaxes.
    """

    def __init__(self, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> None:
        super().__init__()
        self.beta = beta
        self.gamma = gamma
        self.tau = tau

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """Student and teacher logits ``[B, K]`` → 0-d loss."""
        y_s = (z_s / self.tau).softmax(dim=1)
        y_t = (z_t / self.tau).softmax(dim=1)
        inter = self.tau ** 2 * (1 - _pearson_rows(y_s, y_t).mean())
        intra = self.tau ** 2 * (1 - _pearson_rows(y_s.transpose(0, 1), y_t.transpose(0, 1)).mean())
        return self.beta * inter + self.gamma * intra


@register("dist")
class DISTMethod(Distiller):
    """DIST on the logits with ``--dist_beta``, ``--dist_gamma``, ``--dist_tau``."""

    feature_kind = None
    logit_only = True
    default_weight = 1.0  # no -b is published for DIST; the loss carries its own weights
    paper = "Huang et al., Knowledge Distillation from A Stronger Teacher, NeurIPS 2022"
    flags = (
        Flag("--dist_beta", float, 1.0, "weight of DIST's inter-class relation term", minimum=0),
        Flag("--dist_gamma", float, 1.0, "weight of DIST's intra-class relation term", minimum=0),
        Flag("--dist_tau", float, 4.0, "DIST softmax temperature; both terms are scaled by tau**2",
             above=0),
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        self.criterion = DIST(float(cfg.dist_beta), float(cfg.dist_gamma), float(cfg.dist_tau))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.criterion(student.logits, autograd_safe(teacher.logits))
