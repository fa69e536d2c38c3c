"""Independent checks of the logit and simple feature losses and their registered adapters.

Parity with the reference numbers is ``tests/parity.py``'s job; these tests check the same
code against hand computations and identities (TTM as a temperature softmax, DKD's
decomposition of KD, scale invariance of RKD), and each adapter's contract: a finite 0-d
loss whose gradient reaches the student side and the method's own parameters, with the
teacher's tensors made under ``inference_mode`` as in training.
"""
from __future__ import annotations

import argparse
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distiller_zoo as dz
from distiller_zoo.base import METHODS, Batch, MethodContext, Outputs
from distiller_zoo.dkd import DKDMethod
from distiller_zoo.kd import autograd_safe

B, K = 6, 10
S_SHAPES = [(B, 8, 8, 8), (B, 8, 8, 8), (B, 16, 4, 4), (B, 32, 2, 2), (B, 32)]
T_SHAPES = [(B, 16, 8, 8), (B, 16, 8, 8), (B, 32, 4, 4), (B, 64, 2, 2), (B, 64)]
MINE = {  # flag: (feature_kind, logit_only, default_weight)
    "kd": (None, True, 0.0), "ttm": (None, True, 8.0), "wttm": (None, True, 3.0),
    "dist": (None, True, 1.0), "dkd": (None, True, 1.0), "hint": ("feat", False, 100.0),
    "attention": ("feat", False, 1000.0), "similarity": ("feat", False, 3000.0),
    "correlation": ("feat", False, 0.02), "rkd": ("feat", False, 1.0),
    "pkt": ("feat", False, 30000.0), "nst": ("feat", False, 50.0),
}
USED_FEATS = {"hint": [2], "attention": [1, 2, 3], "nst": [1, 2, 3], "similarity": [3],
              "correlation": [4], "rkd": [4], "pkt": [4]}


def _cfg(**over: object) -> types.SimpleNamespace:
    cfg = dict(kd_T=4.0, ttm_l=0.3, feat_dim=16, hint_layer=2, dist_beta=1.0, dist_gamma=1.0,
               dist_tau=4.0, dkd_alpha=1.0, dkd_beta=None, dkd_T=4.0, dkd_warmup=20)
    cfg.update(over)
    return types.SimpleNamespace(**cfg)


def _ctx(teacher: str = "resnet32x4", student: str = "resnet8x4", **over: object) -> MethodContext:
    s = [torch.Size((2,) + s[1:]) for s in S_SHAPES]
    t = [torch.Size((2,) + t[1:]) for t in T_SHAPES]
    return MethodContext(cfg=_cfg(**over), student_shapes=s, teacher_shapes=t,
                         student_preact_shapes=s, teacher_preact_shapes=t, n_data=20,
                         train_labels=torch.arange(20) % K, num_classes=K,
                         student=nn.Identity(), teacher=nn.Identity(),
                         device=torch.device("cpu"), student_name=student, teacher_name=teacher)


def _outputs(seed: int) -> tuple[Outputs, Outputs, Batch]:
    g = torch.Generator().manual_seed(seed)
    s_feats = [torch.randn(s, generator=g).requires_grad_() for s in S_SHAPES]
    s_logits = (3 * torch.randn(B, K, generator=g)).requires_grad_()
    with torch.inference_mode():  # as the loop's frozen teacher
        t_feats = [torch.randn(t, generator=g) for t in T_SHAPES]
        t_logits = 3 * torch.randn(B, K, generator=g)
    batch = Batch(labels=torch.randint(0, K, (B,), generator=g), index=torch.arange(B), epoch=5)
    return Outputs(s_logits, s_feats), Outputs(t_logits, t_feats), batch


