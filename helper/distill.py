"""Distillation plumbing: the frozen teacher, the methods, and the combined objective.

``loss = r·CE + a·ADD + b·MAIN``: ADD is the ``--add`` logit method, MAIN the
``--distill`` method. This module never asks which method runs; it reads what each
method declares (feature kind, trainable parameters, initialisation stage).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import torch
from torch import nn

import models
from distiller_zoo import METHODS, Batch, Distiller, MethodContext, Outputs
from distiller_zoo.base import total_loss
from helper.checkpoint import load_weights, model_state_of
from helper.optim import hard_labels, smoothed_cross_entropy
from errors import UserError


def teacher_arch_from_path(path: str) -> str:
    """The architecture encoded in a teacher's folder name, as the reference reads it.

    ``save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth`` → ``wrn_40_2``;
    ``save/models/resnet32x4_cifar100_lr_0.05_.../resnet32x4_best.pth`` → ``resnet32x4``.
    """
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    known = [name for name in models.model_dict if folder == name or folder.startswith(name + "_")]
    if known:  # the longest registered name the folder starts with (wrn_40_2, mobilenet_v1)
        return max(known, key=len)
    segments = folder.split("_")
    return "_".join(segments[:3]) if segments[0] == "wrn" else segments[0]


def build_teacher(checkpoint: dict[str, Any], path: str, arch: str, num_classes: int,
                  device: torch.device, drop_path_rate: float = 0.0) -> nn.Module:
    """Builds ``arch`` and loads a teacher checkpoint into it strictly, frozen.

    Args:
        checkpoint: the loaded file: ``{'model': state_dict, ...}`` or a bare state dict
            (torchvision's files).
        path: where it came from, for messages.
        arch: the architecture it must hold.
        num_classes: classes of the data set (must match the checkpoint's classifier).
        device: where the teacher runs.
        drop_path_rate: the teacher's stochastic depth (active only with ``--teacher_train_mode``).

    Returns:
        The teacher in eval mode with ``requires_grad`` off.
    """
    try:
        teacher = models.create_model(arch, num_classes, drop_path_rate)
    except ValueError as err:
        raise UserError(f"--teacher_drop_path: {err}") from None
    load_weights(teacher, model_state_of(checkpoint, path, arch), arch, path)
    return teacher.to(device).eval().requires_grad_(False)


class FrozenTeacher:
    """Runs the teacher under ``inference_mode`` in eval mode; not an ``nn.Module`` on
    purpose, so that no optimiser, DDP wrapper or ``.train()`` call can reach it.

    ``train_mode`` (``--teacher_train_mode``) runs it in train mode instead, as cls_KD does
    (its distiller never puts the teacher back into eval mode): dropout and drop path act,
    and a BatchNorm teacher would normalise with batch statistics. It is still never trained.
    """

    def __init__(self, model: nn.Module, feature_kind: Optional[str], autocast_ctx,
                 train_mode: bool = False) -> None:
        self.train_mode = train_mode
        self.model = model.train(train_mode)
        self.feature_kind = feature_kind
        self.autocast_ctx = autocast_ctx

    def __call__(self, images: torch.Tensor, views: Optional[torch.Tensor] = None) -> Outputs:
        """The teacher's outputs for ``images [B, 3, H, W]`` (``views``, the loader's view ids,
        are not needed by a live teacher)."""
        self.model.train(self.train_mode)
        with torch.inference_mode(), self.autocast_ctx():
            if self.feature_kind is None:
                logits, feats = self.model(images), None
            else:
                feats, logits = self.model(images, is_feat=True, preact=self.feature_kind == "preact")
        # inference tensors cannot be saved for backward; one clone (fp32) lifts that
        return Outputs(logits.float().clone(),
                       None if feats is None else [f.float().clone() for f in feats],
                       self.feature_kind == "preact")


def student_outputs(student: nn.Module, images: torch.Tensor, feature_kind: Optional[str]) -> Outputs:
    """The student's forward, with features only when a method reads them (fp32 out)."""
    if feature_kind is None:
        return Outputs(student(images).float())
    feats, logits = student(images, is_feat=True, preact=feature_kind == "preact")
    return Outputs(logits.float(), [f.float() for f in feats], feature_kind == "preact")


def common_feature_kind(methods: list[Distiller]) -> Optional[str]:
    """The one feature kind the methods need (``None``, ``feat`` or ``preact``)."""
    kinds = {m.feature_kind for m in methods if m.feature_kind is not None}
    if len(kinds) > 1:
        raise UserError(f"methods need different feature kinds {sorted(kinds)}; combine compatible ones")
    return kinds.pop() if kinds else None


def method_context(cfg: Any, student: nn.Module, teacher: nn.Module, student_name: str,
                   teacher_name: str, train_labels: torch.Tensor, num_classes: int,
                   device: torch.device, image_size: int = 32,
                   teacher_class_means: Optional[torch.Tensor] = None) -> MethodContext:
    """Probes both networks' feature shapes once (batch of 2 at ``image_size`` pixels) and
    packs the context (``teacher_class_means``: KD++'s ``[K, D]``, when a method needs them)."""
    def shapes(model: nn.Module, preact: bool) -> list[torch.Size]:
        return models.feature_shapes(model, image_size, preact=preact)

    return MethodContext(
        cfg=cfg,
        student_shapes=shapes(student, False), teacher_shapes=shapes(teacher, False),
        student_preact_shapes=shapes(student, True), teacher_preact_shapes=shapes(teacher, True),
        n_data=int(train_labels.numel()), train_labels=train_labels, num_classes=num_classes,
        student=student, teacher=teacher, device=device,
        student_name=student_name, teacher_name=teacher_name,
        teacher_class_means=teacher_class_means)


class DistillObjective(nn.Module):
    """The trainable module: the student plus the methods' own parts.

    ``forward(images, labels, index, epoch, teacher_out)`` returns ``{"loss": 0-d,
    "logits": [B, K], "terms": {"ce", "add_<name>", "main_<name>": 0-d unweighted}}``.
    Losses are computed in fp32 outside autocast; methods with weight 0 are skipped.

    ``feature_kind`` is what the methods in use read from the teacher (which computes only
    that) and, by default, from the student; the student's forward is the main method's
    ``student_forward`` when it sets one: the forward the reference runs even when the method
    adds no term (AB), or a student kind that differs from the teacher's (ReviewKD on CIFAR).
    """

    def __init__(self, student: nn.Module, main: Distiller, add: Optional[Distiller],
                 gamma: float, alpha: float, beta: float, smoothing: float = 0.0) -> None:
        super().__init__()
        self.student = student
        self.smoothing = smoothing  # label smoothing of the CE term (--smoothing)
        self.main = main
        self.add = add
        self.weights = (gamma, alpha, beta)
        self.use_main = beta != 0 and not getattr(main, "main_is_zero", False)
        self.use_add = add is not None and alpha != 0
        used = [m for m, on in ((main, self.use_main), (add, self.use_add)) if on]
        self.feature_kind = common_feature_kind(used)
        self.student_kind = main.student_forward or self.feature_kind

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                epoch: int, teacher_out: Outputs) -> dict[str, Any]:
        gamma, alpha, beta = self.weights
        s = student_outputs(self.student, images, self.student_kind)
        with torch.autocast(device_type=images.device.type, enabled=False):
            batch = Batch(labels=hard_labels(labels), index=index, epoch=epoch)
            ce = smoothed_cross_entropy(s.logits, labels, self.smoothing)
            terms = {"ce": ce}
            loss = gamma * ce
            if self.use_add:
                value = total_loss(self.add(s, teacher_out, batch))
                terms[f"add_{self.add.name}"] = value
                loss = loss + alpha * value
            if self.use_main:
                value = total_loss(self.main(s, teacher_out, batch))
                terms[f"main_{self.main.name}"] = value
                loss = loss + beta * value
        return {"loss": loss, "logits": s.logits, "terms": terms}

    @property
    def graph_safe(self) -> bool:
        """Whether every method in use can be replayed from a CUDA graph."""
        return all(m.graph_safe for m, on in ((self.main, self.use_main), (self.add, self.use_add)) if on)

    @property
    def graph_unsafe_reason(self) -> str:
        used = [m for m, on in ((self.main, self.use_main), (self.add, self.use_add)) if on]
        return ", ".join(f"--distill/--add {m.name}" for m in used if not m.graph_safe)

    def graph_key(self, epoch: int) -> tuple:
        """What the methods in use read of ``epoch`` (see :meth:`Distiller.graph_key`)."""
        return tuple(m.graph_key(epoch) for m, on in ((self.main, self.use_main),
                                                      (self.add, self.use_add)) if on)

    def freeze_untrained(self) -> None:
        """Turns ``requires_grad`` off for every method parameter the main stage does not
        train (methods with weight 0, FT's paraphraser, AB's connectors) and on for the rest."""
        for method, used in ((self.main, self.use_main), (self.add, self.use_add)):
            if method is None:
                continue
            mine = {id(p) for p in method.trainable_parameters()} if used else set()
            for p in method.parameters():
                p.requires_grad_(id(p) in mine)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The student's parameters, then the methods' that require grad (after
        :meth:`freeze_untrained`): what the optimiser updates."""
        return [p for _, p in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of :meth:`trainable_parameters`; the student's names are its
        own (``cls_token``, ``blocks.0.norm1.weight``), the methods' are prefixed ``main.``/``add.``."""
        named = list(self.student.named_parameters())
        for prefix, m in (("main", self.main), ("add", self.add)):
            if m is not None:
                named += [(f"{prefix}.{n}", p) for n, p in m.named_parameters() if p.requires_grad]
        return named

    def task_state(self) -> dict[str, Any]:
        """Method-owned state (memory banks, connectors, samplers) for the resume file."""
        state = {"main": self.main.state_dict()}
        if self.add is not None:
            state["add"] = self.add.state_dict()
        return state

    def load_task_state(self, state: dict[str, Any]) -> None:
        if "main" in state:
            self.main.load_state_dict(state["main"])
        if self.add is not None and "add" in state:
            self.add.load_state_dict(state["add"])


