"""Section ``cost``: the projected cost of Tables 1 and 2 and of the flagship run, from this
run's measurements (the arithmetic is :func:`project`; nothing here is measured).

For each run of a table (a cell's ``runs`` trials, 240 epochs of 50,000 images at batch 64):

    run seconds = epochs × (steps × step seconds × c + outside seconds per epoch)

with ``steps = 782``, the step time of the cell's pair and method (or of the stand-in
:func:`rate_source` picks), ``c`` the cached/live step-time ratio for runs whose weighted
methods are all logit-only (the teacher-output cache serves them), else 1, and the outside
time (loader, meters, validation, checkpoints) per full epoch. The runs are packed K to a
device with :func:`paper_tables.packing.estimate`, and the cache is built once per teacher
of a logit-only cell (8.1 M views at the build rate), before the runs. The inputs: step-grid
rows at the scripts' default setting (or the epoch split's in-step time), the split's outside
time, the packing ratios and the cache's ratio and build rate, each reused for every pair.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from distiller_zoo import METHODS
from paper_tables import packing, recipes
from scripts.bench import report
from scripts.bench.epoch import CIFAR_EPOCHS
from scripts.bench.packing import ratios
from scripts.bench.timing import Bench, Setting

FLAGSHIP_MIN_TARGET, FLAGSHIP_STRETCH_MIN_TARGET = 8.0, 5.0  # the flagship WTTM run alone, 240 epochs
TABLES_GPU_HOURS_TARGET = 36.0  # Tables 1 + 2 at the paper's run counts on one GPU
DEFAULT = Setting().name  # the scripts' default speed flags
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
        work += [packing.RunWork(images, {q: images / seconds * r for q, r in rates.packing.items()})] * cell.runs
        if use_cache and cell.pair.split(":")[0] not in teachers:
            teachers.append(cell.pair.split(":")[0])
        own = (cell.pair, BENCH_METHOD.get(cell.method, cell.method.lower()))
        rows.append({"table": cell.table, "pair": cell.pair, "method": cell.method, "runs": cell.runs,
                     "source": f"{source[0]} {source[1]}", "measured": source == own, "cached": use_cache,
                     "run_s": seconds})
    est = packing.estimate(work, k, k)
    build_s = len(teachers) * n_train * views_per_image / rates.build_views_per_s if cache else 0.0
    return {"runs": len(work), "k": k, "ratio": rates.packing[k], "wall_s": est.wall_s + build_s,
            "device_hours": est.device_hours + build_s / 3600, "build_s": build_s, "teachers": teachers,
            "alone_hours": sum(r["runs"] * r["run_s"] for r in rows) / 3600, "live_alone_hours": live_s / 3600,
            "cells": rows}


def table_cells() -> list[CellRuns]:
    """The runs ``scripts/reproduce.py`` trains for Tables 1 and 2 (their default cells, at
    the paper's run counts); logit-only when every method the cell weights reads logits alone."""
    out = []
    for c in recipes.select(recipes.load_cells(), tables=(1, 2)):
        values = dict(c.hparams)
        add = values.get("add") not in (None, "none") and values.get("a")
        names = [values["distill"]] + ([values["add"]] if add else [])
        out.append(CellRuns(c.table, c.pair, c.method, c.runs, all(METHODS.get(n).logit_only for n in names)))
    return out


def _default(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r["setting"] == DEFAULT), None)


def gather_rates(result: dict[str, Any], headline: str) -> tuple[Rates, list[str]]:
    """The projection's inputs from ``result``, and one line per input saying where it came from."""
    split = _default(result.get("split", []))
    step_ms = {(r["pair"], r["method"]): r["ms_per_step"]["median"] for r in result["steps"]
               if r["setting"] == DEFAULT and r.get("loss") is not None}
    notes = [f"step times: {len(step_ms)} step-grid rows at the default setting ({DEFAULT})"]
    if not step_ms and split:
        step_ms = {(split["pair"], "wttm"): split["ms_per_step"]}
        notes = [f"step times: the epoch split's in-step time of {split['pair']} WTTM, for every cell"]
    notes.append(f"outside the step: {split['full_outside_s']:.2f} s per full epoch from the epoch split "
                 f"({split['pair']}), every pair" if split else "outside the step: not measured (0; step time only)")
    pack = result.get("packing") or []
    notes.append(f"packing: measured on {pack[0]['pair']}, every pair" if pack else "packing: not measured (K = 1)")
    cache = (result.get("cache") or [None])[0]
    notes.append(f"cache: cached/live {cache['cached_ms'] / cache['live_ms']:.3f} and build "
                 f"{cache['build_views_per_s']:,.0f} views/s measured on {cache['pair']}, every logit-only cell"
                 if cache else "cache: not measured (live teacher everywhere)")
    rates = Rates(step_ms, split["full_outside_s"] if split else 0.0, ratios(pack[0] if pack else None),
                  cache["cached_ms"] / cache["live_ms"] if cache else None,
                  cache["build_views_per_s"] if cache else None, headline)
    return rates, notes


