"""Section ``cache``: how fast the exact teacher-output cache is built, and the cached step
against the live one.

- Build: :func:`helper.teacher_cache.build.build_cache` fills the table of every training view
  (162 per image) of ``--cache_build_images`` synthetic images with the pair's teacher
  (random weights: the same work as trained ones); views/s, projected to the 8.1 M views of
  CIFAR-100.
- Step: :func:`scripts.bench.cache_steps.time_steps` builds the run's step twice with
  ``assemble_step`` (live teacher, cached teacher) from the same student and runs both over
  the same view-reporting batches, alternating batch by batch; median ms/step. The table
  behind the cached step covers ``--cache_images`` images and is filled by :data:`FILLER`: the
  cached step never runs a teacher, so its time does not depend on which network filled it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

import models
from dataset.base import ImageDataset
from dataset.views import views_per_image
from distiller_zoo import METHODS
from helper import distributed
from helper.config import Config
from helper.speed import memory_format
from helper.teacher_cache import PAD, CachedTeacher, cache_key
from scripts.bench.cache_steps import build_rate, synthetic, time_steps
from helper.teacher_cache.build import build_cache
from helper.teacher_cache.store import CachePaths, cache_paths, open_table
from scripts.bench import report
from scripts.bench.epoch import CIFAR_TRAIN
from scripts.bench.step import recipe_flags, student_argv, student_config
from scripts.bench.timing import Bench, Setting

FILLER = "resnet8"  # the smallest CIFAR network: fills the step's table quickly
BATCH = 64
FLAGSHIP_PAIR = "resnet32x4:resnet8x4"
CACHE_SPEEDUP_CPU_TARGET = 1.8  # live / cached step time of the flagship pair on the CPU


def logit_only(cfg: Config) -> bool:
    """Whether every method the run weights reads the teacher's logits alone (the cache's condition)."""
    names = [cfg.distill] + ([cfg.add] if cfg.add and cfg.alpha else [])
    return all(METHODS.get(name).logit_only for name in names)


def build_table(cfg: Config, env: distributed.DistEnv, data: ImageDataset, network: Any, name: str,
                folder: str) -> tuple[dict[str, Any], CachePaths]:
    """Builds the table of every view of ``data`` with ``network`` (named ``name`` in the key)."""
    key = cache_key(cfg.replace(teacher_sha256="synthetic", model_t=name), env, data)
    paths = cache_paths(folder, key)
    with contextlib.redirect_stdout(sys.stderr):  # build progress lines; stdout carries the report
        stats = build_cache(paths, key, network, data.train_images, data.mean, data.std,
                            memory_format(cfg.channels_last), env)
    return stats, paths


def cache_row(pair: str, method: str, env: distributed.DistEnv, args: Any) -> dict[str, Any]:
    """Build rate of the pair's teacher and the cached vs live step of ``method`` on the pair."""
    teacher_name, student = pair.split(":")
    batch = min(BATCH, args.cache_images)
    argv = student_argv(pair, recipe_flags(teacher_name, student, method, args.headline), Setting(),
                        args.save_root, ["--batch_size", str(batch)])
    cfg = student_config(pair, argv, env)
    if not logit_only(cfg):
        raise ValueError(f"--distill {cfg.distill} reads teacher features: the cache serves logit-only runs")
    folder = os.path.join(args.save_root, "cache")
    teacher = models.create_model(teacher_name, 100).to(env.device).eval().requires_grad_(False)
    built, _ = build_table(cfg, env, synthetic(args.cache_build_images).to(env.device), teacher, teacher_name, folder)
    data = synthetic(args.cache_images).to(env.device)
    filler = models.create_model(FILLER, 100).to(env.device).eval().requires_grad_(False)
    _, paths = build_table(cfg, env, data, filler, FILLER, folder)
    rows = data.train_images.shape[0] * views_per_image(PAD)
    cached = CachedTeacher(open_table(paths, rows, data.num_classes), env.device)
    timed = time_steps(cfg, env, data, teacher, cached, args.cache_steps, args.warmup)
    rate, full_views = build_rate(built), CIFAR_TRAIN * views_per_image(PAD)
    return {"pair": pair, "method": method, "build_teacher": teacher_name, "build_images": args.cache_build_images,
            "build_views": built["views"], "build_s": built["seconds"], "build_views_per_s": rate,
            "full_views": full_views, "full_build_s": full_views / rate, "table_filled_by": FILLER,
            "step_images": args.cache_images, "batch": batch, "steps": args.cache_steps, "warmup": args.warmup,
            "live_ms": timed["live_ms"], "cached_ms": timed["cached_ms"], "speedup": timed["speedup"], "argv": argv}


def run(bench: Bench) -> None:
    pair = bench.args.headline
    row = bench.budgeted("cache", f"teacher cache {pair} wttm", lambda: cache_row(pair, "wttm", bench.env, bench.args))
    if row is not None:
        bench.result["cache"].append(row)
        bench.save()


def _tail(result: dict[str, Any], row: dict[str, Any]) -> str:
    """The cache target is stated for the CPU and the flagship pair: judged there only."""
    if result.get("smoke"):
        return report.SMOKE
    if result["header"]["device_type"] == "cuda":
        return f"the ≥ {CACHE_SPEEDUP_CPU_TARGET}× target is the CPU's; no CUDA target"
    if row["pair"] != FLAGSHIP_PAIR:
        return f"target ≥ {CACHE_SPEEDUP_CPU_TARGET}× is for {FLAGSHIP_PAIR}; not judged"
    met = row["speedup"] >= CACHE_SPEEDUP_CPU_TARGET
    return f"target ≥ {CACHE_SPEEDUP_CPU_TARGET}× on the CPU: **{'met' if met else 'not met'}**"


def targets(result: dict[str, Any]) -> list[str]:
    return [f"- Teacher cache ({row['pair']} {row['method']}, batch {row['batch']}): cached step "
            f"**{row['speedup']:.2f}×** faster than the live one — {_tail(result, row)}"
            for row in result.get("cache", [])]


def tables(result: dict[str, Any]) -> list[str]:
    if "cache" not in result["sections"]:
        return []
    rows = result.get("cache", [])
    lines = ["## Teacher-output cache: build, and the cached step against the live one", "",
             "Build: the pair's teacher over every view (162 per image) of synthetic images; the full "
             "CIFAR-100 table is 8.1 M views. Step: the run's step built twice by assemble_step (live "
             "teacher, cached teacher), alternating batch by batch; the cached step's table was filled by "
             "a small network (the cached step never runs a teacher).", ""]
    lines += report.table(["teacher", "views", "s", "views/s", "full table min"],
                          [[r["build_teacher"], f"{r['build_views']:,}", f"{r['build_s']:.2f}",
                            f"{r['build_views_per_s']:,.0f}", f"{r['full_build_s'] / 60:,.1f}"] for r in rows])
    return lines + report.table(["teacher:student", "method", "batch", "images", "steps", "live ms/step",
                                 "cached ms/step", "live / cached"],
                                [[r["pair"], r["method"], r["batch"], r["step_images"], r["steps"],
                                  f"{r['live_ms']:.2f}", f"{r['cached_ms']:.2f}", f"{r['speedup']:.2f}×"]
                                 for r in rows])
