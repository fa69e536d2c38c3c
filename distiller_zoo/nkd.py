"""Normalized knowledge distillation (``--distill nkd`` / ``--add nkd``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["NKDLoss"]


def labels_of(gt_label: torch.Tensor) -> torch.Tensor:
    """``[B]`` labels, or ``[B, C]`` scores (mixup/cutmix), → ``[B, 1]`` int64 class indices."""
    if gt_label.dim() > 1:
        return gt_label.argmax(dim=1, keepdim=True)
    return gt_label.reshape(-1, 1).long()


def non_target(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` logits without each row's true class → ``[B, C-1]``, other classes in order.

    Column ``j`` of the result is class ``j`` below the label and ``j + 1`` from it on: the
    same values, in the same order, as the reference's boolean-mask selection, but with a
    fixed output shape, so no host synchronisation (a CUDA graph can hold it).
    """
    others = torch.arange(logits.shape[1] - 1, device=logits.device).unsqueeze(0)
    return logits.gather(1, others + (others >= label).long())


class NKDLoss(nn.Module):
    """Yang, Zeng, Li, Zhang, Yuan & Li, "From Knowledge Distillation to Self-Knowledge
    Distillation: A Unified Approach with Normalized Loss and Customized Soft Labels",
    ICCV 2023 (NKD, "normalized KD"; cls_KD ``mmcls/models/dis_losses/nkd.py``, branch 1.0).

    Target term: ``-mean_b(p_t[y] * log p_s[y])`` at temperature 1, the teacher's probability
    of the true class a detached weight. Non-target term: ``-gamma * temp**2 * mean_b
    sum_{j != y} softmax(z_t / temp) log_softmax(z_s / temp)``, both softmaxes over the C-1
    other classes.

    Args:
        temp: temperature of the non-target softmaxes.
        gamma: weight of the non-target term.
    """

    def __init__(self, temp: float = 1.0, gamma: float = 1.5) -> None:
        super().__init__()
        self.temp = temp
        self.gamma = gamma

    def forward(self, logit_s: torch.Tensor, logit_t: torch.Tensor,
                gt_label: torch.Tensor) -> torch.Tensor:
        """Student and teacher logits ``[B, C]``, labels ``[B]`` int64 or scores ``[B, C]``
        (their argmax is the label) → 0-d loss (nats)."""
        label = labels_of(gt_label)
        s_true = F.log_softmax(logit_s, dim=1).gather(1, label)
        t_true = F.softmax(logit_t, dim=1).gather(1, label).detach()
        loss_t = -(t_true * s_true).mean()

        log_p_s = F.log_softmax(non_target(logit_s, label) / self.temp, dim=1)
        p_t = F.softmax(non_target(logit_t, label) / self.temp, dim=1)
        loss_non = -self.gamma * (self.temp ** 2) * (p_t * log_p_s).sum(dim=1).mean()
        return loss_t + loss_non


@register("nkd")
class NKDMethod(Distiller):
    """NKD on the logits and the labels (``--nkd_T``, ``--nkd_gamma``); cls_KD's settings are
    T 1, γ 1.5 for ImageNet ResNets, T 1, γ 1 for DeiTs, T 3, γ 3.5 for CIFAR-100."""

    feature_kind = None
    logit_only = True
    default_weight = 1.0  # cls_KD's distiller adds the NKD loss unweighted; γ lives inside
    paper = ("Yang et al., From Knowledge Distillation to Self-Knowledge Distillation: A Unified "
             "Approach with Normalized Loss and Customized Soft Labels, ICCV 2023")
    flags = (
        Flag("--nkd_T", float, 1.0, "NKD temperature of the non-target softmaxes", above=0),
        Flag("--nkd_gamma", float, 1.5, "NKD weight of the non-target term", minimum=0),
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = NKDLoss(float(ctx.cfg.nkd_T), float(ctx.cfg.nkd_gamma))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.criterion(student.logits, autograd_safe(teacher.logits), batch.labels)
