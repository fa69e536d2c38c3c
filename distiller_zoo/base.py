"""The method interface: what a distillation method declares, owns and returns.

A method is one file in ``distiller_zoo/``: the reference loss class (kept as it is) plus a
small :class:`Distiller` subclass registered under its ``--distill``/``--add`` name. The
training loop only ever talks to :class:`Distiller`; it never asks which method it runs.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

FEATURE_KINDS = (None, "feat", "preact")


@dataclass
class Outputs:
    """A network's forward pass, by name instead of by position.

    Attributes:
        logits: ``[B, K]`` class scores.
        feats: ``None`` when not requested, else the contract list of the model's
            ``forward(x, is_feat=True, preact=...)``: per-stage maps ``[B, C, H, W]`` and,
            last, the pooled vector ``[B, D]`` that feeds the classifier.
        preact: whether ``feats`` came from a ``preact=True`` forward.
    """

    logits: torch.Tensor
    feats: Optional[list[torch.Tensor]] = None
    preact: bool = False

    @property
    def pooled(self) -> torch.Tensor:
        """The ``[B, D]`` pooled feature (the last entry of ``feats``)."""
        if self.feats is None:
            raise ValueError("features were not computed for this forward")
        return self.feats[-1]


@dataclass
class Batch:
    """What a method may read besides the two networks' outputs.

    Attributes:
        labels: ``[B]`` int64 class labels.
        index: ``[B]`` int64 positions of the samples in the training set.
        epoch: the current epoch, 1-based (0 during an initialisation stage).
    """

    labels: torch.Tensor
    index: torch.Tensor
    epoch: int


@dataclass
class MethodContext:
    """Everything a method may need when it builds its own parts.

    Attributes:
        cfg: the validated run configuration (attribute access, read-only); method flags
            such as ``kd_T``, ``ttm_l``, ``nce_k`` are read from it.
        student_shapes: shapes of the student's ``feats`` for a batch of 2 (``feat`` kind).
        teacher_shapes: the same for the teacher.
        student_preact_shapes / teacher_preact_shapes: shapes of the ``preact=True`` features.
        n_data: number of training samples (memory-bank rows).
        train_labels: ``[n_data]`` int64 labels of the training set, on ``device``.
        num_classes: number of classes.
        student: the student network (for methods whose initialisation stage trains some
            of its modules, via ``get_feat_modules()``).
        teacher: the frozen teacher network (read-only; never trained).
        device: where the method's parts and samplers live.
        student_name / teacher_name: architecture names (e.g. for per-pair defaults).
    """

    cfg: Any
    student_shapes: list[torch.Size]
    teacher_shapes: list[torch.Size]
    student_preact_shapes: list[torch.Size]
    teacher_preact_shapes: list[torch.Size]
    n_data: int
    train_labels: torch.Tensor
    num_classes: int
    student: nn.Module
    teacher: nn.Module
    device: torch.device
    student_name: str = ""
    teacher_name: str = ""


@dataclass
class InitStage:
    """An initialisation stage run before the main training (AB, FT and FSP in RepDistiller).

    The loop trains ``parameters`` alone with SGD (``lr``, the run's momentum and weight
    decay) for ``epochs`` epochs, minimising ``loss(student_out, teacher_out, batch)``. The
    student is kept in eval mode when ``student_train_mode`` is False, as the reference does.

    Attributes:
        epochs: number of epochs of the stage.
        lr: learning rate of the stage's SGD.
        parameters: the tensors the stage trains (connectors, paraphraser, student modules).
        loss: maps the two networks' outputs (features of ``feature_kind``) to a 0-d loss.
        feature_kind: ``"feat"`` or ``"preact"``, the features ``loss`` reads.
        modules: the modules that are put in train mode during the stage.
        student_train_mode: whether the student itself is in train mode during the stage.
    """

    epochs: int
    lr: float
    parameters: list[nn.Parameter]
    loss: Callable[[Outputs, Outputs, Batch], torch.Tensor]
    feature_kind: str = "feat"
    modules: Sequence[nn.Module] = field(default_factory=list)
    student_train_mode: bool = False


class Distiller(nn.Module):
    """Base class of a registered method.

    Subclasses set the class attributes below, build their own trainable parts in
    ``__init__(ctx)`` and implement ``forward``. They return the *unweighted* loss; the
    loop applies ``-a``/``-b``.

    Class attributes:
        name: the ``--distill``/``--add`` name (set by :func:`register`).
        feature_kind: ``None`` (logits only), ``"feat"`` or ``"preact"``: which features the
            method reads from both networks.
        logit_only: True when the method may be used as ``--add``.
        default_weight: the ``-b`` used when the flag is not given (the reference scripts').
        paper: one-line citation shown in ``--help`` and the README.
        main_is_zero: True when the method contributes a literal zero as ``--distill`` (the
            seed's ``kd``, whose KD term comes only through ``--add kd``); the loop honours it.
    """

    name: ClassVar[str] = ""
    feature_kind: ClassVar[Optional[str]] = None
    logit_only: ClassVar[bool] = False
    default_weight: ClassVar[float] = 1.0
    paper: ClassVar[str] = ""
    main_is_zero: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Adds the method's own flags (one argument group) to the parser; optional."""

    @classmethod
    def default_weight_for(cls, teacher: str, student: str) -> float:
        """The ``-b`` used when not given; per-pair methods (DKD) override this."""
        return cls.default_weight

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch
                ) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """Returns one unweighted 0-d loss, or a dict of named 0-d parts that sum to it."""
        raise NotImplementedError

    def init_stage(self) -> Optional[InitStage]:
        """The method's initialisation stage, or None (the default) when it has none."""
        return None

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the main-stage optimiser updates; defaults to all of the method's own.

        Parameters a method owns but does not train in the main stage (FT's paraphraser)
        are left out here; the loop freezes them.
        """
        return self.parameters()


def total_loss(parts: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Sums a method's output to one 0-d tensor (accepts ``[1]``-shaped parts)."""
    if isinstance(parts, Mapping):
        values = list(parts.values())
        out = values[0].reshape(())
        for v in values[1:]:
            out = out + v.reshape(())
        return out
    return parts.reshape(())


def sum_list(losses: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sums a reference per-layer loss list (``Attention``, ``FSP``, ...) to a 0-d tensor."""
    out = losses[0].reshape(())
    for v in losses[1:]:
        out = out + v.reshape(())
    return out


class _Registry:
    """Name → Distiller subclass; fills argparse choices and the tests."""

    def __init__(self) -> None:
        self._methods: dict[str, type[Distiller]] = {}

    def register(self, name: str) -> Callable[[type[Distiller]], type[Distiller]]:
        def deco(cls: type[Distiller]) -> type[Distiller]:
            if name in self._methods:
                raise ValueError(f"distillation method {name!r} registered twice")
            if cls.feature_kind not in FEATURE_KINDS:
                raise ValueError(f"{name}: feature_kind must be one of {FEATURE_KINDS}")
            cls.name = name
            self._methods[name] = cls
            return cls
        return deco

    def get(self, name: str) -> type[Distiller]:
        try:
            return self._methods[name]
        except KeyError:
            raise KeyError(f"unknown distillation method {name!r}; "
                           f"choose from {', '.join(sorted(self._methods))}") from None

    def names(self, logit_only: bool = False) -> list[str]:
        return [n for n, c in self._methods.items() if c.logit_only or not logit_only]

    def items(self) -> list[tuple[str, type[Distiller]]]:
        return list(self._methods.items())


METHODS = _Registry()
register = METHODS.register
