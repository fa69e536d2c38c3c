"""CRD's memory banks in a training step: no copy of a bank is kept for the backward, and the
gradients are those of the reference's formula against the banks as they were at the forward."""
from __future__ import annotations

import argparse

import pytest
import torch

from distiller_zoo.crd import CRDLoss

OPT = argparse.Namespace(s_dim=8, t_dim=6, feat_dim=4, nce_k=5, nce_t=0.07, nce_m=0.5, n_data=30)


def _batch(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(4, 8, generator=g, requires_grad=True)
    f_t = torch.randn(4, 6, generator=g, requires_grad=True)
    idx = torch.randperm(30, generator=g)[:4]
    contrast = torch.cat([idx[:, None], torch.randint(0, 30, (4, 5), generator=g)], 1)
    contrast[0, 1] = idx[1]  # a negative on a row this very step overwrites
    return f_s, f_t, idx, contrast


def _reference_loss(crit: CRDLoss, banks: tuple[torch.Tensor, torch.Tensor], f_s, f_t, idx, contrast):
    """CRD's two NCE losses written out, with the banks given (copies taken before the step)."""
    v1, v2 = crit.embed_s(f_s), crit.embed_t(f_t)
    T, z_v1, z_v2 = (float(x) for x in crit.contrast.params[1:4])
    out_v2 = torch.exp(torch.bmm(banks[0][contrast], v2.unsqueeze(2)) / T) / z_v2
    out_v1 = torch.exp(torch.bmm(banks[1][contrast], v1.unsqueeze(2)) / T) / z_v1
    return crit.criterion_s(out_v1) + crit.criterion_t(out_v2)


@pytest.mark.parametrize("steps", [3])
def test_a_step_keeps_no_bank_copy_and_its_gradients_are_exact(steps):
    torch.manual_seed(0)
    crit = CRDLoss(OPT)
    bank_numel = crit.contrast.memory_v1.numel()
    for step in range(steps):
        f_s, f_t, idx, contrast = _batch(step)
        banks = (crit.contrast.memory_v1.clone(), crit.contrast.memory_v2.clone())
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = crit(f_s, f_t, idx, contrast)
        assert bank_numel not in saved  # neither bank was copied for the backward
        assert not torch.equal(banks[0][idx], crit.contrast.memory_v1[idx])  # rows were updated
        loss.backward()
        grads = (f_s.grad.clone(), f_t.grad.clone())
        f_s.grad = f_t.grad = None
        _reference_loss(crit, banks, f_s, f_t, idx, contrast).backward()
        torch.testing.assert_close(grads, (f_s.grad, f_t.grad), rtol=1e-5, atol=1e-6)
        # the backward put the banks back as the forward's update left them
        assert not torch.equal(banks[1][idx], crit.contrast.memory_v2[idx])
