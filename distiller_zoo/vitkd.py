"""ViT feature distillation (``--distill vitkd``)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["ViTKDLoss"]


def random_mask(batch: int, tokens: int, ratio: float, device: torch.device) -> torch.Tensor:
    """``[B, N]`` float mask, 1 at the ``N - int(N * (1 - ratio))`` masked tokens of each row.

    Draws exactly ``torch.rand(B, N)`` from the global generator of ``device`` and ranks it
    with two ``argsort``s, as the reference's ``random_masking`` does, so a seeded call masks
    the same tokens. A token is masked when its rank is not among the ``len_keep`` smallest.
    """
    len_keep = int(tokens * (1 - ratio))
    noise = torch.rand(batch, tokens, device=device)
    rank = torch.argsort(torch.argsort(noise, dim=1), dim=1)
    return (rank >= len_keep).float()


class ViTKDLoss(nn.Module):
    """Yang, Li, Zeng, Li, Yuan & Li, "ViTKD: Practical Guidelines for ViT feature knowledge
    distillation", arXiv:2209.02432, 2022 (cls_KD ``mmcls/models/dis_losses/vitkd.py``,
    branch 1.0).

    Mimicking: the student's tokens after blocks 0 and 1, each through its own linear
    ``align2.i``, regress the teacher's (summed squared error / B, times ``alpha_vitkd``).
    Generation: the student's last tokens (through ``align``) have a random ``lambda_vitkd``
    share replaced by ``mask_token``, go through two 3×3 convolutions on the ``√N × √N`` grid,
    and regress the teacher's last tokens at the masked positions only (summed squared error
    / B, times ``beta_vitkd / lambda_vitkd``). The align layers exist only when the widths
    differ.

    Args:
        student_dims: student token width ``Ds``.
        teacher_dims: teacher token width ``Dt``.
        alpha_vitkd: weight of the mimicking term.
        beta_vitkd: weight of the generation term.
        lambda_vitkd: share of the last tokens that is masked, in (0, 1).
    """

    def __init__(self, student_dims: int, teacher_dims: int, alpha_vitkd: float = 3e-05,
                 beta_vitkd: float = 3e-06, lambda_vitkd: float = 0.5) -> None:
        super().__init__()
        self.alpha_vitkd = alpha_vitkd
        self.beta_vitkd = beta_vitkd
        self.lambda_vitkd = lambda_vitkd
        self.mask_token = nn.Parameter(torch.zeros(1, 1, teacher_dims))
        if student_dims != teacher_dims:
            self.align2 = nn.ModuleList([nn.Linear(student_dims, teacher_dims) for _ in range(2)])
            self.align = nn.Linear(student_dims, teacher_dims)
        else:
            self.align2 = None
            self.align = None
        self.generation = nn.Sequential(
            nn.Conv2d(teacher_dims, teacher_dims, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(teacher_dims, teacher_dims, kernel_size=3, padding=1))

    def mimic(self, low_s: torch.Tensor, low_t: torch.Tensor) -> torch.Tensor:
        """Shallow tokens ``[B, 2, N, Ds]`` and ``[B, 2, N, Dt]`` → 0-d mimicking term."""
        if self.align2 is not None:
            low_s = torch.stack([self.align2[i](low_s[:, i]) for i in range(2)], dim=1)
        return F.mse_loss(low_s, low_t, reduction="sum") / low_s.shape[0] * self.alpha_vitkd

    def generate(self, high_s: torch.Tensor, high_t: torch.Tensor) -> torch.Tensor:
        """Last tokens ``[B, N, Ds]`` and ``[B, N, Dt]`` → 0-d generation term (draws the mask)."""
        x = self.align(high_s) if self.align is not None else high_s
        B, N, D = x.shape
        mask = random_mask(B, N, self.lambda_vitkd, x.device).unsqueeze(-1)
        # equals the reference's keep-gather, concatenation of mask tokens and unshuffle
        x = torch.where(mask.bool(), self.mask_token, x)
        hw = math.isqrt(N)
        x = x.reshape(B, hw, hw, D).permute(0, 3, 1, 2)
        x = self.generation(x).flatten(2).transpose(1, 2)
        loss = F.mse_loss(x * mask, high_t * mask, reduction="sum")
        return loss / B * self.beta_vitkd / self.lambda_vitkd

    def forward(self, preds_S: Sequence[torch.Tensor], preds_T: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[low [B, 2, N, D], high [B, N, D]]`` of the student and of the teacher (patch
        tokens, no class token, N a square) → 0-d loss. The mimicking term is computed first,
        then the mask is drawn, the reference's order of random draws."""
        loss_lr = self.mimic(preds_S[0], preds_T[0])
        return loss_lr + self.generate(preds_S[1], preds_T[1])


