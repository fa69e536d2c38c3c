"""Information-Theoretic Representation Distillation (``--distill itrd``)."""
from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.util import LinearEmbed

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["ITLoss"]


class ITLoss(nn.Module):
    """Miles, Lopez-Rodriguez & Mikolajczyk, "Information Theoretic Representation
    Distillation", BMVC 2022 (the TTM code's version).

    Two terms on pooled features; the TTM loop weighs them with ``--lambda_corr`` and
    ``--lambda_mutual``. ``embed`` (a bare linear map ``s_dim → t_dim``) is applied by
    :meth:`forward_correlation_it` always, and by :meth:`forward_mutual_it` only when
    ``s_dim != t_dim``. There is no ``forward``.

    Args:
        opt: namespace with ``s_dim``, ``t_dim`` (pooled feature sizes), ``n_data`` (training
            samples; kept, unused) and ``alpha_it`` (the Rényi order α of the correlation term).
    """

    def __init__(self, opt: Any) -> None:
        super().__init__()
        self.s_dim = opt.s_dim
        self.t_dim = opt.t_dim
        self.n_data = opt.n_data
        self.alpha_it = opt.alpha_it
        self.embed = LinearEmbed(opt.s_dim, opt.t_dim)

    def forward_correlation_it(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """Features ``[B, s_dim]``, ``[B, t_dim]`` → 0-d ``log2(sum_d |c_d - 1|**(2 alpha))``
        where ``c`` is the per-dimension correlation of the batch-standardised (unbiased std)
        embedded student and teacher features."""
        f_s = self.embed(z_s)
        n = f_s.shape[0]
        f_s_norm = (f_s - f_s.mean(0)) / f_s.std(0)
        f_t_norm = (z_t - z_t.mean(0)) / z_t.std(0)
        c_st = torch.einsum("bx,bx->x", f_s_norm, f_t_norm) / n
        c_diff = torch.abs(c_st - torch.ones_like(c_st)).pow(2.0).pow(self.alpha_it)
        return torch.log2(c_diff.sum())

    def forward_mutual_it(self, z_s: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """Features ``[B, s_dim]``, ``[B, t_dim]`` → 0-d ``sum(G_s**2) - sum(G_st**2)``, with
        ``G_s`` the student's cosine Gram matrix ``[B, B]`` and ``G_st = G_s * G_t``, each
        divided by its trace."""
        f_s = self.embed(z_s) if self.s_dim != self.t_dim else z_s
        f_s_norm = F.normalize(f_s)
        f_t_norm = F.normalize(z_t)
        g_s = torch.einsum("bx,dx->bd", f_s_norm, f_s_norm)
        g_t = torch.einsum("bx,dx->bd", f_t_norm, f_t_norm)
        g_st = g_s * g_t
        g_s = g_s / torch.trace(g_s)
        g_st = g_st / torch.trace(g_st)
        return (g_s.pow(2) - g_st.pow(2)).sum()


@register("itrd")
class ITRDMethod(Distiller):
    """ITRD as the TTM loop runs it: ``lambda_corr * correlation + lambda_mutual * mutual``
    on the pooled features of a ``preact=True`` forward; the embedding trains."""

    feature_kind = "preact"
    logit_only = False
    default_weight = 1.0
    paper = "Miles et al., Information Theoretic Representation Distillation, BMVC 2022"
    flags = (
        Flag("--lambda_corr", float, 2.0, "correlation loss weight", minimum=0),
        Flag("--lambda_mutual", float, 1.0, "mutual information loss weight", minimum=0),
        Flag("--alpha_it", float, 1.5, "Renyi's alpha (paper: 1.01 same-architecture, 1.5 "
             "cross-architecture)", above=0),
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        opt = argparse.Namespace(s_dim=ctx.student_preact_shapes[-1][1],
                                 t_dim=ctx.teacher_preact_shapes[-1][1],
                                 n_data=ctx.n_data, alpha_it=float(cfg.alpha_it))
        self.criterion = ITLoss(opt)
        self.lambda_corr = float(cfg.lambda_corr)
        self.lambda_mutual = float(cfg.lambda_mutual)

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        f_s, f_t = student.pooled, autograd_safe(teacher.pooled)
        corr = self.criterion.forward_correlation_it(f_s, f_t)
        mutual = self.criterion.forward_mutual_it(f_s, f_t)
        return self.lambda_corr * corr + self.lambda_mutual * mutual
