"""FitNet hints (``--distill hint``)."""
from __future__ import annotations

import torch
from torch import nn

from models.util import ConvReg

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["HintLoss"]


class HintLoss(nn.Module):
    """Romero, Ballas, Kahou, Chassang, Gatta & Bengio, "FitNets: Hints for Thin Deep Nets",
    ICLR 2015.

    Mean squared error between the regressed student feature and the teacher feature.
    """

    def __init__(self) -> None:
        super().__init__()
        self.crit = nn.MSELoss()

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Regressed student and teacher features of one shape (``[B, C, H, W]``) → 0-d."""
        return self.crit(f_s, f_t)


@register("hint")
class HintMethod(Distiller):
    """FitNet: a trainable ``ConvReg`` maps student feature ``--hint_layer`` onto the teacher's."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 100.0  # RepDistiller scripts/run_cifar_distill.sh
    paper = "Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015"
    flags = (Flag("--hint_layer", int, 2, "FitNet hint layer", choices=tuple(range(5))),)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        layer = int(ctx.cfg.hint_layer)
        s_shapes, t_shapes = ctx.student_shapes, ctx.teacher_shapes
        n = min(len(s_shapes), len(t_shapes))
        if not -n <= layer < n or len(s_shapes[layer]) != 4 or len(t_shapes[layer]) != 4:
            raise ValueError(f"--hint_layer {layer} is not a [B, C, H, W] feature of both "
                            f"networks (student {[list(s) for s in s_shapes]}, "
                            f"teacher {[list(t) for t in t_shapes]})")
        self.layer = layer
        self.regress = ConvReg(s_shapes[layer], t_shapes[layer]).to(ctx.device)
        self.criterion = HintLoss()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        f_s = self.regress(student.feats[self.layer])
        return self.criterion(f_s, autograd_safe(teacher.feats[self.layer]))
