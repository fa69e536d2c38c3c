"""Every registered method through the real plumbing, one batch, no data set.

For each method of ``distiller_zoo.METHODS`` and a same-architecture (resnet14 → resnet8) and
a cross-architecture (resnet14 → MobileNetV2) pair: the method built from a
:func:`helper.distill.method_context`, wrapped in a :class:`helper.distill.DistillObjective`,
the teacher run through :class:`helper.distill.FrozenTeacher`. One forward/backward with the
method as the *only* loss term (CE weight 0), so the gradients checked are the method's own.
Init stages run through :func:`helper.init_stage.run_init_stage`. Registry round-trip and the
default weights of the issue close the file.
"""
from __future__ import annotations

import contextlib
import math
import types
from collections import Counter

import pytest
import torch

import models
from distiller_zoo import METHODS, Batch, Distiller, InitStage
from distiller_zoo.base import _Registry, total_loss
from helper import distributed
from helper.distill import (DistillObjective, FrozenTeacher, method_context, resolve_weights,
                            student_outputs)
from errors import UserError
from helper.init_stage import run_init_stage
from helper.student_flags import build_parser, parse_config
from paper_tables.recipes import load_cells

NAMES = METHODS.names()
LOGIT_ONLY = METHODS.names(logit_only=True)
REFERENCE_NAMES = {"kd", "hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt",
                   "abound", "factor", "fsp", "nst", "crd", "itrd", "dist", "dkd", "ttm", "wttm",
                   "nkd", "vitkd", "srrl", "reviewkd", "kdpp"}
TEACHER = "resnet14"
PAIRS = {"same": ("resnet14", "resnet8"), "cross": ("resnet14", "MobileNetV2")}
# Pairs a method cannot be built for by construction: FSP needs equal channel counts stage by
# stage, AB one connector per teacher stage (MobileNetV2 has one stage more than a CIFAR ResNet).
UNBUILDABLE = {("fsp", "cross"): "FSP needs student and teacher stages of equal channel",
               ("abound", "cross"): "student shapes but",
               # ReviewKD pairs level by level: MobileNetV2 has one stage more than a CIFAR ResNet.
               ("reviewkd", "cross"): "must have as many",
               # ViTKD reads transformer tokens; its ViT pairs: test_methods_nkd_vitkd.py
               ("vitkd", "same"): "vitkd needs vision-transformer features",
               ("vitkd", "cross"): "vitkd needs vision-transformer features"}
NUM_CLASSES, N_DATA, BATCH = 10, 64, 8
CPU = torch.device("cpu")
ENV = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=CPU)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_cfg(tmp_path, name: str, student: str, *extra: str):
    """The validated config a student run would build for these flags (teacher resnet14)."""
    argv = ["--path_t", "unused.pth", "--model_s", student, "--distill", name, "--dataset", "digits",
            "--save_root", str(tmp_path / "save"), "--seed", "1", "--nce_k", "16",
            "--init_epochs", "1", *extra]
    return parse_config(argv, ENV, TEACHER)


