"""The initialisation stage some methods run before the main training (AB, FT, FSP).

A method describes its stage as an :class:`~distiller_zoo.base.InitStage`; this runs any
such stage the same way: SGD on the stage's parameters alone, the student in eval mode
except the stage's modules, the teacher frozen, for ``stage.epochs`` epochs.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from distiller_zoo import Batch, InitStage
from helper import distributed
from helper.distill import FrozenTeacher, student_outputs
from helper.loop import NonFiniteLoss, Progress, Trainer
from helper.speed import autocast
from helper.step import unpack


def run_init_stage(stage: Optional[InitStage], student: nn.Module, teacher: nn.Module,
                   trainer: Trainer) -> None:
    """Runs ``stage`` (nothing when None) and writes an epoch-0 resume checkpoint after it.

    Args:
        stage: the method's initialisation stage.
        student: the (unwrapped) student network.
        teacher: the frozen teacher network.
        trainer: the run's trainer (config, device, training loader, checkpointing).
    """
    if stage is None or stage.epochs == 0:
        return
    cfg, env = trainer.cfg, trainer.env
    params = list(stage.parameters)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    frozen = FrozenTeacher(teacher, stage.feature_kind, lambda: autocast(env.device, cfg.precision))
    was_training = student.training
    for epoch in range(1, stage.epochs + 1):
        start = time.perf_counter()
        student.train(stage.student_train_mode)
        for module in stage.modules:
            module.train()
        total = torch.zeros((), device=env.device)
        count = 0
        for batch in trainer.train_loader:
            images, labels, index, views = unpack(batch)
            t_out = frozen(images, views)
            with autocast(env.device, cfg.precision):
                s_out = student_outputs(student, images, stage.feature_kind)
            with torch.autocast(device_type=env.device.type, enabled=False):
                loss = stage.loss(s_out, t_out, Batch(labels=labels, index=index, epoch=0)).reshape(())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if env.enabled:  # the stage runs outside DDP: average its gradients by hand
                for p in params:
                    if p.grad is not None:
                        distributed.all_reduce_sum(p.grad, env).div_(env.world_size)
            optimizer.step()
            total = total + loss.detach() * labels.shape[0]
            count += labels.shape[0]
        mean = total.item() / max(count, 1)  # one sync per init epoch
        if mean != mean or mean in (float("inf"), float("-inf")):
            raise NonFiniteLoss(f"initialisation-stage loss became {mean} at init epoch {epoch}")
        if env.is_main:
            print(f"init stage epoch {epoch}/{stage.epochs} loss {mean:.4f} "
                  f"{time.perf_counter() - start:.1f}s", flush=True)
    student.train(was_training)
    # parameters the main stage does not train are frozen again by the objective
    trainer.optimizer.zero_grad(set_to_none=True)
    if env.is_main:
        trainer.save_resume(Progress())
