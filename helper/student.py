"""The student run: flags → validated config → teacher, data, objective, step → a trained student.

``train_student.py`` is ``train(argv)``; ``scripts/benchmark.py`` and the tests build the same
parts through :func:`helper.student_flags.parse_config`, :func:`build_objective` and
:func:`assemble_step`, so what they time or check is what training runs.

    loss = r·CE + a·ADD + b·MAIN        (ADD = --add, MAIN = --distill)
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

import models
from distiller_zoo import METHODS, Outputs
from errors import UserError
from helper import distributed, resume, teacher_cache
from helper.checkpoint import load_checkpoint
from helper.config import Config, given_flags, option_names, parse_with
from helper.distill import (DistillObjective, FrozenTeacher, build_teacher, describe_objective,
                            method_context, teacher_arch_from_path)
from helper.evaluate import evaluate
from helper.init_stage import run_init_stage
from helper.loop import Trainer
from helper.run import (check_data_fits, closed_on_failure, load_data, make_loaders, make_logbook,
                        open_run_dir, restore, seed_everything, train_and_report)
from helper.graph_step import GRAPH_EVENTS, GraphedStep, append_event, graph_plan, report_step_mode
from helper.speed import autocast, maybe_compile, memory_format
from helper.step import TrainStep
from helper.run_lock import RunLock
from helper.student_flags import (build_parser, default_run_name, legacy_run_name, resolve_config,
                                  unused_flags)
from helper.teacher_cache.class_means import class_means_for_run

@dataclass(frozen=True)
class TeacherFile:
    """A teacher checkpoint read once: its dict, path and SHA-256 (which identifies it)."""

    path: str
    checkpoint: dict[str, Any]
    sha256: str

    def arch(self, model_t: Optional[str]) -> str:
        """``--model_t``, else the checkpoint's ``'arch'``, else the folder name's architecture."""
        if model_t is not None and model_t not in models.model_dict:
            raise UserError(f"unknown teacher model {model_t!r}; choose from {', '.join(models.model_names())}")
        name = model_t or self.checkpoint.get("arch") or teacher_arch_from_path(self.path)
        if name not in models.model_dict:
            raise UserError(f"cannot tell the teacher's architecture from {self.path} (got {name!r}); "
                            f"pass --model_t")
        return name


def read_teacher(path: str) -> TeacherFile:
    """Loads a teacher checkpoint safely (``weights_only``) and hashes it."""
    checkpoint = load_checkpoint(path, "teacher checkpoint")
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return TeacherFile(path, checkpoint, digest.hexdigest())


def configure(argv: Optional[Sequence[str]], env: distributed.DistEnv) -> tuple[Config, TeacherFile, str]:
    """Parses the command line, reads the teacher and reconciles ``--resume`` with the saved run.

    Returns:
        The configuration, the teacher file and the run name (the folder under
        ``<save_root>/student_model``).

    Raises:
        UserError: a bad flag, an unreadable teacher, or a resume that would change the run.
    """
    parser = build_parser()
    flags = vars(parse_with(parser, argv))
    given = given_flags(parser, argv)
    teacher = read_teacher(flags["path_t"])

    def resolve(values: dict[str, Any], drawn_seed: Optional[int]) -> Config:
        cfg = resolve_config(values, env, teacher.arch(values["model_t"]), drawn_seed)
        return cfg.replace(teacher_sha256=teacher.sha256)

    cfg = resolve(flags, None)
    run_name = run_name_of(cfg)
    run_dir = os.path.join(cfg.save_root, "student_model", run_name)
    cfg = resume.reconcile(cfg, flags, given, run_dir, resolve, option_names(parser), unused_flags)
    return cfg, teacher, run_name


def run_name_of(cfg: Config) -> str:
    """``--run_name``, else the default name; with ``--resume``, a run started under the
    default name of earlier versions (``S:…_T:…``, before names were shell-safe) continues in
    its own folder when the current name's folder holds no run."""
    name = cfg.run_name or default_run_name(cfg)
    if cfg.run_name or not cfg.resume:
        return name
    root = os.path.join(cfg.save_root, "student_model")
    old = legacy_run_name(cfg)
    if (not os.path.exists(os.path.join(root, name, "config.json"))
            and os.path.exists(os.path.join(root, old, "config.json"))):
        return old
    return name


