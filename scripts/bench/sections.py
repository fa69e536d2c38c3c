"""The benchmark's sections, each run item by item into one result dict under the time budget.

Order (see :func:`run_all`): CIFAR data pipeline, CRD sampling, ImageNet loader, the CIFAR
step grid's priority 0-1 items, the epoch section (which picks the fastest headline setting
from them), the epoch split, the grid's priority-2 items (the other pairs' default setting,
which the cost projection reads), the teacher cache, packing, the ImageNet step, the rest of
the CIFAR grid, and last the cost projection (arithmetic on what was measured). The result
is saved after every item, so a killed run leaves what it had.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from helper import distributed
from scripts.bench import (measure_cache, measure_cost, measure_crd, measure_epoch, measure_imagenet,
                           measure_loader, measure_packing, measure_split, measure_step)
from scripts.bench.imagenet_files import write_ilsvrc_folder
from scripts.bench.plan import Budget, PlanItem, epoch_reserve, run_item, step_plan
from scripts.bench.timing import Clock, Setting, parse_settings

SECTIONS = ("data", "crd", "steps", "epoch", "split", "cache", "packing", "cost", "imagenet")
SPLIT_SETTINGS = ("fp32", "fp32+eager")  # the scripts' default (a CUDA graph on CUDA) and --cuda_graphs off


@dataclass
class Bench:
    """One benchmark run: where it runs, its options, its budget and what it measured so far.

    Attributes:
        result: the report's data (see :func:`scripts.bench.report.render`).
        save: writes ``result`` out (called after every item).
        flops: FLOPs per step already counted, by ``(pair, method)`` (CIFAR) or pair (ImageNet).
    """

    env: distributed.DistEnv
    args: Any
    clock: Clock
    budget: Budget
    result: dict[str, Any]
    save: Callable[[], None]
    flops: dict = field(default_factory=dict)

    def item(self, name: str, fn: Callable[[], Any]) -> Any:
        return run_item(self.result, name, fn, self.clock.cuda)

    def skip(self, name: str, why: str = "time budget") -> None:
        self.result["skipped"].append(f"{name} ({why})")


def run_all(bench: Bench, sections: set[str]) -> None:
    """Runs the selected ``sections`` (names from :data:`SECTIONS`) in the report's order."""
    args = bench.args
    cifar = {"data", "steps", "epoch"} & sections
    data = measure_loader.synthetic_data(args.step_images, 1).to(bench.env.device) if cifar else None
    if "data" in sections:
        run_data(bench, data)
    if "crd" in sections:
        bench.result["crd"] = bench.item("CRD sampling", lambda: measure_crd.crd_rows(
            bench.clock, args.crd_images, args.crd_k, args.crd_repeats, args.ref_crd_repeats)) or []
        bench.save()
    if "imagenet" in sections:
        run_imagenet_loader(bench)
    plan = step_plan(args.pairs.split(","), args.methods.split(","), parse_settings(args.settings),
                     args.headline, args.grid) if "steps" in sections else []
    run_steps(bench, plan, 1, data)
    if "epoch" in sections:
        run_epochs(bench)
    if "split" in sections:
        run_split(bench)
    run_steps(bench, plan, 2, data)
    if "cache" in sections:
        run_once(bench, "cache", f"teacher cache {args.headline} wttm",
                 lambda: measure_cache.cache_row(args.headline, "wttm", bench.env, args))
    if "packing" in sections:
        run_once(bench, "packing", f"packing {args.headline} wttm",
                 lambda: measure_packing.packing_row(args.headline, "wttm", bench.env, args))
    if "imagenet" in sections:
        run_imagenet_steps(bench)
    run_steps(bench, plan, 99, data)
    if "cost" in sections:
        run_cost(bench)


def run_data(bench: Bench, data: Any) -> None:
    """Our loader in both layouts, then the reference-style pipeline."""
    args, clock = bench.args, bench.clock
    rows = bench.item("data pipeline (ours)", lambda: measure_loader.device_loader_rows(
        data, clock, args.loader_images, args.loader_repeats)) or []
    reference = bench.item("data pipeline (reference-style)", lambda: measure_loader.reference_loader_row(
        data, clock, args.ref_images, args.ref_workers, args.loader_repeats))
    bench.result["loader"] = rows + ([reference] if reference else [])
    bench.save()


def run_steps(bench: Bench, plan: list[PlanItem], last_priority: int, data: Any) -> None:
    """Runs (and removes from ``plan``) its step items up to ``last_priority`` that fit the budget."""
    if not plan or plan[0][0] > last_priority:
        return
    args, result = bench.args, bench.result
    batches = measure_step.cifar_batches(data, bench.env.device)
    while plan and plan[0][0] <= last_priority:
        _, pair, method, setting = plan.pop(0)
        kind = "compile" if setting.compile else "eager"
        name = f"step {pair} {method} {setting.name}"
        if not bench.budget.fits(kind, epoch_reserve(result, args)):
            bench.skip(name)
            continue
        start = time.perf_counter()
        row = bench.item(name, lambda: measure_step.step_row(pair, method, setting, bench.env, data, batches,
                                                             args, bench.clock, bench.flops))
        bench.budget.record(kind, time.perf_counter() - start)
        if row is not None:
            result["steps"].append(row)
        bench.save()


