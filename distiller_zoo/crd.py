"""Contrastive Representation Distillation (``--distill crd``)."""
from __future__ import annotations

import argparse
import logging
import math
import weakref
import zlib
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from models.util import Embed

from .base import FEAT_DIM, Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["BankScores", "ContrastMemory", "ContrastLoss", "CRDLoss", "ContrastSampler"]

log = logging.getLogger(__name__)
eps = 1e-7
_KEY_HIGH = 2 ** 62  # random int64 keys: ties (which would bias topk) have probability ~N²/2⁶³
_SEED_SALT = zlib.crc32(b"crd contrast sampler")
REPLACE_ABOVE = 200_000  # training-set size above which --nce_replace auto draws with replacement  # keeps this stream apart from others seeded by --seed


class ContrastMemory(nn.Module):
    """The two memory banks of CRD (Tian, Krishnan & Isola, "Contrastive Representation
    Distillation", ICLR 2020) and the NCE scores against them.

    ``params`` holds ``[K, T, Z_v1, Z_v2, momentum]`` in float32; the normalisation constants Z
    are set once, from the first batch, to ``mean(exp(score / T)) * outputSize``. ``params`` is
    read at the first forward (one host sync) and again after ``load_state_dict``.

    Args:
        inputSize: embedding dimension ``D``.
        outputSize: number of training samples ``N`` (rows of each bank).
        K: negatives per positive.
        T: temperature.
        momentum: weight of the old row in the memory update.
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07,
                 momentum: float = 0.5) -> None:
        super().__init__()
        self.nLem = outputSize
        self.K = K
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(inputSize / 3)  # rows start uniform in [-stdv, stdv]
        self.register_buffer("memory_v1", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self.register_buffer("memory_v2", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv))
        self._consts: Optional[tuple[float, float, float, float]] = None  # T, Z_v1, Z_v2, momentum
        self._journals: list[tuple[str, weakref.ref]] = []  # (bank, journal of a pending backward)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._consts = None
        super()._load_from_state_dict(*args, **kwargs)

    def _constants(self, out_v1: torch.Tensor, out_v2: torch.Tensor) -> tuple[float, float, float, float]:
        """T, Z_v1, Z_v2 and momentum as float32-rounded Python floats; sets Z when unset."""
        if self._consts is None:
            with torch.no_grad():
                for i, out, name in ((2, out_v1, "Z_v1"), (3, out_v2, "Z_v2")):
                    if self.params[i].item() < 0:
                        self.params[i] = out.mean() * self.nLem
                        log.info("normalization constant %s is set to %.1f", name, self.params[i].item())
            self._consts = tuple(self.params[1:].tolist())  # type: ignore[assignment]
        return self._consts  # type: ignore[return-value]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor,
                idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of the student (``v1``) and teacher (``v2``) embeddings ``[B, D]`` against the
        other side's memory rows ``idx [B, K+1]`` (column 0 = positive ``y [B]``).

        Returns ``(out_v1, out_v2)``, each ``[B, K+1, 1]``: ``exp(<row, v> / T) / Z``. Then row
        ``y`` of each bank becomes the L2-normalised ``momentum * row + (1 - momentum) * v``.
        Without ``idx``, contrast rows are drawn uniformly with replacement (the reference's
        alias sampler with uniform weights), on the memory's device.
        """
        if idx is None:
            idx = torch.randint(0, self.nLem, (v1.shape[0], self.K + 1), device=self.memory_v1.device)
            idx[:, 0] = y
        T = self.params[1].item() if self._consts is None else self._consts[0]
        # Score against every row, then pick: reads each bank once ([N, D], 25.6 MB for CIFAR)
        # instead of gathering [B, K+1, D] rows (537 MB at B=64, K=16384, D=128). Same dot
        # products. The banks are updated in place below; instead of a copy of each bank for
        # the backward (2 × 655 MB a step on ImageNet), the rows written since the forward are
        # journalled and put back while the backward reads the bank.
        journal_v1, journal_v2 = _Journal(), _Journal()  # alive while their graph is
        self._journals = [(n, ref) for n, ref in self._journals if ref() is not None] + \
            [("memory_v1", weakref.ref(journal_v1)), ("memory_v2", weakref.ref(journal_v2))]
        out_v2 = torch.exp(BankScores.apply(v2, self.memory_v1, idx, journal_v1) / T).unsqueeze(2)
        out_v1 = torch.exp(BankScores.apply(v1, self.memory_v2, idx, journal_v2) / T).unsqueeze(2)
        _, z_v1, z_v2, momentum = self._constants(out_v1, out_v2)
        out_v1 = out_v1 / z_v1
        out_v2 = out_v2 / z_v2
        with torch.no_grad():
            for name, v in (("memory_v1", v1), ("memory_v2", v2)):
                rows = getattr(self, name).index_select(0, y).mul_(momentum).add_(v.detach() * (1 - momentum))
                self.write_rows(name, y, rows.div(rows.pow(2).sum(1, keepdim=True).pow(0.5)))
        return out_v1, out_v2

    @torch.no_grad()
    def write_rows(self, name: str, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrites rows ``index [n]`` (distinct) of bank ``name`` with ``rows [n, D]``,
        keeping the old rows for a backward still to come (:class:`BankScores`)."""
        memory = getattr(self, name)
        for bank, ref in self._journals:
            journal = ref()
            if journal is not None and bank == name:
                journal.append((index, memory.index_select(0, index)))
        memory.index_copy_(0, index, rows)


class _Journal(list):
    """``(index, old rows)`` written to one bank since a forward whose backward is still to
    come; only that forward's graph holds it (the memory keeps a weak reference)."""


class BankScores(torch.autograd.Function):
    """``mm(v, bank.t()).gather(1, idx)`` (``[B, D]``, ``[N, D]``, ``[B, K+1]`` → ``[B, K+1]``)
    whose backward reads the bank as it was at the forward without keeping a copy of it.

    Rows overwritten after the forward are listed in ``journal`` as ``(index, old rows)``; the
    backward puts the oldest values back, computes ``dense(grad) @ bank`` (what autograd's
    ``gather`` and ``mm`` backward compute) and restores the current rows.
    """

    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, bank: torch.Tensor, idx: torch.Tensor,
                journal: list) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.bank, ctx.journal = bank, journal  # by reference: the journal makes it exact
        return torch.mm(v, bank.t()).gather(1, idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None, None]:
        (idx,) = ctx.saved_tensors
        bank, journal = ctx.bank, ctx.journal
        dense = grad.new_zeros(grad.shape[0], bank.shape[0]).scatter_add_(1, idx, grad)
        with torch.no_grad():
            current = [bank.index_select(0, index) for index, _ in journal]
            for index, old in reversed(journal):  # the first write's old rows end up in place
                bank.index_copy_(0, index, old)
            grad_v = dense.mm(bank.to(dense.dtype))
            for (index, _), rows in zip(journal, current):
                bank.index_copy_(0, index, rows)
        return grad_v, None, None, None


