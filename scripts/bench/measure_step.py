"""The training step, built only the way ``train_student.py`` builds it.

A step row's run comes from :func:`helper.student_flags.parse_config` (the same flags a user
would type), :func:`~helper.student.build_objective`, :func:`~helper.student.assemble_step` and
:class:`helper.loop.Trainer`, and is timed through ``Trainer.train_epoch`` over a few
prepared batches (teacher under ``inference_mode``, student forward/backward, SGD step,
device meters). The networks keep their random initialisation; the row records the command
line and the resulting configuration.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

import models
from dataset.loader import DeviceLoader
from helper import distributed
from helper.config import Config
from helper.distill import DistillObjective
from helper.loop import NonFiniteLoss, Trainer
from helper.speed import CompiledOrEager, memory_format
from helper.step import unpack
from helper.student import Step, assemble_step, build_objective
from helper.student_flags import parse_config
from scripts.bench.timing import Clock, Setting, apply_global_switches, count_flops, count_kernels, summarize

RECIPE_ROW = {"kd": "KD", "wttm": "WTTM", "crd": "CRD", "dkd": "DKD", "itrd": "ITRD"}
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def recipe_flags(teacher: str, student: str, method: str, headline: str) -> list[str]:
    """The paper recipe's flags for the CIFAR cell, else the headline pair's, else the method alone."""
    try:
        from helper.tables import recipes
        cells = [c for c in recipes.load_cells() if c.method == RECIPE_ROW.get(method) and c.runnable]
        for pair in ((teacher, student), tuple(headline.split(":"))):
            for cell in cells:
                if (cell.teacher, cell.student) == pair:
                    return cell.flags()
    except Exception as err:  # the recipes are a convenience here, not a dependency
        warnings.warn(f"recipes unavailable ({err}); using --distill {method} defaults")
    return ["--distill", method]


def student_argv(pair: str, method_flags: Sequence[str], setting: Setting, save_root: str,
                 extra: Sequence[str] = ()) -> list[str]:
    """The ``train_student.py`` command line of a step row (``--path_t`` is never read)."""
    student = pair.split(":")[1]
    return ["--path_t", "unused.pth", "--model_s", student, *method_flags, "--seed", "1",
            "--save_root", save_root, "--print_freq", str(10 ** 9), *setting.flags(), *extra]


def student_config(pair: str, argv: Sequence[str], env: distributed.DistEnv) -> Config:
    """The validated configuration ``train_student.py`` builds from ``argv`` for this pair's teacher."""
    return parse_config(argv, env, pair.split(":")[0])


def config_record(cfg: Config) -> dict[str, Any]:
    """``cfg`` as plain JSON values (what the report stores and the tests compare)."""
    return json.loads(json.dumps(dict(cfg), default=str))


class CycledBatches:
    """A loader of ``steps`` batches cycling through a few prepared ones (no loader cost)."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches = batches
        self.steps = 1

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


@dataclass
class BuiltRun:
    """A run assembled as ``helper.student.train`` assembles it (no checkpoint, no logbook)."""

    cfg: Config
    objective: DistillObjective
    step: Step
    trainer: Trainer


def build_run(cfg: Config, env: distributed.DistEnv, data: Any, loader: Any, test_loader: Any = ()) -> BuiltRun:
    """Teacher (random init), objective, step and Trainer for ``cfg``.

    Args:
        data: what ``build_objective`` reads: ``num_classes``, ``train_labels [N]`` on the
            device, ``image_size`` (an ImageDataset, or the ImageNet stand-in).
        loader / test_loader: what the Trainer iterates.
    """
    torch.manual_seed(0)
    teacher = models.create_model(cfg.model_t, data.num_classes).to(env.device).eval().requires_grad_(False)
    objective = build_objective(cfg, env, data, teacher)
    fmt = memory_format(cfg.channels_last)
    step = assemble_step(cfg, env, objective, teacher, fmt)
    trainer = Trainer(cfg, env, step.trainable, step.student, cfg.model_s, step.optimizer, loader,
                      test_loader, cfg.save_root, None, teacher=step.teacher, memory_format=fmt,
                      step=step.run)
    return BuiltRun(cfg, objective, step, trainer)


def compile_status(run: BuiltRun) -> str:
    """``compiled``, ``eager fallback`` (the switch warned and ran eagerly) or ``off``."""
    parts = (run.objective.student, getattr(run.step.teacher, "model", None))
    wrapped = [m for m in parts if isinstance(m, CompiledOrEager)]
    if not wrapped:
        return "off"
    return "compiled" if all(m.compiled for m in wrapped) else "eager fallback"


def step_mode(run: BuiltRun) -> str:
    """How the run's step ran: its header line (CUDA graph or eager, and why), plus a note
    when a captured step fell back to eager."""
    fell_back = getattr(run.step.run, "failed", False)
    return run.step.mode + ("; the capture failed its check and ran eagerly" if fell_back else "")


def eager_step(run: BuiltRun) -> Callable[..., Any]:
    """The eager step the run's step is or replays (what the FLOP counter can see)."""
    return getattr(run.step.run, "eager", run.step.run)


