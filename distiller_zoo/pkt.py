"""Probabilistic knowledge transfer (``--distill pkt``)."""
from __future__ import annotations

import torch
from torch import nn

from .base import Batch, Distiller, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["PKT"]


class PKT(nn.Module):
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge
    Transfer", ECCV 2018.

    Cosine similarities between the samples of a batch, mapped to ``[0, 1]`` and normalised
    per row into conditional distributions ``[B, B]``; the loss is the mean over all entries
    of ``p_t * log((p_t + eps) / (p_s + eps))`` (the KL divided by ``B**2``).
    """

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        """Student and teacher features ``[B, Ds]``, ``[B, Dt]`` → 0-d loss."""
        return self.cosine_similarity_loss(f_s, f_t)

    @staticmethod
    def cosine_similarity_loss(output_net: torch.Tensor, target_net: torch.Tensor,
                               eps: float = 0.0000001) -> torch.Tensor:
        """Rows ``[B, Ds]`` and ``[B, Dt]`` → 0-d; ``eps`` guards the norms and the log ratio."""
        output_net = output_net / (torch.sqrt(torch.sum(output_net ** 2, 1, keepdim=True)) + eps)
        # NaN → 0 as the reference's ``x[x != x] = 0``, without its boolean index (a host wait
        # that a CUDA graph cannot hold); the same values and the same zero gradient there
        output_net = torch.where(output_net != output_net, 0.0, output_net)
        target_net = target_net / (torch.sqrt(torch.sum(target_net ** 2, 1, keepdim=True)) + eps)
        target_net = torch.where(target_net != target_net, 0.0, target_net)

        model_similarity = (torch.mm(output_net, output_net.transpose(0, 1)) + 1.0) / 2.0
        target_similarity = (torch.mm(target_net, target_net.transpose(0, 1)) + 1.0) / 2.0
        model_similarity = model_similarity / torch.sum(model_similarity, dim=1, keepdim=True)
        target_similarity = target_similarity / torch.sum(target_similarity, dim=1, keepdim=True)
        return torch.mean(target_similarity
                          * torch.log((target_similarity + eps) / (model_similarity + eps)))


@register("pkt")
class PKTMethod(Distiller):
    """PKT on the pooled features."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 30000.0  # RepDistiller scripts/run_cifar_distill.sh
    paper = ("Passalis & Tefas, Learning Deep Representations with Probabilistic Knowledge "
             "Transfer, ECCV 2018")

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.criterion = PKT()

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.criterion(student.pooled, autograd_safe(teacher.pooled))