class ContrastLoss(nn.Module):
    """CRD's NCE loss (eq. 18): positives against ``m * Pn`` with ``m = K`` negatives and the
    uniform noise distribution ``Pn = 1 / n_data``.

    Args:
        n_data: number of training samples.
    """

    def __init__(self, n_data: int) -> None:
        super().__init__()
        self.n_data = n_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities ``[B, K+1, 1]`` (positive in column 0) → loss of shape ``[1]``."""
        bsz, m = x.shape[0], x.shape[1] - 1
        m_pn = m * (1 / float(self.n_data))
        p_pos = x.select(1, 0)
        log_d1 = torch.log(p_pos / (p_pos + (m_pn + eps)))
        p_neg = x.narrow(1, 1, m)
        log_d0 = torch.log(torch.full_like(p_neg, m_pn) / (p_neg + (m_pn + eps)))
        return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


class CRDLoss(nn.Module):
    """CRD (Tian, Krishnan & Isola, ICLR 2020): both embeddings, the memory and two
    symmetric NCE losses (student anchored on teacher memory and vice versa).

    Args:
        opt: namespace with ``s_dim, t_dim`` (pooled feature sizes), ``feat_dim`` (embedding),
            ``nce_k`` (negatives), ``nce_t`` (temperature), ``nce_m`` (memory momentum) and
            ``n_data`` (training samples).
    """

    def __init__(self, opt: Any) -> None:
        super().__init__()
        self.embed_s = Embed(opt.s_dim, opt.feat_dim)
        self.embed_t = Embed(opt.t_dim, opt.feat_dim)
        self.contrast = ContrastMemory(opt.feat_dim, opt.n_data, opt.nce_k, opt.nce_t, opt.nce_m)
        self.criterion_t = ContrastLoss(opt.n_data)
        self.criterion_s = ContrastLoss(opt.n_data)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor,
                contrast_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Pooled features ``[B, s_dim]``, ``[B, t_dim]``, sample indices ``[B]`` and contrast
        indices ``[B, nce_k + 1]`` (column 0 = ``idx``) → loss of shape ``[1]``."""
        out_s, out_t = self.contrast(self.embed_s(f_s), self.embed_t(f_t), idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)


