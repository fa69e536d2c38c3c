"""The whole epoch as ``Trainer.fit`` runs it, split into the time in the step and outside it.

The headline pair's WTTM run is built like the other rows (``helper.student`` through
:func:`scripts.bench.measure_step.build_run`) over its own ``make_loaders``, with a run
folder, a logbook and checkpoints, and ``Trainer.fit`` runs a warm-up epoch, then
``--epoch_repeats`` more. The step callable is wrapped by :class:`TimedStep` (CUDA events
around each call on the GPU, ``perf_counter`` on the CPU), so an epoch's wall time splits into

- in the step: the step calls (augmented batch in, loss terms out: teacher, student
  forward/backward, SGD; on CUDA the graph replay or the eager kernels);
- loader, meters, validation: the rest of ``fit``'s own per-epoch seconds (its logbook's
  ``seconds``: ``train_epoch`` + ``evaluate``);
- checkpoints and logbook: the rest of the wall time (``resume.pth``, best checkpoint,
  ``metrics.csv``, the text log).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from helper import distributed
from helper.logbook import Logbook
from helper.loop import Progress
from helper.run import close_loaders, make_loaders
from helper.speed import memory_format
from helper.step import StepOut
from scripts.bench.measure_epoch import CIFAR_EPOCHS, CIFAR_STEPS, CIFAR_TRAIN
from scripts.bench.measure_step import build_run, recipe_flags, step_mode, student_argv, student_config
from scripts.bench.timing import Clock, Setting, apply_global_switches


class TimedStep:
    """The run's step callable, with the time of each call summed per epoch.

    On CUDA each call is bracketed by two events on the current stream (no host sync on the
    hot path; the spans are read at the end of the epoch); elsewhere by ``perf_counter``.
    """

    def __init__(self, step: Callable[..., StepOut], cuda: bool) -> None:
        self.step, self.cuda = step, cuda
        self.events: dict[int, list[tuple[Any, Any]]] = defaultdict(list)
        self.seconds: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, views: Any,
                 epoch: int) -> StepOut:
        self.calls[epoch] += 1
        if not self.cuda:
            start = time.perf_counter()
            out = self.step(images, labels, index, views, epoch)
            self.seconds[epoch] += time.perf_counter() - start
            return out
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        out = self.step(images, labels, index, views, epoch)
        end.record()
        self.events[epoch].append((begin, end))
        return out

    def in_step_s(self, epoch: int) -> float:
        """Seconds spent in the step during ``epoch`` (reads the CUDA events: a host sync)."""
        for begin, end in self.events.pop(epoch, []):
            end.synchronize()
            self.seconds[epoch] += begin.elapsed_time(end) / 1e3
        return self.seconds[epoch]


def split_argv(setting: Setting, args: Any, epochs: int) -> list[str]:
    """The headline WTTM run's ``train_student.py`` command line under ``setting``."""
    teacher, student = args.headline.split(":")
    return student_argv(args.headline, recipe_flags(teacher, student, "wttm", args.headline), setting,
                        args.save_root, ["--epochs", str(epochs)])


def split_row(setting: Setting, env: distributed.DistEnv, data: Any, args: Any, clock: Clock) -> dict[str, Any]:
    """One epoch-split row: a warm-up epoch, then ``args.epoch_repeats`` timed epochs of ``fit``."""
    apply_global_switches(setting, clock.cuda)
    repeats = max(args.epoch_repeats, 1)
    argv = split_argv(setting, args, 1 + repeats)
    cfg = student_config(args.headline, argv, env)
    train_loader, test_loader = make_loaders(cfg, env, data, memory_format(cfg.channels_last))
    try:
        run = build_run(cfg, env, data, train_loader, test_loader)
        run_dir = tempfile.mkdtemp(prefix="split-", dir=args.save_root)
        timed = TimedStep(run.step.run, clock.cuda)
        logbook = Logbook(run_dir, os.path.join(run_dir, "log.txt"))
        trainer = dataclasses.replace(run.trainer, run_dir=run_dir, logbook=logbook, step=timed,
                                      task_state=run.objective.task_state)
        progress = Progress()
        with contextlib.redirect_stdout(sys.stderr):  # fit's epoch lines; stdout carries the report
            first = clock.seconds(lambda: dataclasses.replace(trainer, cfg=cfg.replace(epochs=1)).fit(progress),
                                  events=False)
            wall = clock.seconds(lambda: trainer.fit(progress), events=False)
        logbook.close()
    finally:
        close_loaders(train_loader, test_loader)
    rows = logbook.rows
    row = {"pair": args.headline, "method": "wttm", "setting": setting.name, "step_mode": step_mode(run),
           "argv": argv, "train_images": data.train_images.shape[0], "test_images": data.test_images.shape[0],
           "steps_per_epoch": len(train_loader), "epochs": repeats, "first_epoch_s": first,
           "first_in_step_s": timed.in_step_s(1)}
    timed_epochs = range(2, 2 + repeats)
    row.update(split_figures(wall, [float(r["seconds"]) for r in rows[1:]],
                             [timed.in_step_s(e) for e in timed_epochs], sum(timed.calls[e] for e in timed_epochs)))
    row.update(full_epoch(row))
    return row


def split_figures(wall_s: float, fit_s: list[float], in_step_s: list[float], steps: int) -> dict[str, float]:
    """Per-epoch means of the timed epochs: wall, in the step, the rest of ``fit``'s seconds
    (loader, meters, validation) and the rest of the wall time (checkpoints, logbook)."""
    n = len(fit_s)
    epoch, fit, step = wall_s / n, sum(fit_s) / n, sum(in_step_s) / n
    return {"epoch_s": epoch, "in_step_s": step, "loop_s": fit - step, "checkpoint_s": epoch - fit,
            "outside_s": epoch - step, "in_step_share": step / epoch if epoch > 0 else 0.0,
            "ms_per_step": 1e3 * sum(in_step_s) / max(steps, 1)}


def full_epoch(row: dict[str, Any]) -> dict[str, float]:
    """The row projected to a full CIFAR-100 epoch (782 steps, 50,000/10,000 images) and run.

    The step and the loop's time (loader, meters, validation) scale with the images; the
    checkpoints and logbook are per epoch. The run adds the first epoch's extra (warm-up,
    capture) once.
    """
    scale = CIFAR_TRAIN / row["train_images"]
    step = CIFAR_STEPS * row["ms_per_step"] / 1e3
    outside = row["loop_s"] * scale + row["checkpoint_s"]
    full = step + outside
    return {"full_in_step_s": step, "full_outside_s": outside, "full_epoch_s": full,
            "projected_240_s": CIFAR_EPOCHS * full + max(row["first_epoch_s"] - row["epoch_s"], 0.0)}
