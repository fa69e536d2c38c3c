"""The recipe flags of both entry scripts (helper/optim.py, helper/augment_flags.py): the
optimiser and its no-decay groups, the per-iteration warm-up + cosine schedule against
mmengine's formulas written out here, clipping, label smoothing, and their validation."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import models
from errors import UserError
from helper.common_flags import derive_common
from helper.config import Config
from helper.optim import (LRSchedule, build_optimizer, clip_gradients, hard_labels, no_decay_names,
                          smoothed_cross_entropy)
from helper.teacher_run import build_parser

pytestmark = pytest.mark.usefixtures("one_thread")


def derive(tmp_path, *flags: str) -> dict:
    values, _ = build_parser().parse(["--save_root", str(tmp_path / "save"), *flags])
    return derive_common(values, "resnet8")


def test_deit_schedule_follows_linear_warmup_then_cosine_per_iteration():
    """cls_KD's DeiT schedule: LinearLR(start 1e-3) over 20 epochs, CosineAnnealingLR to 1e-5
    over the other 280, both by iteration (mmengine: factor start + (1 - start) * t / T;
    eta_min + (base - eta_min) * (1 + cos(pi * t / T)) / 2)."""
    steps, base = 7, 1e-3
    s = LRSchedule(base=base, kind="cosine", epochs=300, warmup_epochs=20, warmup_factor=1e-3, min_lr=1e-5)
    assert s.per_iteration
    assert s.at(1, 0, steps) == pytest.approx(base * 1e-3)
    t = 10 * steps + 3  # within the warm-up
    assert s.at(11, 3, steps) == pytest.approx(base * (1e-3 + (1 - 1e-3) * t / (20 * steps)))
    assert s.at(21, 0, steps) == pytest.approx(base)  # the warm-up ends at the peak
    t, span = 150 * steps + 5 - 20 * steps, 280 * steps
    assert s.at(151, 5, steps) == pytest.approx(1e-5 + (base - 1e-5) * (1 + math.cos(math.pi * t / span)) / 2)
    assert s.at(300, steps - 1, steps) == pytest.approx(1e-5, rel=1e-3)
    rates = [s.at(e, i, steps) for e in range(21, 301) for i in range(steps)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # the cosine only falls


def test_step_schedule_is_set_per_epoch():
    s = LRSchedule(base=0.1, milestones=(30, 60, 90), rate=0.1, epochs=100)
    assert not s.per_iteration
    assert [s.at(e, 5, 10) for e in (1, 30, 31, 61, 91)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 1e-4])


def test_adamw_skips_decay_on_norms_biases_and_tokens(tmp_path):
    cfg = Config(derive(tmp_path, "--opt", "adamw", "--weight_decay", "0.05", "--learning_rate", "1e-3",
                        "--wd_skip", "norm_bias_tokens"))
    net = models.create_model("deit_tiny_patch16_224", 10)
    opt = build_optimizer(cfg, list(net.named_parameters()), no_decay_names(net))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
    decay, plain = opt.param_groups
    names = {id(p): n for n, p in net.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert decay["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "head.bias"} <= plain_names
    assert all(p.ndim >= 2 for p in decay["params"]) and "pos_embed" not in {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(plain["params"]) == len(list(net.parameters()))


def test_sgd_recipe_is_unchanged(tmp_path):
    cfg = Config(derive(tmp_path))
    net = nn.Linear(3, 2)
    opt = build_optimizer(cfg, list(net.named_parameters()), set())
    assert isinstance(opt, torch.optim.SGD) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 5e-4)


def test_clipping_bounds_the_global_norm_and_leaves_small_gradients():
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(4))
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    clip_gradients([a, b], 5.0)
    assert torch.cat([a.grad, b.grad]).norm().item() == pytest.approx(5.0, rel=1e-5)
    a.grad = torch.full((3,), 0.1)
    b.grad = torch.zeros(4)
    clip_gradients([a, b], 5.0)
    assert torch.equal(a.grad, torch.full((3,), 0.1))


def test_label_smoothing_and_mixed_targets():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    smooth = 0.1 * torch.ones(4, 5) / 5 + 0.9 * torch.nn.functional.one_hot(labels, 5)
    expected = -(smooth * torch.log_softmax(logits, 1)).sum(1).mean()
    assert smoothed_cross_entropy(logits, labels, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    # mixed targets carry their own smoothing: used as they are
    assert smoothed_cross_entropy(logits, smooth, 0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(hard_labels(smooth), labels)


@pytest.mark.parametrize("flags, message", [
    (("--opt_betas", "0.9"), "--opt_betas"),
    (("--smoothing", "1.0"), "--smoothing"),
    (("--clip_grad", "0"), "--clip_grad"),
    (("--warmup_epochs", "300"), "--warmup_epochs"),
    (("--aa", "rand-m9-mstd0.5-inc1"), "image-folder data"),
    (("--mixup", "0.8"), "image-folder data"),
    (("--drop_path", "1.5"), "--drop_path"),
])
def test_recipe_flags_are_validated_in_one_line(tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        derive(tmp_path, *flags)


def test_imagenet_accepts_the_deit_augmentations(tmp_path):
    values = derive(tmp_path, "--dataset", "imagenet", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
                    "--train_interpolation", "bicubic", "--eval_interpolation", "bicubic")
    assert values["aa"] == "rand-m9-mstd0.5-inc1" and values["reprob"] == 0.25
    with pytest.raises(UserError, match="RandAugment"):  # timm's other policies are not built here
        derive(tmp_path, "--dataset", "imagenet", "--aa", "augmix-m5-w4")