def build_method(name: str, ctx) -> nn.Module:
    """Builds a registered method; a pair it cannot be built for is a one-line UserError."""
    try:
        return METHODS.get(name)(ctx)
    except ValueError as err:  # connectors that cannot map these feature shapes
        raise UserError(f"{name} cannot be built for teacher {ctx.teacher_name} and student "
                        f"{ctx.student_name}: {err}") from None


def build_objective(cfg: Config, env: distributed.DistEnv, data, teacher: nn.Module) -> DistillObjective:
    """The student (``cfg.model_s``) and its methods, on ``env.device``."""
    student = models.create_model(cfg.model_s, data.num_classes).to(env.device)
    ctx = method_context(cfg, student, teacher, cfg.model_s, cfg.model_t, data.train_labels.to(env.device),
                         data.num_classes, env.device, data.image_size,
                         teacher_class_means=class_means_for_run(cfg, env, data, teacher))  # KD++
    main = build_method(cfg.distill, ctx).to(env.device)
    add = build_method(cfg.add, ctx).to(env.device) if cfg.add and cfg.alpha else None
    return DistillObjective(student, main, add, cfg.gamma, cfg.alpha, cfg.beta)


@dataclass
class Step:
    """What one training step runs.

    Attributes:
        student: the plain student (evaluated and checkpointed).
        teacher: the frozen teacher callable (compiled with ``--compile``), or the cached
            teacher that looks its logits up by view id.
        optimizer: SGD over the student's and the methods' trainable parameters.
        trainable: the module the loop calls: the objective, its student compiled when asked,
            DDP-wrapped on several ranks (the teacher stays outside DDP).
        run: the per-batch step the loop calls (eager, or replayed from a CUDA graph).
        mode: how ``run`` runs, for the run's header.
    """

    student: nn.Module
    teacher: Callable[..., Outputs]
    optimizer: torch.optim.Optimizer
    trainable: nn.Module
    run: TrainStep | GraphedStep
    mode: str


