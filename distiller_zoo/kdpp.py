"""KD++: KD plus the norm-and-direction loss on the penultimate embedding (``--distill kdpp``).

Reference: WangYZ1608/Knowledge-Distillation-via-ND at fc6f3f9058ed35189a1d3c0a79a7594025e4d88f
(``ImageNet/utils.py`` ``DirectNormLoss``/``KDLoss``, ``ImageNet/train_kd.py``,
``CIFAR/train_cifar_kd.py``, ``*/Models/embtrans*.py``, ``ImageNet/train.sh``,
``CIFAR/train_cifar.sh``). The teacher class means (its ``center_emb_train.json``) come from
the assembly (``ctx.teacher_class_means``, see :mod:`helper.teacher_cache.class_means`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe, distill_kl

__all__ = ["DirectNormLoss"]

# (teacher, student) -> (KD factor, ND factor) of the official scripts: ImageNet/train.sh,
# CIFAR/train_cifar.sh (comment tables "1.0*cls + k*kd + n*nd"). Other pairs: 1.0 and 1.0,
# the argparse defaults of train_kd.py / train_cifar_kd.py.
KDPP_FACTORS: dict[tuple[str, str], tuple[float, float]] = {
    ("resnet34", "resnet18"): (2.5, 1.0),
    ("resnet50", "resnet18"): (4.0, 1.0),
    ("resnet101", "resnet18"): (3.5, 4.0),
    ("resnet152", "resnet18"): (4.0, 2.0),
    ("resnet50", "mobilenet_v1"): (4.0, 1.0),
    ("resnet56", "resnet20"): (1.0, 2.0),
    ("resnet32x4", "resnet8x4"): (3.5, 2.0),
    ("wrn_40_2", "wrn_40_1"): (1.0, 1.5),
    ("ResNet50", "MobileNetV2"): (3.0, 0.5),
    ("resnet32x4", "ShuffleV1"): (2.5, 1.5),
    ("resnet32x4", "ShuffleV2"): (4.0, 0.5),
}
KDPP_FACTORS_DEFAULT = (1.0, 1.0)
# (T, warm-up epochs): ImageNet/train_kd.py's defaults (--t 1.0, --warm_up 5.0), which
# ImageNet/train.sh keeps; CIFAR/train_cifar_kd.py's (--t 4.0, --warm_up 20.0) otherwise.
KDPP_T_WARMUP = {"imagenet": (1.0, 5.0)}
KDPP_T_WARMUP_DEFAULT = (4.0, 20.0)


def class_means_tensor(t_emb: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
    """KD++'s ``{"0": [D floats], "1": ...}`` class means as a ``[K, D]`` tensor like ``like``."""
    try:
        rows = [t_emb[str(i)] for i in range(len(t_emb))]
    except KeyError as err:
        raise ValueError(f"class means must have the keys '0' .. '{len(t_emb) - 1}', missing {err}") from None
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def direct_norm(s_emb: torch.Tensor, t_emb: torch.Tensor, means: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """``Σ_i (1 - <s_i, c_yi/|c_yi|> / max(|s_i|, |t_i|))`` over the batch (0-d, not averaged).

    ``max`` picks the teacher norm only where it is strictly larger, as Python's ``max(s, t)``
    of the reference does, and ``where`` sends the gradient through the picked norm alone.
    """
    centers = means.index_select(0, labels)
    unit = centers / centers.norm(p=2, dim=1, keepdim=True)
    s_norm, t_norm = s_emb.norm(p=2, dim=1), t_emb.norm(p=2, dim=1)
    max_norm = torch.where(t_norm > s_norm, t_norm, s_norm)
    return (1.0 - (s_emb * unit).sum(dim=1) / max_norm).sum()


class DirectNormLoss(nn.Module):
    """Wang, Cheng, Tang, Wang, Li & Wang, "Improving Knowledge Distillation via Regularizing
    Feature Norm and Direction" (KD++), arXiv:2305.17007, 2023.

    ``nd_loss_factor / B · Σ_i (1 - <s_i, ĉ_yi> / max(|s_i|, |t_i|))`` with ``ĉ_y`` the unit
    teacher class mean of class ``y``; the student embedding is not normalised. Vectorised
    (the reference loops over the batch in Python).

    Args:
        num_class: unused (kept for the reference signature).
        nd_loss_factor: weight of the loss.
    """

    def __init__(self, num_class: int = 1000, nd_loss_factor: float = 1.0) -> None:
        super().__init__()
        self.num_class = num_class
        self.nd_loss_factor = nd_loss_factor

    def forward(self, s_emb: torch.Tensor, t_emb: torch.Tensor,
                T_EMB: Union[torch.Tensor, Mapping[str, Any]], labels: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, D]``, class means ``T_EMB`` (``[K, D]`` tensor, or the reference's
        dict ``{"0": [D floats], ...}``), labels ``[B]`` int64 → 0-d loss."""
        if s_emb.shape != t_emb.shape or s_emb.shape[0] != labels.shape[0]:
            raise ValueError(f"embeddings {tuple(s_emb.shape)}, {tuple(t_emb.shape)} and labels "
                             f"{tuple(labels.shape)} do not match")
        means = class_means_tensor(T_EMB, s_emb) if isinstance(T_EMB, Mapping) else T_EMB
        return direct_norm(s_emb, t_emb, means, labels) * self.nd_loss_factor / labels.shape[0]


def embedding_projector(s_dim: int, t_dim: int, dataset: str) -> nn.Sequential:
    """KD++'s ``EmbTrans.fc1``: BatchNorm1d → Dropout(0.5) → Linear, student width to teacher's.

    Initialised as the reference: BN weight 1, bias 0; on ImageNet the Linear's weight and bias
    from N(0, 0.01) (ImageNet/Models/embtrans.py), on CIFAR PyTorch's weight and a zero bias
    (CIFAR/Models/embtrans_cifar.py).
    """
    proj = nn.Sequential(nn.BatchNorm1d(s_dim), nn.Dropout(0.5), nn.Linear(s_dim, t_dim))
    linear = proj[2]
    if dataset == "imagenet":
        nn.init.normal_(linear.weight, mean=0.0, std=0.01)
        nn.init.normal_(linear.bias, mean=0.0, std=0.01)
    else:
        nn.init.zeros_(linear.bias)
    return proj


@register("kdpp")
class KDPPMethod(Distiller):
    """KD++: ``kd_factor · min(1, (epoch - 1) / warmup) · KD_T + nd_factor · ND``.

    KD is :class:`~distiller_zoo.kd.DistillKL`'s formula at ``--kdpp_T``; its warm-up uses the
    reference's 0-based epoch (weight 0 in the first epoch). ND reads the pooled embeddings
    (the student's through :func:`embedding_projector` when the widths differ) and the
    teacher class means. Returns ``{"kd", "nd"}``; ``-b`` (default 1) scales both.
    """

    feature_kind = "feat"
    default_weight = 1.0  # the reference's loss is cls + kd + nd; the factors live inside
    paper = ("Wang et al., Improving Knowledge Distillation via Regularizing Feature Norm and "
             "Direction (KD++), arXiv 2023")
    needs_class_means = True
    flags = (
        Flag("--kdpp_kd", float, None, "weight of the KD term (unset: the official per-pair "
             "value, else 1)", minimum=0),
        Flag("--kdpp_nd", float, None, "weight of the ND term (unset: the official per-pair "
             "value, else 1)", minimum=0),
        Flag("--kdpp_T", float, None, "KD temperature (unset: 1 on imagenet, 4 otherwise)", above=0),
        Flag("--kdpp_warmup", float, None, "epochs over which the KD term ramps up from 0 (unset: "
             "5 on imagenet, 20 otherwise; 0 disables)", minimum=0),
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        if ctx.teacher_class_means is None:
            raise ValueError("kdpp needs the teacher class means (ctx.teacher_class_means)")
        cfg = ctx.cfg
        values = {**self.defaults(getattr(cfg, "dataset", ""), ctx.teacher_name, ctx.student_name),
                  **{k: getattr(cfg, k) for k in ("kdpp_kd", "kdpp_nd", "kdpp_T", "kdpp_warmup")
                     if getattr(cfg, k, None) is not None}}
        self.kd_factor, self.T = float(values["kdpp_kd"]), float(values["kdpp_T"])
        self.warmup = float(values["kdpp_warmup"])
        self.nd = DirectNormLoss(ctx.num_classes, float(values["kdpp_nd"]))
        s_dim, t_dim = ctx.student_shapes[-1][1], ctx.teacher_shapes[-1][1]
        if tuple(ctx.teacher_class_means.shape) != (ctx.num_classes, t_dim):
            raise ValueError(f"class means are {tuple(ctx.teacher_class_means.shape)}, expected "
                             f"[{ctx.num_classes}, {t_dim}]")
        self.projector: Optional[nn.Module] = (
            embedding_projector(s_dim, t_dim, getattr(cfg, "dataset", "")) if s_dim != t_dim else None)
        # derived from the teacher and the data: rebuilt, never checkpointed
        self.register_buffer("class_means", ctx.teacher_class_means.float().to(ctx.device),
                             persistent=False)

    @staticmethod
    def defaults(dataset: str, teacher: str, student: str) -> dict[str, float]:
        kd, nd = KDPP_FACTORS.get((teacher, student), KDPP_FACTORS_DEFAULT)
        T, warmup = KDPP_T_WARMUP.get(dataset, KDPP_T_WARMUP_DEFAULT)
        return {"kdpp_kd": kd, "kdpp_nd": nd, "kdpp_T": T, "kdpp_warmup": warmup}

    @classmethod
    def resolve(cls, cfg: Mapping[str, Any], teacher: str, student: str) -> dict[str, Any]:
        """Unset KD++ flags become the pair's and data set's values (recorded in config.json)."""
        found = cls.defaults(cfg.get("dataset", ""), teacher, student)
        return {k: v for k, v in found.items() if cfg.get(k) is None}

    def warmup_factor(self, epoch: int) -> float:
        """``min(1, e / warmup)`` with the reference's 0-based epoch ``e = epoch - 1``."""
        return min(1.0, max(epoch - 1, 0) / self.warmup) if self.warmup > 0 else 1.0

    def graph_key(self, epoch: int) -> float:
        return self.warmup_factor(epoch)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> dict[str, torch.Tensor]:
        s_emb = student.pooled if self.projector is None else self.projector(student.pooled)
        t_emb = autograd_safe(teacher.pooled)
        kd = distill_kl(student.logits, autograd_safe(teacher.logits), self.T)
        nd = self.nd(s_emb, t_emb, self.class_means, batch.labels)
        return {"kd": self.kd_factor * self.warmup_factor(batch.epoch) * kd, "nd": nd}
