"""Variational Information Distillation (``--distill vid``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, MethodContext, Outputs, register, sum_list
from .kd import autograd_safe

__all__ = ["VIDLoss"]


def match_height(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pools the taller of two maps ``[B, C, H, W]`` to the other's
    ``H × H`` (the reference pools to a square of the smaller height)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = F.adaptive_avg_pool2d(f_s, (t_h, t_h))
    elif s_h < t_h:
        f_t = F.adaptive_avg_pool2d(f_t, (s_h, s_h))
    return f_s, f_t


class VIDLoss(nn.Module):
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019.

    The negative log-likelihood of the teacher map under a Gaussian whose mean a 1×1-conv
    regressor predicts from the student map and whose per-channel variance is
    ``softplus(log_scale) + eps``; averaged over all elements.

    Args:
        num_input_channels: student channels ``C_s``.
        num_mid_channel: hidden channels of the regressor.
        num_target_channels: teacher channels ``C_t``.
        init_pred_var: initial variance; ``log_scale`` starts at
            ``log(exp(init_pred_var - eps) - 1)`` so that the variance starts there.
        eps: variance floor.
    """

    def __init__(self, num_input_channels: int, num_mid_channel: int, num_target_channels: int,
                 init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.regressor = nn.Sequential(
            nn.Conv2d(num_input_channels, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_mid_channel, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(num_mid_channel, num_target_channels, kernel_size=1, bias=False),
        )
        # Computed in float64, then stored as float32 (the reference's NumPy scalar * ones).
        init = math.log(math.exp(init_pred_var - eps) - 1.0)
        self.log_scale = nn.Parameter(torch.full((num_target_channels,), init, dtype=torch.float32))
        self.eps = eps

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Student ``[B, C_s, H, W]`` and teacher ``[B, C_t, H', W']`` → 0-d loss (nats per
        element, constant ``log(2π)/2`` omitted)."""
        input, target = match_height(input, target)
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        neg_log_prob = 0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var))
        return torch.mean(neg_log_prob)


@register("vid")
class VIDMethod(Distiller):
    """One :class:`VIDLoss` per intermediate stage (``feats[1:-1]``), summed."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 1.0
    paper = "Ahn et al., Variational Information Distillation for Knowledge Transfer, CVPR 2019"

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        s_channels = [s[1] for s in ctx.student_shapes[1:-1]]
        t_channels = [t[1] for t in ctx.teacher_shapes[1:-1]]
        self.criteria = nn.ModuleList(VIDLoss(s, t, t) for s, t in zip(s_channels, t_channels))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        g_s = student.feats[1:-1]
        g_t = [autograd_safe(f) for f in teacher.feats[1:-1]]
        return sum_list([c(f_s, f_t) for c, f_s, f_t in zip(self.criteria, g_s, g_t)])
