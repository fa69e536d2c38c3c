"""A whole CIFAR epoch (train + validation) of the headline pair with WTTM, as ``Trainer.fit``
runs it: the run's own ``make_loaders`` over synthetic CIFAR-shaped images, then
``train_epoch`` and ``evaluate``; projected to the full 50,000/10,000-image epoch and 240 epochs.
"""
from __future__ import annotations

import statistics
from typing import Any

import torch

from helper import distributed
from helper.evaluate import evaluate
from helper.run import make_loaders
from helper.speed import memory_format
from scripts.bench.measure_step import (BuiltRun, build_run, compile_status, count_step_flops, recipe_flags,
                                        step_mode, student_argv, student_config)
from scripts.bench.timing import Clock, Setting, apply_global_switches, count_flops, peak_tflops, summarize

CIFAR_TRAIN, CIFAR_TEST, CIFAR_STEPS, CIFAR_EPOCHS = 50000, 10000, 782, 240


def epoch_row(setting: Setting, env: distributed.DistEnv, data: Any, args: Any, clock: Clock,
              flops: dict) -> dict[str, Any]:
    """Seconds of a first epoch (warm-up, compilation) and of ``args.epoch_repeats`` more."""
    apply_global_switches(setting, clock.cuda)
    teacher, student = args.headline.split(":")
    argv = student_argv(args.headline, recipe_flags(teacher, student, "wttm", args.headline), setting, args.save_root)
    cfg = student_config(args.headline, argv, env)
    train_loader, test_loader = make_loaders(cfg, env, data, memory_format(cfg.channels_last))
    run = build_run(cfg, env, data, train_loader, test_loader)
    trainer, fmt = run.trainer, run.trainer.memory_format

    def validate() -> None:
        evaluate(trainer.model, test_loader, cfg.precision, fmt)
    first = clock.seconds(lambda: (trainer.train_epoch(1), validate()), events=False)
    train_s, eval_s = [], []
    for epoch in range(2, 2 + args.epoch_repeats):
        train_s.append(clock.seconds(lambda: trainer.train_epoch(epoch)))
        eval_s.append(clock.seconds(validate))
    epoch_s = [a + b for a, b in zip(train_s, eval_s)]
    n_train, n_test = data.train_images.shape[0], data.test_images.shape[0]
    full = (statistics.median(train_s) * CIFAR_TRAIN / n_train
            + statistics.median(eval_s) * CIFAR_TEST / n_test)
    row = {"pair": args.headline, "method": "wttm", "setting": setting.name, "train_images": n_train,
           "test_images": n_test, "steps_per_epoch": len(train_loader), "first_epoch_s": first,
           "train_s": summarize(train_s), "eval_s": summarize(eval_s), "epoch_s": summarize(epoch_s),
           "full_epoch_s": full,
           "projected_240_s": CIFAR_EPOCHS * full + max(first - statistics.median(epoch_s), 0.0),
           "compile": compile_status(run), "step_mode": step_mode(run), "argv": argv}
    row.update(epoch_floor(run, clock, args, setting, flops))
    return row


def epoch_floor(run: BuiltRun, clock: Clock, args: Any, setting: Setting, flops: dict) -> dict[str, Any]:
    """FLOPs of a full CIFAR-100 epoch (782 steps + 10000 test images) and the time they
    need at the device's tensor-core peak. Counted on eager modules only (a counter around a
    compiled one would recompile it)."""
    batch = next(iter(run.trainer.train_loader))
    step = flops.get((args.headline, "wttm"))
    if step is None and not setting.compile:
        step = count_step_flops(run, batch)
    with torch.inference_mode():
        fwd = count_flops(lambda: run.trainer.model(batch[0]))
    if step is None or fwd is None:
        return {}
    total = CIFAR_STEPS * step + CIFAR_TEST * fwd / batch[0].shape[0]
    peak = args.peak_tflops or peak_tflops(clock, setting.precision)
    return {"epoch_flops": total, "peak_tflops": peak, "flop_floor_s": total / (peak * 1e12) if peak else None}
