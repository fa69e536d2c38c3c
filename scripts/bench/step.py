"""Section ``steps``: the training step, built only the way ``train_student.py`` builds it.

A run comes from :func:`helper.student_flags.parse_config` (the flags a user would type),
:func:`helper.student.build_objective` and :func:`helper.assemble.assemble` (the one assembly
of every run: step and :class:`helper.loop.Trainer`), and is timed through ``Trainer.train_epoch`` over a few prepared
batches (teacher under ``inference_mode``, student forward/backward, optimiser step, device
meters). The networks keep their random initialisation; a row records the command line and
the resulting configuration. The other sections build their runs with :func:`build_run` too.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

import models
from helper import distributed
from helper.config import Config
from helper.distill import DistillObjective
from helper.loop import NonFiniteLoss, Trainer
from helper.speed import CompiledOrEager, memory_format
from helper.step import unpack
from helper.assemble import assemble
from helper.student import build_objective
from helper.student_flags import parse_config
from paper_tables import recipes
from scripts.bench import report
from scripts.bench.data import Batch, cifar_batches
from scripts.bench.timing import Bench, Clock, Setting, apply_global_switches, count_flops, count_kernels, summarize

RECIPE_ROW = {"kd": "KD", "wttm": "WTTM", "crd": "CRD", "dkd": "DKD", "itrd": "ITRD"}
PlanItem = tuple[int, str, str, Setting]  # (priority, teacher:student, method, setting)


def recipe_flags(teacher: str, student: str, method: str, headline: str) -> list[str]:
    """The paper recipe's flags for the CIFAR cell, else the headline pair's, else the method alone."""
    try:
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
    """The ``train_student.py`` command line of a row (``--path_t`` is never read)."""
    return ["--path_t", "unused.pth", "--model_s", pair.split(":")[1], *method_flags, "--seed", "1",
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
    """A run assembled as ``train_student.py`` assembles it (no run folder, no logbook)."""

    cfg: Config
    objective: DistillObjective
    trainer: Trainer

    @property
    def eager_step(self) -> Callable[..., Any]:
        """The eager step the trainer's step is or replays (what the FLOP counter can see)."""
        return getattr(self.trainer.step, "eager", self.trainer.step)


def build_run(cfg: Config, env: distributed.DistEnv, data: Any, loader: Any, test_loader: Any = ()) -> BuiltRun:
    """Teacher (random init), objective (:func:`helper.student.build_objective`) and the
    Trainer of :func:`helper.assemble.assemble`, the one assembly every run goes through.

    Args:
        data: what ``build_objective`` reads: ``num_classes``, ``train_labels [N]``,
            ``image_size`` (an ImageDataset, or the ImageNet stand-in).
        loader / test_loader: what the Trainer iterates.
    """
    torch.manual_seed(0)
    teacher = models.create_model(cfg.model_t, data.num_classes).to(env.device).eval().requires_grad_(False)
    objective = build_objective(cfg, env, data, teacher)
    with contextlib.redirect_stdout(sys.stderr):  # the run's step-mode line; stdout carries the report
        trainer = assemble(cfg, env, objective, cfg.model_s, (loader, test_loader), cfg.save_root, None,
                           memory_format(cfg.channels_last), teacher)
    return BuiltRun(cfg, objective, trainer)


def compile_status(run: BuiltRun) -> str:
    """``compiled``, ``eager fallback`` (the switch warned and ran eagerly) or ``off``."""
    parts = (run.objective.student, getattr(getattr(run.eager_step, "teacher", None), "model", None))
    wrapped = [m for m in parts if isinstance(m, CompiledOrEager)]
    if not wrapped:
        return "off"
    return "compiled" if all(m.compiled for m in wrapped) else "eager fallback"


def step_mode(run: BuiltRun) -> str:
    """How the run's step ran: its header line (CUDA graph or eager, and why), plus a note
    when a captured step fell back to eager."""
    fell_back = getattr(run.trainer.step, "failed", False)
    return run.trainer.step_mode + ("; the capture failed its check and ran eagerly" if fell_back else "")


def count_step_flops(run: BuiltRun, batch: Batch) -> Optional[float]:
    """FLOPs of one eager step on ``batch`` (a graph step's eager twin: what the counter sees)."""
    return count_flops(lambda: run.eager_step(*unpack(batch), 1))


