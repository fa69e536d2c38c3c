"""Train a teacher (or any network) from scratch with the reference CIFAR-100 recipe.

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset digits --epochs 5

Writes ``save/models/<model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>/`` (see README).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import models
from helper import distributed
from helper.config import Config, OneLineParser, add_common_arguments, derive_common, parse_with
from errors import UserError, exit_on_user_error
from helper.loop import Trainer
from helper.run import (load_data, make_loaders, make_logbook, open_run_dir, restore, resumed_seed,
                        seed_everything, train_and_report)
from helper.speed import maybe_compile, memory_format


class ClassifierObjective(nn.Module):
    """Plain cross-entropy training of one network (the teacher recipe)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                epoch: int, teacher_out=None) -> dict:
        logits = self.model(images)
        loss = F.cross_entropy(logits.float(), labels)
        return {"loss": loss, "logits": logits, "terms": {"ce": loss}}


def build_parser() -> OneLineParser:
    parser = OneLineParser(description="Train a network from scratch (teacher recipe).")
    parser.add_argument("--model", default="resnet110", help=f"architecture: {', '.join(models.model_names())}")
    add_common_arguments(parser)
    return parser


def run_folder_name(cfg: Config) -> str:
    """The reference's folder name; it starts with the architecture, which the student
    script reads back when a checkpoint does not record ``'arch'``."""
    return f"{cfg.model}_{cfg.dataset}_lr_{cfg.base_learning_rate}_decay_{cfg.weight_decay}_trial_{cfg.trial}"


def parse_config(argv: Optional[Sequence[str]], env: distributed.DistEnv) -> Config:
    args = parse_with(build_parser(), argv)
    if args.model not in models.model_dict:
        raise UserError(f"unknown model {args.model!r}; choose from {', '.join(models.model_names())}")
    values = derive_common(args, args.model)
    values["seed"] = distributed.broadcast_object(values["seed"], env)
    values["world_size"] = env.world_size
    return Config(values)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> str:
    """Trains the network; returns the path of its best checkpoint."""
    env = distributed.setup(parse_with(build_parser(), argv).device)
    cfg = parse_config(argv, env)
    run_dir = os.path.join(cfg.save_root, "models", cfg.run_name or run_folder_name(cfg))
    cfg = resumed_seed(cfg, run_dir)
    open_run_dir(cfg, env, run_dir)
    seed_everything(cfg.seed)
    fmt = memory_format(cfg.channels_last)
    data = load_data(cfg, env)
    model = models.create_model(cfg.model, data.num_classes).to(env.device, memory_format=fmt)
    objective = distributed.wrap(ClassifierObjective(maybe_compile(model, cfg.compile, cfg.compile_mode)), env)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.learning_rate,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    train_loader, test_loader = make_loaders(cfg, env, data, fmt)
    if env.is_main:
        print(f"training {cfg.model} on {cfg.dataset} ({data.train_labels.numel()} images) on {env.device}, "
              f"lr {cfg.learning_rate}, seed {cfg.seed}, run folder {run_dir}", flush=True)
    trainer = Trainer(cfg, env, objective, model, cfg.model, optimizer, train_loader, test_loader,
                      run_dir, None, memory_format=fmt)
    progress = restore(trainer)
    trainer.logbook = make_logbook(env, run_dir, progress)
    return train_and_report(trainer, progress)


if __name__ == "__main__":
    main()
