"""Sections ``epoch`` and ``split``: a whole CIFAR epoch of the headline pair with WTTM.

- ``epoch``: ``train_epoch`` + ``evaluate`` over the run's own ``make_loaders`` (synthetic
  CIFAR-shaped images), projected to the full 50,000/10,000-image epoch and 240 epochs, with
  the FLOP floor at the device's peak.
- ``split``: the same run under ``Trainer.fit`` with a run folder, logbook and checkpoints
  (a warm-up epoch, then ``--epoch_repeats``), eager (the default) against ``+graph``, each
  epoch split into the time in the step (CUDA events or ``perf_counter`` around each step
  call), the rest of ``fit``'s own seconds (loader, meters, validation) and the rest of the
  wall time (checkpoints, logbook).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from typing import Any, Callable

import torch

from helper.evaluate import evaluate
from helper.logbook import Logbook
from helper.loop import Progress
from helper.data_setup import close_loaders, make_loaders
from helper.speed import memory_format
from helper.step import StepOut
from scripts.bench import report
from scripts.bench.data import synthetic_data
from scripts.bench.step import (build_run, compile_status, count_step_flops, recipe_flags, step_mode, student_argv,
                                student_config)
from scripts.bench.timing import Bench, Setting, apply_global_switches, count_flops, peak_tflops, summarize

CIFAR_TRAIN, CIFAR_TEST, CIFAR_STEPS, CIFAR_EPOCHS = 50000, 10000, 782, 240
CIFAR_EPOCH_S_TARGET = 1.5  # a full epoch incl. validation (240 epochs in ~6 min)
SPLIT_SETTINGS = ("fp32", "fp32+graph")  # the default (eager) and --cuda_graphs on


def headline_argv(setting: Setting, args: Any, extra: tuple[str, ...] = ()) -> list[str]:
    """The headline WTTM run's ``train_student.py`` command line under ``setting``."""
    teacher, student = args.headline.split(":")
    return student_argv(args.headline, recipe_flags(teacher, student, "wttm", args.headline), setting,
                        args.save_root, extra)


def epoch_row(setting: Setting, bench: Bench, data: Any) -> dict[str, Any]:
    """Seconds of a first epoch (warm-up, compilation) and of ``args.epoch_repeats`` more."""
    args, env, clock = bench.args, bench.env, bench.clock
    apply_global_switches(setting, clock.cuda)
    argv = headline_argv(setting, args)
    cfg = student_config(args.headline, argv, env)
    train_loader, test_loader = make_loaders(cfg, env, data, memory_format(cfg.channels_last))
    run = build_run(cfg, env, data, train_loader, test_loader)
    trainer = run.trainer

    def validate() -> None:
        evaluate(trainer.model, test_loader, cfg.precision, trainer.memory_format)
    first = clock.seconds(lambda: (trainer.train_epoch(1), validate()), events=False)
    train_s, eval_s = [], []
    for epoch in range(2, 2 + args.epoch_repeats):
        train_s.append(clock.seconds(lambda: trainer.train_epoch(epoch)))
        eval_s.append(clock.seconds(validate))
    epoch_s = [a + b for a, b in zip(train_s, eval_s)]
    n_train, n_test = data.train_images.shape[0], data.test_images.shape[0]
    full = statistics.median(train_s) * CIFAR_TRAIN / n_train + statistics.median(eval_s) * CIFAR_TEST / n_test
    row = {"pair": args.headline, "method": "wttm", "setting": setting.name, "train_images": n_train,
           "test_images": n_test, "steps_per_epoch": len(train_loader), "first_epoch_s": first,
           "train_s": summarize(train_s), "eval_s": summarize(eval_s), "epoch_s": summarize(epoch_s),
           "full_epoch_s": full, "projected_240_s": CIFAR_EPOCHS * full + max(first - statistics.median(epoch_s), 0.0),
           "compile": compile_status(run), "step_mode": step_mode(run), "argv": argv}
    batch = next(iter(trainer.train_loader))
    step = bench.flops.get((args.headline, "wttm"))
    if step is None and not setting.compile:  # a counter around a compiled module would recompile it
        step = count_step_flops(run, batch)
    with torch.inference_mode():
        fwd = count_flops(lambda: trainer.model(batch[0]))
    if step is not None and fwd is not None:
        total = CIFAR_STEPS * step + CIFAR_TEST * fwd / batch[0].shape[0]
        peak = args.peak_tflops or peak_tflops(clock, setting.precision)
        row.update(epoch_flops=total, peak_tflops=peak, flop_floor_s=total / (peak * 1e12) if peak else None)
    return row


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
        result = self.step(images, labels, index, views, epoch)
        end.record()
        self.events[epoch].append((begin, end))
        return result

    def in_step_s(self, epoch: int) -> float:
        """Seconds spent in the step during ``epoch`` (reads the CUDA events: a host sync)."""
        for begin, end in self.events.pop(epoch, []):
            end.synchronize()
            self.seconds[epoch] += begin.elapsed_time(end) / 1e3
        return self.seconds[epoch]