def _kl_by_hand(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) in float64 from probabilities p and log-probabilities log_q."""
    return (p * (p.log() - log_q)).sum(1)


def test_registry_attributes() -> None:
    for name, (kind, logit_only, weight) in MINE.items():
        cls = METHODS.get(name)
        assert (cls.feature_kind, cls.logit_only, cls.default_weight) == (kind, logit_only, weight)
        assert cls.paper
        assert cls.main_is_zero == (name == "kd")


@pytest.mark.parametrize("name", sorted(MINE))
def test_adapter_loss_and_gradients(name: str) -> None:
    method = METHODS.get(name)(_ctx())
    student, teacher, batch = _outputs(seed=1)
    loss = method(student, teacher, batch)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    used = [student.feats[i] for i in USED_FEATS[name]] if name in USED_FEATS else [student.logits]
    for x in used:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    unused = [x for x in student.feats + [student.logits] if all(x is not u for u in used)]
    assert all(x.grad is None for x in unused)
    params = list(method.trainable_parameters())
    assert len(params) == {"hint": 4, "correlation": 4}.get(name, 0)  # conv, bn; two linears
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_ttm_is_kl_to_teacher_softmax_at_temperature_one_over_gamma() -> None:
    g = torch.Generator().manual_seed(0)
    z, v = 3 * torch.randn(B, K, generator=g), 3 * torch.randn(B, K, generator=g)
    for gamma in (0.1, 0.5, 2.0):
        p_hat = torch.softmax(gamma * v.double(), dim=1)
        want = _kl_by_hand(p_hat, F.log_softmax(z.double(), dim=1)).mean()
        assert torch.allclose(dz.TTM(gamma)(z, v).double(), want, rtol=1e-5)


def test_ttm_with_gamma_one_is_kd_at_temperature_one() -> None:
    g = torch.Generator().manual_seed(1)
    z, v = 2 * torch.randn(B, K, generator=g), 2 * torch.randn(B, K, generator=g)
    assert torch.allclose(dz.TTM(1.0)(z, v), dz.DistillKL(1.0)(z, v), rtol=1e-5)
    assert not torch.allclose(dz.TTM(0.5)(z, v), dz.DistillKL(1.0)(z, v), rtol=1e-3)


def test_wttm_weights_each_sample_by_teacher_power_sum() -> None:
    g = torch.Generator().manual_seed(2)
    z, row = 2 * torch.randn(B, K, generator=g), 2 * torch.randn(K, generator=g)
    v = torch.stack([row[torch.randperm(K, generator=g)] for _ in range(B)])  # same U per row
    gamma = 0.3
    u = (torch.softmax(row.double(), 0) ** gamma).sum()
    wttm, ttm = dz.WTTM(gamma)(z, v).double(), dz.TTM(gamma)(z, v).double()
    assert torch.allclose(wttm, u * ttm, rtol=1e-5)
    # a uniform teacher has the largest power sum, K**(1 - gamma)
    flat = torch.zeros(B, K)
    wttm, ttm = dz.WTTM(gamma)(z, flat), dz.TTM(gamma)(z, flat)
    assert torch.allclose(wttm, K ** (1 - gamma) * ttm, rtol=1e-5)
    # different U per row: the weight is applied before the batch mean
    v = 2 * torch.randn(B, K, generator=g)
    u = (torch.softmax(v.double(), 1) ** gamma).sum(1)
    kl = _kl_by_hand(torch.softmax(gamma * v.double(), 1), F.log_softmax(z.double(), 1))
    assert torch.allclose(dz.WTTM(gamma)(z, v).double(), (u * kl).mean(), rtol=1e-5)


def test_dist_against_pearson_by_hand() -> None:
    g = torch.Generator().manual_seed(3)
    z_s, z_t = 2 * torch.randn(B, K, generator=g), 2 * torch.randn(B, K, generator=g)
    beta, gamma, tau = 2.0, 0.5, 3.0
    y_s, y_t = torch.softmax(z_s.double() / tau, 1), torch.softmax(z_t.double() / tau, 1)

    def mean_corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.corrcoef(torch.stack([x, y]))[0, 1] for x, y in zip(a, b)]).mean()

    want = tau ** 2 * (beta * (1 - mean_corr(y_s, y_t)) + gamma * (1 - mean_corr(y_s.T, y_t.T)))
    assert torch.allclose(dz.DIST(beta, gamma, tau)(z_s, z_t).double(), want, rtol=1e-5)
    assert dz.DIST(beta, gamma, tau)(z_t, z_t).abs() < 1e-4  # eps 1e-8 and float32 round-off


def test_dkd_decomposes_kd() -> None:
    """DKD paper, eq. (1)-(4): KD = TCKD + (1 - p_t[target]) * NCKD, sample by sample."""
    g = torch.Generator().manual_seed(4)
    T = 2.0
    for _ in range(3):
        z, v = (2 * torch.randn(1, K, generator=g, dtype=torch.float64) for _ in range(2))
        y = torch.randint(0, K, (1,), generator=g)
        tckd, nckd = dz.dkd_loss(z, v, y, 1.0, 0.0, T), dz.dkd_loss(z, v, y, 0.0, 1.0, T)
        rest = 1 - torch.softmax(v / T, 1)[0, y]
        assert torch.allclose(dz.DistillKL(T)(z, v), tckd + rest * nckd, rtol=1e-9)


@pytest.mark.parametrize("epoch,factor", [(1, 0.05), (10, 0.5), (20, 1.0), (40, 1.0)])
def test_dkd_warmup(epoch: int, factor: float) -> None:
    method = METHODS.get("dkd")(_ctx())
    student, teacher, batch = _outputs(seed=5)
    full = dz.dkd_loss(student.logits, teacher.logits.clone(), batch.labels, 1.0, 8.0, 4.0)
    batch.epoch = epoch
    assert torch.allclose(method(student, teacher, batch), factor * full, rtol=1e-6)


def test_dkd_beta_per_pair_and_flag() -> None:
    six = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("vgg13", "vgg8"),
           ("vgg13", "MobileNetV2")]
    for pair in six:
        assert DKDMethod.beta_for(*pair) == 6.0
    for pair in [("resnet56", "resnet20"), ("resnet110", "resnet32")]:
        assert DKDMethod.beta_for(*pair) == 2.0
    for pair in [("resnet110", "resnet20"), ("resnet32x4", "resnet8x4"), ("ResNet50", "vgg8"),
                 ("resnet32x4", "ShuffleV1"), ("vgg8", "vgg13")]:
        assert DKDMethod.beta_for(*pair) == 8.0
    assert DKDMethod(_ctx("resnet56", "resnet20")).beta == 2.0
    assert DKDMethod(_ctx("resnet56", "resnet20", dkd_beta=3.5)).beta == 3.5
    assert DKDMethod.resolve({"dkd_beta": None}, "resnet56", "resnet20") == {"dkd_beta": 2.0}
    assert DKDMethod.resolve({"dkd_beta": 3.5}, "resnet56", "resnet20") == {}
    with pytest.raises(ValueError, match="--dkd_warmup must be >= 0"):
        DKDMethod.validate({"dkd_warmup": -1})


def test_method_flags_parse() -> None:
    parser = argparse.ArgumentParser()
    for name in ("dist", "dkd"):
        for flag in METHODS.get(name).flags:
            flag.add_to(parser)
    ns = parser.parse_args([])
    assert (ns.dist_beta, ns.dist_gamma, ns.dist_tau) == (1.0, 1.0, 4.0)
    assert (ns.dkd_alpha, ns.dkd_beta, ns.dkd_T, ns.dkd_warmup) == (1.0, None, 4.0, 20)
    ns = parser.parse_args(["--dkd_beta", "6", "--dist_tau", "1"])
    assert ns.dkd_beta == 6.0 and isinstance(ns.dkd_beta, float) and ns.dist_tau == 1.0


def test_hint_layer_must_be_a_feature_map() -> None:
    with pytest.raises(ValueError, match="--hint_layer 4 is not"):
        METHODS.get("hint")(_ctx(hint_layer=4))  # the pooled vector


def test_similarity_returns_one_element_tensors_and_adapter_scalar() -> None:
    student, teacher, batch = _outputs(seed=6)
    out = dz.Similarity()([student.feats[3]], [teacher.feats[3].clone()])
    assert len(out) == 1 and out[0].shape == (1,)
    loss = METHODS.get("similarity")(_ctx())(student, teacher, batch)
    assert loss.shape == () and torch.allclose(loss, out[0][0])


def test_rkd_is_zero_for_scaled_copies() -> None:
    f = torch.randn(B, 12, generator=torch.Generator().manual_seed(7))
    assert dz.RKDLoss()(3.0 * f, f) < 1e-6
    assert dz.RKDLoss()(f.flip(0), f) > 1e-3


def test_correlation_by_hand() -> None:
    f_s, f_t = torch.tensor([[1.0, 2.0], [0.0, -1.0]]), torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    assert torch.allclose(dz.Correlation()(f_s, f_t), torch.tensor(1 * 2 + 2 * 2.0))


def test_pkt_zeroes_nans_and_vanishes_for_equal_similarities() -> None:
    g = torch.Generator().manual_seed(8)
    f = torch.randn(B, 12, generator=g)
    assert dz.PKT()(2.0 * f, f).abs() < 1e-6
    bad = f.clone()
    bad[0, 0] = float("inf")  # inf / inf = NaN after normalising: replaced by 0
    assert torch.isfinite(dz.PKT()(bad, f))


def test_attention_and_nst_pool_the_larger_map() -> None:
    g = torch.Generator().manual_seed(9)
    big, small = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    pooled = F.adaptive_avg_pool2d(big, (4, 4))
    for loss in (dz.Attention(), dz.NSTLoss()):
        assert torch.allclose(loss([big], [small])[0], loss([pooled], [small])[0])
        assert torch.allclose(loss([small], [big])[0], loss([small], [pooled])[0])


def test_autograd_safe_copies_only_inference_tensors() -> None:
    x = torch.randn(3)
    assert autograd_safe(x) is x
    with torch.inference_mode():
        y = torch.randn(3)
    z = autograd_safe(y)
    assert not z.is_inference() and torch.equal(z, y)


def test_feature_adapters_pair_the_contract_features() -> None:
    """AT and NST pair stage features 1..-2 with the same stages of the teacher; RKD and PKT
    read the pooled vectors; FitNet regresses feature ``hint_layer`` onto the teacher's."""
    student, teacher, batch = _outputs(seed=10)
    s, t = student.feats, [f.clone() for f in teacher.feats]
    expected = {
        "attention": lambda m: sum(dz.Attention()(s[1:-1], t[1:-1])),
        "nst": lambda m: sum(dz.NSTLoss()(s[1:-1], t[1:-1])),
        "rkd": lambda m: dz.RKDLoss()(s[-1], t[-1]),
        "pkt": lambda m: dz.PKT()(s[-1], t[-1]),
        "hint": lambda m: dz.HintLoss()(m.regress(s[2]), t[2]),
    }
    for name, want in expected.items():
        method = METHODS.get(name)(_ctx())
        assert torch.allclose(method(student, teacher, batch), want(method), rtol=1e-6), name
