"""SRRL and ReviewKD: their reference pieces against formulas written here, and each method
through the real plumbing (context, objective, frozen teacher) on CIFAR pairs and on the
ImageNet pair ResNet-34 → ResNet-18 at 64 pixels.

The formulas are the papers' as the official codes compute them: KD_SRRL
``distiller_zoo/AIN.py`` and ``train_imagenet_distillation.py``; mdistiller
``mdistiller/distillers/ReviewKD.py``; dvlab-research/ReviewKD ``CIFAR-100/model/reviewkd.py``.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch import nn

import models
from distiller_zoo import METHODS, Batch, MethodContext, Outputs
from distiller_zoo.reviewkd import ABF, hcl_loss, review_levels
from distiller_zoo.srrl import SRRLLoss, statm_loss, transfer_conv
from helper import distributed
from helper.distill import DistillObjective, FrozenTeacher, method_context, resolve_weights
from helper.student_flags import parse_config
from models.heads import classifier_head

CPU = torch.device("cpu")
ENV = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)
NUM_CLASSES = 10
slow = pytest.mark.skipif(not os.environ.get("KD_SLOW_TESTS"), reason="set KD_SLOW_TESTS=1")

pytestmark = pytest.mark.usefixtures("one_thread")


def cfg_for(tmp_path, method: str, teacher: str, student: str, *extra: str):
    argv = ["--path_t", "unused.pth", "--model_s", student, "--distill", method,
            "--save_root", str(tmp_path / "save"), "--seed", "1", *extra]
    return parse_config(argv, ENV, teacher)


class Pair:
    """A student/teacher pair, its context, one batch of ``side``-pixel images, and the
    teacher's state to check it is never touched."""

    def __init__(self, tmp_path, method: str, teacher: str, student: str, side: int = 32,
                 *extra: str) -> None:
        torch.manual_seed(0)
        self.cfg = cfg_for(tmp_path, method, teacher, student, *extra)
        self.student = models.create_model(student, NUM_CLASSES)
        self.teacher = models.create_model(teacher, NUM_CLASSES)  # requires_grad left on
        self.state = {k: v.clone() for k, v in self.teacher.state_dict().items()}
        self.ctx = method_context(self.cfg, self.student, self.teacher, student, teacher,
                                  torch.arange(16) % NUM_CLASSES, NUM_CLASSES, CPU, side)
        self.images = torch.randn(2, 3, side, side)
        self.labels = torch.tensor([1, 2])
        self.method = METHODS.get(method)(self.ctx)

    def objective(self, beta: float = 1.0) -> DistillObjective:
        obj = DistillObjective(self.student, self.method, None, gamma=0.0, alpha=0.0, beta=beta)
        obj.freeze_untrained()
        return obj

    def run(self, obj: DistillObjective, epoch: int = 1) -> dict:
        teacher_out = FrozenTeacher(self.teacher, obj.feature_kind, contextlib.nullcontext)(self.images)
        return obj(self.images, self.labels, self.labels, epoch, teacher_out)

    def check_gradients(self, obj: DistillObjective) -> None:
        out = self.run(obj)
        assert torch.isfinite(out["loss"]) and out["loss"] > 0
        out["loss"].backward()
        grad = next(self.student.parameters()).grad
        assert grad is not None and grad.abs().sum() > 0
        for name, p in self.method.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        self.assert_teacher_untouched()

    def assert_teacher_untouched(self) -> None:
        assert all(p.grad is None for p in self.teacher.parameters())
        for key, value in self.teacher.state_dict().items():
            assert torch.equal(value, self.state[key]), key


# ---- models.heads ---------------------------------------------------------------------------

# Larger twins of classes covered above: with KD_SLOW_TESTS only.
HEAVY = {"resnet101", "resnet152", "deit_small_patch16_224", "deit3_small_patch16_224"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=slow) if n in HEAVY else n
                                  for n in models.model_names()])