def split_row(setting: Setting, bench: Bench, data: Any) -> dict[str, Any]:
    """One epoch-split row: a warm-up epoch, then ``args.epoch_repeats`` timed epochs of ``fit``."""
    args, env, clock = bench.args, bench.env, bench.clock
    apply_global_switches(setting, clock.cuda)
    repeats = max(args.epoch_repeats, 1)
    argv = headline_argv(setting, args, ("--epochs", str(1 + repeats)))
    cfg = student_config(args.headline, argv, env)
    train_loader, test_loader = make_loaders(cfg, env, data, memory_format(cfg.channels_last))
    try:
        run = build_run(cfg, env, data, train_loader, test_loader)
        run_dir = tempfile.mkdtemp(prefix="split-", dir=args.save_root)
        timed = TimedStep(run.trainer.step, clock.cuda)
        logbook = Logbook(run_dir, os.path.join(run_dir, "log.txt"))
        trainer = dataclasses.replace(run.trainer, run_dir=run_dir, logbook=logbook, step=timed)
        progress = Progress()
        with contextlib.redirect_stdout(sys.stderr):  # fit's epoch lines; stdout carries the report
            first = clock.seconds(lambda: dataclasses.replace(trainer, cfg=cfg.replace(epochs=1)).fit(progress),
                                  events=False)
            wall = clock.seconds(lambda: trainer.fit(progress), events=False)
        logbook.close()
    finally:
        close_loaders(train_loader, test_loader)
    row = {"pair": args.headline, "method": "wttm", "setting": setting.name, "step_mode": step_mode(run),
           "argv": argv, "train_images": data.train_images.shape[0], "test_images": data.test_images.shape[0],
           "steps_per_epoch": len(train_loader), "epochs": repeats, "first_epoch_s": first,
           "first_in_step_s": timed.in_step_s(1)}
    timed_epochs = range(2, 2 + repeats)
    row.update(split_figures(wall, [float(r["seconds"]) for r in logbook.rows[1:]],
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
    step = CIFAR_STEPS * row["ms_per_step"] / 1e3
    outside = row["loop_s"] * CIFAR_TRAIN / row["train_images"] + row["checkpoint_s"]
    return {"full_in_step_s": step, "full_outside_s": outside, "full_epoch_s": step + outside,
            "projected_240_s": CIFAR_EPOCHS * (step + outside) + max(row["first_epoch_s"] - row["epoch_s"], 0.0)}


def reserve(bench: Bench, any_time: bool = False) -> float:
    """Seconds to keep for the epoch section: (warm-up + repeats) epochs of two settings at the
    slowest measured headline WTTM step time; 0 until one is measured, or once the section
    has run (unless ``any_time``)."""
    args, result = bench.args, bench.result
    rows = [r["ms_per_step"]["median"] for r in result["steps"] if r["pair"] == args.headline and r["method"] == "wttm"]
    if args.epoch_images <= 0 or (result["epoch"] and not any_time) or not rows:
        return 0.0
    per_epoch = max(rows) / 1e3 * (args.epoch_images / 64) * 1.3  # + loader and validation
    return 2 * (1 + args.epoch_repeats) * per_epoch + 30.0


def _data(args: Any, device: torch.device) -> Any:
    return synthetic_data(args.epoch_images, args.epoch_images // 5).to(device)


def run_epochs(bench: Bench) -> None:
    """The default setting, the fastest measured headline WTTM setting the scripts offer as
    flags, then the fastest of all (``+cudnn``/``+cg`` included)."""
    args, result = bench.args, bench.result
    if args.epoch_images <= 0:
        return bench.skip("epoch", "--epoch_images 0")
    head = [r for r in result["steps"] if r["pair"] == args.headline and r["method"] == "wttm"
            and r["compile"] != "eager fallback"]
    flags = [r for r in head if not ({"cudnn", "cg"} & set(r["setting"].split("+")))]
    fastest = lambda rows: (  # noqa: E731
        [min(rows, key=lambda r: r["ms_per_step"]["median"])["setting"]] if rows else [])
    data = _data(args, bench.env.device)
    for name in dict.fromkeys(["fp32"] + fastest(flags) + fastest(head)):
        setting = Setting.parse(name)
        need = reserve(bench, any_time=True) / 2 + (bench.budget.cost["compile"] if setting.compile else 0.0)
        if bench.budget.left() < need:
            bench.skip(f"epoch {name}")
            continue
        row = bench.item(f"epoch {name}", lambda: epoch_row(setting, bench, data))
        if row is not None:
            result["epoch"].append(row)
        bench.save()


def run_split(bench: Bench) -> None:
    """The headline WTTM run's epochs under ``fit``, eager and ``+graph``."""
    if bench.args.epoch_images <= 0:
        return bench.skip("epoch split", "--epoch_images 0")
    data = _data(bench.args, bench.env.device)
    for name in SPLIT_SETTINGS:
        if bench.budget.left() < reserve(bench, any_time=True) / 2:
            bench.skip(f"epoch split {name}")
            continue
        row = bench.item(f"epoch split {name}", lambda: split_row(Setting.parse(name), bench, data))
        if row is not None:
            bench.result["split"].append(row)
        bench.save()


def targets(result: dict[str, Any]) -> list[str]:
    out = []
    for row in result["epoch"]:
        floor, full = row.get("flop_floor_s"), row["full_epoch_s"]
        out.append(f"- CIFAR epoch ({row['setting']}): **{full:.2f} s** per full CIFAR-100 epoch incl. "
                   f"validation, 240 epochs ≈ {row['projected_240_s'] / 60:.1f} min"
                   + (f"; FLOP floor {floor:.3f} s" if floor else "") + " — "
                   + report.judged(result, f"< {CIFAR_EPOCH_S_TARGET} s (~6 min)", full < CIFAR_EPOCH_S_TARGET))
    return out


def tables(result: dict[str, Any]) -> list[str]:
    lines = []
    if "epoch" in result["sections"]:
        lines += [f"## Whole epoch (train + validation), {result['args']['headline']} WTTM", ""]
        lines += report.table(
            ["setting", "train/test images", "steps", "train s", "eval s", "epoch s (IQR)", "first epoch s",
             "full CIFAR epoch s", "240 epochs min", "FLOP floor s"],
            [[r["setting"], f"{r['train_images']}/{r['test_images']}", r["steps_per_epoch"],
              report.quartiles(r["train_s"], d=3)[0], report.quartiles(r["eval_s"], d=3)[0],
              " ".join(report.quartiles(r["epoch_s"], d=3)[:2]), f"{r['first_epoch_s']:.2f}",
              f"{r['full_epoch_s']:.2f}", f"{r['projected_240_s'] / 60:.1f}",
              f"{r['flop_floor_s']:.3f}" if r.get("flop_floor_s") else None] for r in result["epoch"]])
    if "split" in result["sections"]:
        lines += _split_table(result.get("split", []))
    return lines


def _split_table(rows: list[dict[str, Any]]) -> list[str]:
    head = f"{rows[0]['pair']} WTTM" if rows else "headline WTTM"
    lines = [f"## Epoch split: the whole epoch as Trainer.fit runs it, {head}, eager vs +graph", "",
             "Means of the timed epochs after a warm-up epoch. In the step: the step calls (CUDA events / "
             "perf_counter around each). Loop: fit's own epoch seconds less that (loader, meters, validation). "
             "Checkpoints: the rest of the wall time (resume and best checkpoints, metrics.csv, text log). "
             "Full epoch: step × 782 steps, loop × 50,000 / training images, checkpoints as measured.", ""]
    cells = [[r["setting"], report.step_word(r["step_mode"]), f"{r['train_images']}/{r['test_images']}",
              r["steps_per_epoch"], r["epochs"], f"{r['epoch_s']:.3f}",
              f"{r['in_step_s']:.3f} ({100 * r['in_step_share']:.0f} %)", f"{r['loop_s']:.3f}",
              f"{r['checkpoint_s']:.3f}", f"{r['ms_per_step']:.2f}",
              f"{r['first_epoch_s']:.2f} ({r['first_in_step_s']:.2f})",
              f"{r['full_epoch_s']:.2f} ({r['full_in_step_s']:.2f} + {r['full_outside_s']:.2f})",
              f"{r['projected_240_s'] / 60:.1f}"] for r in rows]
    return lines + report.table(["setting", "step", "train/test images", "steps", "epochs", "epoch s", "in step s",
                                 "loop s", "checkpoints s", "step ms", "first epoch s (in step)",
                                 "full epoch s (step + outside)", "240 epochs min"], cells)
