"""Factor Transfer (``--distill factor``): paraphraser pre-training, then factor matching."""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.util import Paraphraser, Translator

from .base import INIT_EPOCHS, Batch, Distiller, InitStage, MethodContext, Outputs, register
from .kd import autograd_safe
from .vid import match_height

__all__ = ["FactorTransfer"]

# RepDistiller's helper/pretrain.py trains the paraphraser with lr 0.01 for these students.
_SMALL_INIT_LR_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56",
                           "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2",
                           "wrn_40_1", "wrn_40_2")
_SMALL_INIT_LR = 0.01


class FactorTransfer(nn.Module):
    """Kim et al., "Paraphrasing Complex Network: Network Compression via Factor Transfer",
    NeurIPS 2018.

    Each factor ``[B, C, H, W]`` is reduced to ``mean_c(f**p1)`` per position, flattened and
    L2-normalised; the loss is the mean ``|difference|`` (``p2 == 1``) or mean
    ``difference**p2`` between the student's and the teacher's.

    Args:
        p1: power applied before the channel mean.
        p2: norm of the difference.
    """

    def __init__(self, p1: float = 2, p2: float = 1) -> None:
        super().__init__()
        self.p1 = p1
        self.p2 = p2

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Translator and paraphraser factors ``[B, C, H, W]`` (channels may differ; the taller
        map is pooled to the other's height) → 0-d loss."""
        return self.factor_loss(f_s, f_t)

    def factor_loss(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = match_height(f_s, f_t)
        diff = self.factor(f_s) - self.factor(f_t)
        if self.p2 == 1:
            return diff.abs().mean()
        return diff.pow(self.p2).mean()

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` → unit rows ``[B, H*W]``."""
        return F.normalize(f.pow(self.p1).mean(1).reshape(f.shape[0], -1))


@register("factor")
class FTMethod(Distiller):
    """FT as RepDistiller runs it on the last stage maps (``feats[-2]``).

    Initialisation stage: the paraphraser alone learns to reconstruct the teacher map (MSE)
    for ``--init_epochs`` epochs, student and teacher in eval mode. Main stage: FT between the
    translator's factor of the student map and the (frozen) paraphraser's factor of the
    teacher map; only the translator is trained.
    """

    feature_kind = "feat"
    logit_only = False
    default_weight = 200.0
    paper = ("Kim et al., Paraphrasing Complex Network: Network Compression via Factor Transfer, "
             "NeurIPS 2018")
    flags = (INIT_EPOCHS,)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        s_shape, t_shape = ctx.student_shapes[-2], ctx.teacher_shapes[-2]
        self.paraphraser = Paraphraser(t_shape)
        self.translator = Translator(s_shape, t_shape)
        self.criterion = FactorTransfer()
        self._init_epochs = int(ctx.cfg.init_epochs)
        small = ctx.student_name in _SMALL_INIT_LR_STUDENTS
        self._init_lr = _SMALL_INIT_LR if small else float(ctx.cfg.learning_rate)

    def init_loss(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        """Reconstruction MSE of the teacher map ``feats[-2]`` (0-d)."""
        f_t = autograd_safe(teacher.feats[-2])
        _, f_t_rec = self.paraphraser(f_t)
        return F.mse_loss(f_t_rec, f_t)

    def init_stage(self) -> InitStage:
        return InitStage(epochs=self._init_epochs, lr=self._init_lr,
                         parameters=list(self.paraphraser.parameters()), loss=self.init_loss,
                         feature_kind="feat", modules=[self.paraphraser], student_train_mode=False)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        factor_s = self.translator(student.feats[-2])
        # The paraphraser is frozen after its stage and only sees teacher features: no graph
        # (its output is an ordinary tensor even when the teacher ran in inference mode).
        with torch.no_grad():
            factor_t = self.paraphraser(teacher.feats[-2], is_factor=True)
        return self.criterion(factor_s, factor_t)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return self.translator.parameters()
