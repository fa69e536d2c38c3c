"""Parity with the reference implementations (numbers in tests/data/golden_public.json).

One test per model (``model/<name>``) and per loss or helper-module case
(``loss/<Class>/<set>/<case>``, ``module/<Class>/<set>/<case>``); see tests/parity.py for the
procedure. A missing model or class fails; only cases marked ``optional`` (KDSVD) are skipped
when their class does not exist. The ``test_harness_*`` tests check the harness itself (that it
accepts a correct loss, rejects a wrong one, fills weights as specified) without importing the
project's packages.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parity

GOLDEN = parity.load_golden()
CASES = parity.case_list(GOLDEN)


def _verdict_or_fail(run, optional=False):
    """Run a check; a missing target fails the test (or skips it, for an optional case)."""
    try:
        return run()
    except parity.Missing as e:
        why, absent = str(e), e.absent
    if optional and absent:
        pytest.skip(f"optional case: {why}")
    pytest.fail(f"missing: {why}", pytrace=False)


@pytest.mark.parametrize("name", list(GOLDEN["models"]), ids=lambda n: f"model/{n}")
def test_model(name):
    v = _verdict_or_fail(lambda: parity.check_model(name, GOLDEN))
    for note in v.notes:
        warnings.warn(f"model/{name}: {note}")
    if not v.ok:
        pytest.fail(v.message(f"model/{name}"), pytrace=False)


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[cid for cid, _ in CASES])
def test_case(case, request):
    v = _verdict_or_fail(lambda: parity.check_case(case, GOLDEN), optional=bool(case.get("optional")))
    if not v.ok:
        pytest.fail(v.message(request.node.callspec.id), pytrace=False)


# ----------------------------------------------------------------------------- harness self-tests
def _case(case_id):
    return next(c for cid, c in CASES if cid == case_id)


class GoodKL(nn.Module):
    """KL distillation loss written from its definition: KL(p_t || p_s) * T^2 / B."""

    def __init__(self, T):
        super().__init__()
        self.T = T

    def forward(self, y_s, y_t):
        log_ps = F.log_softmax(y_s / self.T, dim=1)
        pt = F.softmax(y_t / self.T, dim=1)
        return (pt * (pt.log() - log_ps)).sum() * self.T ** 2 / y_s.shape[0]


class KLWithoutTSquared(GoodKL):
    def forward(self, y_s, y_t):
        return super().forward(y_s, y_t) / self.T ** 2


class Embed(nn.Module):
    """A flatten + linear embedding, the shape of the reference helper LinearEmbed."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("case_id", ["loss/DistillKL/public/a", "loss/DistillKL/public/b"])
def test_harness_accepts_correct_kl(case_id):
    v = parity.check_case(_case(case_id), GOLDEN, target=GoodKL)
    assert v.ok, v.message(case_id)
    assert v.worst < 1e-5


def test_harness_rejects_kl_without_t_squared():
    case_id = "loss/DistillKL/public/a"   # T = 4 (case b has T = 1, where T**2 changes nothing)
    v = parity.check_case(_case(case_id), GOLDEN, target=KLWithoutTSquared)
    assert not v.ok
    assert any(p.startswith("output:") for p in v.problems), v.problems
    assert any(p.startswith("grad y_s") for p in v.problems), v.problems
    assert v.worst > 0.5


def test_harness_fill_objective_and_param_grads():
    """Name-seeded fill + train/eval calls + 'wsum' objective + parameter gradients, end to end."""
    v = parity.check_case(_case("module/LinearEmbed/public/a"), GOLDEN, target=Embed)
    assert v.ok, v.message("LinearEmbed")


def test_harness_rejects_a_missing_bias():
    class NoBias(Embed):
        def __init__(self, dim_in=1024, dim_out=128):
            super().__init__(dim_in, dim_out)
            self.linear = nn.Linear(dim_in, dim_out, bias=False)

    with pytest.raises(ValueError, match="linear.bias"):
        parity.check_case(_case("module/LinearEmbed/public/a"), GOLDEN, target=NoBias)


