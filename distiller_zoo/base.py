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


@dataclass(frozen=True)
class Flag:
    """A command-line flag a method owns: how it is parsed, its default and its valid range.

    The method reads the value as ``ctx.cfg.<dest>``. A flag several methods read (``--feat_dim``,
    ``--init_epochs``) is one shared :class:`Flag` object listed by each of them.

    Attributes:
        name: the option, e.g. ``"--nce_k"``.
        type: converts the command-line text (``int``, ``float``, ``str``).
        default: the value when the flag is not given (None: the method resolves it).
        help: one line for ``--help`` (the default is appended there).
        choices: the allowed values, when they are a short list.
        minimum: inclusive lower bound.
        above: exclusive lower bound.
        below: exclusive upper bound.
    """

    name: str
    type: Callable[[str], Any] = float
    default: Any = None
    help: str = ""
    choices: Optional[tuple[Any, ...]] = None
    minimum: Optional[float] = None
    above: Optional[float] = None
    below: Optional[float] = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-")

    def check(self, value: Any) -> None:
        """Raises ValueError naming the flag when ``value`` is outside its range."""
        if value is None:
            return
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {value}")
        if isinstance(value, (int, float)):
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"{self.name} must be a finite number, got {value}")
            rules = [(self.minimum, lambda v, b: v >= b, ">="), (self.above, lambda v, b: v > b, ">"),
                     (self.below, lambda v, b: v < b, "<")]
            for bound, ok, sign in rules:
                if bound is not None and not ok(value, bound):
                    raise ValueError(f"{self.name} must be {sign} {bound:g}, got {value}")

    def add_to(self, group: Any) -> None:
        """Adds the flag to an argparse parser or argument group."""
        group.add_argument(self.name, type=self.type, default=self.default, help=self.help,
                           choices=self.choices)


FEAT_DIM = Flag("--feat_dim", int, 128, "embedding size of CRD and CC", minimum=1)
INIT_EPOCHS = Flag("--init_epochs", int, 30, "epochs of the initialisation stage of AB, FT and FSP",
                   minimum=0)


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
        teacher_class_means: ``[K, D]`` float32 mean of the teacher's pooled feature per class
            over the training set, on ``device``; filled only when a method in use sets
            ``needs_class_means`` (KD++), else None.
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
    teacher_class_means: Optional[torch.Tensor] = None


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
        student_forward: the student forward the reference runs in the main stage even when
            the method adds no term there (AB: ``"preact"``; on WRN students that forward
            passes three feature maps through batch norms a second time, which moves their
            running statistics), or the student's feature kind when it differs from the
            teacher's ``feature_kind`` (ReviewKD on CIFAR: post-ReLU student maps against the
            teacher's pre-activation ones). None: the student's forward is ``feature_kind``.
        flags: the command-line flags the method reads (see :class:`Flag`).
        graph_safe: False when the method's forward cannot be replayed from a CUDA graph
            (host synchronisation, its own random generator, collective communication); runs
            using it stay eager.
        needs_class_means: True when the method reads ``ctx.teacher_class_means`` (KD++); the
            assembly computes them once per teacher and data set, before the method is built.
    """

    name: ClassVar[str] = ""
    feature_kind: ClassVar[Optional[str]] = None
    logit_only: ClassVar[bool] = False
    default_weight: ClassVar[float] = 1.0
    paper: ClassVar[str] = ""
    main_is_zero: ClassVar[bool] = False
    student_forward: ClassVar[Optional[str]] = None
    flags: ClassVar[tuple[Flag, ...]] = ()
    graph_safe: ClassVar[bool] = True
    needs_class_means: ClassVar[bool] = False

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__()

    @classmethod
    def validate(cls, cfg: Mapping[str, Any]) -> None:
        """Checks the method's flags in ``cfg`` (called when the flags are parsed, before any
        data or teacher is loaded); raises ValueError naming the flag. Methods with rules that
        tie several flags together extend this."""
        for flag in cls.flags:
            flag.check(cfg.get(flag.dest))

    @classmethod
    def resolve(cls, cfg: Mapping[str, Any], teacher: str, student: str) -> dict[str, Any]:
        """Values of the method's flags that depend on the teacher→student pair, for flags
        left unset (DKD's β); they are written into the run's config. Default: none."""
        return {}

    @classmethod
    def default_weight_for(cls, teacher: str, student: str) -> float:
        """The ``-b`` used when not given; per-pair methods (DKD) override this."""
        return cls.default_weight

    def forward(self, student: Outputs, teacher: Outputs, batch: Batch
                ) -> torch.Tensor | Mapping[str, torch.Tensor]:
        """Returns one unweighted 0-d loss, or a dict of named 0-d parts that sum to it."""
        raise NotImplementedError

    def graph_key(self, epoch: int) -> Any:
        """What of ``epoch`` the forward depends on (None: nothing). A captured step is
        captured again when this changes (DKD's warm-up factor)."""
        return None

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

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Adds every method's flags: one group per method, and one group for the flags that
        several methods share (each flag once)."""
        users: dict[str, list[str]] = {}
        flags: dict[str, Flag] = {}
        for name, cls in self._methods.items():
            for flag in cls.flags:
                if flags.setdefault(flag.name, flag) != flag:
                    raise ValueError(f"{name} declares {flag.name} differently from "
                                     f"{', '.join(users[flag.name])}")
                users.setdefault(flag.name, []).append(name)
        shared = [f for f in flags.values() if len(users[f.name]) > 1]
        if shared:
            group = parser.add_argument_group("flags several methods share")
            for flag in shared:
                flag.add_to(group)
        for name, cls in self._methods.items():
            own = [f for f in cls.flags if len(users[f.name]) == 1]
            if own:
                group = parser.add_argument_group(f"{name} (--distill {name})")
                for flag in own:
                    flag.add_to(group)


METHODS = _Registry()
register = METHODS.register
