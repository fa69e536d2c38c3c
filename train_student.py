"""Distil a student from a frozen teacher with any registered method (and an added logit loss).

    python train_student.py --path_t save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \
        --model_s resnet8x4 --distill wttm --ttm_l 0.1 -r 1 -a 0 -b 3 --trial 1

Total loss = r·CE + a·ADD + b·MAIN (ADD = --add, MAIN = --distill). See README.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

import models
from distiller_zoo import METHODS
from helper import distributed
from helper.config import Config, OneLineParser, add_common_arguments, derive_common, parse_with
from helper.distill import (DistillObjective, FrozenTeacher, describe_objective, load_teacher,
                            method_context, resolve_weights)
from errors import UserError, exit_on_user_error
from helper.evaluate import evaluate
from helper.init_stage import run_init_stage
from helper.loop import Trainer
from helper.run import (load_data, make_loaders, make_logbook, open_run_dir, restore, resumed_seed,
                        seed_everything, train_and_report)
from helper.speed import autocast, maybe_compile, memory_format


def build_parser() -> OneLineParser:
    parser = OneLineParser(description="Distil a student from a teacher (loss = r·CE + a·ADD + b·MAIN).")
    group = parser.add_argument_group("distillation")
    group.add_argument("--path_t", required=True, help="teacher checkpoint (.pth)")
    group.add_argument("--model_t", default=None,
                       help="teacher architecture (default: the checkpoint's 'arch', else its folder name)")
    group.add_argument("--model_s", default="resnet8", help=f"student: {', '.join(models.model_names())}")
    group.add_argument("--distill", default="kd", choices=METHODS.names(), help="main method (weight -b)")
    group.add_argument("--add", default="kd", choices=METHODS.names(logit_only=True) + ["none"],
                       help="added logit method (weight -a); the seed's KD term is --add kd")
    group.add_argument("-r", "--gamma", type=float, default=1.0, help="weight of cross-entropy")
    group.add_argument("-a", "--alpha", type=float, default=None, help="weight of --add (default 0)")
    group.add_argument("-b", "--beta", type=float, default=None,
                       help="weight of --distill (default: the method's usual weight)")
    group.add_argument("--kd_T", type=float, default=4, help="KD temperature")
    group.add_argument("--ttm_l", type=float, default=1, help="TTM/WTTM power exponent γ = 1/T")
    group.add_argument("--feat_dim", type=int, default=128, help="embedding size of CRD and CC")
    group.add_argument("--hint_layer", type=int, default=2, choices=range(5), help="FitNet hint layer")
    group.add_argument("--init_epochs", type=int, default=30,
                       help="epochs of the initialisation stage of AB, FT and FSP")
    for _, cls in METHODS.items():
        cls.add_arguments(parser)
    add_common_arguments(parser)
    return parser


def default_run_name(cfg: Config) -> str:
    """The seed's run name: ``S:<student>_T:<teacher>_<data>_<distill>_r:<r>_a:<a>_b:<b>_<trial>``."""
    return (f"S:{cfg.model_s}_T:{cfg.model_t}_{cfg.dataset}_{cfg.distill}_"
            f"r:{cfg.gamma}_a:{cfg.alpha}_b:{cfg.beta}_{cfg.trial}")


def parse_config(argv: Optional[Sequence[str]], env: distributed.DistEnv) -> tuple[Config, torch.nn.Module]:
    """Parses and validates the flags; loads the teacher (its arch completes the config)."""
    args = parse_with(build_parser(), argv)
    if args.model_s not in models.model_dict:
        raise UserError(f"unknown model {args.model_s!r}; choose from {', '.join(models.model_names())}")
    if args.model_t is not None and args.model_t not in models.model_dict:
        raise UserError(f"unknown teacher model {args.model_t!r}")
    for flag in ("gamma", "alpha", "beta", "kd_T", "ttm_l"):
        value = getattr(args, flag)
        if value is not None and not (torch.isfinite(torch.tensor(float(value))) and value >= 0):
            raise UserError(f"--{flag} must be a finite non-negative number, got {value}")
    if args.kd_T == 0:  # the KD logits are divided by it
        raise UserError("--kd_T must be positive, got 0")
    if args.add == "none" and args.alpha:
        raise UserError(f"-a {args.alpha} weights the --add loss, but --add is none")
    if args.init_epochs < 0:
        raise UserError("--init_epochs must be >= 0")
    values = derive_common(args, args.model_s)
    values["seed"] = distributed.broadcast_object(values["seed"], env)
    values["world_size"] = env.world_size
    values["add"] = None if args.add == "none" else args.add
    return Config(values), args