def count_step_flops(run: BuiltRun, batch: Batch) -> Optional[float]:
    """FLOPs of one eager step on ``batch``."""
    step = eager_step(run)
    return count_flops(lambda: step(*unpack(batch), 1))


def time_steps(run: BuiltRun, loader: CycledBatches, clock: Clock, warmup: int, steps: int,
               repeats: int) -> tuple[dict[str, Any], Callable[[], None]]:
    """Runs ``warmup`` steps twice (the first includes compilation, timed apart), then
    ``repeats`` timed passes of ``steps`` steps.

    Returns:
        ms/step statistics, the first call's seconds and the last loss; and a function that
        runs one more step the same way (for the FLOP and kernel counters).
    """
    stats: dict[str, Any] = {}

    def epoch() -> None:
        try:
            stats.update(run.trainer.train_epoch(1))
        except NonFiniteLoss:  # raised at the epoch-end read, after every step ran: timing holds
            stats["loss"], stats["note"] = float("nan"), "non-finite loss with the random-init teacher"
    loader.steps = warmup
    first = clock.seconds(epoch, events=False)  # compilation lands here
    clock.seconds(epoch)  # settles the allocator and autotuning
    loader.steps = steps
    samples = [1e3 * clock.seconds(epoch) / steps for _ in range(repeats)]
    loader.steps = 1
    return ({"ms_per_step": summarize(samples), "first_call_s": first, "warmup_steps": 2 * warmup,
             "loss": stats.get("loss"), "note": stats.get("note")}, epoch)


def cifar_batches(data: Any, device: torch.device, batch: int = 64, count: int = 4) -> dict[bool, list[Batch]]:
    """``count`` augmented batches of ``data`` from ``DeviceLoader``, per layout (channels_last?)."""
    out = {}
    for cl in (False, True):
        loader = DeviceLoader(data.train_images.to(device), data.train_labels.to(device), batch, data.mean,
                              data.std, train=True, seed=0, memory_format=memory_format(cl))
        out[cl] = [b for _, b in zip(range(count), loader)]
    return out


def step_row(pair: str, method: str, setting: Setting, env: distributed.DistEnv, data: Any,
             batches: dict[bool, list[Batch]], args: Any, clock: Clock,
             flops: dict[tuple[str, str], Optional[float]]) -> dict[str, Any]:
    """One CIFAR step row: the cell's paper recipe under ``setting``, ms/step over the repeats."""
    apply_global_switches(setting, clock.cuda)
    teacher, student = pair.split(":")
    extra = ["--nce_k", str(args.nce_k)] if args.nce_k else []
    argv = student_argv(pair, recipe_flags(teacher, student, method, args.headline), setting, args.save_root, extra)
    loader = CycledBatches(batches[setting.channels_last])
    start = time.perf_counter()
    run = build_run(student_config(pair, argv, env), env, data, loader)
    build_s = time.perf_counter() - start
    timed, one_step = time_steps(run, loader, clock, args.warmup, args.steps, args.repeats)
    row = {"pair": pair, "method": method, "setting": setting.name, **timed, "build_s": build_s,
           "compile": compile_status(run), "step_mode": step_mode(run), "argv": argv,
           "config": config_record(run.cfg)}
    if (pair, method) not in flops and not setting.compile:
        flops[(pair, method)] = count_step_flops(run, loader.batches[0])
    row["flops_per_step"] = flops.get((pair, method))
    if pair == args.headline and method == "wttm":
        row["kernels_per_step"] = count_kernels(one_step, clock)
    return row
