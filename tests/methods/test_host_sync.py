"""No host synchronisation inside a step that a CUDA graph would capture, proven on the CPU.

Every registered method (and every ``--distill``/``--add`` combination of the paper tables'
recipe files) runs one eager training step, built as ``train_student.py`` builds it, under a
dispatch mode that refuses the ops a CUDA stream would have to wait on the host for
(``helper/host_sync.py``). A method the graph plan would capture
(``graph_safe``) must pass; one that cannot is kept eager by the plan, which names it.
"""
from __future__ import annotations

import pytest
import torch

from distiller_zoo import METHODS
from distiller_zoo.pkt import PKT
from distiller_zoo.rkd import RKDLoss
from helper.graph_step import graph_plan
from helper.host_sync import Case, HostSyncError, RefuseHostSync, build_case, screen_step
from paper_tables.recipes import add_combinations

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
CASES = [Case(name) for name in METHODS.names()] + [Case(*combo) for combo in add_combinations()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_capturable_step_runs_without_the_host(tmp_path, case):
    built = build_case(case, CPU, str(tmp_path))
    planned, mode = graph_plan("auto", torch.device("cuda", 0), 1, False, built.objective)
    if built.objective.graph_safe:
        before = [p.detach().clone() for p in built.objective.student.parameters()]
        out = screen_step(built)
        assert torch.isfinite(out.loss)
        after = list(built.objective.student.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after))  # the update ran, screened
        assert planned, mode
    else:  # eager by plan, and the plan says which method keeps it so
        assert not planned and any(m in mode for m in case.name.split("+")), mode


def test_the_recipes_combinations_are_screened():
    names = {Case(*combo).name for combo in add_combinations()}
    assert {"crd+wttm", "itrd+wttm"} <= names


@pytest.mark.parametrize("op, why", [
    (lambda x: x.sum().item(), "item"),
    (lambda x: float(x.max()), "item"),
    (lambda x: x[x > 0].mean(), "boolean-mask"),
    (lambda x: x.nonzero(), "nonzero"),
    (lambda x: torch.masked_select(x, x > 0), "masked_select"),
    (lambda x: torch.unique(x), "unique"),
    (lambda x: x.masked_fill_(x > 0, 0) if bool((x > 0).any()) else x, "bool"),
    (lambda x: x.index_put_((x > 0,), torch.tensor(0.0)), "boolean-mask"),
])
def test_the_screen_refuses_what_waits_for_the_host(op, why):
    x = torch.randn(5, 4)
    with pytest.raises(HostSyncError, match=why):
        with RefuseHostSync():
            op(x)
    with RefuseHostSync():  # the device-side rewrites pass
        torch.where(x > 0, x, 0.0).sum() / (x > 0).sum()


def _reference_rkd(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RepDistiller's RKD (boolean-mask means, in-place diagonal), for comparison."""
    def pdist(e):
        sq = e.pow(2).sum(dim=1)
        res = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        res[range(len(e)), range(len(e))] = 0
        return res

    def angles(e):
        d = torch.nn.functional.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
        return torch.bmm(d, d.transpose(1, 2)).view(-1)
    with torch.no_grad():
        t_d = pdist(f_t)
        t_d = t_d / t_d[t_d > 0].mean()
        t_a = angles(f_t)
    d = pdist(f_s)
    d = d / d[d > 0].mean()
    return (25 * torch.nn.functional.smooth_l1_loss(d, t_d)
            + 50 * torch.nn.functional.smooth_l1_loss(angles(f_s), t_a))


def test_rkd_without_host_waits_keeps_the_reference_values_and_gradients():
    g = torch.Generator().manual_seed(3)
    f_t = torch.randn(6, 16, generator=g)
    f_s = torch.randn(6, 16, generator=g)
    f_s[2] = f_s[4]  # coincident rows: the clamp's gradient path
    a = f_s.clone().requires_grad_(True)
    b = f_s.clone().requires_grad_(True)
    ours, ref = RKDLoss()(a, f_t), _reference_rkd(b, f_t)
    ours.backward()
    ref.backward()
    assert torch.allclose(ours, ref, rtol=1e-6, atol=0)
    assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8)


def _reference_pkt(f_s: torch.Tensor, f_t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """RepDistiller's PKT with its in-place boolean-mask NaN → 0."""
    f_s = f_s / (f_s.pow(2).sum(1, keepdim=True).sqrt() + eps)
    f_s[f_s != f_s] = 0
    f_t = f_t / (f_t.pow(2).sum(1, keepdim=True).sqrt() + eps)
    f_t[f_t != f_t] = 0
    s = (f_s @ f_s.t() + 1) / 2
    t = (f_t @ f_t.t() + 1) / 2
    s, t = s / s.sum(1, keepdim=True), t / t.sum(1, keepdim=True)
    return (t * torch.log((t + eps) / (s + eps))).mean()


def test_pkt_without_host_waits_keeps_the_reference_values_and_gradients():
    g = torch.Generator().manual_seed(4)
    f_s, f_t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    f_s[1, 3] = float("inf")  # inf / inf → NaN after the normalisation: the zeroed entries
    a, b = f_s.clone().requires_grad_(True), f_s.clone().requires_grad_(True)
    ours, ref = PKT()(a, f_t), _reference_pkt(b, f_t)
    ours.backward()
    ref.backward()
    assert torch.isfinite(ours) and torch.equal(ours, ref)
    assert torch.equal(torch.nan_to_num(a.grad), torch.nan_to_num(b.grad))
