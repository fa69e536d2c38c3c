"""Checks of the stateful and two-stage methods: CRD's sampler and memory, ITRD, VID, AB, FT, FSP.

Parity with the reference numbers is ``tests/parity.py``'s job. Here: the CRD negatives'
distribution (chi-square against the reference's, on tiny label sets), the sampler's saved
state, the memory update by hand, ITRD's embedding quirk, what each initialisation stage
trains, and that each adapter's gradient reaches the student side and its own parameters
(teacher tensors made under ``inference_mode``, as in training).
"""
from __future__ import annotations

import io
import dataclasses
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from distiller_zoo.abound import ABMethod
from distiller_zoo.base import Batch, InitStage, MethodContext, Outputs
from distiller_zoo.crd import ContrastMemory, ContrastSampler, CRDMethod
from distiller_zoo.factor import FTMethod
from distiller_zoo.fsp import FSPMethod
from distiller_zoo.itrd import ITLoss, ITRDMethod
from distiller_zoo.vid import VIDMethod
from models import feature_shapes


class TinyNet(nn.Module):
    """Feature contract of the CIFAR ResNets on 8×8 inputs: 4 maps then the pooled vector."""

    def __init__(self, widths: tuple[int, int, int, int], classes: int = 4) -> None:
        super().__init__()
        c0, c1, c2, c3 = widths
        self.conv0, self.bn0 = nn.Conv2d(3, c0, 3, 1, 1), nn.BatchNorm2d(c0)
        self.convs = nn.ModuleList([nn.Conv2d(c0, c1, 3, 1, 1), nn.Conv2d(c1, c2, 3, 2, 1),
                                    nn.Conv2d(c2, c3, 3, 2, 1)])
        self.bns = nn.ModuleList([nn.BatchNorm2d(c) for c in (c1, c2, c3)])
        self.fc = nn.Linear(c3, classes)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        x = torch.relu(self.bn0(self.conv0(x)))
        feats = [x]
        for conv, bn in zip(self.convs, self.bns):
            pre = bn(conv(x))
            x = torch.relu(pre)
            feats.append(pre if preact else x)
        pooled = pre.mean((2, 3))  # pre-ReLU: no dead (constant) dimensions for ITRD's std
        feats.append(pooled)
        logits = self.fc(pooled)
        return (feats, logits) if is_feat else logits

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.conv0, self.bn0, self.convs, self.bns])


N_DATA, CLASSES = 40, 4
LABELS = torch.arange(N_DATA) % CLASSES


def _ctx(student: nn.Module, teacher: nn.Module, student_name: str = "resnet8", **over) -> MethodContext:
    cfg = dict(feat_dim=8, init_epochs=3, learning_rate=0.05, momentum=0.9, weight_decay=5e-4,
               seed=7, mode="exact", nce_k=8, nce_t=0.07, nce_m=0.5, lambda_corr=2.0,
               lambda_mutual=1.0, alpha_it=1.5, nce_replace="auto")
    cfg.update(over)
    s_shapes, t_shapes = (feature_shapes(n, 8) for n in (student, teacher))
    s_pre, t_pre = (feature_shapes(n, 8, preact=True) for n in (student, teacher))
    return MethodContext(cfg=types.SimpleNamespace(**cfg), student_shapes=s_shapes, teacher_shapes=t_shapes,
                         student_preact_shapes=s_pre, teacher_preact_shapes=t_pre, n_data=N_DATA,
                         train_labels=LABELS, num_classes=CLASSES, student=student, teacher=teacher,
                         device=torch.device("cpu"), student_name=student_name, teacher_name="t")