def build_objective(cfg: Config, env, data, teacher, teacher_name: str) -> DistillObjective:
    """The student and its methods, with weights resolved (printed at start)."""
    student = models.create_model(cfg.model_s, data.num_classes).to(env.device)
    ctx = method_context(cfg, student, teacher, cfg.model_s, teacher_name,
                         data.train_labels, data.num_classes, env.device)
    main = build_method(cfg.distill, ctx).to(env.device)
    add = build_method(cfg.add, ctx).to(env.device) if cfg.add and cfg.alpha else None
    return DistillObjective(student, main, add, cfg.gamma, cfg.alpha, cfg.beta)


def build_method(name: str, ctx) -> torch.nn.Module:
    """Builds a registered method; a pair it cannot be built for is a one-line UserError."""
    try:
        return METHODS.get(name)(ctx)
    except ValueError as err:  # connectors that cannot map these feature shapes
        raise UserError(f"{name} cannot be built for teacher {ctx.teacher_name} and student "
                        f"{ctx.student_name}: {err}") from None


def assemble_step(cfg: Config, env: distributed.DistEnv, objective: DistillObjective,
                  teacher: torch.nn.Module, fmt: torch.memory_format
                  ) -> tuple[torch.nn.Module, FrozenTeacher, torch.optim.Optimizer, torch.nn.Module]:
    """What one training step runs (``scripts/benchmark.py`` times exactly this).

    Returns the plain student (evaluated, checkpointed), the frozen teacher (compiled when
    ``--compile``), SGD over the student's and methods' trainable parameters, and the
    trainable module the loop calls: the objective with its student compiled when asked,
    DDP-wrapped on several ranks (the teacher stays outside DDP).
    """
    teacher.to(memory_format=fmt)
    objective.student.to(memory_format=fmt)
    params = objective.trainable_parameters()  # before DDP: it registers what requires grad
    optimizer = torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    frozen = FrozenTeacher(maybe_compile(teacher, cfg.compile, cfg.compile_mode), objective.feature_kind,
                           lambda: autocast(env.device, cfg.precision))
    student = objective.student
    objective.student = maybe_compile(student, cfg.compile, cfg.compile_mode)
    return student, frozen, optimizer, distributed.wrap(objective, env)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> str:
    """Distils the student; returns the path of its best checkpoint."""
    env = distributed.setup(parse_with(build_parser(), argv).device)
    cfg, _ = parse_config(argv, env)
    data = load_data(cfg, env)
    teacher, teacher_name = load_teacher(cfg.path_t, data.num_classes, env.device, cfg.model_t)
    gamma, alpha, beta = resolve_weights(cfg, teacher_name, cfg.model_s)
    cfg = cfg.replace(model_t=teacher_name, gamma=gamma, alpha=alpha, beta=beta)
    run_name = cfg.run_name or default_run_name(cfg)
    run_dir = os.path.join(cfg.save_root, "student_model", run_name)
    cfg = resumed_seed(cfg, run_dir)
    seed_everything(cfg.seed)
    fmt = memory_format(cfg.channels_last)
    objective = build_objective(cfg, env, data, teacher, teacher_name)
    formula = describe_objective(gamma, alpha, beta, cfg.distill, cfg.add if objective.use_add else None,
                                 getattr(objective.main, "main_is_zero", False))
    train_loader, test_loader = make_loaders(cfg, env, data, fmt)
    teacher.to(memory_format=fmt)
    teacher_acc = evaluate(teacher, test_loader, cfg.precision, fmt)
    open_run_dir(cfg, env, run_dir, {"objective": formula, "teacher_test_acc": teacher_acc["acc1"]})
    if env.is_main:
        print(f"teacher {teacher_name} ({cfg.path_t}): test acc {teacher_acc['acc1']:.2f}", flush=True)
        print(f"student {cfg.model_s} on {cfg.dataset}, {env.device}, seed {cfg.seed}: {formula}", flush=True)
    student, frozen, optimizer, trainable = assemble_step(cfg, env, objective, teacher, fmt)
    trainer = Trainer(cfg, env, trainable, student, cfg.model_s,
                      optimizer, train_loader, test_loader, run_dir, None, teacher=frozen,
                      task_state=objective.task_state, memory_format=fmt)
    progress = restore(trainer, objective.load_task_state)
    if progress.epoch == 0 and not os.path.exists(os.path.join(run_dir, "resume.pth")):
        run_init_stage(objective.main.init_stage(), student, teacher, trainer)
        objective.trainable_parameters()  # re-freeze what only the init stage trains
    text_log = os.path.join(cfg.save_root, "student_log", run_name + ".txt")
    trainer.logbook = make_logbook(env, run_dir, progress, text_log)
    return train_and_report(trainer, progress)


if __name__ == "__main__":
    main()
