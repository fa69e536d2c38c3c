"""Flow of Solution Procedure (``--distill fsp``): an initialisation stage only."""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn


from .base import INIT_EPOCHS, Batch, Distiller, InitStage, MethodContext, Outputs, register, sum_list
from .kd import autograd_safe

__all__ = ["FSP"]


class FSP(nn.Module):
    """Yim et al., "A Gift from Knowledge Distillation: Fast Optimization, Network
    Minimization and Transfer Learning", CVPR 2017.

    For each pair of consecutive maps the FSP matrix ``G[b, i, j] = mean_hw top_i * bot_j``
    (the taller map pooled to the other's height); the loss per pair is the mean squared
    difference between the student's and the teacher's matrices.

    Args:
        s_shapes: student feature shapes ``[N, C, H, W]``.
        t_shapes: teacher feature shapes; channel counts must equal the student's.

    Raises:
        ValueError: the lists differ in length or in any channel count.
    """

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]) -> None:
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise ValueError("unequal length of feat list")
        s_c = [int(s[1]) for s in s_shapes]
        t_c = [int(t[1]) for t in t_shapes]
        if s_c != t_c:
            raise ValueError(f"num of channels not equal (error in FSP): student {s_c}, teacher {t_c}")

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> list[torch.Tensor]:
        """Lists of L maps ``[B, C_i, H_i, W_i]`` → list of L-1 0-d losses."""
        s_fsp = self.compute_fsp(g_s)
        t_fsp = self.compute_fsp(g_t)
        return [self.compute_loss(s, t) for s, t in zip(s_fsp, t_fsp)]

    @staticmethod
    def compute_loss(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (s - t).pow(2).mean()

    @staticmethod
    def compute_fsp(g: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Maps → FSP matrices ``[B, C_top, C_bot]``, one per consecutive pair."""
        out = []
        for bot, top in zip(g[:-1], g[1:]):
            b_h, t_h = bot.shape[2], top.shape[2]
            if b_h > t_h:
                bot = F.adaptive_avg_pool2d(bot, (t_h, t_h))
            elif b_h < t_h:
                top = F.adaptive_avg_pool2d(top, (b_h, b_h))
            bot = bot.reshape(bot.shape[0], bot.shape[1], -1)
            top = top.reshape(top.shape[0], top.shape[1], -1)
            # bmm instead of the reference's broadcast product [B, C_top, C_bot, HW]: same sums.
            out.append(torch.bmm(top, bot.transpose(1, 2)) / bot.shape[2])
        return out


@register("fsp")
class FSPMethod(Distiller):
    """FSP as RepDistiller runs it: ``--init_epochs`` epochs that train the student's feature
    modules on the FSP loss of ``feats[:-1]`` (student otherwise in eval mode), then plain
    training: the main-stage loss is a literal 0."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 50.0
    paper = ("Yim et al., A Gift from Knowledge Distillation: Fast Optimization, Network "
             "Minimization and Transfer Learning, CVPR 2017")
    main_is_zero: ClassVar[bool] = True
    flags = (INIT_EPOCHS,)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        try:
            self.criterion = FSP(ctx.student_shapes[:-1], ctx.teacher_shapes[:-1])
        except ValueError as err:
            raise ValueError(f"FSP needs student and teacher stages of equal channel counts: "
                             f"{err}") from None
        self._init_epochs = int(ctx.cfg.init_epochs)
        self._lr = float(ctx.cfg.learning_rate)
        # Held outside the module tree: the student belongs to the loop, not to the method.
        self._feat_modules: tuple[nn.Module, ...] = (ctx.student.get_feat_modules(),)

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        """The initialisation stage's 0-d loss."""
        g_t = [autograd_safe(f) for f in teacher.feats[:-1]]
        return sum_list(self.criterion(student.feats[:-1], g_t))

    def init_stage(self) -> InitStage:
        feat_modules = self._feat_modules[0]
        return InitStage(epochs=self._init_epochs, lr=self._lr,
                         parameters=list(feat_modules.parameters()), loss=self.init_loss,
                         feature_kind="feat", modules=[feat_modules], student_train_mode=False)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        # The reference's main stage adds nothing (loss_kd = 0); CE and --add train the student.
        return student.logits.new_zeros(())
