"""Relational knowledge distillation (``--distill rkd``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["RKDLoss"]


def _pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distances between the rows of ``[B, D]`` → ``[B, B]``, zero diagonal.

    Squared distances are clamped at ``eps`` before the square root (finite gradients for
    coincident rows), as in the reference. The diagonal is zeroed by a multiplication (no
    in-place write, no index tensor): same values, and no gradient through it, as the
    reference's ``res[i, i] = 0``.
    """
    sq = e.pow(2).sum(dim=1)
    res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * (e @ e.t())).clamp(min=eps).sqrt()
    off_diagonal = 1 - torch.eye(len(e), device=e.device, dtype=res.dtype)
    return res * off_diagonal


def _normalized(d: torch.Tensor) -> torch.Tensor:
    """``d / d[d > 0].mean()`` without the boolean index, which needs the host (``nonzero``)
    and so cannot run inside a CUDA graph: ``d >= 0`` here, so the sum over all entries is the
    sum over the positive ones, and the count is a device tensor."""
    return d / (d.sum() / (d > 0).sum())


def _angles(e: torch.Tensor) -> torch.Tensor:
    """Rows ``[B, D]`` → ``[B**3]``: entry ``(i, j, k)`` is the cosine of the angle at ``e_i``
    between ``e_j - e_i`` and ``e_k - e_i`` (0 when ``j`` or ``k`` equals ``i``)."""
    d = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(d, d.transpose(1, 2)).view(-1)


class RKDLoss(nn.Module):
    """Park, Kim, Lu & Cho, "Relational Knowledge Distillation", CVPR 2019.

    ``w_d * smooth_l1(distance relations) + w_a * smooth_l1(angle relations)``; distances are
    divided by their mean over the nonzero entries; the teacher side has no gradient. No step
    waits on the host (no boolean indexing), so the loss can be replayed from a CUDA graph.

    Args:
        w_d: weight of the distance term.
        w_a: weight of the angle term.
    """

    def __init__(self, w_d: float = 25, w_a: float = 50) -> None:
        super().__init__()
        self.w_d = w_d
        self.w_a = w_a

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Student and teacher features ``[B, ...]`` (flattened to ``[B, -1]``) → 0-d loss."""
        student = f_s.reshape(f_s.shape[0], -1)
        teacher = f_t.reshape(f_t.shape[0], -1)
        with torch.no_grad():
            t_d = _pdist(teacher)
            t_d = _normalized(t_d)
            t_angle = _angles(teacher)
        d = _pdist(student)
        d = _normalized(d)
        loss_d = F.smooth_l1_loss(d, t_d)
        loss_a = F.smooth_l1_loss(_angles(student), t_angle)
        return self.w_d * loss_d + self.w_a * loss_a


@register("rkd")
class RKDMethod(Distiller):
    """RKD on the pooled features with RepDistiller's weights (distance 25, angle 50)."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 1.0  # RepDistiller scripts/run_cifar_distill.sh
    paper = "Park et al., Relational Knowledge Distillation, CVPR 2019"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = RKDLoss()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.criterion(student.pooled, autograd_safe(teacher.pooled))
