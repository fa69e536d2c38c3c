"""Knowledge review (``--distill reviewkd``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Batch, Distiller, Flag, MethodContext, Outputs, register
from .kd import autograd_safe

__all__ = ["ABF", "hcl_loss"]

REVIEWKD_WEIGHT: dict[tuple[str, str], float] = {
    # (teacher, student) -> the loss weight of the official scripts. CIFAR-100:
    # dvlab-research/ReviewKD cede6ea6387ae9b6127de0e561507177bf19c11e CIFAR-100/script/reviewKD.sh
    # (--kd-loss-weight); ImageNet: megvii-research/mdistiller a08d46f10d6102bd6e3f258ca5ac880b020ea259
    # configs/imagenet/{r34_r18,r50_mv1}/reviewkd.yaml (REVIEWKD_WEIGHT).
    ("wrn_40_2", "wrn_16_2"): 5.0,
    ("wrn_40_2", "wrn_40_1"): 5.0,
    ("wrn_40_2", "ShuffleV1"): 5.0,
    ("resnet32x4", "resnet8x4"): 5.0,
    ("resnet32x4", "ShuffleV1"): 5.0,
    ("resnet32x4", "ShuffleV2"): 8.0,
    ("resnet56", "resnet20"): 0.6,
    ("resnet110", "resnet32"): 1.0,
    ("resnet34", "resnet18"): 1.0,
    ("resnet50", "mobilenet_v1"): 8.0,
}
REVIEWKD_WEIGHT_DEFAULT = 1.0  # mdistiller's CFG.REVIEWKD.REVIEWKD_WEIGHT
WARMUP_EPOCHS = {"imagenet": 1}  # mdistiller's ImageNet configs; its default (CIFAR) is 20
WARMUP_EPOCHS_DEFAULT = 20


class ABF(nn.Module):
    """Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021
    (mdistiller ``mdistiller/distillers/ReviewKD.py``): attention-based fusion.

    ``conv1`` (1x1 conv + BN) maps the student feature to ``mid_channel``; with ``fuse`` it is
    blended with the deeper level's residual, nearest-upsampled to ``shape``, by two sigmoid
    attention maps; the result (nearest-resized to ``out_shape`` when its side differs) is the
    new residual, and ``conv2`` (3x3 conv + BN) maps it to the teacher's ``out_channel``.

    Args:
        in_channel: student channels.
        mid_channel: channels of the residual path.
        out_channel: teacher channels.
        fuse: whether a deeper residual is fused in (False for the deepest level).
    """

    def __init__(self, in_channel: int, mid_channel: int, out_channel: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channel, mid_channel, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channel))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channel, out_channel, kernel_size=3, stride=1,
                                             padding=1, bias=False),
                                   nn.BatchNorm2d(out_channel))
        self.att_conv = (nn.Sequential(nn.Conv2d(mid_channel * 2, 2, kernel_size=1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, shape: Optional[int] = None,
                out_shape: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Student feature ``x [B, in, h, h]``; ``y [B, mid, h', h']`` the deeper residual,
        resized to ``shape`` (= ``h``). Returns ``(out [B, out, s, s], residual [B, mid, s, s])``
        with ``s = out_shape``."""
        n, _, h, w = x.shape
        x = self.conv1(x)
        if self.att_conv is not None:
            y = F.interpolate(y, (shape, shape), mode="nearest")
            z = self.att_conv(torch.cat([x, y], dim=1))
            x = x * z[:, 0].view(n, 1, h, w) + y * z[:, 1].view(n, 1, h, w)
        if x.shape[-1] != out_shape:
            x = F.interpolate(x, (out_shape, out_shape), mode="nearest")
        return self.conv2(x), x