def time_steps(run: BuiltRun, loader: CycledBatches, clock: Clock, warmup: int, steps: int,
               repeats: int) -> tuple[dict[str, Any], Callable[[], None]]:
    """Runs ``warmup`` steps twice (the first includes compilation or capture, timed apart),
    then ``repeats`` timed passes of ``steps`` steps.

    Returns:
        ms/step statistics, the first call's seconds and the last loss; and a function that
        runs one more step the same way (for the kernel counter).
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


def step_row(pair: str, method: str, setting: Setting, bench: Bench, data: Any,
             batches: dict[bool, list[Batch]]) -> dict[str, Any]:
    """One CIFAR step row: the cell's paper recipe under ``setting``, ms/step over the repeats."""
    args, env, clock = bench.args, bench.env, bench.clock
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
    if (pair, method) not in bench.flops and not setting.compile:
        bench.flops[(pair, method)] = count_step_flops(run, loader.batches[0])
    row["flops_per_step"] = bench.flops.get((pair, method))
    if pair == args.headline and method == "wttm":
        row["kernels_per_step"] = count_kernels(one_step, clock)
    return row


def priority(pair: str, method: str, setting: Setting, headline: str) -> int:
    """Order of the step grid under a time budget: what the defaults and the epoch section
    need first (0-1 run before the epoch section, which picks the fastest headline WTTM setting)."""
    head, wttm = pair == headline, method == "wttm"
    if setting.graph:  # the loop's CUDA graph against the eager default: the headline WTTM one first
        return 1 if head and wttm else (4 if head else 7)
    if head and wttm and setting.name in ("bf16+cl+compile", "bf16+cl+cg", "fp32+cudnn", "bf16+cl+cudnn"):
        return 1
    if setting.cudnn_benchmark or setting.cudagraphs or setting.eager:
        return 4 if head and wttm else 7
    if not setting.compile:
        return 0 if head else (2 if setting.name in ("fp32", "bf16+cl") else 3)
    return 4 if head and wttm else (5 if head else 6)


def step_plan(pairs: list[str], methods: list[str], settings: list[Setting], headline: str,
              grid: str) -> list[PlanItem]:
    """Every (pair, method, setting) of the grid, sorted by :func:`priority`; with ``grid ==
    "headline"`` the other pairs get only the first setting."""
    items = [(priority(p, m, s, headline), p, m, s) for p in pairs for m in methods for s in settings
             if grid == "full" or p == headline or s == settings[0]]
    return sorted(items, key=lambda item: item[0])


def run_steps(bench: Bench, plan: list[PlanItem], last_priority: int, data: Any, reserve: Callable[[], float]) -> None:
    """Runs (and removes from ``plan``) its items up to ``last_priority`` that fit the budget,
    keeping ``reserve()`` seconds for the epoch section."""
    batches = cifar_batches(data, bench.env.device) if plan and plan[0][0] <= last_priority else None
    while plan and plan[0][0] <= last_priority:
        _, pair, method, setting = plan.pop(0)
        row = bench.budgeted("compile" if setting.compile else "eager", f"step {pair} {method} {setting.name}",
                             lambda: step_row(pair, method, setting, bench, data, batches), reserve())
        if row is not None:
            bench.result["steps"].append(row)
            bench.save()


def loader_share(result: dict[str, Any], row: dict[str, Any]) -> Optional[float]:
    """Share of (loader + step) time the on-device loader takes, for a step row's layout."""
    name = "ours: DeviceLoader" + (", channels_last" if "+cl" in row["setting"] else "")
    loader = next((r for r in result["loader"] if r["pipeline"] == name), None)
    if loader is None:
        return None
    return loader["ms_per_batch"] / (loader["ms_per_batch"] + row["ms_per_step"]["median"])


def targets(result: dict[str, Any]) -> list[str]:
    shares = [s for s in (loader_share(result, r) for r in result["steps"]) if s is not None]
    if not shares:
        return []
    tail = report.SMOKE if result.get("smoke") else "target: not the bottleneck"
    return [f"- CIFAR loader share of (loader + step) time: {100 * min(shares):.2f}–"
            f"{100 * max(shares):.2f} % over the step rows — {tail}"]


def tables(result: dict[str, Any]) -> list[str]:
    if "steps" not in result["sections"]:
        return []
    lines = ["## Training step (batch 64: teacher forward + student forward/backward + SGD)", "",
             "ms/step over repeats; first call = the warm-up steps incl. compilation or capture; "
             "TFLOP/s = counted FLOPs / median; loader share = DeviceLoader ms/batch / (that + step).", ""]
    rows = []
    for r in result["steps"]:
        share = loader_share(result, r)
        rows.append([r["pair"], r["method"], r["setting"], *report.quartiles(r["ms_per_step"]),
                     f"{r['first_call_s']:.2f}", *report.tflops(r), r.get("kernels_per_step"),
                     f"{100 * share:.2f} %" if share is not None else None, report.how(r)])
    return lines + report.table(["teacher:student", "method", "setting", "ms/step", "IQR", "min–max", "first call s",
                                 "GFLOP/step", "TFLOP/s", "kernels", "loader share", "compile; step; note"], rows)
