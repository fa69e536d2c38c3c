"""The student run: flags → validated config → teacher, data, objective, step → a trained student.

``train_student.py`` is ``train(argv)``; the run is assembled by :func:`helper.assemble.assemble`,
as every run is. The benchmark and the tests build the same parts through
:func:`helper.student_flags.parse_config`, :func:`build_objective` and
:func:`helper.assemble.assemble_step`, so what they time or check is what training runs.

    loss = r·CE + a·ADD + b·MAIN        (ADD = --add, MAIN = --distill)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from torch import nn

import models
from dataset import Data
from distiller_zoo import METHODS
from errors import UserError
from helper import distributed, resume, teacher_cache
from helper.assemble import assemble
from helper.checkpoint import file_sha256, load_checkpoint
from helper.cli import OneLineParser
from helper.config import Config
from helper.data_setup import check_data_fits, closed_on_failure, load_data, make_loaders
from helper.distill import DistillObjective, build_teacher, describe_objective, method_context, teacher_arch_from_path
from helper.evaluate import evaluate
from helper.graph_step import GRAPH_EVENTS
from helper.init_stage import run_init_stage
from helper.optim import description
from helper.run_folder import (make_logbook, open_run_dir, progress_of, read_resume, seed_everything,
                               train_and_report)
from helper.run_lock import RunLock
from helper.speed import memory_format
from helper.student_flags import build_parser, default_run_name, legacy_run_name, resolve_config, unused_flags
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
    return TeacherFile(path, checkpoint, file_sha256(path))


def configure(flags: dict[str, Any], given: set[str], env: distributed.DistEnv,
              parser: OneLineParser) -> tuple[Config, TeacherFile, str]:
    """Validates the parsed flags (``given``: those typed), reads the teacher and reconciles
    ``--resume`` with the saved run.

    Returns:
        The configuration, the teacher file and the run name (the folder under
        ``<save_root>/student_model``).

    Raises:
        UserError: a bad flag, an unreadable teacher, or a resume that would change the run.
    """
    teacher = read_teacher(flags["path_t"])

    def resolve(values: dict[str, Any], drawn_seed: Optional[int]) -> Config:
        cfg = resolve_config(values, env, teacher.arch(values["model_t"]), drawn_seed)
        return cfg.replace(teacher_sha256=teacher.sha256)

    cfg = resolve(flags, None)
    run_name = run_name_of(cfg)
    run_dir = os.path.join(cfg.save_root, "student_model", run_name)
    cfg = resume.reconcile(cfg, flags, given, run_dir, resolve, parser.option_names(), unused_flags)
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
    try:
        student = models.create_model(cfg.model_s, data.num_classes, cfg.get("drop_path", 0.0)).to(env.device)
    except ValueError as err:
        raise UserError(f"--drop_path: {err}") from None
    ctx = method_context(cfg, student, teacher, cfg.model_s, cfg.model_t, data.train_labels.to(env.device),
                         data.num_classes, env.device, data.image_size,
                         teacher_class_means=class_means_for_run(cfg, env, data, teacher))  # KD++
    main = build_method(cfg.distill, ctx).to(env.device)
    add = build_method(cfg.add, ctx).to(env.device) if cfg.add and cfg.alpha else None
    return DistillObjective(student, main, add, cfg.gamma, cfg.alpha, cfg.beta, cfg.get("smoothing", 0.0))


def warn_if_plain_training(cfg: Config, objective: DistillObjective) -> None:
    """A run whose every distillation term has weight 0 says so on stderr."""
    if objective.use_main or objective.use_add:
        return
    print(f"warning: every distillation weight is 0 (--distill {cfg.distill} -b {cfg.beta:g}"
          f"{', --add ' + cfg.add + ' -a ' + format(cfg.alpha, 'g') if cfg.add else ''}): this run "
          f"trains the student with cross-entropy alone. To distil, give --distill METHOD with -b > 0 "
          f"or --add METHOD with -a > 0 (the seed's KD: --distill kd --add kd -r 0.1 -a 0.9 -b 0)",
          file=sys.stderr, flush=True)


def train(argv: Optional[Sequence[str]] = None, data: Optional[Data] = None) -> str:
    """Distils the student that ``argv`` describes (on ``data`` when given, else the flags'
    data set); returns the path of its best checkpoint (or of its last one when no epoch
    beat 0 %)."""
    parser = build_parser()
    flags, given = parser.parse(argv)
    env = distributed.setup(flags["device"])
    cfg, teacher_file, run_name = configure(flags, given, env, parser)
    run_dir = os.path.join(cfg.save_root, "student_model", run_name)
    with RunLock(run_dir, env.is_main):  # one process owns the run folder until the run ends
        return _train(cfg, env, teacher_file, run_name, run_dir, data)


def _train(cfg: Config, env: distributed.DistEnv, teacher_file: TeacherFile, run_name: str,
           run_dir: str, data: Optional[Data]) -> str:
    """The run itself, in the locked run folder ``run_dir``."""
    data = load_data(cfg, env, data)
    check_data_fits(cfg, data, (cfg.model_s, cfg.model_t))
    teacher = build_teacher(teacher_file.checkpoint, teacher_file.path, cfg.model_t, data.num_classes,
                            env.device, cfg.get("teacher_drop_path", 0.0))
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
            print(f"optimiser: {description(cfg)}", flush=True)
            print(f"run folder {run_dir}", flush=True)
            print(cache_plan.header_line(), flush=True)
            warn_if_plain_training(cfg, objective)
        cached = teacher_cache.teacher_for_run(cache_plan, env, data, teacher, fmt)
        state = read_resume(cfg, env, run_dir, cfg.model_s)
        progress = progress_of(state)
        text_log = os.path.join(cfg.save_root, "student_log", run_name + ".txt")
        trainer = assemble(cfg, env, objective, cfg.model_s, (train_loader, test_loader), run_dir,
                           make_logbook(env, run_dir, progress, text_log), fmt, teacher=teacher, cached=cached,
                           events_file=os.path.join(run_dir, GRAPH_EVENTS))
        if state is not None:
            trainer.restore(state, objective.load_task_state)
        else:  # a fresh run: the method's initialisation stage first
            run_init_stage(objective.main.init_stage(), trainer.model, teacher, trainer)
            objective.freeze_untrained()  # what only the initialisation stage trains is frozen again
        return train_and_report(trainer, progress)
