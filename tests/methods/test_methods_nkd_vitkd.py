"""NKD and ViTKD: the loss classes against straightforward loop formulas, and their adapters.

Parity with cls_KD's numbers is ``tests/parity.py``'s job. Here: each loss recomputed in
float64 with per-sample loops (no call into the code under test), NKD's freedom from host
synchronisation (so a CUDA graph can hold it), ViTKD's random mask (its share, its draw from
the global generator, the loss seeing masked tokens only), the adapters' gradients (student
side and own parameters, never the teacher, whose tensors are made under inference_mode as
in training), their flags, and a one-line error for a CNN pair.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import models
from distiller_zoo.base import METHODS, Batch, MethodContext, Outputs
from distiller_zoo.nkd import NKDLoss
from distiller_zoo.vitkd import ViTKDLoss, random_mask

pytestmark = pytest.mark.usefixtures("one_thread")

B, C = 4, 10


def nkd_by_loops(logit_s, logit_t, labels, temp, gamma):
    """NKD in float64, one sample at a time; the true class is left out by a Python list."""
    target, non = 0.0, 0.0
    for b in range(logit_s.shape[0]):
        s, t, y = logit_s[b].double(), logit_t[b].double(), int(labels[b])
        p_t_y = (torch.exp(t[y]) / torch.exp(t).sum()).detach()
        target = target - p_t_y * (s[y] - torch.logsumexp(s, 0))
        others = [j for j in range(s.shape[0]) if j != y]
        zs = torch.stack([s[j] for j in others]) / temp
        zt = torch.stack([t[j] for j in others]) / temp
        non = non + (torch.exp(zt) / torch.exp(zt).sum() * (zs - torch.logsumexp(zs, 0))).sum()
    n = logit_s.shape[0]
    return target / n - gamma * temp ** 2 * non / n


def logits(seed, shape=(B, C), scale=3.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("temp, gamma", [(1.0, 1.5), (3.0, 3.5), (0.5, 0.0)])
def test_nkd_value_and_gradient_match_the_loop_formula(temp, gamma):
    s, t = logits(1).requires_grad_(), logits(2)
    labels = torch.tensor([0, 9, 3, 3])
    loss = NKDLoss(temp, gamma)(s, t, labels)
    assert loss.dim() == 0
    s64 = s.detach().double().requires_grad_()
    ref = nkd_by_loops(s64, t, labels, temp, gamma)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    loss.backward()
    ref.backward()
    assert torch.allclose(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


def test_nkd_soft_labels_equal_their_argmax():
    s, t = logits(3), logits(4)
    scores = torch.rand(B, C, generator=torch.Generator().manual_seed(5))
    hard = scores.argmax(dim=1)
    crit = NKDLoss(2.0, 1.5)
    assert torch.equal(crit(s, t, scores), crit(s, t, hard))
    assert not torch.equal(crit(s, t, scores), crit(s, t, (hard + 1) % C))


class NoHostSync(TorchDispatchMode):
    """Raises on every op that reads a device value on the host or has a data-dependent shape."""

    BANNED = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
              "aten::item", "aten::unique_dim", "aten::_unique", "aten::_unique2",
              "aten::unique_consecutive"}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in self.BANNED:
            raise AssertionError(f"host synchronisation: {name}")
        if name == "aten::index":
            for idx in args[1]:
                if idx is not None and idx.dtype == torch.bool:
                    raise AssertionError("host synchronisation: boolean-mask indexing")
        return func(*args, **(kwargs or {}))


def test_the_sync_guard_catches_boolean_masks_and_item():
    x = torch.randn(2, 3)
    with pytest.raises(AssertionError, match="boolean-mask"), NoHostSync():
        x[x > 0]
    with pytest.raises(AssertionError, match="host synchronisation"), NoHostSync():
        x.sum().item()


@pytest.mark.parametrize("labels", [torch.tensor([1, 2, 3, 4]), torch.rand(B, C)])
def test_nkd_forward_and_backward_never_synchronise(labels):
    s, t = logits(6).requires_grad_(), logits(7)
    with NoHostSync():
        NKDLoss(1.0, 1.5)(s, t, labels).backward()
    assert torch.isfinite(s.grad).all()


# ---- ViTKD ------------------------------------------------------------------------------

def vitkd_by_loops(crit, low_s, high_s, low_t, high_t, seed, ratio):
    """ViTKD in float64 with ``crit``'s weights: the mask from ``torch.rand(B, N)`` after
    ``manual_seed(seed)`` (the largest noise values are masked), tokens laid out row-major on
    the √N × √N grid one at a time."""
    p = {k: v.detach().double() for k, v in crit.named_parameters()}
    bsz, n, _ = high_s.shape
    hw, keep = math.isqrt(n), int(n * (1 - ratio))
    torch.manual_seed(seed)
    noise = torch.rand(bsz, n)
    mimic, gen = 0.0, 0.0
    for b in range(bsz):
        for i in range(2):
            for k in range(n):
                x = low_s[b, i, k].double()
                if "align2.0.weight" in p:
                    x = p[f"align2.{i}.weight"] @ x + p[f"align2.{i}.bias"]
                mimic = mimic + ((x - low_t[b, i, k].double()) ** 2).sum()
        order = sorted(range(n), key=lambda k: noise[b, k].item())
        masked = set(order[keep:])
        grid = torch.zeros(1, p["mask_token"].shape[-1], hw, hw, dtype=torch.float64)
        for k in range(n):
            x = high_s[b, k].double()
            if "align.weight" in p:
                x = p["align.weight"] @ x + p["align.bias"]
            grid[0, :, k // hw, k % hw] = p["mask_token"][0, 0] if k in masked else x
        y = torch.nn.functional.conv2d(grid, p["generation.0.weight"], p["generation.0.bias"], padding=1)
        y = torch.nn.functional.conv2d(y.relu(), p["generation.2.weight"], p["generation.2.bias"], padding=1)
        for k in masked:
            gen = gen + ((y[0, :, k // hw, k % hw] - high_t[b, k].double()) ** 2).sum()
    return mimic / bsz * crit.alpha_vitkd + gen / bsz * crit.beta_vitkd / ratio


def features(seed, bsz, n, d):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(bsz, 2, n, d, generator=g), torch.randn(bsz, n, d, generator=g)


@pytest.mark.parametrize("ds, dt, ratio", [(16, 32, 0.5), (24, 24, 0.75)])
def test_vitkd_matches_the_loop_formula(ds, dt, ratio):
    torch.manual_seed(0)
    crit = ViTKDLoss(ds, dt, alpha_vitkd=0.01, beta_vitkd=0.02, lambda_vitkd=ratio)
    with torch.no_grad():
        crit.mask_token.normal_()  # the reference initialises it to zeros
    assert ("align.weight" in dict(crit.named_parameters())) == (ds != dt)
    (low_s, high_s), (low_t, high_t) = features(1, 2, 16, ds), features(2, 2, 16, dt)
    torch.manual_seed(123)
    loss = crit([low_s, high_s], [low_t, high_t])
    ref = vitkd_by_loops(crit, low_s, high_s, low_t, high_t, 123, ratio)
    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    torch.manual_seed(124)  # another mask gives another value
    assert not math.isclose(crit([low_s, high_s], [low_t, high_t]).item(), ref.item(), rel_tol=1e-5)


@pytest.mark.parametrize("n, ratio", [(16, 0.5), (49, 0.75), (16, 0.3), (196, 0.5)])
def test_vitkd_mask_share_is_lambda(n, ratio):
    torch.manual_seed(0)
    mask = random_mask(5, n, ratio, torch.device("cpu"))
    assert mask.shape == (5, n) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert (mask.sum(1) == n - int(n * (1 - ratio))).all()
    assert abs(mask.mean().item() - ratio) <= 1 / n
    assert len({tuple(row.tolist()) for row in mask}) > 1  # each sample has its own mask
    torch.manual_seed(0)
    assert torch.equal(random_mask(5, n, ratio, torch.device("cpu")), mask)  # global generator


def test_vitkd_generation_sees_only_masked_teacher_tokens():
    torch.manual_seed(0)
    crit = ViTKDLoss(16, 16, lambda_vitkd=0.5)
    (low_s, high_s), (low_t, high_t) = features(3, 1, 16, 16), features(4, 1, 16, 16)
    torch.manual_seed(7)
    mask = random_mask(1, 16, 0.5, torch.device("cpu"))[0]
    kept, masked = int(mask.argmin()), int(mask.argmax())

    def loss_with(t):
        torch.manual_seed(7)
        return crit([low_s, high_s], [low_t, t]).item()

    base = loss_with(high_t)
    moved = high_t.clone()
    moved[0, kept] += 5.0
    assert loss_with(moved) == base
    moved[0, masked] += 5.0
    assert loss_with(moved) != base


def test_vitkd_forward_and_backward_never_synchronise():
    crit = ViTKDLoss(8, 16, lambda_vitkd=0.5)
    (low_s, high_s), (low_t, high_t) = features(5, 2, 16, 8), features(6, 2, 16, 16)
    low_s.requires_grad_()
    with NoHostSync():
        crit([low_s, high_s], [low_t, high_t]).backward()
    assert low_s.grad is not None


# ---- adapters -------------------------------------------------------------------------------

class TinyTokens(nn.Module):
    """A stand-in ViT on ``[B, N, 8]`` inputs with the feature contract of ``models/vit.py``:
    tokens after block 0 and block 1, last tokens after the norm, the pooled vector."""

    def __init__(self, dim: int, num_classes: int = C) -> None:
        super().__init__()
        self.embed, self.block0, self.block1 = nn.Linear(8, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, num_classes)

    def forward(self, x, is_feat=False, preact=False):
        t0 = self.embed(x) + self.block0(self.embed(x)).relu()
        t1 = t0 + self.block1(t0).relu()
        last = self.norm(t1)
        pooled = last.mean(1)
        out = self.head(pooled)
        return ([t0, t1, last, pooled], out) if is_feat else out


def context(student, teacher, s_shapes, t_shapes, s_name="", t_name="", **cfg) -> MethodContext:
    flags = {f.dest: f.default for name in ("nkd", "vitkd") for f in METHODS.get(name).flags}
    flags.update(cfg)
    return MethodContext(types.SimpleNamespace(**flags), s_shapes, t_shapes, [], [], 8,
                         torch.arange(8) % C, C, student, teacher, torch.device("cpu"), s_name, t_name)


def run_adapter(name, student, teacher, x, labels, **cfg):
    """One forward/backward of the adapter; the teacher runs under inference_mode."""
    with torch.no_grad():  # the shape probe, as helper.distill.method_context does it
        s_feats, _ = student(x[:2], is_feat=True)
        t_feats, _ = teacher(x[:2], is_feat=True)
    ctx = context(student, teacher, [f.shape for f in s_feats], [f.shape for f in t_feats], **cfg)
    method = METHODS.get(name)(ctx)
    s_feats, s_logits = student(x, is_feat=True)
    with torch.inference_mode():
        t_feats, t_logits = teacher(x, is_feat=True)
    loss = method(Outputs(s_logits, s_feats), Outputs(t_logits, t_feats),
                  Batch(labels, torch.arange(x.shape[0]), 1))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    return method


@pytest.mark.parametrize("name", ["nkd", "vitkd"])
def test_adapter_trains_the_student_and_its_own_parts_never_the_teacher(name):
    torch.manual_seed(0)
    student, teacher = TinyTokens(16), TinyTokens(32)
    x = torch.randn(4, 16, 8)
    method = run_adapter(name, student, teacher, x, torch.tensor([0, 1, 2, 3]))
    assert student.embed.weight.grad is not None and student.embed.weight.grad.abs().sum() > 0
    own = dict(method.named_parameters())
    if name == "vitkd":
        assert set(own) == {"criterion.mask_token", "criterion.align.weight", "criterion.align.bias",
                            *(f"criterion.{m}.{i}.{w}" for m, i in (("align2", 0), ("align2", 1),
                              ("generation", 0), ("generation", 2)) for w in ("weight", "bias"))}
    for key, p in own.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, key


def test_adapter_declarations():
    nkd, vitkd = METHODS.get("nkd"), METHODS.get("vitkd")
    assert nkd.logit_only and nkd.feature_kind is None and nkd.default_weight == 1.0
    assert not vitkd.logit_only and vitkd.feature_kind == "feat" and vitkd.default_weight == 1.0
    assert nkd.graph_safe and not vitkd.graph_safe
    assert "ICCV 2023" in nkd.paper and "ViTKD" in vitkd.paper
    defaults = {f.dest: f.default for f in nkd.flags + vitkd.flags}
    assert defaults == {"nkd_T": 1.0, "nkd_gamma": 1.5, "vitkd_alpha": 3e-5, "vitkd_beta": 3e-6,
                        "vitkd_lambda": 0.5}


@pytest.mark.parametrize("name, flag, value", [
    ("nkd", "nkd_T", 0.0), ("nkd", "nkd_gamma", -1.0), ("nkd", "nkd_T", float("nan")),
    ("vitkd", "vitkd_lambda", 1.0), ("vitkd", "vitkd_lambda", 0.0), ("vitkd", "vitkd_alpha", -1e-5),
    ("vitkd", "vitkd_beta", float("inf")),
])
def test_out_of_range_flags_are_refused(name, flag, value):
    cls = METHODS.get(name)
    cfg = {f.dest: f.default for f in cls.flags}
    cls.validate(cfg)
    with pytest.raises(ValueError, match=f"--{flag} must be"):
        cls.validate({**cfg, flag: value})


def test_the_flags_reach_the_command_line():
    from helper.student_flags import build_parser

    args = build_parser().parse_args(["--path_t", "t.pth", "--distill", "vitkd", "--add", "nkd",
                                      "--vitkd_lambda", "0.75", "--nkd_gamma", "1"])
    assert (args.vitkd_lambda, args.nkd_gamma, args.nkd_T, args.vitkd_alpha) == (0.75, 1.0, 1.0, 3e-5)


def test_vitkd_refuses_a_cnn_pair_in_one_line():
    student, teacher = models.create_model("resnet8", C), models.create_model("resnet14", C)
    s_shapes, t_shapes = models.feature_shapes(student), models.feature_shapes(teacher)
    ctx = context(student, teacher, s_shapes, t_shapes, "resnet8", "resnet14")
    with pytest.raises(ValueError) as info:
        METHODS.get("vitkd")(ctx)
    message = str(info.value)
    assert "\n" not in message and message == ("vitkd needs vision-transformer features "
                                               "([B, N, D] tokens); resnet8 gives [B, C, H, W] maps")


def test_vitkd_refuses_token_counts_that_differ_or_are_not_square():
    for n_s, n_t in ((16, 49), (12, 12)):
        s, t = [torch.Size([2, n_s, 8])] * 3 + [torch.Size([2, 8])], [torch.Size([2, n_t, 8])] * 3
        with pytest.raises(ValueError, match="square number of patch tokens"):
            METHODS.get("vitkd")(context(None, None, s, t))


@pytest.mark.skipif(not {"deit_tiny_patch16_224", "deit_small_patch16_224"} <= set(models.model_dict),
                    reason="models.model_dict has no DeiT-Ti/DeiT-S yet (models/vit.py)")
def test_vitkd_on_the_real_deits():
    """DeiT-S teacher → DeiT-Ti student at 224 pixels, batch 2: the adapter reads the ViT
    feature contract (196 patch tokens, widths 192 and 384) and trains the student's blocks."""
    torch.manual_seed(0)
    student = models.create_model("deit_tiny_patch16_224", 1000)
    teacher = models.create_model("deit_small_patch16_224", 1000)
    x = torch.randn(2, 3, 224, 224)
    method = run_adapter("vitkd", student, teacher, x, torch.tensor([1, 2]))
    assert method.criterion.mask_token.shape == (1, 1, 384)
    assert method.criterion.align.weight.shape == (384, 192)
    assert student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert student.head.weight.grad is None  # ViTKD reads tokens, never the logits
