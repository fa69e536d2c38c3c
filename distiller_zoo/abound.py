"""Activation-boundary distillation (``--distill abound``): an initialisation stage only."""
from __future__ import annotations

from typing import ClassVar, Iterator

import torch
from torch import nn

from models.util import Connector

from .base import INIT_EPOCHS, Batch, Distiller, InitStage, MethodContext, Outputs, register, sum_list
from .kd import autograd_safe

__all__ = ["ABLoss"]


class ABLoss(nn.Module):
    """Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries Formed by
    Hidden Neurons", AAAI 2019.

    Per layer, the alternative (hinge-squared) loss that pushes the student's pre-activation
    to the teacher's side of zero by at least ``margin``: summed over elements, weighted by
    ``2**(i - feat_num + 1)`` (the deepest layer weighs 1), divided by the batch size and
    scaled by ``3/1000``.

    Args:
        feat_num: number of layers.
        margin: the margin around the activation boundary (feature units).
    """

    def __init__(self, feat_num: int, margin: float = 1.0) -> None:
        super().__init__()
        self.w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s: list[torch.Tensor], g_t: list[torch.Tensor]) -> list[torch.Tensor]:
        """Connector outputs and teacher pre-activations, pairwise ``[B, C, H, W]`` of equal
        shapes → one 0-d loss per layer."""
        bsz = g_s[0].shape[0]
        losses = [w * self.criterion_alternative_l2(s, t) for w, s, t in zip(self.w, g_s, g_t)]
        return [loss / bsz / 1000 * 3 for loss in losses]

    def criterion_alternative_l2(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sum over elements of ``(s + m)**2`` where the teacher is off (``t <= 0``) and the
        student is above ``-m``, plus ``(s - m)**2`` where the teacher is on and ``s <= m``."""
        m = self.margin
        off = ((source > -m) & (target <= 0)).float()
        on = ((source <= m) & (target > 0)).float()
        loss = (source + m) ** 2 * off + (source - m) ** 2 * on
        return torch.abs(loss).sum()


@register("abound")
class ABMethod(Distiller):
    """AB as RepDistiller runs it: ``--init_epochs`` epochs that train the connectors and the
    student's feature modules on the AB loss of the pre-activations ``feats[1:-1]`` (student
    otherwise in eval mode), then plain training: the main-stage loss is a literal 0 and the
    connectors are not trained further."""

    feature_kind = "preact"
    logit_only = False
    default_weight = 1.0
    paper = ("Heo et al., Knowledge Transfer via Distillation of Activation Boundaries Formed "
             "by Hidden Neurons, AAAI 2019")
    main_is_zero: ClassVar[bool] = True
    student_forward = "preact"  # the reference's main-stage forward (see Distiller)
    flags = (INIT_EPOCHS,)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        s_shapes = ctx.student_preact_shapes[1:-1]
        t_shapes = ctx.teacher_preact_shapes[1:-1]
        self.connector = Connector(s_shapes, t_shapes)
        self.criterion = ABLoss(len(s_shapes))
        self._init_epochs = int(ctx.cfg.init_epochs)
        self._lr = float(ctx.cfg.learning_rate)
        # Held outside the module tree: the student belongs to the loop, not to the method.
        self._feat_modules: tuple[nn.Module, ...] = (ctx.student.get_feat_modules(),)

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        """The initialisation stage's 0-d loss on pre-activation features."""
        g_s = self.connector(student.feats[1:-1])
        g_t = [autograd_safe(f) for f in teacher.feats[1:-1]]
        return sum_list(self.criterion(g_s, g_t))

    def init_stage(self) -> InitStage:
        feat_modules = self._feat_modules[0]
        return InitStage(
            epochs=self._init_epochs, lr=self._lr,
            parameters=list(self.connector.parameters()) + list(feat_modules.parameters()),
            loss=self.init_loss, feature_kind="preact",
            modules=[self.connector, feat_modules], student_train_mode=False)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        # The reference's main stage adds nothing (loss_kd = 0); CE and --add train the student.
        return student.logits.new_zeros(())

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())
