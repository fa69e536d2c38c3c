"""Timing the teacher-output cache: build rate, and the step with a cached vs a live teacher.

    OMP_NUM_THREADS=1 python -m helper.teacher_cache.bench --teacher resnet32x4 \
        --student resnet8x4 --method wttm --build_teacher resnet8 --device cpu

builds a cache over ``--images`` synthetic CIFAR-shaped images (``--build_teacher``, default
the teacher itself; the cached step never runs a teacher, so its time does not depend on
which one filled the table) and times :func:`time_steps`. ``scripts/benchmark.py`` may call
:func:`time_steps` and :func:`build_rate` directly.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Optional, Sequence

import torch
from torch import nn

import models
from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from dataset.views import views_per_image
from helper import distributed
from helper.config import Config
from helper.distributed import DistEnv
from helper.speed import memory_format
from helper.assemble import assemble_step
from helper.student import build_objective
from helper.student_flags import parse_config
from helper.teacher_cache import PAD, CachedTeacher, cache_key
from helper.teacher_cache.build import build_cache
from helper.teacher_cache.store import cache_paths, open_table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(cfg: Config, env: DistEnv, data: ImageDataset, teacher: nn.Module,
               cached: CachedTeacher, steps: int = 10, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per training step of the run ``cfg`` describes, live teacher vs ``cached``.

    Both steps are built by ``assemble_step`` from the same initial student (seed 0) and run
    the same batches (a view-reporting loader over ``data``, seeded by ``cfg.seed``),
    alternating batch by batch so that a change in machine load hits both alike. The device
    is drained around each timed step.

    Returns:
        ``{"live_ms", "cached_ms"}`` (medians of ``steps`` steps after ``warmup``) and
        ``"speedup"`` (live / cached).
    """
    fmt = memory_format(cfg.channels_last)
    runs = {}
    for name, source in (("live", None), ("cached", cached)):
        torch.manual_seed(0)
        objective = build_objective(cfg, env, data, teacher)
        runs[name] = assemble_step(cfg, env, objective, teacher, fmt, source).run
    loader = DeviceLoader(data.train_images, data.train_labels, cfg.batch_size, data.mean, data.std,
                          train=True, seed=cfg.seed, drop_last=True, memory_format=fmt,
                          report_views=True)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    while len(samples["live"]) < warmup + steps:
        for batch in loader:
            for name, run in runs.items():
                _sync(env.device)
                start = time.perf_counter()
                run(*batch, 1)
                _sync(env.device)
                samples[name].append(1e3 * (time.perf_counter() - start))
            if len(samples["live"]) == warmup + steps:
                break
    out = {f"{name}_ms": statistics.median(times[warmup:]) for name, times in samples.items()}
    out["speedup"] = out["live_ms"] / out["cached_ms"]
    return out


def build_rate(stats: dict[str, float]) -> float:
    """Views per second of a :func:`~helper.teacher_cache.build.build_cache` result."""
    return stats["views"] / max(stats["seconds"], 1e-9)


def synthetic(n: int, classes: int = 100) -> ImageDataset:
    """CIFAR-shaped uint8 images (fixed seed) with labels ``i % classes``."""
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(n) % classes
    return ImageDataset("synthetic", images, labels, images[:1], labels[:1], classes,
                        CIFAR100_MEAN, CIFAR100_STD)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet32x4")
    parser.add_argument("--student", default="resnet8x4")
    parser.add_argument("--method", default="wttm", help="a logit-only --distill method")
    parser.add_argument("--build_teacher", default=None,
                        help="network that fills the table (default: --teacher)")
    parser.add_argument("--images", type=int, default=64, help="synthetic training images")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    env = distributed.setup(args.device)
    data = synthetic(args.images).to(env.device)
    with tempfile.TemporaryDirectory() as root:
        cfg = parse_config(["--path_t", "unused.pth", "--model_s", args.student, "--distill",
                            args.method, "--batch_size", str(args.batch_size), "--seed", "1",
                            "--save_root", root, "--device", args.device], env, args.teacher)
        builder_name = args.build_teacher or args.teacher
        builder = models.create_model(builder_name, data.num_classes).to(env.device).eval()
        key = cache_key(cfg.replace(teacher_sha256="synthetic", model_t=builder_name), env, data)
        paths = cache_paths(root, key)
        stats = build_cache(paths, key, builder, data.train_images, data.mean, data.std,
                            memory_format(cfg.channels_last), env)
        rows = args.images * views_per_image(PAD)
        cached = CachedTeacher(open_table(paths, rows, data.num_classes), env.device)
        teacher = models.create_model(args.teacher, data.num_classes).to(env.device).eval()
        timed = time_steps(cfg, env, data, teacher.requires_grad_(False), cached, args.steps, args.warmup)
        result = {"build_views_per_s": build_rate(stats), "build_teacher": builder_name, **timed}
    print(f"{env.device}, {torch.get_num_threads()} threads: build "
          f"{result['build_views_per_s']:,.0f} views/s ({builder_name}); {args.teacher}->{args.student} {args.method} batch {args.batch_size}: "
          f"live {result['live_ms']:.1f} ms/step, cached {result['cached_ms']:.1f} ms/step, "
          f"{result['speedup']:.2f}x")
    return result


if __name__ == "__main__":
    main()