def resolve_weights(cfg: Any, teacher: str, student: str) -> tuple[float, float, float]:
    """``(r, a, b)``: unset ``-a`` is 0; unset ``-b`` is the main method's usual weight."""
    main_cls = METHODS.get(cfg.distill)
    alpha = 0.0 if cfg.alpha is None else cfg.alpha
    beta = main_cls.default_weight_for(teacher, student) if cfg.beta is None else cfg.beta
    return float(cfg.gamma), float(alpha), float(beta)


def describe_objective(gamma: float, alpha: float, beta: float, distill: str, add: Optional[str],
                       main_is_zero: bool, cfg: Optional[Mapping[str, Any]] = None) -> str:
    """The resolved formula printed at start and saved as ``objective`` in ``config.json``.

    With ``cfg`` (the run's configuration), every term in use lists the values of its
    method's own flags (the method's ``flags``, by the name the command line uses; unset
    ones, None, act on nothing and are left out), e.g.
    ``loss = 1·CE + 0.9·kd(add, kd_T=4) + 1·dkd(dkd_alpha=1, dkd_beta=8, dkd_T=4, dkd_warmup=20)``.
    A term of weight 0 contributes nothing and lists nothing.
    """
    main = f"{_number(beta)}·{distill}{_settings(distill, cfg if beta and not main_is_zero else None)}"
    if main_is_zero:
        main += f" (a literal 0: --distill {distill} adds no main-stage term)"
    add_part = f" + {_number(alpha)}·{add}{_settings(add, cfg if alpha else None, 'add')}" if add else ""
    return f"loss = {_number(gamma)}·CE{add_part} + {main}"


def _settings(method: str, cfg: Optional[Mapping[str, Any]], role: str = "") -> str:
    """``(role, flag=value, ...)`` of a method's own flags in ``cfg``; ``(role)`` or '' without."""
    values = [] if cfg is None else [f"{f.dest}={_number(cfg[f.dest])}" for f in METHODS.get(method).flags
                                     if cfg.get(f.dest) is not None]  # None: unset, does not act
    items = ([role] if role else []) + values
    return f"({', '.join(items)})" if items else ""


def _number(value: Any) -> str:
    """A number in its shortest exact spelling (``1.0`` → ``1``, ``0.1`` → ``0.1``); other
    values as they print."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
