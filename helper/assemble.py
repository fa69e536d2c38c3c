"""One way to assemble a run: a configuration, an environment, an objective and an optional
teacher become the training step and the :class:`~helper.loop.Trainer` that drives it.

Both entry scripts end here (``helper/student.py`` with a :class:`~helper.distill.DistillObjective`
and a teacher, ``helper/teacher_run.py`` with a :class:`ClassifierObjective` and none), and so
do the benchmark, the packing calibration and the tests: what they time or check is what
training runs. The objective protocol both objectives follow:

- ``student``: the network that is trained, evaluated and checkpointed;
- ``feature_kind``: what a teacher must compute for it (None: logits);
- ``freeze_untrained()``, ``named_trainable_parameters()``: what the optimiser updates;
- ``task_state()`` / ``load_task_state(state)``: method-owned state for the resume file;
- ``graph_safe``, ``graph_key(epoch)``: whether and when a CUDA-graph step is captured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from distiller_zoo import Outputs
from helper import distributed
from helper.config import Config
from helper.distill import FrozenTeacher
from helper.graph_step import GraphedStep, append_event, graph_plan, report_step_mode
from helper.logbook import Logbook
from helper.loop import Trainer
from helper.optim import LRSchedule, build_optimizer, no_decay_names, smoothed_cross_entropy
from helper.speed import autocast, maybe_compile
from helper.step import TrainStep


class ClassifierObjective(nn.Module):
    """Cross-entropy training of one network (the teacher recipe); returns the loop's
    ``{"loss", "logits", "terms"}`` dict for images ``[B, 3, H, W]`` and labels ``[B]`` (or
    mixed ``[B, K]`` targets), with label smoothing ``smoothing``."""

    feature_kind = None
    graph_safe = True

    def __init__(self, network: nn.Module, smoothing: float = 0.0) -> None:
        super().__init__()
        self.student = network
        self.smoothing = smoothing

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                epoch: int, teacher_out: Any = None) -> dict[str, Any]:
        logits = self.student(images)
        loss = smoothed_cross_entropy(logits.float(), labels, self.smoothing)
        return {"loss": loss, "logits": logits, "terms": {"ce": loss}}

    def freeze_untrained(self) -> None:
        """Nothing to freeze: every parameter of the network is trained."""

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(self.student.named_parameters())

    def task_state(self) -> dict[str, Any]:
        return {}

    def load_task_state(self, state: dict[str, Any]) -> None:
        """No method-owned state."""

    def graph_key(self, epoch: int) -> tuple:
        return ()


@dataclass
class Step:
    """What one training step runs.

    Attributes:
        student: the plain trained network (evaluated and checkpointed).
        teacher: the frozen teacher callable (compiled with ``--compile``), the cached teacher
            that looks its logits up by view id, or None (a teacher run).
        optimizer: over the network's and the methods' trainable parameters (``--opt``).
        trainable: the module the loop calls: the objective, its network compiled when asked,
            DDP-wrapped on several ranks (the teacher stays outside DDP).
        run: the per-batch step the loop calls (eager, or replayed from a CUDA graph).
        mode: how ``run`` runs, for the run's header.
    """

    student: nn.Module
    teacher: Optional[Callable[..., Outputs]]
    optimizer: torch.optim.Optimizer
    trainable: nn.Module
    run: TrainStep | GraphedStep
    mode: str


def assemble_step(cfg: Config, env: distributed.DistEnv, objective: nn.Module,
                  teacher: Optional[nn.Module], fmt: torch.memory_format,
                  cached: Optional[Any] = None, events_file: Optional[str] = None) -> Step:
    """The parts of one training step (the benchmark times exactly these).

    Args:
        objective: a :class:`~helper.distill.DistillObjective` or :class:`ClassifierObjective`.
        teacher: the live teacher network, or None for a teacher run.
        cached: the cached teacher (view id → logits) that replaces the live one, or None.
        events_file: where a CUDA-graph step appends each fallback (``graph_events.jsonl``).
    """
    if teacher is not None:
        teacher.to(memory_format=fmt)
    distributed.convert_sync_bn(objective, cfg.sync_bn, env)
    objective.student.to(memory_format=fmt)
    objective.freeze_untrained()  # before DDP: it registers what requires grad
    named = objective.named_trainable_parameters()
    optimizer = build_optimizer(cfg, named, no_decay_names(objective.student))
    schedule = LRSchedule.from_config(cfg)
    graphed, mode = graph_plan(cfg.cuda_graphs, env.device, env.world_size, cfg.compile, objective,
                               *([cached] if cached is not None else []),
                               recipe=recipe_blockers(cfg, schedule))
    frozen: Optional[Callable[..., Outputs]] = cached
    if cached is None and teacher is not None:
        frozen = FrozenTeacher(maybe_compile(teacher, cfg.compile, cfg.compile_mode), objective.feature_kind,
                               lambda: autocast(env.device, cfg.precision, cache=not graphed),
                               train_mode=bool(cfg.get("teacher_train_mode")))
    student = objective.student
    objective.student = maybe_compile(student, cfg.compile, cfg.compile_mode)
    trainable = distributed.wrap(objective, env)
    eager = TrainStep(trainable, frozen, optimizer, cfg.precision, fmt, cache_casts=not graphed,
                      clip_grad=cfg.get("clip_grad"), parameters=[p for _, p in named])
    run = GraphedStep(eager, objective, batch_size=cfg.batch_size // env.world_size,
                      on_event=append_event(events_file) if events_file else None) if graphed else eager
    return Step(student, frozen, optimizer, trainable, run, mode)


def recipe_blockers(cfg: Config, schedule: LRSchedule) -> list[str]:
    """Why the recipe keeps the step eager: AdamW keeps its step count on the host unless
    built capturable, and a per-iteration LR would force a capture per step."""
    out = []
    if cfg.get("opt", "sgd") != "sgd":
        out.append(f"--opt {cfg.opt}")
    if schedule.per_iteration:
        out.append("a per-iteration LR schedule")
    return out


def assemble(cfg: Config, env: distributed.DistEnv, objective: nn.Module, arch: str,
             loaders: tuple[Any, Any], run_dir: str, logbook: Optional[Logbook],
             fmt: torch.memory_format, teacher: Optional[nn.Module] = None,
             cached: Optional[Any] = None, events_file: Optional[str] = None) -> Trainer:
    """A ready :class:`~helper.loop.Trainer` for ``objective``: the step of
    :func:`assemble_step`, the run's loaders, folder, logbook and LR schedule; its mode is
    printed (rank 0)."""
    step = assemble_step(cfg, env, objective, teacher, fmt, cached, events_file)
    report_step_mode(cfg, env, step.mode)
    train_loader, test_loader = loaders
    return Trainer(cfg, env, step.trainable, step.student, arch, step.optimizer, train_loader, test_loader,
                   run_dir, logbook, step=step.run, schedule=LRSchedule.from_config(cfg),
                   task_state=objective.task_state, memory_format=fmt, step_mode=step.mode)


__all__ = ["ClassifierObjective", "Step", "assemble", "assemble_step"]
