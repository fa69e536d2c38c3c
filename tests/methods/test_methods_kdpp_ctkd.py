"""KD++ (DirectNormLoss, the kdpp method, the teacher class means on disk) and CTKD (the
gradient reversal, the learnable temperature in kd/dkd, its schedule and its resume state).

The references the loops below restate: WangYZ1608/Knowledge-Distillation-via-ND
``ImageNet/utils.py`` (DirectNormLoss, one sample at a time) and zhengli97/CTKD
``train_student.py`` (``CosineDecay``), ``models/temp_global.py``.
"""
from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from distiller_zoo import Batch, DirectNormLoss, GradientReversal, Global_T, MethodContext, Outputs
from distiller_zoo.ctkd import cosine_lambda
from distiller_zoo.dkd import DKDMethod, dkd_loss
from distiller_zoo.kd import DistillKL, KDMethod
from distiller_zoo.kdpp import KDPPMethod
from dataset.base import ImageDataset
from helper import distributed
from helper.config import Config
from helper.distill import DistillObjective
from helper.teacher_cache import class_means as cm
from train_utils import run_student

pytestmark = pytest.mark.usefixtures("one_thread")
ENV = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CTKD_CFG = dict(kd_T=4.0, ctkd="global", ctkd_t_start=1.0, ctkd_t_end=20.0, ctkd_cosine_epochs=10,
                dataset="cifar100", dkd_alpha=1.0, dkd_beta=8.0, dkd_T=4.0, dkd_warmup=0)


def _ctx(cfg: dict, s_dim: int = 8, t_dim: int = 8, num_classes: int = 5, **over) -> MethodContext:
    size = lambda d: [torch.Size([2, d])]  # noqa: E731 (only the pooled width is read)
    fields = dict(cfg=types.SimpleNamespace(**cfg), student_shapes=size(s_dim), teacher_shapes=size(t_dim),
                  student_preact_shapes=size(s_dim), teacher_preact_shapes=size(t_dim), n_data=10,
                  train_labels=torch.arange(10) % num_classes, num_classes=num_classes,
                  student=nn.Identity(), teacher=nn.Identity(), device=torch.device("cpu"),
                  student_name="s", teacher_name="t")
    fields.update(over)
    return MethodContext(**fields)


# ---- KD++ -----------------------------------------------------------------------------------

def _reference_nd(s_emb, t_emb, means, labels, factor):
    """The reference's per-sample loop (Python ``max`` of two 0-d norms)."""
    loss = 0.0
    for s, t, i in zip(s_emb, t_emb, labels):
        center = means[int(i)]
        e_c = center / center.norm(p=2)
        loss = loss + 1 - torch.dot(s, e_c) / max(s.norm(p=2), t.norm(p=2))
    return loss * factor / len(labels)


def test_direct_norm_loss_equals_the_per_sample_loop_in_value_and_gradient():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 4, generator=g)
    t = torch.randn(6, 4, generator=g)
    t[:3] *= 5.0  # |t| > |s| for the first half, |s| > |t| for the rest
    s[3:] *= 5.0
    means = torch.randn(3, 4, generator=g)
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    t_emb = {str(i): row.tolist() for i, row in enumerate(means)}
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    ours = DirectNormLoss(num_class=3, nd_loss_factor=2.5)(s_emb=s1, t_emb=t, T_EMB=t_emb, labels=labels)
    ref = _reference_nd(s2, t, means, labels, 2.5)
    assert ours.dim() == 0 and torch.allclose(ours, ref, rtol=1e-6, atol=1e-6)
    ours.backward()
    ref.backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)
    # the norm path matters: rows where |s| is the max get a gradient not parallel to e_c
    assert not torch.allclose(s1.grad[3:], s1.grad[3:].new_zeros(3, 4))
    tensor_means = DirectNormLoss(3, 2.5)(s, t, means, labels)
    assert torch.allclose(tensor_means, ref.detach(), rtol=1e-6)