def assemble_step(cfg: Config, env: distributed.DistEnv, objective: DistillObjective,
                  teacher: nn.Module, fmt: torch.memory_format,
                  cached: Optional[teacher_cache.CachedTeacher] = None,
                  events_file: Optional[str] = None) -> Step:
    """The parts of one training step (``scripts/benchmark.py`` times exactly these); the
    step's teacher is ``cached`` when given, else the live frozen ``teacher``. A CUDA-graph
    step appends each fallback to ``events_file`` (a run's ``graph_events.jsonl``) when given."""
    teacher.to(memory_format=fmt)
    distributed.convert_sync_bn(objective, cfg.sync_bn, env)
    objective.student.to(memory_format=fmt)
    objective.freeze_untrained()  # before DDP: it registers what requires grad
    optimizer = torch.optim.SGD(objective.trainable_parameters(), lr=cfg.learning_rate,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    graphed, mode = graph_plan(cfg.cuda_graphs, env.device, env.world_size, cfg.compile, objective,
                               *([cached] if cached is not None else []))
    frozen = cached if cached is not None else FrozenTeacher(
        maybe_compile(teacher, cfg.compile, cfg.compile_mode), objective.feature_kind,
        lambda: autocast(env.device, cfg.precision, cache=not graphed))
    student = objective.student
    objective.student = maybe_compile(student, cfg.compile, cfg.compile_mode)
    trainable = distributed.wrap(objective, env)
    eager = TrainStep(trainable, frozen, optimizer, cfg.precision, fmt, cache_casts=not graphed)
    run = GraphedStep(eager, objective, batch_size=cfg.batch_size // env.world_size,
                      on_event=append_event(events_file) if events_file else None) if graphed else eager
    return Step(student, frozen, optimizer, trainable, run, mode)


def warn_if_plain_training(cfg: Config, objective: DistillObjective) -> None:
    """A run whose every distillation term has weight 0 says so on stderr."""
    if objective.use_main or objective.use_add:
        return
    print(f"warning: every distillation weight is 0 (--distill {cfg.distill} -b {cfg.beta:g}"
          f"{', --add ' + cfg.add + ' -a ' + format(cfg.alpha, 'g') if cfg.add else ''}): this run "
          f"trains the student with cross-entropy alone. To distil, give --distill METHOD with -b > 0 "
          f"or --add METHOD with -a > 0 (the seed's KD: --distill kd --add kd -r 0.1 -a 0.9 -b 0)",
          file=sys.stderr, flush=True)


def train(argv: Optional[Sequence[str]] = None) -> str:
    """Distils the student that ``argv`` describes; returns the path of its best checkpoint
    (or of its last one when no epoch beat 0 %)."""
    env = distributed.setup(parse_with(build_parser(), argv).device)
    cfg, teacher_file, run_name = configure(argv, env)
    run_dir = os.path.join(cfg.save_root, "student_model", run_name)
    with RunLock(run_dir, env.is_main):  # one process owns the run folder until the run ends
        return _train(cfg, env, teacher_file, run_name, run_dir)


def _train(cfg: Config, env: distributed.DistEnv, teacher_file: TeacherFile, run_name: str,
           run_dir: str) -> str:
    """The run itself, in the locked run folder ``run_dir``."""
    data = load_data(cfg, env)
    check_data_fits(cfg, data, (cfg.model_s, cfg.model_t))
    teacher = build_teacher(teacher_file.checkpoint, teacher_file.path, cfg.model_t, data.num_classes,
                            env.device)
    seed_everything(cfg.seed)
    fmt = memory_format(cfg.channels_last)
    objective = build_objective(cfg, env, data, teacher)
    formula = describe_objective(cfg.gamma, cfg.alpha, cfg.beta, cfg.distill,
                                 cfg.add if objective.use_add else None,
                                 getattr(objective.main, "main_is_zero", False), cfg)
    cache_plan = teacher_cache.plan(cfg, env, data, objective.feature_kind)
    train_loader, test_loader = make_loaders(cfg, env, data, fmt)
    with closed_on_failure(train_loader, test_loader):
        if cache_plan.use:
            train_loader = train_loader.reporting_views()
        teacher.to(memory_format=fmt)
        teacher_acc = evaluate(teacher, test_loader, cfg.precision, fmt, env)
        open_run_dir(cfg, env, run_dir, {"objective": formula, "teacher_test_acc": teacher_acc["acc1"],
                                         "teacher_cache_use": cache_plan.record()})
        if env.is_main:
            print(f"teacher {cfg.model_t} ({cfg.path_t}): test acc {teacher_acc['acc1']:.2f}", flush=True)
            print(f"student {cfg.model_s} on {cfg.dataset}, {env.device}, seed {cfg.seed}: {formula}", flush=True)
            print(f"run folder {run_dir}", flush=True)
            print(cache_plan.header_line(), flush=True)
            warn_if_plain_training(cfg, objective)
        cached = teacher_cache.teacher_for_run(cache_plan, env, data, teacher, fmt)
        step = assemble_step(cfg, env, objective, teacher, fmt, cached, os.path.join(run_dir, GRAPH_EVENTS))
        report_step_mode(cfg, env, step.mode)
        progress = restore(cfg, env, run_dir, cfg.model_s, step.student, step.optimizer, train_loader,
                           objective.load_task_state)
        fresh = progress.epoch == 0 and not os.path.exists(os.path.join(run_dir, "resume.pth"))
        text_log = os.path.join(cfg.save_root, "student_log", run_name + ".txt")
        trainer = Trainer(cfg, env, step.trainable, step.student, cfg.model_s, step.optimizer,
                          train_loader, test_loader, run_dir, make_logbook(env, run_dir, progress, text_log),
                          teacher=step.teacher, task_state=objective.task_state, memory_format=fmt,
                          step=step.run, step_mode=step.mode)
        if fresh:
            run_init_stage(objective.main.init_stage(), step.student, teacher, trainer)
            objective.freeze_untrained()  # what only the initialisation stage trains is frozen again
        return train_and_report(trainer, progress)