class ContrastSampler:
    """Draws CRD contrast indices for a whole batch on the labels' device.

    The distribution is RepDistiller's ``CIFAR100InstanceSample`` (``is_sample=True``,
    ``percent=1.0``): column 0 is the positive, the sample itself (``exact``) or a uniform
    draw from its class (``relax``); the ``k`` negatives are uniform without replacement over
    the samples of all other classes, or with replacement when that pool is smaller than ``k``.

    Without replacement: i.i.d. random int64 keys ``[B, N]``, same-class keys set to -1, then
    ``topk(k)``: an exactly uniform k-subset. Cost per batch: ``B*N`` keys (25.6 MB for
    B=64, N=50000; about 41 MB peak) and one top-k; nothing per sample in Python and no host
    sync. Measured at B=64, N=50000, k=16384: 0.32 ms on an H200 (0.52 ms in relax mode),
    60 ms on one Xeon core, 25 ms with 16 threads. With replacement: ``key % pool`` mapped
    past the class's block of the label-sorted order. Uniform integers below ``n`` are
    ``key % n`` (bias below ``n / 2**62``).

    Args:
        labels: ``[N]`` int64 training labels, on the device to sample on.
        k: negatives per sample (``--nce_k``).
        mode: ``"exact"`` or ``"relax"`` (``--mode``).
        generator: random source on ``labels.device``; its state is the sampler's state.
        always_replace: draw every sample's negatives with replacement, as the ImageNet
            reference does (mdistiller's ``ImageNetInstanceSample``); keys ``[B, k]`` instead
            of ``[B, N]`` (``B * N`` int64 keys would be 2.6 GB at B = 256, N = 1.28 M).
    """

    def __init__(self, labels: torch.Tensor, k: int, mode: str = "exact",
                 generator: Optional[torch.Generator] = None, always_replace: bool = False) -> None:
        if mode not in ("exact", "relax"):
            raise ValueError(f"mode must be 'exact' or 'relax', got {mode!r}")
        self.labels = labels.long()
        self.k, self.mode = int(k), mode
        self.generator = generator if generator is not None else torch.Generator(device=labels.device)
        self.counts = torch.bincount(self.labels)
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # class blocks of `order`
        self.order = torch.argsort(self.labels, stable=True)
        self.pool = self.labels.numel() - self.counts  # negatives available per class
        self.replace = (self.pool < self.k) | always_replace
        present = self.counts > 0
        if bool((present & (self.pool == 0)).any()):
            raise ValueError("CRD needs at least two classes to draw negatives from")
        self._any_replace = bool((present & self.replace).any())  # one-off host syncs
        self._all_replace = bool((~present | self.replace).all())

    def _below(self, high: torch.Tensor, cols: int) -> torch.Tensor:
        """``[B, cols]`` uniform integers in ``[0, high[b])`` for ``high [B]``."""
        keys = torch.randint(0, _KEY_HIGH, (high.shape[0], cols), device=high.device,
                             generator=self.generator)
        return keys % high.unsqueeze(1)

    def _with_replacement(self, y: torch.Tensor) -> torch.Tensor:
        p = self._below(self.pool[y], self.k)  # position in the class-sorted order minus y's block
        p = p + (p >= self.starts[y].unsqueeze(1)) * self.counts[y].unsqueeze(1)
        return self.order[p]

    def _without_replacement(self, y: torch.Tensor) -> torch.Tensor:
        keys = torch.randint(0, _KEY_HIGH, (y.shape[0], self.labels.numel()), device=y.device,
                             generator=self.generator)
        keys.masked_fill_(self.labels.unsqueeze(0) == y.unsqueeze(1), -1)
        return keys.topk(self.k, dim=1, sorted=False).indices

    def draw(self, index: torch.Tensor) -> torch.Tensor:
        """Sample indices ``[B]`` → contrast indices ``[B, k + 1]`` int64 (column 0 = positive)."""
        y = self.labels[index]
        if self.mode == "exact":
            pos = index.long()
        else:
            pos = self.order[self.starts[y] + self._below(self.counts[y], 1).squeeze(1)]
        if self._all_replace:
            neg = self._with_replacement(y)
        else:
            neg = self._without_replacement(y)
            if self._any_replace:
                neg = torch.where(self.replace[y].unsqueeze(1), self._with_replacement(y), neg)
        return torch.cat([pos.unsqueeze(1), neg], dim=1)

    def get_state(self) -> torch.Tensor:
        """The generator state (a CPU uint8 tensor)."""
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state.cpu())


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@register("crd")
class CRDMethod(Distiller):
    """CRD on the pooled features, with negatives drawn on the device by
    :class:`ContrastSampler`. The embeddings train; the memory banks and the sampler's
    generator state are method state (``state_dict``, including ``_extra_state``)."""

    feature_kind = "feat"
    logit_only = False
    default_weight = 0.8
    paper = "Tian, Krishnan & Isola, Contrastive Representation Distillation, ICLR 2020"
    graph_safe = False  # its own sampler generator, a one-off host read of Z, DDP gathers
    flags = (
        FEAT_DIM,
        Flag("--mode", str, "exact", "positive: the sample itself (exact) or a random same-class "
             "sample (relax)", choices=("exact", "relax")),
        Flag("--nce_k", int, 16384, "number of negative samples for NCE", minimum=1),
        Flag("--nce_t", float, 0.07, "temperature parameter for softmax", above=0),
        Flag("--nce_m", float, 0.5, "momentum for non-parametric updates", minimum=0, below=1),
        Flag("--nce_replace", str, "auto", "negatives drawn with replacement: yes (mdistiller's "
             "ImageNet sampler; torchdistill draws without), no (the CIFAR-100 reference, unless a class's pool is smaller than "
             "--nce_k), auto: yes above 200,000 training images", choices=("auto", "yes", "no")),
    )

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        cfg = ctx.cfg
        opt = argparse.Namespace(s_dim=ctx.student_shapes[-1][1], t_dim=ctx.teacher_shapes[-1][1],
                                 feat_dim=cfg.feat_dim, nce_k=cfg.nce_k, nce_t=cfg.nce_t,
                                 nce_m=cfg.nce_m, n_data=ctx.n_data)
        self.criterion = CRDLoss(opt).to(ctx.device)
        generator = torch.Generator(device=ctx.train_labels.device)
        # each DDP rank draws its own negatives (rank 0 keeps the single-process stream)
        generator.manual_seed((int(cfg.seed) + _SEED_SALT + 1000003 * _rank()) % 2 ** 63)
        replace = cfg.nce_replace
        always = replace == "yes" or (replace == "auto" and ctx.n_data > REPLACE_ABOVE)
        self.sampler = ContrastSampler(ctx.train_labels, cfg.nce_k, cfg.mode, generator, always)
        if self.sampler._any_replace and not always and _rank() == 0:  # said once, at build
            log.warning("CRD: --nce_k %d is more than the %d negatives (samples of the other classes) "
                        "available to some classes; their negatives are drawn with replacement",
                        cfg.nce_k, int(self.sampler.pool[self.sampler.counts > 0].min()))
        self._z_shared = False

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        contrast_idx = self.sampler.draw(batch.index)
        loss = self.criterion(student.pooled, autograd_safe(teacher.pooled), batch.index, contrast_idx)
        if _world_size() > 1:
            self._share_memory_updates(batch.index)
        return loss.reshape(())

    @torch.no_grad()
    def _share_memory_updates(self, index: torch.Tensor) -> None:
        """Under DDP, gives every rank the memory rows the other ranks just updated.

        Each rank updates the rows of its own shard of the global batch; gathering
        ``(index, rows)`` from all ranks makes every bank hold the update of the whole
        global batch, as a single process would (the shards are disjoint).
        """
        contrast = self.criterion.contrast
        world = _world_size()
        rows = torch.cat([contrast.memory_v1[index], contrast.memory_v2[index]], dim=1)
        all_index = [torch.empty_like(index) for _ in range(world)]
        all_rows = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(all_index, index.contiguous())
        dist.all_gather(all_rows, rows.contiguous())
        index, rows = torch.cat(all_index), torch.cat(all_rows)
        half = contrast.memory_v1.shape[1]
        contrast.write_rows("memory_v1", index, rows[:, :half])
        contrast.write_rows("memory_v2", index, rows[:, half:])
        if not self._z_shared:  # Z came from each rank's own first batch: use their mean
            z = contrast.params[2:4].clone()
            dist.all_reduce(z)
            contrast.params[2:4] = z / world
            contrast._consts = None
            self._z_shared = True

    def get_extra_state(self) -> dict[str, torch.Tensor]:
        return {"sampler_rng": self.sampler.get_state()}

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sampler.set_state(state["sampler_rng"])
        if _rank() > 0:  # resume files hold rank 0's stream; derive this rank's own from it
            gen = self.sampler.generator
            draw = int(torch.randint(0, 2 ** 62, (1,), generator=gen, device=gen.device).item())
            gen.manual_seed((draw + 1000003 * _rank()) % 2 ** 63)