def _token_width(shapes: Sequence[torch.Size], side: str, name: str) -> tuple[int, int]:
    """``(N, D)`` of a ViT's feature list; ValueError when it is not the ViT contract."""
    if len(shapes) < 3 or any(len(s) != 3 for s in shapes[:3]):
        got = "[B, C, H, W] maps" if any(len(s) == 4 for s in shapes) else \
            f"features of shapes {[list(s) for s in shapes]}"
        raise ValueError(f"vitkd needs vision-transformer features ([B, N, D] tokens); "
                         f"{name or 'the ' + side} gives {got}")
    n, d = int(shapes[0][1]), int(shapes[0][2])
    if any((int(s[1]), int(s[2])) != (n, d) for s in shapes[1:3]):
        raise ValueError(f"vitkd: the {side}'s first three features differ in shape: "
                         f"{[list(s) for s in shapes[:3]]}")
    return n, d


@register("vitkd")
class ViTKDMethod(Distiller):
    """ViTKD on the ViT token features: ``feats[0]``, ``feats[1]`` (patch tokens after blocks
    0 and 1) are mimicked, ``feats[2]`` (last tokens after the final norm) generated."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 1.0  # cls_KD adds the loss unweighted; alpha and beta carry the weights
    paper = "Yang et al., ViTKD: Practical Guidelines for ViT feature knowledge distillation, arXiv 2022"
    # The mask is drawn from the global generator at every step. A captured graph would replay
    # fresh CUDA draws, but never the eager step's mask, so the capture check cannot match it.
    graph_safe = False
    flags = (
        Flag("--vitkd_alpha", float, 3e-5, "ViTKD weight of the mimicking term (blocks 0, 1)",
             minimum=0),
        Flag("--vitkd_beta", float, 3e-6, "ViTKD weight of the generation term (last tokens)",
             minimum=0),
        Flag("--vitkd_lambda", float, 0.5, "ViTKD share of masked last tokens", above=0, below=1),
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        n_s, d_s = _token_width(ctx.student_shapes, "student", ctx.student_name)
        n_t, d_t = _token_width(ctx.teacher_shapes, "teacher", ctx.teacher_name)
        if n_s != n_t or math.isqrt(n_s) ** 2 != n_s:
            raise ValueError(f"vitkd needs the same square number of patch tokens in both "
                             f"networks, got {n_s} (student) and {n_t} (teacher)")
        cfg = ctx.cfg
        self.criterion = ViTKDLoss(d_s, d_t, float(cfg.vitkd_alpha), float(cfg.vitkd_beta),
                                   float(cfg.vitkd_lambda)).to(ctx.device)

    @staticmethod
    def inputs(out: Outputs) -> list[torch.Tensor]:
        """The ViT feature contract → ``[low [B, 2, N, D], high [B, N, D]]``."""
        feats = [autograd_safe(f) for f in out.feats[:3]]
        return [torch.stack(feats[:2], dim=1), feats[2]]

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        return self.criterion(self.inputs(student), self.inputs(teacher))