def _run(student: nn.Module, teacher: nn.Module, preact: bool, seed: int = 0):
    """Student forward (train mode, with graph) and teacher forward under inference_mode."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 3, 8, 8, generator=g)
    index = torch.randperm(N_DATA, generator=g)[:6]
    student.train()
    s_feats, s_logits = student(x, is_feat=True, preact=preact)
    teacher.eval()
    with torch.inference_mode():
        t_feats, t_logits = teacher(x, is_feat=True, preact=preact)
    return (Outputs(s_logits, s_feats, preact), Outputs(t_logits, t_feats, preact),
            Batch(labels=LABELS[index], index=index, epoch=1))


def _nets(same_width: bool = False) -> tuple[TinyNet, TinyNet]:
    torch.manual_seed(0)
    return TinyNet((4, 4, 8, 8)), TinyNet((4, 4, 8, 8) if same_width else (4, 8, 16, 16))


def _ids(params) -> set[int]:
    return {id(p) for p in params}


# ----------------------------------------------------------------------------- CRD sampler
def _chi2_z(counts: torch.Tensor, expected: torch.Tensor, scale: float = 1.0) -> float:
    """Wilson-Hilferty z-score of ``sum((O - E)**2 / (E * scale))`` against chi-square with
    ``len - 1`` degrees of freedom (``scale = 1 - k/M`` for draws without replacement)."""
    stat = float(((counts.double() - expected) ** 2 / (expected * scale)).sum())
    df = counts.numel() - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


def _draw_many(labels: torch.Tensor, k: int, mode: str, rounds: int, always_replace: bool = False) -> torch.Tensor:
    sampler = ContrastSampler(labels, k, mode, torch.Generator().manual_seed(3), always_replace)
    index = torch.arange(labels.numel())
    return torch.stack([sampler.draw(index) for _ in range(rounds)])  # [R, N, k+1]


def _pool_z(labels: torch.Tensor, draws: torch.Tensor, k: int, replace: bool) -> float:
    """Combined per-class chi-square z of how often each other-class sample is a negative."""
    zs = []
    for c in labels.unique():
        rows = draws[:, labels == c, 1:].reshape(-1)
        pool = (labels != c).nonzero().squeeze(1)
        counts = torch.bincount(rows, minlength=labels.numel())[pool]
        scale = 1.0 if replace else 1 - k / pool.numel()
        zs.append(abs(_chi2_z(counts, torch.full((pool.numel(),), rows.numel() / pool.numel()), scale)))
    return max(zs)


def test_chi2_detects_a_biased_sampler():
    g = torch.Generator().manual_seed(0)
    fair = torch.bincount(torch.randint(0, 20, (20000,), generator=g), minlength=20)
    weights = torch.ones(20)
    weights[0] = 1.3
    biased = torch.bincount(torch.multinomial(weights, 20000, True, generator=g), minlength=20)
    expected = torch.full((20,), 1000.0)
    assert abs(_chi2_z(fair, expected)) < 4 and _chi2_z(biased, expected) > 4


def test_exact_mode_distribution():
    labels = torch.tensor([0] * 10 + [1] * 12 + [2] * 8)[torch.randperm(30, generator=torch.Generator().manual_seed(1))]
    k = 6
    draws = _draw_many(labels, k, "exact", rounds=600)
    assert draws.shape == (600, 30, k + 1) and draws.dtype == torch.int64
    assert torch.equal(draws[:, :, 0], torch.arange(30).expand(600, 30))  # positive = itself
    neg = draws[:, :, 1:]
    assert not (labels[neg] == labels.view(1, -1, 1)).any()  # never a same-class negative
    assert (neg.sort(dim=2).values.diff(dim=2) > 0).all()  # no duplicates within a row
    assert _pool_z(labels, draws, k, replace=False) < 4.5  # uniform over the pool


def test_relax_mode_positive_is_uniform_over_its_class():
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 3)
    draws = _draw_many(labels, 4, "relax", rounds=2000)
    pos = draws[:, :, 0]
    assert torch.equal(labels[pos], labels.expand_as(pos))
    assert not torch.equal(pos, torch.arange(15).expand_as(pos))
    for c in range(3):
        members = (labels == c).nonzero().squeeze(1)
        counts = torch.bincount(pos[:, labels == c].reshape(-1), minlength=15)[members]
        assert abs(_chi2_z(counts, torch.full((members.numel(),), counts.sum() / members.numel()))) < 4.5


def test_with_replacement_when_the_pool_is_smaller_than_k():
    labels = torch.tensor([0, 1, 2] * 3)  # pools of 6 < k = 7
    draws = _draw_many(labels, 7, "exact", rounds=1500)
    neg = draws[:, :, 1:]
    assert not (labels[neg] == labels.view(1, -1, 1)).any()
    assert _pool_z(labels, draws, 7, replace=True) < 4.5


def test_always_replace_is_uniform_with_replacement_over_the_pool():
    """The ImageNet reference draws negatives with replacement whatever the pool size."""
    labels = torch.tensor([0] * 10 + [1] * 12 + [2] * 8)
    draws = _draw_many(labels, 6, "exact", rounds=600, always_replace=True)
    neg = draws[:, :, 1:]
    assert not (labels[neg] == labels.view(1, -1, 1)).any()
    assert ((neg.sort(dim=2).values.diff(dim=2) == 0).any(dim=2)).any()  # repeats happen
    assert _pool_z(labels, draws, 6, replace=True) < 4.5


def test_crd_replaces_above_the_imagenet_scale_or_when_asked():
    student, teacher = _nets()
    for n_data, flag, expected in ((N_DATA, "auto", False), (N_DATA, "yes", True),
                                   (300_000, "auto", True), (300_000, "no", False)):
        ctx = _ctx(student, teacher, nce_replace=flag)
        labels = torch.arange(n_data) % CLASSES
        ctx = dataclasses.replace(ctx, n_data=n_data, train_labels=labels)
        assert bool(CRDMethod(ctx).sampler.replace.all()) == expected, (n_data, flag)


def test_mixed_pools_replace_only_where_needed():
    labels = torch.tensor([0, 0, 1, 1] + [2] * 8)  # pools 10, 10, 4 for k = 6
    draws = _draw_many(labels, 6, "exact", rounds=300)
    neg = draws[:, :, 1:]
    assert not (labels[neg] == labels.view(1, -1, 1)).any()
    small = neg[:, labels < 2]
    assert (small.sort(dim=2).values.diff(dim=2) > 0).all()
    big = neg[:, labels == 2]
    assert ((big.sort(dim=2).values.diff(dim=2) == 0).any(dim=2)).all()  # 6 draws from 4


def test_sampler_state_restores_identical_draws():
    sampler = ContrastSampler(LABELS, 8, "relax", torch.Generator().manual_seed(5))
    sampler.draw(torch.arange(6))
    state = sampler.get_state().clone()
    first = sampler.draw(torch.arange(6))
    assert not torch.equal(first, sampler.draw(torch.arange(6)))
    sampler.set_state(state)
    assert torch.equal(first, sampler.draw(torch.arange(6)))


# ----------------------------------------------------------------------------- CRD memory
def test_memory_scores_then_updates_by_hand():
    mem = ContrastMemory(2, 3, K=1, T=0.5, momentum=0.25)
    mem.memory_v1.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.28, 0.96]]))
    mem.memory_v2.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]]))
    v1, v2 = torch.tensor([[1.0, 0.0]]).requires_grad_(), torch.tensor([[0.0, 1.0]])
    bank = mem.memory_v1
    out_v1, out_v2 = mem(v1, v2, torch.tensor([1]), torch.tensor([[1, 2]]))
    assert mem.memory_v1 is bank  # updated in place: DDP and checkpoints keep the same buffer
    out_v1.sum().backward()  # the in-place update does not break the backward
    e_v1 = torch.exp(torch.tensor([1.0, 0.8]) / 0.5)  # v1 against memory_v2 rows 1, 2 (old)
    e_v2 = torch.exp(torch.tensor([1.0, 0.96]) / 0.5)  # v2 against memory_v1 rows 1, 2 (old)
    z_v1, z_v2 = e_v1.mean() * 3, e_v2.mean() * 3
    assert torch.allclose(out_v1.detach().view(-1), e_v1 / z_v1) and torch.allclose(out_v2.view(-1), e_v2 / z_v2)
    assert torch.allclose(mem.params[2:4], torch.stack([z_v1, z_v2]))
    new_v1 = torch.tensor([0.0, 0.25]) + torch.tensor([0.75, 0.0])  # 0.25 * old + 0.75 * v1
    new_v2 = torch.tensor([0.25, 0.0]) + torch.tensor([0.0, 0.75])
    assert torch.allclose(mem.memory_v1[1], new_v1 / new_v1.norm())
    assert torch.allclose(mem.memory_v2[1], new_v2 / new_v2.norm())
    assert torch.equal(mem.memory_v1[[0, 2]], torch.tensor([[1.0, 0.0], [0.28, 0.96]]))
    out2, _ = mem(v1.detach(), v2, torch.tensor([0]), torch.tensor([[0, 1]]))  # Z stays from call 0
    assert torch.allclose(out2.view(-1), torch.exp(torch.tensor([0.0, float(new_v2[0] / new_v2.norm())]) / 0.5) / z_v1)


def test_memory_without_idx_scores_the_positive_in_column_0():
    torch.manual_seed(0)
    mem = ContrastMemory(4, 10, K=5, T=0.5)
    v1, v2, y = F.normalize(torch.randn(2, 4)), F.normalize(torch.randn(2, 4)), torch.tensor([3, 7])
    before = mem.memory_v2.clone()
    out_v1, out_v2 = mem(v1, v2, y)
    assert out_v1.shape == out_v2.shape == (2, 6, 1)
    positive = torch.exp((before[y] * v1).sum(1) / 0.5) / mem.params[2]
    assert torch.allclose(out_v1[:, 0, 0], positive)


# ----------------------------------------------------------------------------- CRD adapter
def test_crd_gradients_and_exact_resume():
    student, teacher = _nets()
    m = CRDMethod(_ctx(student, teacher))
    s, t, b = _run(student, teacher, preact=False)
    loss = m(s, t, b)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.trainable_parameters())
    assert student.convs[2].weight.grad.abs().sum() > 0 and student.fc.weight.grad is None
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    other = CRDMethod(_ctx(student, teacher, seed=99))
    other.load_state_dict(torch.load(buf, weights_only=True))
    s, t, b = _run(student, teacher, preact=False, seed=1)
    with torch.no_grad():
        assert torch.equal(m(s, t, b), other(s, t, b))
    assert torch.equal(m.criterion.contrast.memory_v2, other.criterion.contrast.memory_v2)


def test_crd_rejects_bad_flags():
    for bad, message in (({"nce_m": 1.0}, "--nce_m must be < 1"), ({"nce_k": 0}, "--nce_k must be >= 1"),
                         ({"nce_t": 0.0}, "--nce_t must be > 0"), ({"mode": "loose"}, "--mode must be one of")):
        with pytest.raises(ValueError, match=message):
            CRDMethod.validate({"feat_dim": 128, "mode": "exact", "nce_k": 16, "nce_t": 0.07,
                                "nce_m": 0.5, **bad})


# ----------------------------------------------------------------------------- ITRD
@pytest.mark.parametrize("s_dim,t_dim", [(6, 6), (6, 10)])
def test_itrd_embedding_quirk(s_dim: int, t_dim: int):
    crit = ITLoss(types.SimpleNamespace(s_dim=s_dim, t_dim=t_dim, n_data=10, alpha_it=1.5))
    z_s, z_t = torch.randn(8, s_dim).abs().requires_grad_(), torch.randn(8, t_dim).abs()
    crit.forward_correlation_it(z_s, z_t).backward()
    assert crit.embed.linear.weight.grad.abs().sum() > 0  # always embedded here
    assert crit.embed.linear.bias.grad.abs().max() < 1e-5  # standardisation removes the bias
    crit.zero_grad(set_to_none=True)
    z_s.grad = None
    crit.forward_mutual_it(z_s, z_t).backward()
    assert z_s.grad.abs().sum() > 0
    assert (crit.embed.linear.weight.grad is None) == (s_dim == t_dim)  # only when dims differ


def test_itrd_adapter_combines_both_terms():
    student, teacher = _nets()
    m = ITRDMethod(_ctx(student, teacher, lambda_corr=2.0, lambda_mutual=0.5))
    s, t, b = _run(student, teacher, preact=True)
    loss = m(s, t, b)
    f_s, f_t = s.feats[-1], t.feats[-1].clone()
    expected = 2.0 * m.criterion.forward_correlation_it(f_s, f_t) + 0.5 * m.criterion.forward_mutual_it(f_s, f_t)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert m.criterion.embed.linear.weight.grad.abs().sum() > 0 and student.convs[2].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- VID, AB, FT, FSP
def test_vid_gradients():
    student, teacher = _nets()
    m = VIDMethod(_ctx(student, teacher))
    assert len(m.criteria) == 3
    s, t, b = _run(student, teacher, preact=False)
    m(s, t, b).backward()
    assert all(p.grad is not None for p in m.trainable_parameters())
    assert student.convs[0].weight.grad.abs().sum() > 0


def _check_stage(stage: InitStage, student: nn.Module, teacher: nn.Module, expected: set[int]) -> None:
    assert isinstance(stage, InitStage) and stage.epochs == 3 and not stage.student_train_mode
    assert _ids(stage.parameters) == expected and len(stage.parameters) == len(expected)
    s, t, b = _run(student, teacher, preact=stage.feature_kind == "preact")
    loss = stage.loss(s, t, b)
    assert loss.shape == () and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in stage.parameters)
    assert sum(float(p.grad.abs().sum()) for p in stage.parameters) > 0


def test_ab_init_stage_trains_connector_and_student_feature_modules():
    student, teacher = _nets()
    m = ABMethod(_ctx(student, teacher))
    stage = m.init_stage()
    assert stage.feature_kind == "preact" and stage.lr == 0.05
    expected = _ids(m.connector.parameters()) | _ids(student.get_feat_modules().parameters())
    assert student.fc.weight not in set(stage.parameters) and m.connector in stage.modules
    _check_stage(stage, student, teacher, expected)
    assert list(m.trainable_parameters()) == []
    s, t, b = _run(student, teacher, preact=True)
    assert m(s, t, b).item() == 0.0


def test_ft_init_stage_trains_the_paraphraser_only():
    student, teacher = _nets()
    m = FTMethod(_ctx(student, teacher, student_name="resnet8"))
    stage = m.init_stage()
    assert stage.lr == 0.01 and stage.feature_kind == "feat" and stage.modules == [m.paraphraser]
    _check_stage(stage, student, teacher, _ids(m.paraphraser.parameters()))
    assert all(p.grad is None for p in m.translator.parameters())
    assert FTMethod(_ctx(student, teacher, student_name="vgg8")).init_stage().lr == 0.05
    assert _ids(m.trainable_parameters()) == _ids(m.translator.parameters())
    m.zero_grad(set_to_none=True)
    s, t, b = _run(student, teacher, preact=False)
    m(s, t, b).backward()
    assert all(p.grad is not None for p in m.translator.parameters())
    assert all(p.grad is None for p in m.paraphraser.parameters())
    assert student.convs[2].weight.grad.abs().sum() > 0


def test_fsp_init_stage_trains_student_feature_modules():
    student, teacher = _nets(same_width=True)
    m = FSPMethod(_ctx(student, teacher))
    _check_stage(m.init_stage(), student, teacher, _ids(student.get_feat_modules().parameters()))
    s, t, b = _run(student, teacher, preact=False)
    assert m(s, t, b).item() == 0.0
    with pytest.raises(ValueError, match="FSP needs student and teacher stages of equal channel"):
        FSPMethod(_ctx(*_nets(same_width=False)))
