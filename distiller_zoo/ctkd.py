"""CTKD: a learnable KD temperature trained adversarially (``--ctkd global`` on ``kd``/``dkd``).

Not a method of its own: ``kd`` and ``dkd`` own a :class:`CurriculumTemperature` when
``--ctkd`` is not ``off`` and use its temperature instead of ``--kd_T``/``--dkd_T``.
Reference: zhengli97/CTKD at 7d5252241259ae70d38a832371fed9697d15fc14 (``models/temp_global.py``,
``helper/loops.py``, ``train_student.py``'s ``CosineDecay``, ``scripts/run_*_distill.sh``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .base import Flag

__all__ = ["GradientReversal", "Global_T"]

Lambda = Union[float, torch.Tensor]

CTKD = Flag("--ctkd", str, "off", "CTKD's learnable temperature for kd/dkd: off, or global (one "
            "temperature for all samples; the instance-wise variant is not public code)",
            choices=("off", "global"))
CTKD_T_START = Flag("--ctkd_t_start", float, 1.0, "CTKD: temperature = t_start + t_end * "
                    "sigmoid(theta)", minimum=0)
CTKD_T_END = Flag("--ctkd_t_end", float, 20.0, "CTKD: see --ctkd_t_start", above=0)
CTKD_COSINE_EPOCHS = Flag("--ctkd_cosine_epochs", int, None, "CTKD: epochs over which the "
                          "gradient-reversal weight falls from 0 to -1 along a cosine (unset: 5 on "
                          "imagenet, 10 otherwise, as CTKD's scripts)", minimum=1)
CTKD_FLAGS = (CTKD, CTKD_T_START, CTKD_T_END, CTKD_COSINE_EPOCHS)
# --decay_loops of CTKD's scripts/run_imagenet_distill.sh (5) and run_cifar_distill.sh (10)
COSINE_EPOCHS = {"imagenet": 5}
COSINE_EPOCHS_DEFAULT = 10


class _ReversalFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the upstream gradient by ``lambda_`` (no minus
    sign: CTKD's schedule makes ``lambda_`` negative itself)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: Lambda) -> torch.Tensor:
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # a Python float stays a kernel argument: no host-to-device copy, so graph capture works
        return grad * ctx.lambda_, None


class GradientReversal(nn.Module):
    """Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation", ICML 2015,
    as used by Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023.

    ``forward(x, lambda_)`` returns a copy of ``x``; the gradient reaching ``x`` is
    ``lambda_ · upstream``.
    """

    def forward(self, x: torch.Tensor, lambda_: Lambda) -> torch.Tensor:
        return _ReversalFunction.apply(x, lambda_)


class Global_T(nn.Module):
    """Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023 (global CTKD).

    One learnable scalar ``global_T [1]`` (initially 1.0), returned through a
    :class:`GradientReversal` (``grl``). The two inputs are ignored (CTKD passes the teacher
    and student logits).
    """

    def __init__(self) -> None:
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1))
        self.grl = GradientReversal()

    def forward(self, fake_input1: Any, fake_input2: Any, lambda_: Lambda) -> torch.Tensor:
        """Returns ``global_T`` ``[1]`` with its gradient scaled by ``lambda_``."""
        return self.grl(self.global_T, lambda_)


def cosine_lambda(epoch: float, epochs: int, start: float = 0.0, end: float = -1.0) -> float:
    """CTKD's ``CosineDecay(max_value=start, min_value=end, num_loops=epochs).get_value(epoch)``:
    ``end + (start - end) · (1 + cos(π · e / epochs)) / 2`` with ``e`` clamped to ``[0, epochs]``.
    CTKD calls it with 1-based epochs, as :class:`~distiller_zoo.base.Batch` carries them."""
    e = min(max(epoch, 0), epochs)
    return end + (start - end) * (math.cos(e * math.pi / epochs) + 1.0) * 0.5


class CurriculumTemperature(nn.Module):
    """The temperature ``t_start + t_end · sigmoid(θ)`` of a KD loss, θ trained through the
    gradient reversal whose weight is :func:`cosine_lambda` of the epoch.

    Args:
        t_start, t_end: the affine map of the sigmoid (CTKD: 1 and 20, so 15.6 at θ = 1).
        cosine_epochs: epochs of the reversal's ramp from 0 to -1.
    """

    def __init__(self, t_start: float, t_end: float, cosine_epochs: int) -> None:
        super().__init__()
        self.global_t = Global_T()
        self.t_start, self.t_end, self.cosine_epochs = t_start, t_end, cosine_epochs

    def lambda_(self, epoch: int) -> float:
        return cosine_lambda(epoch, self.cosine_epochs)

    def forward(self, epoch: int) -> torch.Tensor:
        """The ``[1]`` temperature for a batch of (1-based) ``epoch``."""
        theta = self.global_t(None, None, self.lambda_(epoch))
        return self.t_start + self.t_end * torch.sigmoid(theta)


def ctkd_from_cfg(cfg: Any) -> Optional[CurriculumTemperature]:
    """The temperature module ``--ctkd`` asks for, or None when it is off."""
    mode = getattr(cfg, "ctkd", "off") or "off"
    if mode == "off":
        return None
    epochs = getattr(cfg, "ctkd_cosine_epochs", None)
    if epochs is None:
        epochs = cosine_epochs_for(getattr(cfg, "dataset", ""))
    return CurriculumTemperature(float(cfg.ctkd_t_start), float(cfg.ctkd_t_end), int(epochs))


def cosine_epochs_for(dataset: str) -> int:
    return COSINE_EPOCHS.get(dataset, COSINE_EPOCHS_DEFAULT)


def resolve_ctkd(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """An unset ``--ctkd_cosine_epochs`` of a CTKD run becomes the data set's value."""
    if cfg.get("ctkd", "off") == "off" or cfg.get("ctkd_cosine_epochs") is not None:
        return {}
    return {"ctkd_cosine_epochs": cosine_epochs_for(cfg.get("dataset", ""))}
