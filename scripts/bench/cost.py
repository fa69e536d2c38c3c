"""The projected cost of whole paper tables from measured rates: the arithmetic, nothing measured.

For each run of a table (a cell's ``runs`` trials, 240 epochs of 50,000 images at batch 64):

    run seconds = epochs × (steps × step seconds × c + outside seconds per epoch)

with ``steps = ceil(50,000 / 64) = 782``, the step time of the cell's pair and method (or of the
stand-in :func:`rate_source` picks), ``c`` the cached/live step-time ratio for runs whose
weighted methods are all logit-only (the teacher-output cache serves them), else 1, and the
outside time (loader, meters, validation, checkpoints) per full epoch. The runs are then
packed K to a device with :func:`helper.tables.packing.estimate` (a run's rate is ``ratio(K) /
K`` of one run's alone; K from :func:`helper.tables.packing.choose_k`), and the cache is built
once per teacher of a logit-only cell (8.1 M views at the build rate), before the runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from helper.tables import packing

# The benchmark's --methods name for each paper row (a row adding WTTM to a feature method
# is timed as that method: the WTTM term is a few logit kernels).
BENCH_METHOD = {"KD": "kd", "WTTM": "wttm", "TTM": "ttm", "DIST": "dist", "DKD": "dkd", "CRD": "crd",
                "ITRD": "itrd", "FitNet": "hint", "AT": "attention", "VID": "vid", "RKD": "rkd", "PKT": "pkt",
                "WTTM+CRD": "crd", "WTTM+ITRD": "itrd"}
# Stand-ins, in order, for a method the benchmark did not time on a pair.
LOGIT_STANDINS = ("wttm", "kd", "ttm", "dist", "dkd")
FEATURE_STANDINS = ("crd", "itrd", "hint", "attention", "vid", "rkd", "pkt")


@dataclass(frozen=True)
class CellRuns:
    """The runs of one table cell: ``runs`` trials of ``method`` (paper row) on ``pair``."""

    table: Any
    pair: str
    method: str
    runs: int
    logit_only: bool


@dataclass(frozen=True)
class Rates:
    """The measured figures a projection uses.

    Attributes:
        step_ms: ms per batch-64 training step with the live teacher, by ``(teacher:student,
            benchmark method)``.
        outside_s: seconds per full CIFAR-100 epoch outside the step; 0 when not measured.
        packing: aggregate images/s of K runs on one device over one run's, by K.
        cache_ratio: cached / live step time; None when no cache is projected.
        build_views_per_s: the cache's build rate (views/s); None when no cache is projected.
        headline: the pair standing in for pairs that share no network with a measured one.
    """

    step_ms: Mapping[tuple[str, str], float]
    outside_s: float = 0.0
    packing: Mapping[int, float] = field(default_factory=lambda: {1: 1.0})
    cache_ratio: Optional[float] = None
    build_views_per_s: Optional[float] = None
    headline: str = ""


def rate_source(pair: str, method: str, step_ms: Mapping[tuple[str, str], float], headline: str) -> tuple[str, str]:
    """The measured ``(pair, benchmark method)`` whose step time a cell uses.

    Pairs, in order: the cell's, measured pairs with the same student, then the same teacher,
    then ``headline``, then any; within a pair, the cell's method, then stand-ins of its kind
    (logit-only or feature), then any method.

    Raises:
        ValueError: nothing was measured.
    """
    if not step_ms:
        raise ValueError("no step time was measured")
    measured = sorted({p for p, _ in step_ms})
    teacher, student = pair.split(":")
    pairs = [pair] + [p for p in measured if p.split(":")[1] == student] \
        + [p for p in measured if p.split(":")[0] == teacher] + [headline] + measured
    own = BENCH_METHOD.get(method, method.lower())
    kind = LOGIT_STANDINS if own in LOGIT_STANDINS else FEATURE_STANDINS
    methods = [own, *kind] + sorted({m for _, m in step_ms})
    return next((p, m) for p in pairs for m in methods if (p, m) in step_ms)


def run_seconds(step_ms: float, outside_s: float, cached: float, epochs: int, steps: int) -> float:
    """Seconds of one run alone on a device (see the module's formula)."""
    return epochs * (steps * step_ms / 1e3 * cached + outside_s)


def project(cells: Sequence[CellRuns], rates: Rates, epochs: int = 240, n_train: int = 50000,
            batch: int = 64, views_per_image: int = 162) -> dict[str, Any]:
    """Device-hours and wall time of ``cells`` on one device (see the module docstring).

    Returns:
        ``runs``, ``k`` (runs per device), ``ratio`` (aggregate over one run at K),
        ``device_hours`` and ``wall_s`` (packed, with the cache build), ``build_s`` and
        ``teachers`` (the cache builds), ``alone_hours`` (one run at a time, with the cache),
        ``live_alone_hours`` (one at a time, no cache), and ``cells``: per cell its rate
        source, run seconds and runs.
    """
    steps = math.ceil(n_train / batch)
    images = packing.images_to_train(epochs, n_train, batch)
    k = packing.choose_k([rates.packing], [1.0])
    cache = rates.cache_ratio is not None and rates.build_views_per_s is not None
    rows, work, live_s, teachers = [], [], 0.0, []
    for cell in cells:
        source = rate_source(cell.pair, cell.method, rates.step_ms, rates.headline)
        ms = rates.step_ms[source]
        use_cache = cache and cell.logit_only
        seconds = run_seconds(ms, rates.outside_s, rates.cache_ratio if use_cache else 1.0, epochs, steps)
        live_s += cell.runs * run_seconds(ms, rates.outside_s, 1.0, epochs, steps)
        rate = images / seconds
        work += [packing.RunWork(images, {q: rate * r for q, r in rates.packing.items()})] * cell.runs
        if use_cache and cell.pair.split(":")[0] not in teachers:
            teachers.append(cell.pair.split(":")[0])
        rows.append({"table": cell.table, "pair": cell.pair, "method": cell.method, "runs": cell.runs,
                     "source": f"{source[0]} {source[1]}", "measured": source == (cell.pair, BENCH_METHOD.get(
                         cell.method, cell.method.lower())), "cached": use_cache, "run_s": seconds})
    est = packing.estimate(work, k, k)
    build_s = len(teachers) * n_train * views_per_image / rates.build_views_per_s if cache else 0.0
    return {"runs": len(work), "k": k, "ratio": rates.packing[k], "wall_s": est.wall_s + build_s,
            "device_hours": est.device_hours + build_s / 3600, "build_s": build_s, "teachers": teachers,
            "alone_hours": sum(r["runs"] * r["run_s"] for r in rows) / 3600, "live_alone_hours": live_s / 3600,
            "cells": rows}
