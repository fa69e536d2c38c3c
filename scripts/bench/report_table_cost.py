"""Markdown of the whole-table sections: epoch split, teacher cache, packed runs, projected cost."""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

Table = Callable[[list[str], list[list[Any]]], list[str]]


def _hm(seconds: float) -> str:
    minutes = int(round(seconds / 60))
    return f"{minutes // 60}h{minutes % 60:02d}m"


def _word(mode: str) -> str:
    return ("graph" if mode.startswith("CUDA graph") else "eager") + (" (fell back)" if "ran eagerly" in mode else "")


def split_lines(result: dict[str, Any], table: Table) -> list[str]:
    rows = result.get("split", [])
    head = f"{rows[0]['pair']} WTTM" if rows else "headline WTTM"
    lines = [f"## Epoch split: the whole epoch as Trainer.fit runs it, {head}", "",
             "Means of the timed epochs after a warm-up epoch. In the step: the step calls (CUDA events / "
             "perf_counter around each). Loop: fit's own epoch seconds less that (loader, meters, validation). "
             "Checkpoints: the rest of the wall time (resume and best checkpoints, metrics.csv, text log). "
             "Full epoch: step × 782 steps, loop × 50,000 / training images, checkpoints as measured.", ""]
    cells = [[r["setting"], _word(r["step_mode"]), f"{r['train_images']}/{r['test_images']}", r["steps_per_epoch"],
              r["epochs"], f"{r['epoch_s']:.3f}", f"{r['in_step_s']:.3f} ({100 * r['in_step_share']:.0f} %)",
              f"{r['loop_s']:.3f}", f"{r['checkpoint_s']:.3f}", f"{r['ms_per_step']:.2f}",
              f"{r['first_epoch_s']:.2f} ({r['first_in_step_s']:.2f})",
              f"{r['full_epoch_s']:.2f} ({r['full_in_step_s']:.2f} + {r['full_outside_s']:.2f})",
              f"{r['projected_240_s'] / 60:.1f}"] for r in rows]
    return lines + table(["setting", "step", "train/test images", "steps", "epochs", "epoch s", "in step s",
                          "loop s", "checkpoints s", "step ms", "first epoch s (in step)",
                          "full epoch s (step + outside)", "240 epochs min"], cells)


def cache_lines(result: dict[str, Any], table: Table) -> list[str]:
    lines = ["## Teacher-output cache: build, and the cached step against the live one", "",
             "Build: the pair's teacher over every view (162 per image) of synthetic images; the full "
             "CIFAR-100 table is 8.1 M views. Step: the run's step built twice by assemble_step (live "
             "teacher, cached teacher), alternating batch by batch; the cached step's table was filled by "
             "a small network (the cached step never runs a teacher).", ""]
    rows = result.get("cache", [])
    lines += table(["teacher", "views", "s", "views/s", "full table min"],
                   [[r["build_teacher"], f"{r['build_views']:,}", f"{r['build_s']:.2f}",
                     f"{r['build_views_per_s']:,.0f}", f"{r['full_build_s'] / 60:,.1f}"] for r in rows])
    return lines + table(["teacher:student", "method", "batch", "images", "steps", "live ms/step",
                          "cached ms/step", "live / cached"],
                         [[r["pair"], r["method"], r["batch"], r["step_images"], r["steps"], f"{r['live_ms']:.2f}",
                           f"{r['cached_ms']:.2f}", f"{r['speedup']:.2f}×"] for r in rows])


def packing_lines(result: dict[str, Any], table: Table) -> list[str]:
    lines = []
    for row in result.get("packing", []):
        lines += [f"## Packed runs: K runs of {row['pair']} WTTM at once on {row['device']}", "",
                  f"helper.tables.calibrate: each process builds the run's step (batch {row['batch']}, live "
                  f"teacher, no loader) and times {row['steps']} steps after {row['warmup']} warm-up steps, "
                  f"all K at once; aggregate = images of all K / the span from the first start to the last "
                  f"end. {row['cores']} CPU cores shared; MPS {'on' if row['mps'] else 'off'}.", ""]
        lines += table(["K", "threads per process", "aggregate images/s", "× one run"],
                       [[r["k"], r["threads"], f"{r['images_per_s']:,.1f}",
                         f"{r['ratio']:.2f}" if r["ratio"] is not None else None] for r in row["rounds"]])
        lines += [f"- not measured: K={k}: {why}" for k, why in row["stopped"].items()]
        if row.get("best_ratio") is not None:
            lines += [f"- best K = {row['best_k']} (the smallest within 3 % of the fastest): "
                      f"{row['best_ratio']:.2f}× one run"]
        lines.append("")
    return lines


def cost_lines(result: dict[str, Any], table: Table) -> list[str]:
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
    lines += table([f"plan (one {unit})", f"{unit}-hours", "wall"], [
        ["one run at a time, live teacher", f"{t['live_alone_hours']:,.1f}", _hm(t["live_alone_hours"] * 3600)],
        ["one run at a time, cache (+ its build)", f"{t['alone_hours'] + build_h:,.1f}",
         _hm(t["alone_hours"] * 3600 + t["build_s"])],
        [f"K = {t['k']} packed ({t['ratio']:.2f}×), cache (+ its build)", f"{t['device_hours']:,.1f}",
         _hm(t["wall_s"])]])
    return lines + table(["table", "teacher:student", "runs", "step times from", "mean run min",
                          f"{unit}-hours alone, cache"], _pair_cells(t["cells"]))


def _pair_cells(cells: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per pair: its runs, where its rates came from, its mean run time and hours."""
    by_pair: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c in cells:
        by_pair[(c["table"], c["pair"])].append(c)
    out = []
    for (tab, pair), rows in by_pair.items():
        runs = sum(r["runs"] for r in rows)
        seconds = sum(r["runs"] * r["run_s"] for r in rows)
        sources = sorted({r["source"].split()[0] for r in rows})
        own = sum(r["measured"] for r in rows)
        where = "reused: " + ", ".join(sources) if sources != [pair] else "measured" + (
            f" ({len(rows) - own} of {len(rows)} methods by a stand-in)" if own < len(rows) else "")
        out.append([tab, pair, runs, where, f"{seconds / runs / 60:,.1f}", f"{seconds / 3600:,.2f}"])
    return out