def test_classifier_head_maps_the_last_map_to_the_logits(name):
    torch.manual_seed(0)
    model = models.create_model(name, NUM_CLASSES).eval()
    if name.startswith("deit"):
        with pytest.raises(ValueError, match="no classifier head"):
            classifier_head(model)
        return
    head = classifier_head(model)
    assert {id(p) for p in head.parameters()} <= {id(p) for p in model.parameters()}
    side = 32  # the ImageNet networks pool adaptively: 32 pixels keep the test fast
    with torch.no_grad():
        feats, logits = model(torch.randn(1, 3, side, side), is_feat=True)
        out = head(feats[-2])
    # deep random ResNets reach logits of 1e8: the tolerance is relative to their scale
    assert (out - logits).abs().max() <= 1e-5 * logits.abs().max() + 1e-6


# ---- SRRL pieces ----------------------------------------------------------------------------

def test_statm_loss_is_the_squared_gap_of_spatial_means():
    torch.manual_seed(0)
    x, y = torch.randn(3, 5, 4, 4), torch.randn(3, 5, 2, 2)  # sides may differ
    expected = sum(((x[b, c].mean() - y[b, c].mean()) ** 2).item()
                   for b in range(3) for c in range(5)) / 15
    assert torch.isclose(statm_loss()(x, y), torch.tensor(expected), rtol=1e-5)
    assert statm_loss(eps=7)(x, y) == statm_loss()(x, y)


def test_transfer_conv_is_conv_bn_relu_onto_the_teacher_channels():
    conv = transfer_conv(6, 9)
    layers = list(conv.Connectors)
    assert [type(m) for m in layers] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert layers[0].kernel_size == (1, 1) and layers[0].bias is None
    out = conv.eval()(torch.randn(2, 6, 3, 3))
    assert out.shape == (2, 9, 3, 3) and (out >= 0).all()


def test_srrl_loss_weighs_both_terms():
    torch.manual_seed(0)
    fs, ft = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    zs, zt = torch.randn(2, 7), torch.randn(2, 7)
    gap = ((fs.mean((2, 3)) - ft.mean((2, 3))) ** 2).mean()
    mse = ((zs - zt) ** 2).mean()
    assert torch.isclose(SRRLLoss(4, 4, alpha=0.5, beta=3.0)(fs, ft, zs, zt), 0.5 * gap + 3.0 * mse)
    assert isinstance(SRRLLoss(4, 8).Connectors[0], nn.Conv2d)


# ---- SRRL method ----------------------------------------------------------------------------

def test_srrl_cifar_pair_value_and_gradients(tmp_path):
    pair = Pair(tmp_path, "srrl", "resnet32x4", "resnet8x4", 32, "--srrl_w", "2")
    obj = pair.objective()
    pair.method.eval()  # fixed BN statistics, so the value can be recomputed below
    out = pair.run(obj)
    with torch.no_grad():
        s_feats, _ = pair.student(pair.images, is_feat=True)
        t_feats, t_logits = pair.teacher.eval()(pair.images, is_feat=True)
        f = pair.method.connector(s_feats[-2])
        fm = ((f.mean((2, 3)) - t_feats[-2].mean((2, 3))) ** 2).mean()
        sr = ((pair.teacher.fc(f.mean((2, 3))) - t_logits) ** 2).mean()
    assert set(out["terms"]) == {"ce", "main_srrl"}
    assert torch.isclose(out["terms"]["main_srrl"], fm + 2.0 * sr, rtol=1e-5)
    pair.method.train()
    pair.check_gradients(obj)


def test_srrl_teacher_head_stays_frozen_even_in_train_mode(tmp_path):
    """WRN's head holds a BN: a teacher left in train mode must not move its statistics, and
    the gradient must pass through that BN into the connector."""
    pair = Pair(tmp_path, "srrl", "wrn_16_2", "wrn_16_1")
    teacher_out = FrozenTeacher(pair.teacher, "feat", contextlib.nullcontext)(pair.images)
    pair.teacher.train()
    s_feats, s_logits = pair.student(pair.images, is_feat=True)
    parts = pair.method(Outputs(s_logits, s_feats), teacher_out, Batch(pair.labels, pair.labels, 1))
    parts["srrl_sr"].backward()
    assert pair.method.connector.Connectors[0].weight.grad.abs().sum() > 0
    pair.assert_teacher_untouched()


