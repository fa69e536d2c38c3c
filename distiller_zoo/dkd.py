"""Decoupled knowledge distillation (``--distill dkd``)."""
from __future__ import annotations

from typing import Any, Mapping, Union

import torch
import torch.nn.functional as F

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .ctkd import CTKD_FLAGS, ctkd_from_cfg, resolve_ctkd
from .kd import autograd_safe

__all__ = ["dkd_loss"]

DKD_BETA: dict[tuple[str, str], float] = {
    # (teacher, student) -> beta of mdistiller's CIFAR-100 configs; other pairs use 8.
    ("wrn_40_2", "wrn_16_2"): 6.0,
    ("wrn_40_2", "wrn_40_1"): 6.0,
    ("vgg13", "vgg8"): 6.0,
    ("vgg13", "MobileNetV2"): 6.0,
    ("resnet56", "resnet20"): 2.0,
    ("resnet110", "resnet32"): 2.0,
}
DKD_BETA_DEFAULT = 8.0


def _binary(p: torch.Tensor, gt_mask: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[B, K]`` → ``[B, 2]``: (target mass, non-target mass)."""
    return torch.cat([(p * gt_mask).sum(1, keepdim=True), (p * ~gt_mask).sum(1, keepdim=True)], 1)


def dkd_loss(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
             alpha: float, beta: float, temperature: Union[float, torch.Tensor]) -> torch.Tensor:
    """Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022.

    ``alpha * TCKD + beta * NCKD``, each a ``T**2``-scaled KL summed over the batch and
    divided by ``B``: TCKD between the binary (target, rest) distributions, NCKD between the
    distributions over the non-target classes (the target is removed by subtracting 1000
    from its logit / T).

    Args:
        logits_student, logits_teacher: ``[B, K]``.
        target: ``[B]`` int64 labels.
        alpha, beta: weights of TCKD and NCKD.
        temperature: softmax temperature T (or CTKD's ``[1]`` learnable one).
    Returns:
        0-d loss (``[1]`` for a ``[1]`` temperature).
    """
    T = temperature
    gt_mask = torch.zeros_like(logits_student).scatter_(1, target.reshape(-1, 1), 1).bool()
    p_s = _binary(F.softmax(logits_student / T, dim=1), gt_mask)
    p_t = _binary(F.softmax(logits_teacher / T, dim=1), gt_mask)
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * (T ** 2) / target.shape[0]
    # The teacher side as log-probabilities: its masked target entry is exactly 0 as a
    # probability, and kl_div's gradient with respect to a 0 target is 0/0 = NaN, which a
    # learnable temperature (CTKD) receives. The value is mdistiller's kl_div(log p_s, p_t).
    log_p_t_rest = F.log_softmax(logits_teacher / T - 1000.0 * gt_mask, dim=1)
    log_p_s_rest = F.log_softmax(logits_student / T - 1000.0 * gt_mask, dim=1)
    nckd = (F.kl_div(log_p_s_rest, log_p_t_rest, reduction="sum", log_target=True)
            * (T ** 2) / target.shape[0])
    return alpha * tckd + beta * nckd


@register("dkd")
class DKDMethod(Distiller):
    """DKD on the logits, ramped up linearly over the first ``--dkd_warmup`` epochs (with
    ``--ctkd global`` at CTKD's learnable temperature instead of ``--dkd_T``)."""

    feature_kind = None
    logit_only = True
    default_weight = 1.0  # mdistiller's CE weight 1; alpha/beta live inside the loss
    paper = "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022"
    flags = (
        Flag("--dkd_alpha", float, 1.0, "weight of the target-class term TCKD", minimum=0),
        Flag("--dkd_beta", float, None, "weight of the non-target term NCKD (unset: mdistiller's "
             "per-pair value: 6, 2, or 8 for pairs without a config)", minimum=0),
        Flag("--dkd_T", float, 4.0, "DKD softmax temperature", above=0),
        Flag("--dkd_warmup", int, 20, "epochs over which the DKD loss ramps up linearly; 0 "
             "disables the ramp", minimum=0),
        *CTKD_FLAGS,
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        beta = cfg.dkd_beta
        self.alpha = float(cfg.dkd_alpha)
        self.beta = float(beta) if beta is not None else self.beta_for(ctx.teacher_name,
                                                                       ctx.student_name)
        self.T = float(cfg.dkd_T)
        self.warmup = int(cfg.dkd_warmup)
        self.ctkd = ctkd_from_cfg(cfg)  # None unless --ctkd

    @classmethod
    def resolve(cls, cfg: Mapping[str, Any], teacher: str, student: str) -> dict[str, Any]:
        """An unset ``--dkd_beta`` becomes the pair's value (recorded in config.json)."""
        beta = {"dkd_beta": cls.beta_for(teacher, student)} if cfg.get("dkd_beta") is None else {}
        return {**beta, **resolve_ctkd(cfg)}

    @classmethod
    def beta_for(cls, teacher: str, student: str) -> float:
        """mdistiller's NCKD weight for a teacher→student pair (8 when it has no config)."""
        return DKD_BETA.get((teacher, student), DKD_BETA_DEFAULT)

    def warmup_factor(self, epoch: int) -> float:
        """``min(epoch / warmup, 1)`` with 1-based epochs, as mdistiller's DKD wrapper."""
        return min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def graph_key(self, epoch: int) -> Any:
        if self.ctkd is None:
            return self.warmup_factor(epoch)
        return self.warmup_factor(epoch), self.ctkd.lambda_(epoch)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        T = self.T if self.ctkd is None else self.ctkd(batch.epoch)
        loss = dkd_loss(student.logits, autograd_safe(teacher.logits), batch.labels,
                        self.alpha, self.beta, T)
        return (self.warmup_factor(batch.epoch) * loss).reshape(())