def test_harness_fill_rule_by_hand():
    # fc.weight: randn((3, 2), seed crc32('fc.weight')) * 2**-0.5 (fan_in 2); running_var: 0.5 + rand;
    # running_mean: 0.1 * randn; 1-d weight: 1 + 0.1 * randn; 1-d bias: 0.1 * randn
    t = torch.zeros(3, 2)
    assert parity.fill_value("fc.weight", t).reshape(-1).tolist() == pytest.approx(
        [0.2194621, -0.1402916, 0.1393126, -0.7240484, 1.0729954, -0.5688782], abs=1e-6)
    assert parity.fill_value("bn1.running_var", torch.zeros(3)).tolist() == pytest.approx(
        [1.361655, 0.7934747, 0.6678929], abs=1e-6)
    assert parity.fill_value("bn1.running_mean", torch.zeros(2)).tolist() == pytest.approx(
        [0.0693425, -0.0864856], abs=1e-6)
    assert parity.fill_value("bn1.weight", torch.zeros(2)).tolist() == pytest.approx(
        [0.9260945, 0.8816339], abs=1e-6)
    assert parity.fill_value("bn1.bias", torch.zeros(2)).tolist() == pytest.approx(
        [-0.0888585, -0.1188948], abs=1e-6)
    assert parity.fill_value("bn1.num_batches_tracked", torch.tensor(0)) is None
    assert parity.fill_value("log_scale", torch.zeros(4)) is None


def test_harness_summary_catches_a_permutation():
    x = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    ref = parity.summarize(x)
    v = parity.Verdict(1e-4)
    v.summary("x", parity.summarize(x.flip(1)), ref)   # same sum/abs_sum/norm, other order
    assert not v.ok and "x " in v.problems[0]
    v = parity.Verdict(1e-4)
    v.summary("x", parity.summarize(x * (1 + 1e-6)), ref)
    assert v.ok and v.worst < 1e-5


def test_harness_module_paths():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Sequential(nn.ReLU(), nn.Conv2d(8, 4, 1)))
    desc = parity.describe_modules(net, [net[1], net[2][1], nn.ReLU()])
    assert [d["path"] for d in desc] == ["1", "2.1", None]
    assert desc[0]["num_features"] == 8 and desc[0]["num_params"] == 16
    assert (desc[1]["in_channels"], desc[1]["out_channels"], desc[1]["num_params"]) == (8, 4, 36)


class _Reverse(torch.autograd.Function):
    """Identity forward; the backward multiplies the upstream gradient by ``lambda_``."""

    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return ctx.lambda_ * grad, None


class LearnedTemperature(nn.Module):
    """CTKD's global temperature written from its description (PARITY.md section 10.2)."""

    def __init__(self):
        super().__init__()
        self.global_T = nn.Parameter(torch.ones(1))

    def forward(self, a, b, lambda_):
        return _Reverse.apply(self.global_T, lambda_)


class ForwardReverse(LearnedTemperature):
    def forward(self, a, b, lambda_):
        return _Reverse.apply(self.global_T, -lambda_)


@pytest.mark.parametrize("case_id", ["module/Global_T/public/a", "module/Global_T/public/ctkd"])
def test_harness_ctkd_objective(case_id):
    """The 'ctkd_kd' objective and per-call arguments reproduce the reference gradients; the
    other sign convention of the reversal is caught."""
    v = parity.check_case(_case(case_id), GOLDEN, target=LearnedTemperature)
    assert v.ok, v.message(case_id)
    assert not parity.check_case(_case(case_id), GOLDEN, target=ForwardReverse).ok


class NormDirection(nn.Module):
    """KD++'s ND loss from its formula: mean over i of 1 - <s_i, c_y/|c_y|> / max(|s_i|, |t_i|)."""

    def __init__(self, num_class=1000, nd_loss_factor=1.0):
        super().__init__()
        self.factor = nd_loss_factor

    def forward(self, s_emb, t_emb, T_EMB, labels):
        centers = torch.tensor([T_EMB[str(i)] for i in range(len(T_EMB))])
        c = centers[labels]
        c = c / c.norm(dim=1, keepdim=True)
        scale = torch.maximum(s_emb.norm(dim=1), t_emb.norm(dim=1))
        return self.factor * (1 - (s_emb * c).sum(1) / scale).mean()


def test_harness_class_means_argument():
    case_id = "loss/DirectNormLoss/public/b"
    v = parity.check_case(_case(case_id), GOLDEN, target=NormDirection)
    assert v.ok, v.message(case_id)


def test_harness_fills_layer_scale_like_a_weight():
    g = parity.fill_value("blocks.0.ls1.gamma", torch.zeros(3))
    w = parity.fill_value("blocks.0.ls1.weight", torch.zeros(3))
    assert g is not None and (g - 1).abs().max() < 0.5 and not torch.equal(g, w)