def test_srrl_refuses_a_teacher_without_a_last_map(tmp_path):
    pair = Pair(tmp_path, "srrl", "resnet8", "resnet8")
    fields = {k: getattr(pair.ctx, k) for k in MethodContext.__dataclass_fields__}
    fields["teacher_shapes"] = [torch.Size([2, 196, 192]), torch.Size([2, 196, 192]),
                                torch.Size([2, 192])]  # a ViT's token features
    with pytest.raises(ValueError, match=r"last \[B, C, H, W\] feature map") as info:
        METHODS.get("srrl")(MethodContext(**fields))
    assert "\n" not in str(info.value)


# ---- ReviewKD pieces ------------------------------------------------------------------------

def pool_to(x: torch.Tensor, side: int) -> torch.Tensor:
    """Average pooling of a square map whose side is a multiple of ``side``, by reshaping."""
    b, c, h, _ = x.shape
    k = h // side
    return x.reshape(b, c, side, k, side, k).mean((3, 5))


def test_hcl_loss_weighs_the_pooled_levels_below_the_map_side():
    torch.manual_seed(0)
    mse = lambda a, b: ((a - b) ** 2).mean()  # noqa: E731
    s8, t8 = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    s2, t2 = torch.randn(2, 5, 2, 2), torch.randn(2, 5, 2, 2)
    s1, t1 = torch.randn(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    # side 8: pools 4, 2, 1 with weights 1/2, 1/4, 1/8; side 2: pool 1 with 1/2; side 1: none
    level8 = (mse(s8, t8) + mse(pool_to(s8, 4), pool_to(t8, 4)) / 2
              + mse(pool_to(s8, 2), pool_to(t8, 2)) / 4 + mse(pool_to(s8, 1), pool_to(t8, 1)) / 8) / 1.875
    level2 = (mse(s2, t2) + mse(pool_to(s2, 1), pool_to(t2, 1)) / 2) / 1.5
    expected = level8 + level2 + mse(s1, t1)
    assert torch.isclose(hcl_loss([s8, s2, s1], [t8, t2, t1]), expected, rtol=1e-5)


def abf_by_hand(abf: ABF, x, y, out_side):
    """ABF in eval mode, written out: nearest upsampling as repeat_interleave."""
    x = abf.conv1(x)
    if y is not None:
        r = x.shape[-1] // y.shape[-1]
        y = y.repeat_interleave(r, 2).repeat_interleave(r, 3)
        z = torch.sigmoid(abf.att_conv[0](torch.cat([x, y], 1)))
        x = x * z[:, :1] + y * z[:, 1:]
    if out_side != x.shape[-1]:
        r = out_side // x.shape[-1]
        x = x.repeat_interleave(r, 2).repeat_interleave(r, 3)
    return abf.conv2(x), x


@pytest.mark.parametrize("case", ["fuse", "top", "upsample"])
def test_abf_matches_its_formula(case):
    torch.manual_seed(0)
    fuse = case != "top"
    abf = ABF(6, 8, 5, fuse).eval()
    assert (abf.att_conv is not None) == fuse
    side = 1 if case == "top" else 4
    x = torch.randn(2, 6, side, side)
    y = torch.randn(2, 8, 2, 2) if fuse else None
    out_side = 2 * side if case == "upsample" else side
    out, res = abf(x, y, side if fuse else None, out_side)
    ref_out, ref_res = abf_by_hand(abf, x, y, out_side)
    assert out.shape == (2, 5, out_side, out_side) and res.shape == (2, 8, out_side, out_side)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(res, ref_res, atol=1e-6)


# ---- ReviewKD method ------------------------------------------------------------------------

def abf_layout(method) -> list[tuple[int, int, int, bool]]:
    """``(in, mid, out, fuse)`` of the ABFs, deepest first."""
    return [(a.conv1[0].in_channels, a.conv1[0].out_channels, a.conv2[0].out_channels,
             a.att_conv is not None) for a in method.abfs]


def test_reviewkd_cifar_pair(tmp_path):
    pair = Pair(tmp_path, "reviewkd", "resnet32x4", "resnet8x4")
    # dvlab-research/ReviewKD build_review_kd for 'x4': in = out = [64, 128, 256, 256]
    assert abf_layout(pair.method) == [(256, 256, 256, False), (256, 256, 256, True),
                                       (128, 256, 128, True), (64, 256, 64, True)]
    assert pair.cfg.reviewkd_warmup == 20 and pair.cfg.beta == 5.0
    obj = pair.objective()
    # the teacher's pre-activation maps, the student's post-ReLU ones
    assert obj.feature_kind == "preact" and obj.student_kind == "feat"
    pair.method.eval()
    values = [pair.run(obj, epoch)["terms"]["main_reviewkd"] for epoch in (5, 20, 40)]
    assert torch.isclose(values[0], values[1] / 4) and torch.equal(values[1], values[2])
    pair.method.train()
    pair.check_gradients(obj)


def test_reviewkd_refuses_features_of_the_wrong_kind(tmp_path):
    pair = Pair(tmp_path, "reviewkd", "resnet8", "resnet8")
    out = FrozenTeacher(pair.teacher, "preact", contextlib.nullcontext)(pair.images)
    with pytest.raises(ValueError, match="post-ReLU"):
        pair.method(out, out, Batch(pair.labels, pair.labels, 1))  # a preact student


def test_reviewkd_shufflev2_student_is_upsampled_to_the_teacher(tmp_path):
    pair = Pair(tmp_path, "reviewkd", "resnet32x4", "ShuffleV2")
    # the official layout: in [116, 232, 464, 1024], out [64, 128, 256, 256], mid 512
    assert abf_layout(pair.method) == [(1024, 512, 256, False), (464, 512, 256, True),
                                       (232, 512, 128, True), (116, 512, 64, True)]
    assert pair.cfg.beta == 8.0
    s_feats, _ = pair.student(pair.images, is_feat=True)
    results = pair.method.review(review_levels(s_feats), [32, 16, 8, 1])
    assert [tuple(r.shape[1:]) for r in results] == [(64, 32, 32), (128, 16, 16), (256, 8, 8),
                                                     (256, 1, 1)]
    pair.check_gradients(pair.objective())


def test_reviewkd_refuses_pairs_of_unequal_depth(tmp_path):
    with pytest.raises(ValueError, match="as many") as info:
        Pair(tmp_path, "reviewkd", "resnet32x4", "MobileNetV2")  # 4 levels against 5
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("teacher, student, dataset, weight, warmup", [
    ("resnet56", "resnet20", "cifar100", 0.6, 20),
    ("resnet110", "resnet32", "cifar100", 1.0, 20),
    ("wrn_40_2", "wrn_16_2", "cifar100", 5.0, 20),
    ("resnet34", "resnet18", "imagenet", 1.0, 1),
    ("resnet50", "mobilenet_v1", "imagenet", 8.0, 1),
])
def test_reviewkd_per_pair_defaults(tmp_path, teacher, student, dataset, weight, warmup):
    cfg = cfg_for(tmp_path, "reviewkd", teacher, student, "--dataset", dataset)
    assert cfg.beta == weight and cfg.reviewkd_warmup == warmup
    given = cfg_for(tmp_path, "reviewkd", teacher, student, "--dataset", dataset, "-b", "3",
                    "--reviewkd_warmup", "7")
    assert given.beta == 3.0 and given.reviewkd_warmup == 7
    assert resolve_weights(cfg, teacher, student)[2] == weight


@pytest.mark.parametrize("method", ["srrl", "reviewkd"])
def test_imagenet_pair_at_64_pixels(tmp_path, method):
    pair = Pair(tmp_path, method, "resnet34", "resnet18", 64, "--dataset", "imagenet")
    obj = pair.objective()
    if method == "reviewkd":
        assert obj.student_kind == "preact" and pair.method.warmup == 1
        # mdistiller configs/imagenet/r34_r18/reviewkd.yaml: IN = OUT = [64, 128, 256, 512, 512]
        assert [a[0] for a in abf_layout(pair.method)] == [512, 512, 256, 128, 64]
    pair.check_gradients(obj)
