"""What runs first and what fits: priorities of the step grid, the time budget, and the
wrapper that turns one measurement's failure into a recorded error."""
from __future__ import annotations

import gc
import sys
import time
import traceback
import warnings
from typing import Any, Callable

import torch

from scripts.bench.timing import Setting

# Seconds a kind of item is assumed to cost until one has been measured.
FIRST_COST = {"eager": 20.0, "imagenet loader": 60.0, "imagenet eager": 60.0, "packing": 120.0, "cache": 60.0}
COMPILE_COST = {"cuda": 150.0, "cpu": 600.0}
IMAGENET_COMPILE_COST = {"cuda": 240.0, "cpu": 1200.0}

PlanItem = tuple[int, str, str, Setting]  # (priority, teacher:student, method, setting)


def priority(pair: str, method: str, setting: Setting, headline: str) -> int:
    """Order of the step grid under a time budget: what the defaults and targets need first
    (0-1 run before the epoch section, which picks the fastest headline WTTM setting)."""
    head, name = pair == headline, setting.name
    if setting.eager:  # the baseline of the CUDA-graph default: the headline WTTM one first
        return 1 if head and method == "wttm" else (4 if head else 7)
    if head and method == "wttm" and name in ("bf16+cl+compile", "bf16+cl+cg", "fp32+cudnn", "bf16+cl+cudnn"):
        return 1
    if setting.cudnn_benchmark or setting.cudagraphs:
        return 4 if head and method == "wttm" else 7
    if not setting.compile:
        return 0 if head else (2 if name in ("fp32", "bf16+cl") else 3)
    if head and method == "wttm":
        return 4
    return 5 if head else 6


def step_plan(pairs: list[str], methods: list[str], settings: list[Setting], headline: str,
              grid: str) -> list[PlanItem]:
    """Every (pair, method, setting) of the grid, sorted by :func:`priority`; with ``grid ==
    "headline"`` the other pairs get only the first setting."""
    items = [(priority(p, m, s, headline), p, m, s) for p in pairs for m in methods for s in settings
             if grid == "full" or p == headline or s == settings[0]]
    return sorted(items, key=lambda item: item[0])


class Budget:
    """A deadline and running estimates of what each kind of item costs (seconds).

    Kinds: ``eager``/``compile`` (CIFAR steps), ``imagenet loader``, ``imagenet eager``,
    ``imagenet compile``. An eager kind's estimate is its last measurement; a compile
    kind's never drops below half its previous estimate (compilation varies).
    """

    def __init__(self, seconds: float, cuda: bool) -> None:
        self.deadline = time.perf_counter() + seconds if seconds > 0 else float("inf")
        where = "cuda" if cuda else "cpu"
        self.cost = {**FIRST_COST, "compile": COMPILE_COST[where], "imagenet compile": IMAGENET_COMPILE_COST[where]}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, kind: str, reserve: float = 0.0) -> bool:
        return self.left() >= self.cost[kind] + reserve

    def record(self, kind: str, seconds: float) -> None:
        self.cost[kind] = max(seconds, self.cost[kind] * 0.5) if kind.endswith("compile") else seconds


def epoch_reserve(result: dict[str, Any], args: Any) -> float:
    """Seconds to keep for the epoch section, (warm-up + repeats) epochs of two settings at
    the slowest measured headline WTTM step time (0 until one is measured)."""
    rows = [r["ms_per_step"]["median"] for r in result["steps"]
            if r["pair"] == args.headline and r["method"] == "wttm"]
    if args.epoch_images <= 0 or result["epoch"] or not rows:
        return 0.0
    per_epoch = max(rows) / 1e3 * (args.epoch_images / 64) * 1.3  # + loader and validation
    return 2 * (1 + args.epoch_repeats) * per_epoch + 30.0


def run_item(result: dict[str, Any], name: str, fn: Callable[[], Any], cuda: bool) -> Any:
    """Runs one measurement; an error is recorded in ``result["errors"]`` (not raised) and
    the run goes on. Compilation warnings are attached to a dict result as ``warnings``."""
    print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as err:
            traceback.print_exc()
            result["errors"].append({"item": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            out = None
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    notes = sorted({str(w.message)[:200] for w in caught if "compile" in str(w.message).lower()})
    if isinstance(out, dict) and notes:
        out["warnings"] = notes
    return out
