"""The teacher-output cache's timings for the benchmark's cache section: the build rate, and
the step with a cached vs a live teacher (``python scripts/benchmark.py --sections cache``)."""
from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from helper.config import Config
from helper.distributed import DistEnv
from helper.speed import memory_format
from helper.assemble import assemble_step
from helper.student import build_objective
from helper.teacher_cache import CachedTeacher


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
