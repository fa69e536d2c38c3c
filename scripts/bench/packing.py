"""Section ``packing``: aggregate images/s of K runs of the headline pair packed on one device.

Measured by :func:`paper_tables.calibrate.calibrate`, the calibration ``scripts/reproduce.py
--jobs-per-gpu auto`` runs: K worker processes, each building the run's real training step
(``helper.student``; live teacher, synthetic batches, no loader) and timing
``--packing_steps`` steps at once; a round's rate is the images of all K over the span from
the first start to the last end. Each process gets its share of the CPU cores (capped at
``--threads`` when given). Rounds stop at the first that fails or falls 10 % below the best.
The best K is :func:`paper_tables.packing.choose_k`'s (the smallest within 3 % of the fastest).
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

import torch

from helper import distributed
from paper_tables import calibrate, packing
from paper_tables.gpu_slots import Slot
from paper_tables.pack_plan import device_of
from scripts.bench import report
from scripts.bench.step import recipe_flags
from scripts.bench.timing import Bench, Setting

BATCH = 64  # the recipe's batch: one run per process
PACKED_SPEEDUP_TARGET = 6.0  # aggregate images/s at the best K over one run's


def packing_ks(text: Optional[str], cuda: bool) -> list[int]:
    """``--packing_ks``: a comma list of positive integers, or None for the calibration's own
    candidates (1, 2, 4, 8, 16; on the CPU up to its cores)."""
    if not text:
        return packing.candidate_ks(not cuda, packing.available_cores())
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--packing_ks must be a comma list of positive integers, got {text!r}")
    return sorted({int(p) for p in parts})


def packing_spec(pair: str, method: str, env: distributed.DistEnv, args: Any) -> tuple[calibrate.Spec, Optional[str]]:
    """The calibration spec of the pair's recipe run (default speed flags), and the
    ``CUDA_VISIBLE_DEVICES`` entry of the benchmark's device (None on the CPU)."""
    teacher, student = pair.split(":")
    setting = Setting()  # the scripts' defaults
    argv = ["--path_t", "unused.pth", "--model_s", student, *recipe_flags(teacher, student, method, args.headline),
            *setting.flags()]
    cuda = env.device.type == "cuda"
    kind, gpu, name = device_of(Slot((env.device.index or 0,)) if cuda else Slot(), os.environ)
    mps = packing.mps_status(os.environ) if cuda else None
    speed = f"{setting.precision},channels_last=False,compile=False:default"
    return calibrate.Spec(teacher, student, method, "cifar100", BATCH, speed, kind, name, torch.__version__,
                          mps is not None, tuple(argv)), gpu


def packing_row(pair: str, method: str, env: distributed.DistEnv, args: Any) -> dict[str, Any]:
    """Aggregate images/s for each K of ``--packing_ks``, the ratio to one run, the best K."""
    spec, gpu = packing_spec(pair, method, env, args)
    environ = dict(os.environ)
    if args.threads:
        environ["OMP_NUM_THREADS"] = str(args.threads)  # thread_share caps each process's share by it
    ks = packing_ks(args.packing_ks, env.device.type == "cuda")
    cores = packing.available_cores()
    cal = calibrate.calibrate(spec, ks, os.path.join(args.save_root, "calibration"), gpu, cores,
                              steps=args.packing_steps, warmup=args.packing_warmup, recalibrate=True,
                              log=lambda line: print(line, file=sys.stderr, flush=True), environ=environ)
    one = cal.rates.get(1)
    rounds = [{"k": k, "images_per_s": rate, "ratio": rate / one if one else None,
               "threads": packing.thread_share(cores, k, environ.get("OMP_NUM_THREADS"))}
              for k, rate in sorted(cal.rates.items())]
    best = packing.choose_k([cal.rates], [1.0])
    return {"pair": pair, "method": method, "batch": BATCH, "device": spec.device_name, "ks": ks,
            "cores": cores, "mps": spec.mps, "steps": args.packing_steps, "warmup": args.packing_warmup,
            "rounds": rounds, "stopped": {str(k): why for k, why in sorted(cal.stopped.items())},
            "best_k": best, "best_ratio": cal.rates[best] / one if one else None, "argv": list(spec.argv)}


def ratios(row: Optional[dict[str, Any]]) -> dict[int, float]:
    """A packing row's aggregate-to-one-run ratio by K (``{1: 1.0}`` without a row)."""
    if not row:
        return {1: 1.0}
    return {r["k"]: r["ratio"] for r in row["rounds"] if r["ratio"] is not None} or {1: 1.0}


def run(bench: Bench) -> None:
    pair = bench.args.headline
    row = bench.budgeted("packing", f"packing {pair} wttm", lambda: packing_row(pair, "wttm", bench.env, bench.args))
    if row is not None:
        bench.result["packing"].append(row)
        bench.save()


def targets(result: dict[str, Any]) -> list[str]:
    return [f"- Packed runs ({row['pair']} WTTM, {len(row['rounds'])} K measured): best K = {row['best_k']}, "
            f"**{row['best_ratio']:.2f}×** one run's images/s — "
            + report.judged(result, f"≥ {PACKED_SPEEDUP_TARGET:.0f}× at the best K",
                            row["best_ratio"] >= PACKED_SPEEDUP_TARGET)
            for row in result.get("packing", []) if row.get("best_ratio") is not None]


def tables(result: dict[str, Any]) -> list[str]:
    if "packing" not in result["sections"]:
        return []
    lines = []
    for row in result.get("packing", []):
        lines += [f"## Packed runs: K runs of {row['pair']} WTTM at once on {row['device']}", "",
                  f"paper_tables.calibrate: each process builds the run's step (batch {row['batch']}, live "
                  f"teacher, no loader) and times {row['steps']} steps after {row['warmup']} warm-up steps, "
                  f"all K at once; aggregate = images of all K / the span from the first start to the last "
                  f"end. {row['cores']} CPU cores shared; MPS {'on' if row['mps'] else 'off'}.", ""]
        lines += report.table(["K", "threads per process", "aggregate images/s", "× one run"],
                              [[r["k"], r["threads"], f"{r['images_per_s']:,.1f}",
                                f"{r['ratio']:.2f}" if r["ratio"] is not None else None] for r in row["rounds"]])
        lines += [f"- not measured: K={k}: {why}" for k, why in row["stopped"].items()]
        if row.get("best_ratio") is not None:
            lines += [f"- best K = {row['best_k']} (the smallest within 3 % of the fastest): "
                      f"{row['best_ratio']:.2f}× one run"]
        lines.append("")
    return lines
