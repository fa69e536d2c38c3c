"""The student run: flags → validated config → teacher, data, objective, step → a trained student.

``train_student.py`` is ``train(argv)``; ``scripts/benchmark.py`` and the tests build the same
parts through :func:`parse_config`, :func:`build_objective` and :func:`assemble_step`, so what
they time or check is what training runs.

    loss = r·CE + a·ADD + b·MAIN        (ADD = --add, MAIN = --distill)
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

import models
from distiller_zoo import METHODS, Distiller, Outputs
from errors import UserError
from helper import distributed, resume, teacher_cache
from helper.checkpoint import load_checkpoint
from helper.config import (Config, OneLineParser, add_common_arguments, derive_common, given_flags,
                           option_names, parse_with)
from helper.distill import (DistillObjective, FrozenTeacher, build_teacher, describe_objective,
                            method_context, resolve_weights, teacher_arch_from_path)
from helper.evaluate import evaluate
from helper.init_stage import run_init_stage
from helper.loop import Trainer
from helper.run import (check_data_fits, closed_on_failure, load_data, make_loaders, make_logbook,
                        open_run_dir, restore, seed_everything, train_and_report)
from helper.graph_step import GraphedStep, graph_plan, report_step_mode
from helper.speed import autocast, maybe_compile, memory_format
from helper.step import TrainStep

# Short names the seed code's run names use for the flags it puts there.
NAME_KEYS = {"ttm_l": "l", "kd_T": "T"}
# Method flags always named when their method is in use (the seed's habit); others only when
# they differ from their default.
ALWAYS_NAMED = ("ttm_l", "kd_T")


def build_parser() -> OneLineParser:
    """Every flag of ``train_student.py``: the distillation group, each method's own flags
    (from the registry) and the flags shared with ``train_teacher.py``."""
    parser = OneLineParser(description="Distil a student from a teacher (loss = r·CE + a·ADD + b·MAIN).")
    group = parser.add_argument_group("distillation")
    group.add_argument("--path_t", required=True, help="teacher checkpoint (.pth)")
    group.add_argument("--model_t", default=None,
                       help="teacher architecture (default: the checkpoint's 'arch', else its folder name)")
    group.add_argument("--model_s", default="resnet8", help=f"student: {', '.join(models.model_names())}")
    group.add_argument("--distill", default="kd", type=str.lower, choices=METHODS.names(),
                       help="main method (weight -b; any letter case)")
    group.add_argument("--add", default="kd", type=str.lower,
                       choices=METHODS.names(logit_only=True) + ["none"],
                       help="added logit method (weight -a); the seed's KD term is --add kd")
    group.add_argument("-r", "--gamma", type=float, default=1.0, help="weight of cross-entropy")
    group.add_argument("-a", "--alpha", type=float, default=None, help="weight of --add (unset: 0)")
    group.add_argument("-b", "--beta", type=float, default=None,
                       help="weight of --distill (unset: the method's usual weight)")
    group.add_argument("--teacher_cache", default="auto", choices=teacher_cache.MODES,
                       help="logit-only methods: look the teacher's logits up in the exact cache "
                            "under <save_root>/cache/ instead of running it. auto: when a valid "
                            "cache exists; build: build it first if needed; off: never")
    METHODS.add_arguments(parser)
    add_common_arguments(parser)
    return parser


def methods_in_use(cfg: Mapping[str, Any]) -> list[type[Distiller]]:
    """The method classes whose flags matter: ``--distill``, and ``--add`` unless its weight is 0."""
    used = [METHODS.get(cfg["distill"])]
    if cfg.get("add") and cfg["add"] != "none" and cfg.get("alpha"):
        used.append(METHODS.get(cfg["add"]))
    return used


def validate_flags(flags: Mapping[str, Any]) -> None:
    """Checks the distillation flags and the flags of the methods in use (no files are read).

    Raises:
        UserError: one line naming the flag.
    """
    for name in ("gamma", "alpha", "beta"):
        value = flags[name]
        if value is not None and not (torch.isfinite(torch.tensor(float(value))) and value >= 0):
            raise UserError(f"--{name} must be a finite non-negative number, got {value}")
    if flags["add"] == "none" and flags["alpha"]:
        raise UserError(f"-a {flags['alpha']} weights the --add loss, but --add is none")
    for model_flag in ("model_s", "model_t"):
        name = flags[model_flag]
        if name is not None and name not in models.model_dict:
            raise UserError(f"unknown {'student' if model_flag == 'model_s' else 'teacher'} model "
                            f"{name!r}; choose from {', '.join(models.model_names())}")
    try:  # every method flag's range, then the rules of the methods in use
        for _, cls in METHODS.items():
            for flag in cls.flags:
                flag.check(flags.get(flag.dest))
        for cls in methods_in_use({**flags, "alpha": flags["alpha"] if flags["add"] != "none" else 0}):
            cls.validate(flags)
    except ValueError as err:
        raise UserError(str(err)) from None


def resolve_config(flags: Mapping[str, Any], env: distributed.DistEnv, teacher_name: str,
                   drawn_seed: Optional[int] = None) -> Config:
    """The validated, complete configuration of a run with teacher architecture ``teacher_name``.

    Fills in what the flags leave open: the learning rate of light students, the seed (drawn
    on rank 0 and shared), the loss weights (unset ``-a`` is 0, unset ``-b`` the method's
    usual one) and pair-dependent method values (DKD's β). Reads no file.
    """
    validate_flags(flags)
    values = derive_common(flags, flags["model_s"], drawn_seed)
    values["seed"] = distributed.broadcast_object(values["seed"], env)
    values["world_size"] = env.world_size
    values["add"] = None if flags["add"] == "none" else flags["add"]
    values["model_t"] = teacher_name
    gamma, alpha, beta = resolve_weights(Config(values), teacher_name, flags["model_s"])
    values.update(gamma=gamma, alpha=alpha, beta=beta)
    for cls in methods_in_use(values):
        values.update(cls.resolve(values, teacher_name, flags["model_s"]))
    values["flags"] = dict(flags)
    return Config(values)


def parse_config(argv: Sequence[str], env: distributed.DistEnv, teacher_name: str) -> Config:
    """``resolve_config`` of a command line, for a teacher of architecture ``teacher_name``
    that is not read from ``--path_t`` (the benchmark and the tests build their own)."""
    return resolve_config(vars(parse_with(build_parser(), argv)), env, teacher_name)


def default_run_name(cfg: Mapping[str, Any]) -> str:
    """The run folder name: the seed's, plus every training flag that tells runs apart.

    ``S:<student>_T:<teacher>_<data>_<distill>[+<add>]_r:<r>_a:<a>_b:<b>`` then, for the
    methods in use, ``l:<ttm_l>`` / ``T:<kd_T>`` and any of their flags off its default, then
    every other training flag off its default (``batch_size:128``), ``seed:<n>`` when the seed
    was given, and the trial last. ``--epochs`` is left out: a run may be resumed to more.
    """
    method = cfg["distill"] + (f"+{cfg['add']}" if cfg.get("add") and cfg.get("alpha") else "")
    parts = [f"S:{cfg['model_s']}", f"T:{cfg['model_t']}", cfg["dataset"], method,
             f"r:{cfg['gamma']}", f"a:{cfg['alpha']}", f"b:{cfg['beta']}"]  # the seed's spelling
    defaults = {a.dest: a.default for a in build_parser()._actions}
    flags = cfg.get("flags", cfg)
    in_use = [f.dest for cls in methods_in_use(cfg) for f in cls.flags]
    shown = set()
    for dest in dict.fromkeys(in_use):
        if dest in ALWAYS_NAMED or flags.get(dest) != defaults.get(dest):
            parts.append(f"{NAME_KEYS.get(dest, dest)}:{_short(flags.get(dest))}")
        shown.add(dest)
    method_dests = {f.dest for _, cls in METHODS.items() for f in cls.flags}
    skip = (shown | method_dests | resume.FREE_TO_CHANGE
            | {"model_s", "model_t", "dataset", "distill", "add", "gamma", "alpha", "beta",
               "epochs", "seed", "trial"})
    for dest, default in defaults.items():
        if dest not in skip and dest != "help" and flags.get(dest, default) != default:
            parts.append(f"{dest}:{_short(flags[dest])}")
    if flags.get("seed"):
        parts.append(f"seed:{flags['seed']}")
    parts.append(str(cfg["trial"]))
    return "_".join(parts)


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("/", "-").replace(",", "-")


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
    run_name = cfg.run_name or default_run_name(cfg)
    run_dir = os.path.join(cfg.save_root, "student_model", run_name)
    cfg = resume.reconcile(cfg, flags, given, run_dir, resolve, option_names(parser), unused_flags)
    return cfg, teacher, run_name


def unused_flags(cfg: Mapping[str, Any]) -> set[str]:
    """Method flags that do not act on the run ``cfg`` describes (its methods do not read them)."""
    every = {f.dest for _, cls in METHODS.items() for f in cls.flags}
    return every - {f.dest for cls in methods_in_use(cfg) for f in cls.flags}


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
                         data.num_classes, env.device, data.image_size)
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
                  cached: Optional[teacher_cache.CachedTeacher] = None) -> Step:
    """The parts of one training step (``scripts/benchmark.py`` times exactly these); the
    step's teacher is ``cached`` when given, else the live frozen ``teacher``."""
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
    run = GraphedStep(eager, objective) if graphed else eager
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
    data = load_data(cfg, env)
    check_data_fits(cfg, data, (cfg.model_s, cfg.model_t))
    teacher = build_teacher(teacher_file.checkpoint, teacher_file.path, cfg.model_t, data.num_classes,
                            env.device)
    seed_everything(cfg.seed)
    fmt = memory_format(cfg.channels_last)
    objective = build_objective(cfg, env, data, teacher)
    formula = describe_objective(cfg.gamma, cfg.alpha, cfg.beta, cfg.distill,
                                 cfg.add if objective.use_add else None,
                                 getattr(objective.main, "main_is_zero", False))
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
        step = assemble_step(cfg, env, objective, teacher, fmt, cached)
        report_step_mode(cfg, env, step.mode)
        progress = restore(cfg, env, run_dir, cfg.model_s, step.student, step.optimizer, train_loader,
                           objective.load_task_state)
        fresh = progress.epoch == 0 and not os.path.exists(os.path.join(run_dir, "resume.pth"))
        text_log = os.path.join(cfg.save_root, "student_log", run_name + ".txt")
        trainer = Trainer(cfg, env, step.trainable, step.student, cfg.model_s, step.optimizer,
                          train_loader, test_loader, run_dir, make_logbook(env, run_dir, progress, text_log),
                          teacher=step.teacher, task_state=objective.task_state, memory_format=fmt,
                          step=step.run)
        if fresh:
            run_init_stage(objective.main.init_stage(), step.student, teacher, trainer)
            objective.freeze_untrained()  # what only the initialisation stage trains is frozen again
        return train_and_report(trainer, progress)