class Setup:
    """A fresh student/teacher pair, the context, one batch and the teacher's outputs."""

    def __init__(self, tmp_path, name: str, pair: str, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.t_name, self.s_name = PAIRS[pair]
        self.cfg = make_cfg(tmp_path, name, self.s_name)
        self.student = models.create_model(self.s_name, NUM_CLASSES)
        # Left with requires_grad=True on purpose: only FrozenTeacher may keep gradients away.
        self.teacher = models.create_model(self.t_name, NUM_CLASSES)
        self.teacher_state = {k: v.clone() for k, v in self.teacher.state_dict().items()}
        self.train_labels = torch.arange(N_DATA) % NUM_CLASSES
        # KD++ reads the teacher's class-mean embeddings (computed from the data in a run)
        means = (torch.randn(NUM_CLASSES, models.feature_shapes(self.teacher, 32)[-1][1])
                 if METHODS.get(name).needs_class_means else None)
        self.ctx = method_context(self.cfg, self.student, self.teacher, self.s_name, self.t_name,
                                  self.train_labels, NUM_CLASSES, CPU, teacher_class_means=means)
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(BATCH, 3, 32, 32, generator=g)
        self.index = torch.randperm(N_DATA, generator=g)[:BATCH]
        self.labels = self.train_labels[self.index]

    def teacher_out(self, feature_kind):
        self.teacher.train()  # FrozenTeacher must pin eval mode whatever the caller did
        out = FrozenTeacher(self.teacher, feature_kind, contextlib.nullcontext)(self.images)
        assert not self.teacher.training
        return out

    def assert_teacher_untouched(self, objective) -> None:
        assert all(p.grad is None for p in self.teacher.parameters())
        teacher_ids = {id(p) for p in self.teacher.parameters()}
        assert not teacher_ids & {id(p) for p in objective.parameters()}
        for key, value in self.teacher.state_dict().items():  # weights and BN statistics
            assert torch.equal(value, self.teacher_state[key]), key


def first_param(model: torch.nn.Module) -> torch.nn.Parameter:
    """The stem convolution's weight: every loss on any feature or the logits reaches it."""
    return next(model.parameters())


def check_objective(setup: Setup, objective: DistillObjective, method: Distiller, term: str,
                    weight: float) -> None:
    objective.freeze_untrained()
    trainable = objective.trainable_parameters()
    own = {id(p) for p in method.trainable_parameters()}
    assert {id(p) for p in trainable} == {id(p) for p in setup.student.parameters()} | own
    out = objective(setup.images, setup.labels, setup.index, 1, setup.teacher_out(objective.feature_kind))
    loss = out["loss"]
    assert loss.dim() == 0 and torch.isfinite(loss), out["terms"]
    assert set(out["terms"]) == {"ce", term}
    assert torch.allclose(loss, weight * out["terms"][term])
    assert out["logits"].shape == (BATCH, NUM_CLASSES)
    loss.backward()

    # the student is trained by the method's loss alone (CE has weight 0)
    grad = first_param(setup.student).grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    for p in setup.student.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    # every parameter the method trains gets a gradient; what it owns but does not train, none
    for p in method.trainable_parameters():
        assert p.requires_grad and p.grad is not None and torch.isfinite(p.grad).all()
    for p in method.parameters():
        if id(p) not in own:
            assert not p.requires_grad and p.grad is None
    setup.assert_teacher_untouched(objective)


# ---- every method as --distill --------------------------------------------------------

@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", NAMES)
def test_method_as_main_term(tmp_path, name, pair):
    setup = Setup(tmp_path, name, pair)
    cls = METHODS.get(name)
    if (name, pair) in UNBUILDABLE:
        with pytest.raises((UserError, ValueError), match=UNBUILDABLE[name, pair]):
            cls(setup.ctx)
        return
    method = cls(setup.ctx)
    assert method.name == name
    objective = DistillObjective(setup.student, method, None, gamma=0.0, alpha=0.0, beta=1.0)
    if method.main_is_zero:
        # the seed's literal-zero main term (KD: its term comes through --add; AB and FSP: their
        # init stage): the objective leaves it out altogether
        assert not objective.use_main
        if not cls.logit_only:  # AB and FSP: the main-stage loss itself is a literal 0
            s_out = student_outputs(setup.student, setup.images, cls.feature_kind)
            value = method(s_out, setup.teacher_out(cls.feature_kind), Batch(setup.labels, setup.index, 1))
            assert total_loss(value).item() == 0.0
        out = objective(setup.images, setup.labels, setup.index, 1, setup.teacher_out(None))
        assert set(out["terms"]) == {"ce"}
        return
    assert objective.feature_kind == cls.feature_kind
    check_objective(setup, objective, method, f"main_{name}", weight=1.0)


@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("name", LOGIT_ONLY)
def test_logit_method_as_add_term(tmp_path, name, pair):
    setup = Setup(tmp_path, "kd", pair)
    add = METHODS.get(name)(setup.ctx)
    main = METHODS.get("kd")(setup.ctx)  # the seed's default main: a literal zero
    objective = DistillObjective(setup.student, main, add, gamma=0.0, alpha=0.7, beta=1.0)
    assert objective.use_add and not objective.use_main and objective.feature_kind is None
    check_objective(setup, objective, add, f"add_{name}", weight=0.7)


@pytest.mark.parametrize("combo", [("crd", "wttm"), ("itrd", "wttm")])
def test_paper_combinations_sum_both_terms(tmp_path, combo):
    main_name, add_name = combo
    setup = Setup(tmp_path, main_name, "cross")
    main = METHODS.get(main_name)(setup.ctx)
    add = METHODS.get(add_name)(setup.ctx)
    objective = DistillObjective(setup.student, main, add, gamma=1.0, alpha=1.0, beta=0.8)
    objective.freeze_untrained()
    out = objective(setup.images, setup.labels, setup.index, 1, setup.teacher_out(objective.feature_kind))
    terms = out["terms"]
    assert set(terms) == {"ce", f"add_{add_name}", f"main_{main_name}"}
    expected = terms["ce"] + 1.0 * terms[f"add_{add_name}"] + 0.8 * terms[f"main_{main_name}"]
    assert torch.allclose(out["loss"], expected) and torch.isfinite(out["loss"])
    out["loss"].backward()
    for p in main.trainable_parameters():
        assert p.grad is not None
    setup.assert_teacher_untouched(objective)


def test_zero_weight_skips_the_method(tmp_path):
    setup = Setup(tmp_path, "hint", "same")
    method = METHODS.get("hint")(setup.ctx)
    objective = DistillObjective(setup.student, method, None, gamma=1.0, alpha=0.0, beta=0.0)
    assert not objective.use_main and objective.feature_kind is None
    # a method that does not run is not trained (no weight decay on its connector either)
    objective.freeze_untrained()
    assert {id(p) for p in objective.trainable_parameters()} == {id(p) for p in setup.student.parameters()}
    assert all(not p.requires_grad for p in method.parameters())


def test_incompatible_feature_kinds_are_refused(tmp_path):
    setup = Setup(tmp_path, "itrd", "same")
    main = METHODS.get("itrd")(setup.ctx)  # pre-activation features
    add = METHODS.get("kd")(setup.ctx)
    DistillObjective(setup.student, main, add, 1.0, 1.0, 1.0)  # logits mix with anything
    with pytest.raises(UserError, match="different feature kinds"):
        DistillObjective(setup.student, METHODS.get("hint")(setup.ctx), main, 1.0, 1.0, 1.0)


def test_frozen_teacher_outputs_carry_no_graph(tmp_path):
    setup = Setup(tmp_path, "hint", "same")
    out = setup.teacher_out("feat")
    assert out.logits.shape == (BATCH, NUM_CLASSES) and not out.preact
    for t in [out.logits, *out.feats]:
        assert not t.requires_grad and t.grad_fn is None and t.dtype == torch.float32
    pre = setup.teacher_out("preact")
    assert pre.preact and len(pre.feats) == len(out.feats)
    assert not torch.equal(pre.feats[1], out.feats[1])  # pre-activation maps differ (ReLU)


# ---- initialisation stages --------------------------------------------------------------

def init_stage_names(tmp_path) -> list[str]:
    names = []
    for name in NAMES:
        if (name, "same") in UNBUILDABLE:
            continue
        setup = Setup(tmp_path, name, "same")
        if METHODS.get(name)(setup.ctx).init_stage() is not None:
            names.append(name)
    return names


def test_init_stage_methods_are_ab_ft_fsp(tmp_path):
    assert init_stage_names(tmp_path) == sorted({"abound", "factor", "fsp"}, key=NAMES.index)


class StageTrainer(types.SimpleNamespace):
    """What run_init_stage reads of a Trainer: config, device, loader, checkpointing."""

    def save_resume(self, progress) -> None:
        self.saved.append(progress.epoch)


@pytest.mark.parametrize("name, pair", [(n, p) for n in ("abound", "factor", "fsp") for p in PAIRS
                                        if (n, p) not in UNBUILDABLE])
def test_init_stage_trains_what_it_declares(tmp_path, name, pair):
    setup = Setup(tmp_path, name, pair)
    method = METHODS.get(name)(setup.ctx)
    objective = DistillObjective(setup.student, method, None, 1.0, 0.0, 50.0)
    objective.freeze_untrained()  # as the run does before the stage
    stage = method.init_stage()
    assert isinstance(stage, InitStage) and stage.epochs == setup.cfg.init_epochs == 1
    assert stage.feature_kind == ("preact" if name == "abound" else "feat")
    declared = {id(p) for p in stage.parameters}
    assert declared and len(declared) == len(stage.parameters)

    # the stage's loss depends on every parameter it declares
    s_out = student_outputs(setup.student, setup.images, stage.feature_kind)
    for p in stage.parameters:
        p.requires_grad_(True)
    loss = stage.loss(s_out, setup.teacher_out(stage.feature_kind), None)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    with_grad = [p for p in stage.parameters if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= len(stage.parameters) // 2, "the stage loss ignores what it trains"
    for p in list(stage.parameters) + list(setup.student.parameters()):
        p.grad = None

    everything = {**{f"student.{k}": p for k, p in setup.student.named_parameters()},
                  **{f"method.{k}": p for k, p in method.named_parameters()}}
    before = {k: p.detach().clone() for k, p in everything.items()}
    batches = [(setup.images, setup.labels, setup.index)] * 2
    trainer = StageTrainer(cfg=setup.cfg, env=ENV, train_loader=batches, saved=[],
                           memory_format=torch.contiguous_format,
                           optimizer=torch.optim.SGD(objective.trainable_parameters(), lr=0.1))
    setup.student.train()
    run_init_stage(stage, setup.student, setup.teacher, trainer)

    assert trainer.saved == [0]  # an epoch-0 resume checkpoint right after the stage
    assert setup.student.training  # the student's mode is restored
    changed = {k for k, p in everything.items() if not torch.equal(p.detach(), before[k])}
    declared_names = {k for k, p in everything.items() if id(p) in declared}
    assert changed <= declared_names, f"trained outside its declaration: {sorted(changed - declared_names)}"
    with_grad_ids = {id(p) for p in with_grad}
    assert {k for k, p in everything.items() if id(p) in with_grad_ids} <= changed
    setup.assert_teacher_untouched(objective)
    # after the stage the main-stage objective trains only the method's main-stage parameters
    objective.freeze_untrained()
    main_ids = {id(p) for p in method.trainable_parameters()}
    for p in method.parameters():
        assert p.requires_grad == (id(p) in main_ids)


def test_init_stage_with_zero_epochs_does_nothing(tmp_path):
    setup = Setup(tmp_path, "factor", "same")
    stage = METHODS.get("factor")(setup.ctx).init_stage()
    stage.epochs = 0
    trainer = StageTrainer(cfg=setup.cfg, env=ENV, train_loader=[], saved=[])
    run_init_stage(stage, setup.student, setup.teacher, trainer)
    run_init_stage(None, setup.student, setup.teacher, trainer)
    assert trainer.saved == []


# ---- registry -----------------------------------------------------------------------------

def test_registry_holds_the_reference_names():
    assert set(NAMES) == REFERENCE_NAMES and len(NAMES) == len(REFERENCE_NAMES)
    for name, cls in METHODS.items():
        assert issubclass(cls, Distiller) and cls.name == name and METHODS.get(name) is cls
        assert cls.paper, f"{name} has no citation"


def test_logit_only_methods_are_exactly_the_logit_losses():
    assert set(LOGIT_ONLY) == {"kd", "ttm", "wttm", "dist", "dkd", "nkd"}
    for name in LOGIT_ONLY:
        assert METHODS.get(name).feature_kind is None


def test_unknown_method_is_a_keyerror_listing_the_choices():
    with pytest.raises(KeyError) as info:
        METHODS.get("nope")
    message = str(info.value)
    assert "unknown distillation method 'nope'" in message
    assert all(name in message for name in NAMES)


def test_registering_twice_or_a_bad_feature_kind_fails():
    registry = _Registry()

    @registry.register("mine")
    class Mine(Distiller):
        pass

    assert registry.names() == ["mine"] and Mine.name == "mine"
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("mine")(type("Again", (Distiller,), {}))
    with pytest.raises(ValueError, match="feature_kind"):
        registry.register("odd")(type("Odd", (Distiller,), {"feature_kind": "pixels"}))
    assert registry.names() == ["mine"]


def test_cli_choices_come_from_the_registry():
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions}
    assert list(actions["distill"].choices) == NAMES
    assert list(actions["add"].choices) == LOGIT_ONLY + ["none"]


def test_total_loss_sums_named_parts():
    parts = {"a": torch.tensor(1.5), "b": torch.tensor([2.0])}
    assert total_loss(parts).item() == 3.5 and total_loss(parts).dim() == 0
    assert total_loss(torch.tensor([4.0])).dim() == 0


# ---- default weights (unset -b) -----------------------------------------------------------

def most_common_b(method: str) -> float:
    values = [dict(c.hparams)["b"] for c in load_cells() if c.method == method and c.runnable]
    return Counter(values).most_common(1)[0][0]


@pytest.mark.parametrize("name, weight", [
    ("hint", 100), ("attention", 1000), ("similarity", 3000), ("correlation", 0.02), ("vid", 1),
    ("rkd", 1), ("pkt", 30000), ("abound", 1), ("factor", 200), ("fsp", 50), ("nst", 50),
    ("crd", 0.8), ("itrd", 1), ("dist", 1), ("dkd", 1),
    ("ttm", most_common_b("TTM")), ("wttm", most_common_b("WTTM")),
])
def test_default_beta(tmp_path, name, weight):
    cfg = make_cfg(tmp_path, name, "resnet8")
    gamma, alpha, beta = resolve_weights(cfg, "resnet32x4", "resnet8x4")
    assert (gamma, alpha) == (1.0, 0.0) and math.isclose(beta, weight)
    given = make_cfg(tmp_path, name, "resnet8", "-b", "7", "-a", "0.5", "-r", "0.25")
    assert resolve_weights(given, "resnet32x4", "resnet8x4") == (0.25, 0.5, 7.0)


def test_ab_main_stage_runs_the_references_preact_student_forward(tmp_path):
    """RepDistiller runs the main stage's student forward with ``preact=True`` for AB although
    the AB term is 0; on a WRN student that forward passes three maps through batch norms a
    second time, which moves their running statistics. The objective does the same."""
    torch.manual_seed(0)
    cfg = make_cfg(tmp_path, "abound", "wrn_16_1")
    student = models.create_model("wrn_16_1", NUM_CLASSES)
    teacher = models.create_model("wrn_40_1", NUM_CLASSES)
    ctx = method_context(cfg, student, teacher, "wrn_16_1", "wrn_40_1", torch.arange(N_DATA) % NUM_CLASSES,
                         NUM_CLASSES, CPU)
    objective = DistillObjective(student, METHODS.get("abound")(ctx), None, 1.0, 0.0, 1.0)
    assert objective.feature_kind is None and objective.student_kind == "preact"
    images = torch.randn(BATCH, 3, 32, 32)
    labels = torch.arange(BATCH) % NUM_CLASSES
    twin = models.create_model("wrn_16_1", NUM_CLASSES)
    twin.load_state_dict(student.state_dict())
    plain = models.create_model("wrn_16_1", NUM_CLASSES)
    plain.load_state_dict(student.state_dict())
    objective.train()
    objective(images, labels, labels, 1, FrozenTeacher(teacher, None, contextlib.nullcontext)(images))
    twin.train()(images, is_feat=True, preact=True)
    plain.train()(images)
    for i, bn in enumerate(student.get_bn_before_relu()):
        assert torch.equal(bn.running_mean, twin.get_bn_before_relu()[i].running_mean)
        assert not torch.equal(bn.running_mean, plain.get_bn_before_relu()[i].running_mean)