def hcl_loss(fstudent: Sequence[torch.Tensor], fteacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chen et al., CVPR 2021 (mdistiller ``ReviewKD.py``): hierarchical context loss.

    Per pair of ``[B, C, H, W]`` maps: the MSE, plus the MSEs of their adaptive average pools to
    4x4, 2x2 and 1x1 (each only when smaller than ``H``) with weights 1/2, 1/4, 1/8 in that
    order of the pools kept; divided by the sum of the weights used. Summed over pairs → 0-d.
    """
    loss_all = fstudent[0].new_zeros(())
    for fs, ft in zip(fstudent, fteacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft, reduction="mean")
        weight, total = 1.0, 1.0
        for side in (4, 2, 1):
            if side >= h:
                continue
            weight /= 2.0
            loss = loss + weight * F.mse_loss(F.adaptive_avg_pool2d(fs, (side, side)),
                                              F.adaptive_avg_pool2d(ft, (side, side)))
            total += weight
        loss_all = loss_all + loss / total
    return loss_all


def review_levels(feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """A network's contract features → ReviewKD's levels, shallow to deep: the stage maps
    without the stem (``feats[1:-1]``) and the pooled vector as ``[B, D, 1, 1]``."""
    return [*feats[1:-1], feats[-1][:, :, None, None]]


def _level_shapes(shapes: Sequence[torch.Size]) -> list[tuple[int, ...]]:
    """Feature shapes → the levels' ``(C, H, W)``; ValueError when a stage is not a map."""
    if len(shapes) < 3 or any(len(s) != 4 for s in shapes[1:-1]) or len(shapes[-1]) != 2:
        raise ValueError(f"ReviewKD needs [B, C, H, W] stage maps and a pooled [B, D] feature, "
                         f"got {[list(s) for s in shapes]}")
    return [tuple(s[1:]) for s in shapes[1:-1]] + [(shapes[-1][1], 1, 1)]


@register("reviewkd")
class ReviewKDMethod(Distiller):
    """ReviewKD: the student's levels, deepest first, pass through a chain of :class:`ABF`
    (built shallow-to-deep, then reversed: ``abfs[0]`` takes the pooled feature), and
    :func:`hcl_loss` compares each output with the teacher's level; ramped up linearly over
    ``--reviewkd_warmup`` epochs.

    Features, as both official codes read them: the teacher's are its pre-activation stage
    maps (``feature_kind``); the student's are its post-ReLU maps on CIFAR-sized data and its
    pre-activation maps on ImageNet (mdistiller's ``STU_PREACT``), which the objective runs as
    ``student_forward``. ABF sides come from the tensors: a student map smaller than the
    teacher's is upsampled (the official ShuffleNet layout).
    """

    feature_kind = "preact"
    logit_only = False
    default_weight = REVIEWKD_WEIGHT_DEFAULT
    paper = "Chen et al., Distilling Knowledge via Knowledge Review, CVPR 2021"
    flags = (Flag("--reviewkd_warmup", int, None, "epochs over which the ReviewKD loss ramps up "
                  "linearly (unset: 1 on ImageNet, 20 otherwise, as mdistiller); 0 disables the "
                  "ramp", minimum=0),)

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        dataset = getattr(ctx.cfg, "dataset", None)
        self.student_preact = dataset == "imagenet"
        self.student_forward = "preact" if self.student_preact else "feat"
        s_levels = _level_shapes(ctx.student_preact_shapes if self.student_preact
                                 else ctx.student_shapes)
        t_levels = _level_shapes(ctx.teacher_preact_shapes)
        if len(s_levels) != len(t_levels):
            raise ValueError(f"ReviewKD pairs the student's {len(s_levels)} levels (stage maps "
                             f"and pooled feature) with the teacher's {len(t_levels)}; they must "
                             f"have as many")
        in_channels = [s[0] for s in s_levels]
        mid_channel = min(512, in_channels[-1])
        abfs = [ABF(c_in, mid_channel, t[0], i < len(in_channels) - 1)
                for i, (c_in, t) in enumerate(zip(in_channels, t_levels))]
        self.abfs = nn.ModuleList(abfs[::-1]).to(ctx.device)
        warmup = ctx.cfg.reviewkd_warmup
        self.warmup = int(warmup if warmup is not None else self.warmup_for(dataset))

    @classmethod
    def resolve(cls, cfg: Mapping[str, Any], teacher: str, student: str) -> dict[str, Any]:
        """An unset ``--reviewkd_warmup`` becomes the data set's value (recorded in config.json)."""
        if cfg.get("reviewkd_warmup") is not None:
            return {}
        return {"reviewkd_warmup": cls.warmup_for(cfg.get("dataset"))}

    @staticmethod
    def warmup_for(dataset: Optional[str]) -> int:
        return WARMUP_EPOCHS.get(dataset, WARMUP_EPOCHS_DEFAULT)

    @classmethod
    def default_weight_for(cls, teacher: str, student: str) -> float:
        """The official scripts' loss weight for the pair (1 for pairs they do not run)."""
        return REVIEWKD_WEIGHT.get((teacher, student), REVIEWKD_WEIGHT_DEFAULT)

    def warmup_factor(self, epoch: int) -> float:
        """``min(epoch / warmup, 1)`` with 1-based epochs, as mdistiller's ReviewKD."""
        return min(epoch / self.warmup, 1.0) if self.warmup > 0 else 1.0

    def graph_key(self, epoch: int) -> float:
        return self.warmup_factor(epoch)

    def review(self, levels: Sequence[torch.Tensor], sides: Sequence[int]) -> list[torch.Tensor]:
        """Student levels (shallow to deep) → the ABF outputs, shallow to deep, the ``i``-th
        of side ``sides[i]``."""
        deep_first = levels[::-1]
        out, residual = self.abfs[0](deep_first[0], out_shape=sides[-1])
        results = [out]
        for x, abf, side in zip(deep_first[1:], self.abfs[1:], sides[-2::-1]):
            out, residual = abf(x, residual, x.shape[-1], side)
            results.insert(0, out)
        return results

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch) -> torch.Tensor:
        if student.preact != self.student_preact or not teacher.preact:
            raise ValueError(f"ReviewKD reads the teacher's pre-activation features and the "
                             f"student's {'pre-activation' if self.student_preact else 'post-ReLU'} "
                             f"ones (got student preact={student.preact}, teacher "
                             f"preact={teacher.preact})")
        t_levels = review_levels([autograd_safe(t) for t in teacher.feats])
        results = self.review(review_levels(student.feats), [t.shape[-1] for t in t_levels])
        return self.warmup_factor(batch.epoch) * hcl_loss(results, t_levels)