def test_kdpp_returns_kd_and_nd_with_the_warm_up_and_a_projector_for_other_widths():
    cfg = dict(dataset="cifar100", kdpp_kd=3.5, kdpp_nd=2.0, kdpp_T=4.0, kdpp_warmup=20.0)
    means = torch.randn(5, 16)
    method = KDPPMethod(_ctx(cfg, s_dim=8, t_dim=16, teacher_class_means=means))
    assert isinstance(method.projector, nn.Sequential)
    assert [type(m) for m in method.projector] == [nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert "class_means" not in method.state_dict()  # derived data, not checkpointed
    g = torch.Generator().manual_seed(1)
    s = Outputs(torch.randn(4, 5, generator=g), [torch.randn(4, 8, generator=g)])
    t = Outputs(torch.randn(4, 5, generator=g), [torch.randn(4, 16, generator=g)])
    labels = torch.tensor([0, 1, 4, 4])
    method.eval()  # dropout off: the ND term is then a plain function of the inputs
    first = method(s, t, Batch(labels, labels, epoch=1))
    assert set(first) == {"kd", "nd"} and float(first["kd"]) == 0.0  # 0-based epoch 0
    later = method(s, t, Batch(labels, labels, epoch=11))
    assert torch.allclose(later["kd"], 3.5 * 0.5 * DistillKL(4.0)(s.logits, t.logits))
    expected_nd = DirectNormLoss(5, 2.0)(method.projector(s.pooled), t.pooled, means, labels)
    assert torch.allclose(later["nd"], expected_nd)
    same = KDPPMethod(_ctx(cfg, s_dim=16, t_dim=16, teacher_class_means=means))
    assert same.projector is None


def test_kdpp_defaults_come_from_the_pair_and_the_data_set():
    assert KDPPMethod.resolve({"dataset": "imagenet"}, "resnet34", "resnet18") == \
        {"kdpp_kd": 2.5, "kdpp_nd": 1.0, "kdpp_T": 1.0, "kdpp_warmup": 5.0}
    assert KDPPMethod.resolve({"dataset": "imagenet", "kdpp_T": 2.0}, "resnet50", "mobilenet_v1") == \
        {"kdpp_kd": 4.0, "kdpp_nd": 1.0, "kdpp_warmup": 5.0}
    assert KDPPMethod.resolve({"dataset": "cifar100"}, "resnet32x4", "resnet8x4") == \
        {"kdpp_kd": 3.5, "kdpp_nd": 2.0, "kdpp_T": 4.0, "kdpp_warmup": 20.0}
    with pytest.raises(ValueError, match="class means"):
        KDPPMethod(_ctx({"dataset": "cifar100"}))


# ---- class means on disk --------------------------------------------------------------------

class _Pooled(nn.Module):
    """A tiny "teacher": pooled feature = per-channel image mean times a weight."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((3,), scale))

    def forward(self, x, is_feat=False, preact=False):
        pooled = x.mean(dim=(2, 3)) * self.w
        return ([pooled], pooled.sum(1, keepdim=True)) if is_feat else pooled.sum(1, keepdim=True)


def test_compute_class_means_averages_the_pooled_feature_per_class():
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(4, 3, 2, 2, generator=g), torch.tensor([0, 1, 1, 2])) for _ in range(3)]
    teacher = _Pooled(2.0).train()
    means, counts = cm.compute_class_means(teacher, batches, 3, torch.device("cpu"), ENV)
    assert teacher.training  # its mode is given back
    feats = torch.cat([x.mean(dim=(2, 3)) * 2.0 for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    for k in range(3):
        assert torch.allclose(means[k], feats[labels == k].mean(0), atol=1e-6)
    assert counts.tolist() == [3, 6, 3]


def _key(teacher_sha: str = "a" * 64) -> cm.MeansKey:
    return cm.MeansKey(teacher_sha, "resnet8", "digits", "b" * 64, 3, 32, (0.5,) * 3, (0.2,) * 3, 0, "cpu")


def test_class_means_are_built_once_reused_and_rebuilt_when_corrupt(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return torch.arange(6.0).reshape(3, 2) + len(calls), torch.ones(3, dtype=torch.int64)

    key = _key()
    path = cm.means_path(str(tmp_path / "cache"), key)
    first, status = cm.load_or_build(path, key, build, ENV)
    assert status == "built (missing)" and len(calls) == 1
    again, status = cm.load_or_build(path, key, build, ENV)
    assert status == "loaded" and len(calls) == 1 and torch.equal(again, first)
    with open(path, "r+b") as handle:  # flip bytes in the middle of the file
        handle.seek(200)
        handle.write(b"\xff" * 64)
    rebuilt, status = cm.load_or_build(path, key, build, ENV)
    assert status.startswith("built (") and len(calls) == 2 and torch.equal(rebuilt, first + 1)
    with open(path, "wb") as handle:
        handle.write(b"not a checkpoint")
    _, status = cm.load_or_build(path, key, build, ENV)
    assert status.startswith("built (unreadable")
    assert len(calls) == 3


def test_class_means_key_changes_with_the_teacher_and_the_data():
    assert cm.means_path("c", _key("a" * 64)) != cm.means_path("c", _key("c" * 64))
    assert cm.state_sha256(_Pooled(1.0)) != cm.state_sha256(_Pooled(1.5))
    images = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    data = ImageDataset("tiny", images, torch.tensor([0, 1, 0, 1]), images, torch.tensor([0, 1, 0, 1]),
                        2, (0.5,) * 3, (0.2,) * 3)
    other = ImageDataset("tiny", images + 1, data.train_labels, images, data.test_labels, 2,
                         (0.5,) * 3, (0.2,) * 3)
    assert cm.data_sha256(data) != cm.data_sha256(other)


def test_class_means_for_run_builds_from_the_training_loader_then_reuses(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(12) % 3
    data = ImageDataset("tiny", images, labels, images, labels, 3, (0.5,) * 3, (0.25,) * 3)
    cfg = Config(dict(distill="kdpp", add=None, alpha=0.0, save_root=str(tmp_path), model_t="resnet8",
                      batch_size=4, dataset="tiny", workers=0))
    teacher = _Pooled(1.0)
    before = torch.get_rng_state()
    means = cm.class_means_for_run(cfg, ENV, data, teacher)
    assert torch.equal(torch.get_rng_state(), before)  # the pass leaves the global RNG alone
    assert means.shape == (3, 3) and torch.isfinite(means).all()
    built = []
    monkeypatch.setattr(cm, "compute_class_means", lambda *a, **k: built.append(1))
    assert torch.equal(cm.class_means_for_run(cfg, ENV, data, teacher), means) and not built
    assert cm.class_means_for_run(Config({**cfg, "distill": "dkd"}), ENV, data, teacher) is None


# ---- CTKD -----------------------------------------------------------------------------------

def test_gradient_reversal_is_identity_forward_and_scales_the_gradient_by_lambda():
    x = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    y = GradientReversal()(x, -0.7)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.7 * upstream)  # no extra minus sign
    module = Global_T()
    assert torch.equal(module.global_T.data, torch.ones(1))
    out = module(None, None, 0.5)
    (3.0 * out).sum().backward()
    assert torch.allclose(module.global_T.grad, torch.tensor([1.5]))


def test_lambda_follows_ctkd_cosine_decay_from_0_to_minus_1():
    def cosine_decay(i, loops, hi=0.0, lo=-1.0):  # CTKD train_student.py, restated
        i = min(max(i, 0), loops)
        return ((math.cos(i * math.pi / loops) + 1.0) * 0.5) * (hi - lo) + lo

    assert cosine_lambda(0, 10) == 0.0
    assert cosine_lambda(5, 10) == pytest.approx(-0.5)
    assert cosine_lambda(10, 10) == pytest.approx(-1.0) and cosine_lambda(30, 10) == pytest.approx(-1.0)
    for epoch in (1, 3, 7):
        assert cosine_lambda(epoch, 5) == pytest.approx(cosine_decay(epoch, 5))


def test_ctkd_temperature_is_pushed_to_increase_the_kd_loss():
    method = KDMethod(_ctx(CTKD_CFG))
    theta = method.ctkd.global_t.global_T
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(8, 5, generator=g), 3 * torch.randn(8, 5, generator=g)
    batch = Batch(torch.zeros(8, dtype=torch.int64), torch.arange(8), epoch=5)
    loss_before = method(Outputs(s), Outputs(t), batch)
    assert loss_before.dim() == 0
    loss_before.backward()
    assert method.graph_key(5) == pytest.approx(-0.5) and theta.grad is not None
    with torch.no_grad():  # one SGD step on theta alone: the reversal turns it into ascent
        theta -= 0.5 * theta.grad
    assert method(Outputs(s), Outputs(t), batch) > loss_before
    theta.grad = None
    method(Outputs(s), Outputs(t), Batch(batch.labels, batch.index, epoch=0)).backward()
    assert float(theta.grad) == 0.0  # lambda = 0 before the first epoch


def test_ctkd_off_keeps_kd_and_dkd_unchanged():
    off = {**CTKD_CFG, "ctkd": "off"}
    g = torch.Generator().manual_seed(5)
    s, t = Outputs(torch.randn(6, 5, generator=g)), Outputs(torch.randn(6, 5, generator=g))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    kd = KDMethod(_ctx(off))
    assert kd.ctkd is None and kd.graph_key(3) is None and not list(kd.parameters())
    assert torch.equal(kd(s, t, Batch(labels, labels, 3)), DistillKL(4.0)(s.logits, t.logits))
    dkd = DKDMethod(_ctx(off))
    assert dkd.graph_key(3) == 1.0 and not list(dkd.parameters())
    assert torch.equal(dkd(s, t, Batch(labels, labels, 3)), dkd_loss(s.logits, t.logits, labels, 1.0, 8.0, 4.0))
    dkd_on = DKDMethod(_ctx(CTKD_CFG))
    assert dkd_on.graph_key(2) == (1.0, pytest.approx(cosine_lambda(2, 10)))
    temperature = 1.0 + 20.0 * torch.sigmoid(torch.ones(1))
    assert torch.allclose(dkd_on(s, t, Batch(labels, labels, 3)),
                          dkd_loss(s.logits, t.logits, labels, 1.0, 8.0, temperature).reshape(()))


def test_ctkd_temperature_joins_the_optimiser_and_the_resume_state(tmp_path):
    def objective():
        return DistillObjective(nn.Linear(2, 5), KDMethod(_ctx(CTKD_CFG)), KDMethod(_ctx(CTKD_CFG)),
                                0.1, 0.9, 0.0)

    first = objective()
    first.freeze_untrained()
    theta = first.add.ctkd.global_t.global_T
    assert any(p is theta for p in first.trainable_parameters())  # --add kd's temperature trains
    assert not first.main.ctkd.global_t.global_T.requires_grad  # --distill kd adds a literal 0
    with torch.no_grad():
        theta.fill_(-0.3)
    torch.save(first.task_state(), tmp_path / "state.pth")
    second = objective()
    second.load_task_state(torch.load(tmp_path / "state.pth", weights_only=True))
    assert torch.equal(second.add.ctkd.global_t.global_T, torch.tensor([-0.3]))


# ---- through train_student.py ----------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_teacher_path(tmp_path_factory) -> str:
    from train_utils import digits_teacher
    return digits_teacher(tmp_path_factory)


def test_ctkd_run_trains_theta_and_resumes_it(digits_teacher_path, tmp_path, one_thread):
    import json

    from train_utils import load, only_run_dir

    argv = ["--path_t", digits_teacher_path, "--model_s", "resnet8", "--dataset", "digits",
            "--batch_size", "32", "--seed", "1", "--save_root", str(tmp_path), "--device", "cpu",
            "--distill", "kd", "--add", "kd", "-r", "0.1", "-a", "0.9", "-b", "0", "--ctkd", "global"]
    run_student([*argv, "--epochs", "1"])
    run_dir = only_run_dir(tmp_path / "student_model")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["ctkd"] == "global" and config["ctkd_cosine_epochs"] == 10 and "ctkd" in run_dir.name
    theta1 = load(run_dir / "resume.pth")["task_state"]["add"]["ctkd.global_t.global_T"]
    assert theta1.shape == (1,) and float(theta1) != 1.0  # lambda(1) < 0: it moved
    run_student([*argv, "--epochs", "2", "--resume"])
    theta2 = load(run_dir / "resume.pth")["task_state"]["add"]["ctkd.global_t.global_T"]
    assert float(theta2) != float(theta1)