def run_epochs(bench: Bench) -> None:
    """The default setting, the fastest measured headline WTTM setting the scripts offer as
    flags, then the fastest of all (``+cudnn``/``+cg`` included)."""
    args, result = bench.args, bench.result
    if args.epoch_images <= 0:
        bench.skip("epoch", "--epoch_images 0")
        return
    head = [r for r in result["steps"] if r["pair"] == args.headline and r["method"] == "wttm"
            and r["compile"] != "eager fallback"]
    flags = [r for r in head if not ({"cudnn", "cg"} & set(r["setting"].split("+")))]

    def fastest(rows: list[dict[str, Any]]) -> list[str]:
        return [min(rows, key=lambda r: r["ms_per_step"]["median"])["setting"]] if rows else []
    data = measure_loader.synthetic_data(args.epoch_images, args.epoch_images // 5).to(bench.env.device)
    for name in dict.fromkeys(["fp32"] + fastest(flags) + fastest(head)):
        setting = Setting.parse(name)
        need = epoch_reserve({"steps": result["steps"], "epoch": []}, args) / 2
        need += bench.budget.cost["compile"] if setting.compile else 0.0
        if bench.budget.left() < need:
            bench.skip(f"epoch {name}")
            continue
        row = bench.item(f"epoch {name}", lambda: measure_epoch.epoch_row(setting, bench.env, data, args,
                                                                           bench.clock, bench.flops))
        if row is not None:
            result["epoch"].append(row)
        bench.save()


def run_split(bench: Bench) -> None:
    """The headline WTTM run's epochs under ``fit``, split into step and outside, for the
    default setting and ``--cuda_graphs off``."""
    args, result = bench.args, bench.result
    if args.epoch_images <= 0:
        bench.skip("epoch split", "--epoch_images 0")
        return
    data = measure_loader.synthetic_data(args.epoch_images, args.epoch_images // 5).to(bench.env.device)
    for name in SPLIT_SETTINGS:
        setting = Setting.parse(name)
        if bench.budget.left() < epoch_reserve({"steps": result["steps"], "epoch": []}, args) / 2:
            bench.skip(f"epoch split {name}")
            continue
        row = bench.item(f"epoch split {name}", lambda: measure_split.split_row(setting, bench.env, data, args,
                                                                                 bench.clock))
        if row is not None:
            result["split"].append(row)
        bench.save()


def run_once(bench: Bench, kind: str, name: str, fn: Callable[[], Any]) -> None:
    """One item of the ``kind`` section (``cache``, ``packing``) when the budget allows it."""
    if not bench.budget.fits(kind):
        bench.skip(name)
        return
    start = time.perf_counter()
    row = bench.item(name, fn)
    bench.budget.record(kind, time.perf_counter() - start)
    if row is not None:
        bench.result[kind].append(row)
    bench.save()


def run_cost(bench: Bench) -> None:
    """The projected cost of Tables 1 and 2 and of the flagship run, from what was measured."""
    errors = len(bench.result["errors"])
    cost = bench.item("cost projection", lambda: measure_cost.cost_section(bench.result, bench.args.headline))
    if cost is None and len(bench.result["errors"]) == errors:
        bench.skip("cost projection", "no step time was measured")
    bench.result["cost"] = cost
    bench.save()


def run_imagenet_loader(bench: Bench) -> None:
    """Writes the ILSVRC-style folder (once per run) and measures the training loader over it."""
    args, section = bench.args, bench.result["imagenet"]
    if not bench.budget.fits("imagenet loader"):
        bench.skip("imagenet loader")
        return
    start = time.perf_counter()
    root = os.path.join(args.save_root, "ilsvrc")
    folder = bench.item("imagenet JPEGs", lambda: write_ilsvrc_folder(root, args.imagenet_images,
                                                                        args.imagenet_files))
    if folder is not None:
        section["files"] = {k: v for k, v in dataclasses.asdict(folder).items() if k != "root"}
        workers = [int(w) for w in str(args.imagenet_workers).split(",")]
        section["loader"] = bench.item("imagenet loader", lambda: measure_imagenet.loader_rows(
            root, bench.clock, workers, args.loader_repeats)) or []
    bench.budget.record("imagenet loader", time.perf_counter() - start)
    bench.save()


def run_imagenet_steps(bench: Bench) -> None:
    """The ImageNet WTTM step under each ``--imagenet_settings`` setting that fits the budget."""
    args, section = bench.args, bench.result["imagenet"]
    flops: dict = {}
    for setting in parse_settings(args.imagenet_settings):
        kind = "imagenet compile" if setting.compile else "imagenet eager"
        name = f"imagenet step {args.imagenet_pair} wttm {setting.name}"
        if not bench.budget.fits(kind):
            bench.skip(name)
            continue
        start = time.perf_counter()
        row = bench.item(name, lambda: measure_imagenet.step_row(setting, bench.env, args, bench.clock, flops))
        bench.budget.record(kind, time.perf_counter() - start)
        if row is not None:
            section["steps"].append(row)
        bench.save()
