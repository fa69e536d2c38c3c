"""Softmax regression representation learning (``--distill srrl``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import classifier_head

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["statm_loss", "transfer_conv", "SRRLLoss"]


def connectors(in_channels: int, out_channels: int) -> nn.Sequential:
    """SRRL's connector: 1x1 conv (no bias), BN, ReLU; conv weights ``N(0, 2 / (k·k·out))``
    and BN weight 1, bias 0, as KD_SRRL and cls_KD initialise it."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
    bn = nn.BatchNorm2d(out_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn, nn.ReLU())


def mean_gap(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` maps (sides may differ) → 0-d mean over batch and channels of the
    squared difference of their spatial means."""
    x_mean = x.reshape(x.shape[0], x.shape[1], -1).mean(dim=2)
    y_mean = y.reshape(y.shape[0], y.shape[1], -1).mean(dim=2)
    return (x_mean - y_mean).pow(2).mean(dim=1).mean()


class statm_loss(nn.Module):  # noqa: N801 (the reference class name)
    """Yang, Martinez, Bulat & Tzimiropoulos, "Knowledge Distillation via Softmax Regression
    Representation Learning", ICLR 2021 (KD_SRRL ``distiller_zoo/AIN.py``).

    The feature-matching term: squared distance between the per-channel spatial means of the
    (connected) student map and the teacher map, averaged over channels and batch.

    Args:
        eps: unused; kept for the reference signature.
    """

    def __init__(self, eps: float = 2) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Student ``x`` and teacher ``y`` maps ``[B, C, H, W]`` → 0-d loss."""
        return mean_gap(x, y)


class transfer_conv(nn.Module):  # noqa: N801 (the reference class name)
    """Yang et al., ICLR 2021 (SRRL; KD_SRRL ``distiller_zoo/AIN.py``): the connector that maps
    the student's last feature map onto the teacher's channels.

    Args:
        in_feature: student channels.
        out_feature: teacher channels.
    """

    def __init__(self, in_feature: int, out_feature: int) -> None:
        super().__init__()
        self.in_feature = in_feature
        self.out_feature = out_feature
        self.Connectors = connectors(in_feature, out_feature)

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        """``[B, in_feature, H, W]`` → ``[B, out_feature, H, W]``."""
        return self.Connectors(student)


class SRRLLoss(nn.Module):
    """Yang et al., ICLR 2021, as cls_KD re-implements it (``mmcls/models/dis_losses/srrl.py``,
    branch 1.0): ``alpha · statm + beta · MSE(logit_st, logit_t)``.

    ``Connectors`` is owned here but applied by the caller, as in cls_KD's distiller.

    Args:
        student_channels, teacher_channels: the connector's input and output channels.
        alpha: weight of the feature-matching term.
        beta: weight of the softmax-regression term (cls_KD's ImageNet configs use 1).
    """

    def __init__(self, student_channels: int, teacher_channels: int, alpha: float = 1.0,
                 beta: float = 5.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = beta
        self.Connectors = connectors(student_channels, teacher_channels)

    def forward(self, fea_s: torch.Tensor, fea_t: torch.Tensor, logit_st: torch.Tensor,
                logit_t: torch.Tensor) -> torch.Tensor:
        """Connected student map and teacher map ``[B, C, H, W]``; the teacher's classifier
        applied to ``fea_s`` and the teacher's logits, ``[B, K]`` each → 0-d loss."""
        return self.alpha * mean_gap(fea_s, fea_t) + self.beta * F.mse_loss(logit_st, logit_t)


@register("srrl")
class SRRLMethod(Distiller):
    """SRRL on the last feature maps: ``statm(conv(f_s), f_t) + w · MSE(head_t(conv(f_s)), z_t)``.

    ``conv`` is the trainable :class:`transfer_conv`; ``head_t`` the frozen teacher's own
    pooling and classifier (:func:`models.heads.classifier_head`), run with detached weights
    so the gradient reaches the connector and the student but never the teacher (KD_SRRL's
    ``net_t(x=None, feat_s=...)``).
    """

    feature_kind = "feat"
    logit_only = False
    default_weight = 1.0  # KD_SRRL adds loss_kd unweighted next to CE
    paper = ("Yang et al., Knowledge Distillation via Softmax Regression Representation "
             "Learning, ICLR 2021")
    flags = (Flag("--srrl_w", float, 1.0, "weight of SRRL's softmax-regression term (KD_SRRL "
                  "--weight; cls_KD's beta in its ImageNet configs)", minimum=0),)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        s_shape, t_shape = ctx.student_shapes[-2], ctx.teacher_shapes[-2]
        if len(s_shape) != 4 or len(t_shape) != 4:
            raise ValueError(f"SRRL needs a last [B, C, H, W] feature map in both networks "
                             f"(student {list(s_shape)}, teacher {list(t_shape)})")
        self.connector = transfer_conv(s_shape[1], t_shape[1]).to(ctx.device)
        self.statm = statm_loss()
        # A tuple, not an attribute: registering the teacher's modules here would hand the
        # teacher's weights to the optimiser, DDP and the method's state dict.
        self._teacher_head = (classifier_head(ctx.teacher),)
        self.w = float(ctx.cfg.srrl_w)

    def teacher_head(self, fmap: torch.Tensor) -> torch.Tensor:
        """The teacher's pooling and classifier on ``fmap [B, C_t, H, W]`` → ``[B, K]``,
        differentiable in ``fmap`` only (eval-mode BN, detached weights)."""
        head = self._teacher_head[0]
        head.eval()  # the teacher's own modules: never in train mode, whatever a caller did
        params = {name: p.detach() for name, p in head.named_parameters()}
        return torch.func.functional_call(head, params, (fmap,))

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        f_s = self.connector(student.feats[-2])
        fm = self.statm(f_s, autograd_safe(teacher.feats[-2]))
        sr = F.mse_loss(self.teacher_head(f_s), autograd_safe(teacher.logits))
        return {"srrl_fm": fm, "srrl_sr": self.w * sr}
