"""A network trained from scratch with cross-entropy (the teacher recipe): ``train_teacher.py``.

Same loop, loaders, checkpoints, resume rules and outputs as a student run; the objective is
plain cross-entropy of one network.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import models
from errors import UserError
from helper import distributed, resume
from helper.config import (Config, OneLineParser, add_common_arguments, derive_common, given_flags,
                           option_names, parse_with)
from helper.loop import Trainer
from helper.run import (check_data_fits, closed_on_failure, load_data, make_loaders, make_logbook,
                        open_run_dir, restore, seed_everything, train_and_report)
from helper.run_lock import RunLock
from helper.graph_step import GRAPH_EVENTS, GraphedStep, append_event, graph_plan, report_step_mode
from helper.speed import maybe_compile, memory_format
from helper.step import TrainStep


class ClassifierObjective(nn.Module):
    """Plain cross-entropy training of one network; returns the loop's ``{"loss", "logits",
    "terms"}`` dict for images ``[B, 3, H, W]`` and labels ``[B]``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                epoch: int, teacher_out: Any = None) -> dict[str, Any]:
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits, "terms": {"ce": loss}}


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


def configure(argv: Optional[Sequence[str]], env: distributed.DistEnv) -> tuple[Config, str]:
    """The configuration (reconciled with the saved run on ``--resume``) and the run folder."""
    parser = build_parser()
    flags = vars(parse_with(parser, argv))
    cfg = resolve_config(flags, env)
    run_dir = os.path.join(cfg.save_root, "models", cfg.run_name or run_folder_name(cfg))
    cfg = resume.reconcile(cfg, flags, given_flags(parser, argv), run_dir,
                           lambda values, seed: resolve_config(values, env, seed), option_names(parser))
    return cfg, run_dir


def train(argv: Optional[Sequence[str]] = None) -> str:
    """Trains the network ``argv`` describes; returns the path of its best checkpoint."""
    env = distributed.setup(parse_with(build_parser(), argv).device)
    cfg, run_dir = configure(argv, env)
    with RunLock(run_dir, env.is_main):  # one process owns the run folder until the run ends
        return _train(cfg, env, run_dir)


def _train(cfg: Config, env: distributed.DistEnv, run_dir: str) -> str:
    """The run itself, in the locked run folder ``run_dir``."""
    data = load_data(cfg, env)
    check_data_fits(cfg, data, (cfg.model,))
    open_run_dir(cfg, env, run_dir)
    seed_everything(cfg.seed)
    fmt = memory_format(cfg.channels_last)
    model = models.create_model(cfg.model, data.num_classes).to(env.device, memory_format=fmt)
    objective = ClassifierObjective(maybe_compile(model, cfg.compile, cfg.compile_mode))
    distributed.convert_sync_bn(objective, cfg.sync_bn, env)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    train_loader, test_loader = make_loaders(cfg, env, data, fmt)
    with closed_on_failure(train_loader, test_loader):
        if env.is_main:
            print(f"training {cfg.model} on {cfg.dataset} ({data.train_labels.numel()} images) on {env.device}, "
                  f"lr {cfg.learning_rate}, seed {cfg.seed}, run folder {run_dir}", flush=True)
        progress = restore(cfg, env, run_dir, cfg.model, model, optimizer, train_loader)
        graphed, mode = graph_plan(cfg.cuda_graphs, env.device, env.world_size, cfg.compile, objective)
        report_step_mode(cfg, env, mode)
        trainable = distributed.wrap(objective, env)
        eager = TrainStep(trainable, None, optimizer, cfg.precision, fmt, cache_casts=not graphed)
        run = GraphedStep(eager, objective, batch_size=cfg.batch_size,
                          on_event=append_event(os.path.join(run_dir, GRAPH_EVENTS))) if graphed else eager
        trainer = Trainer(cfg, env, trainable, model, cfg.model, optimizer,
                          train_loader, test_loader, run_dir, make_logbook(env, run_dir, progress),
                          memory_format=fmt, step=run, step_mode=mode)
        return train_and_report(trainer, progress)
