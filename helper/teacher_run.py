"""A network trained from scratch with cross-entropy (the teacher recipe): ``train_teacher.py``.

Same loop, loaders, checkpoints, resume rules and outputs as a student run; the objective is
plain cross-entropy of one network.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import models
from dataset import Data
from errors import UserError
from helper import distributed, optim, resume
from helper.assemble import ClassifierObjective, assemble
from helper.cli import OneLineParser
from helper.common_flags import add_common_arguments, derive_common
from helper.config import Config
from helper.data_setup import check_data_fits, closed_on_failure, load_data, make_loaders
from helper.graph_step import GRAPH_EVENTS
from helper.run_folder import (make_logbook, open_run_dir, progress_of, read_resume, seed_everything,
                               train_and_report)
from helper.run_lock import RunLock
from helper.speed import memory_format


def build_parser() -> OneLineParser:
    """``--model`` plus the flags shared with ``train_student.py``."""
    parser = OneLineParser(description="Train a network from scratch (teacher recipe).")
    parser.add_argument("--model", default="resnet110", help=f"architecture: {', '.join(models.model_names())}")
    add_common_arguments(parser)
    return parser


def run_folder_name(cfg: Config) -> str:
    """The reference's folder name; it starts with the architecture, which the student
    script reads back when a checkpoint does not record ``'arch'``."""
    return f"{cfg.model}_{cfg.dataset}_lr_{cfg.base_learning_rate}_decay_{cfg.weight_decay}_trial_{cfg.trial}"


def resolve_config(flags: dict[str, Any], env: distributed.DistEnv, drawn_seed: Optional[int] = None) -> Config:
    """Validates the flags and fills in the derived values (LR, seed shared by the ranks)."""
    if flags["model"] not in models.model_dict:
        raise UserError(f"unknown model {flags['model']!r}; choose from {', '.join(models.model_names())}")
    values = derive_common(flags, flags["model"], drawn_seed)
    values["seed"] = distributed.broadcast_object(values["seed"], env)
    values["world_size"] = env.world_size
    values["flags"] = dict(flags)
    return Config(values)


def configure(flags: dict[str, Any], given: set[str], env: distributed.DistEnv,
              parser: OneLineParser) -> tuple[Config, str]:
    """The configuration (reconciled with the saved run on ``--resume``) and the run folder."""
    cfg = resolve_config(flags, env)
    run_dir = os.path.join(cfg.save_root, "models", cfg.run_name or run_folder_name(cfg))
    cfg = resume.reconcile(cfg, flags, given, run_dir,
                           lambda values, seed: resolve_config(values, env, seed), parser.option_names())
    return cfg, run_dir


def train(argv: Optional[Sequence[str]] = None, data: Optional[Data] = None) -> str:
    """Trains the network ``argv`` describes (on ``data`` when given, else the flags' data
    set); returns the path of its best checkpoint."""
    parser = build_parser()
    flags, given = parser.parse(argv)
    env = distributed.setup(flags["device"])
    cfg, run_dir = configure(flags, given, env, parser)
    with RunLock(run_dir, env.is_main):  # one process owns the run folder until the run ends
        return _train(cfg, env, run_dir, data)


def _train(cfg: Config, env: distributed.DistEnv, run_dir: str, data: Optional[Data]) -> str:
    """The run itself, in the locked run folder ``run_dir``."""
    data = load_data(cfg, env, data)
    check_data_fits(cfg, data, (cfg.model,))
    open_run_dir(cfg, env, run_dir)
    seed_everything(cfg.seed)
    fmt = memory_format(cfg.channels_last)
    try:
        model = models.create_model(cfg.model, data.num_classes, cfg.drop_path)
    except ValueError as err:
        raise UserError(f"--drop_path: {err}") from None
    objective = ClassifierObjective(model.to(env.device, memory_format=fmt), cfg.smoothing)
    loaders = make_loaders(cfg, env, data, fmt)
    with closed_on_failure(*loaders):
        if env.is_main:
            print(f"training {cfg.model} on {cfg.dataset} ({data.train_labels.numel()} images) on {env.device}, "
                  f"{optim.description(cfg)}, seed {cfg.seed}, run folder {run_dir}", flush=True)
        state = read_resume(cfg, env, run_dir, cfg.model)
        progress = progress_of(state)
        trainer = assemble(cfg, env, objective, cfg.model, loaders, run_dir, make_logbook(env, run_dir, progress),
                           fmt, events_file=os.path.join(run_dir, GRAPH_EVENTS))
        if state is not None:
            trainer.restore(state, objective.load_task_state)
        return train_and_report(trainer, progress)
