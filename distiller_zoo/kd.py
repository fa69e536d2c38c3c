"""Vanilla knowledge distillation (``--distill kd`` / ``--add kd``)."""
from __future__ import annotations

from typing import Any, ClassVar, Mapping, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .ctkd import CTKD_FLAGS, ctkd_from_cfg, resolve_ctkd

__all__ = ["DistillKL"]


def autograd_safe(t: torch.Tensor) -> torch.Tensor:
    """Returns ``t``, or a plain copy of it when it was made under ``torch.inference_mode``.

    Autograd refuses to save inference tensors for backward (a teacher tensor multiplied by
    a student one, or fed to a trainable embedding); a copy made outside inference mode is
    accepted. The copy has no history, so no gradient can reach the teacher either way.
    """
    return t.clone() if t.is_inference() else t


class DistillKL(nn.Module):
    """Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network",
    NIPS Deep Learning Workshop 2015.

    ``T**2 * KL(softmax(y_t / T) || softmax(y_s / T))``, summed over classes and samples and
    divided by the batch size.

    Args:
        T: temperature applied to both networks' logits.
    """

    def __init__(self, T: float) -> None:
        super().__init__()
        self.T = T

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        """Student and teacher logits ``[B, K]`` → 0-d loss."""
        return distill_kl(y_s, y_t, self.T)


def distill_kl(y_s: torch.Tensor, y_t: torch.Tensor, T: Union[float, torch.Tensor]) -> torch.Tensor:
    """:class:`DistillKL`'s value at temperature ``T``: a number, or a ``[1]`` tensor (CTKD's
    learnable temperature, then the result is ``[1]`` and carries the temperature's gradient)."""
    log_p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * (T ** 2) / y_s.shape[0]


@register("kd")
class KDMethod(Distiller):
    """KD on the logits with temperature ``--kd_T``.

    As ``--distill kd`` the seed's main loss is a literal zero (``main_is_zero``); its KD term
    comes through ``--add kd -a 0.9`` with ``-r 0.1 -b 0``. Owns ``--kd_T``. With ``--ctkd
    global`` the temperature is CTKD's learnable one (:mod:`distiller_zoo.ctkd`) instead.
    """

    feature_kind = None
    logit_only = True
    default_weight = 0.0
    paper = "Hinton et al., Distilling the Knowledge in a Neural Network, NIPS-W 2015"
    main_is_zero: ClassVar[bool] = True
    flags = (Flag("--kd_T", float, 4.0, "KD temperature", above=0), *CTKD_FLAGS)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = DistillKL(float(ctx.cfg.kd_T))
        self.ctkd = ctkd_from_cfg(ctx.cfg)  # None unless --ctkd

    @classmethod
    def resolve(cls, cfg: Mapping[str, Any], teacher: str, student: str) -> dict[str, Any]:
        return resolve_ctkd(cfg)

    def graph_key(self, epoch: int) -> Any:
        return None if self.ctkd is None else self.ctkd.lambda_(epoch)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        if self.ctkd is None:
            return self.criterion(student.logits, autograd_safe(teacher.logits))
        temperature = self.ctkd(batch.epoch)
        return distill_kl(student.logits, autograd_safe(teacher.logits), temperature).reshape(())
