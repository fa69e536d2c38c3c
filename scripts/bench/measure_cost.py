"""The projected cost section: Tables 1 and 2 and the flagship run, from this run's measurements.

What it uses, all from the same benchmark run (and named in the report):

- step times: the step grid's rows at the scripts' default setting (``fp32``: a CUDA-graph
  step on CUDA, eager on the CPU), or, without them, the epoch split's in-step time of the
  headline WTTM run;
- outside the step: the epoch split's default row (loader, meters, validation, checkpoints
  per full epoch), reused for every pair;
- packing: the packing section's ratios (measured on the headline pair), reused for every pair;
- cache: the cache section's cached/live ratio and build rate (the headline pair), reused.
"""
from __future__ import annotations

from typing import Any, Optional

from distiller_zoo import METHODS
from helper.tables import recipes
from scripts.bench.cost import CellRuns, Rates, project
from scripts.bench.measure_epoch import CIFAR_EPOCHS
from scripts.bench.measure_packing import ratios
from scripts.bench.timing import Setting

DEFAULT = Setting().name  # the scripts' default speed flags


def cell_logit_only(cell: recipes.Cell) -> bool:
    """Whether every method the cell weights reads the teacher's logits alone (the cache serves it)."""
    values = dict(cell.hparams)
    names = [values["distill"]] + ([values["add"]] if values.get("add") not in (None, "none") and values.get("a")
                                   else [])
    return all(METHODS.get(name).logit_only for name in names)


def table_cells() -> list[CellRuns]:
    """The runs ``scripts/reproduce.py`` trains for Tables 1 and 2 (their default cells, at
    the paper's run counts)."""
    return [CellRuns(c.table, c.pair, c.method, c.runs, cell_logit_only(c))
            for c in recipes.select(recipes.load_cells(), tables=(1, 2))]


def default_row(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    return next((r for r in rows if r["setting"] == DEFAULT), None)


def gather_rates(result: dict[str, Any], headline: str) -> tuple[Rates, list[str]]:
    """The projection's inputs from ``result``, and one line per input saying where it came from."""
    split = default_row(result.get("split", []))
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
    split = default_row(result.get("split", []))
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
    tables = project(table_cells(), rates)
    measured = sorted({p for p, _ in rates.step_ms})
    return {"notes": notes, "measured_pairs": measured, "tables": tables, "flagship": flagship(result),
            "rates": {"step_ms": {f"{p} {m}": v for (p, m), v in sorted(rates.step_ms.items())},
                      "outside_s": rates.outside_s, "packing": {str(k): v for k, v in rates.packing.items()},
                      "cache_ratio": rates.cache_ratio, "build_views_per_s": rates.build_views_per_s}}