def flagship(result: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The headline WTTM run alone: minutes with the live teacher (the split's projection) and
    with the cache (its in-step time × the cached/live ratio)."""
    split = _default(result.get("split", []))
    if split is None:
        return None
    cache = (result.get("cache") or [None])[0]
    extra = split["projected_240_s"] - CIFAR_EPOCHS * split["full_epoch_s"]
    out = {"pair": split["pair"], "setting": split["setting"], "live_min": split["projected_240_s"] / 60}
    if cache:
        ratio = cache["cached_ms"] / cache["live_ms"]
        cached = CIFAR_EPOCHS * (split["full_in_step_s"] * ratio + split["full_outside_s"]) + extra
        out.update(cached_min=cached / 60, cache_ratio=ratio)
    return out


def cost_section(result: dict[str, Any], headline: str) -> Optional[dict[str, Any]]:
    """The cost projection of Tables 1 and 2 and the flagship run; None when no step time was measured."""
    rates, notes = gather_rates(result, headline)
    if not rates.step_ms:
        return None
    return {"notes": notes, "measured_pairs": sorted({p for p, _ in rates.step_ms}),
            "tables": project(table_cells(), rates), "flagship": flagship(result),
            "rates": {"step_ms": {f"{p} {m}": v for (p, m), v in sorted(rates.step_ms.items())},
                      "outside_s": rates.outside_s, "packing": {str(k): v for k, v in rates.packing.items()},
                      "cache_ratio": rates.cache_ratio, "build_views_per_s": rates.build_views_per_s}}


def run(bench: Bench) -> None:
    errors = len(bench.result["errors"])
    cost = bench.item("cost projection", lambda: cost_section(bench.result, bench.args.headline))
    if cost is None and len(bench.result["errors"]) == errors:
        bench.skip("cost projection", "no step time was measured")
    bench.result["cost"] = cost
    bench.save()


def _flagship_tail(result: dict[str, Any], minutes: float) -> str:
    tail = report.judged(result, f"≤ {FLAGSHIP_MIN_TARGET:.0f} min (stretch {FLAGSHIP_STRETCH_MIN_TARGET:.0f})",
                         minutes <= FLAGSHIP_MIN_TARGET)
    if tail.endswith("**met**"):
        tail += f"; stretch: **{'met' if minutes <= FLAGSHIP_STRETCH_MIN_TARGET else 'not met'}**"
    return tail


def targets(result: dict[str, Any]) -> list[str]:
    out, cost = [], result.get("cost") or {}
    ship = cost.get("flagship")
    if ship:
        name = f"Flagship {ship['pair']} WTTM run alone ({ship['setting']}"
        out.append(f"- {name}, live teacher): **{ship['live_min']:,.1f} min** for 240 epochs, from the epoch "
                   f"split — {_flagship_tail(result, ship['live_min'])}")
        if "cached_min" in ship:
            out.append(f"- {name}, teacher cache): **{ship['cached_min']:,.1f} min**, the split's in-step time "
                       f"× the cached/live ratio {ship['cache_ratio']:.2f} — "
                       + _flagship_tail(result, ship["cached_min"]))
    tables = cost.get("tables")
    if tables:
        hours, unit = tables["device_hours"], "GPU" if result["header"]["device_type"] == "cuda" else "CPU"
        out.append(f"- Tables 1 + 2 ({tables['runs']} runs): **{hours:,.1f} {unit}-hours** projected (K = "
                   f"{tables['k']} per {unit}, cache for {len(tables['teachers'])} teachers) — "
                   + report.judged(result, f"≤ {TABLES_GPU_HOURS_TARGET:.0f} GPU-hours",
                                   hours <= TABLES_GPU_HOURS_TARGET))
    return out


def _hm(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def tables(result: dict[str, Any]) -> list[str]:
    if "cost" not in result["sections"]:
        return []
    cost = result.get("cost")
    if not cost:
        return ["## Projected cost of Tables 1 and 2", "", "Nothing to project: no step time was measured.", ""]
    t = cost["tables"]
    lines = [f"## Projected cost of Tables 1 and 2 ({t['runs']} runs at the paper's run counts; 240 epochs "
             "of 50,000 images at batch 64)", "",
             "run s = 240 × (782 × step s × c + outside s), c = cached/live for logit-only runs; runs packed "
             "K per device at the measured aggregate ratio; the cache built once per teacher first. Figures used:", ""]
    lines += [f"- {note}" for note in cost["notes"]]
    lines += [f"- step times measured on: {', '.join(cost['measured_pairs'])}; other pairs reuse one of "
              "them (same student, else same teacher, else the headline pair), as the table says", ""]
    build_h, unit = t["build_s"] / 3600, "GPU" if result["header"]["device_type"] == "cuda" else "CPU"
    lines += report.table([f"plan (one {unit})", f"{unit}-hours", "wall"], [
        ["one run at a time, live teacher", f"{t['live_alone_hours']:,.1f}", _hm(t["live_alone_hours"] * 3600)],
        ["one run at a time, cache (+ its build)", f"{t['alone_hours'] + build_h:,.1f}",
         _hm(t["alone_hours"] * 3600 + t["build_s"])],
        [f"K = {t['k']} packed ({t['ratio']:.2f}×), cache (+ its build)", f"{t['device_hours']:,.1f}",
         _hm(t["wall_s"])]])
    return lines + report.table(["table", "teacher:student", "runs", "step times from", "mean run min",
                                 f"{unit}-hours alone, cache"], _pair_cells(t["cells"]))


def _pair_cells(cells: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per pair: its runs, where its rates came from, its mean run time and hours."""
    by_pair: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_pair[(c["table"], c["pair"])].append(c)
    out = []
    for (tab, pair), rows in by_pair.items():
        runs, seconds = sum(r["runs"] for r in rows), sum(r["runs"] * r["run_s"] for r in rows)
        sources, own = sorted({r["source"].split()[0] for r in rows}), sum(r["measured"] for r in rows)
        where = "reused: " + ", ".join(sources) if sources != [pair] else "measured" + (
            f" ({len(rows) - own} of {len(rows)} methods by a stand-in)" if own < len(rows) else "")
        out.append([tab, pair, runs, where, f"{seconds / runs / 60:,.1f}", f"{seconds / 3600:,.2f}"])
    return out
