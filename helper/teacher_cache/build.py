"""Building the teacher-output cache: the frozen teacher over every training view, once.

The views are made by the loader's own crop and normalisation code
(:func:`dataset.loader.view_images`) and the teacher runs through the same
:class:`~helper.distill.FrozenTeacher` as a live run (eval mode, ``inference_mode``, the run's
autocast), so each row is the teacher's output on exactly the view the loader yields. Under
torchrun every rank computes the rows of its share of the images into the one shared
temporary file (ranks of one node, or a file system all nodes share) and rank 0 checksums it
and renames it into place.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dataset.loader import view_images
from dataset.views import views_per_image
from helper import distributed
from helper.distill import FrozenTeacher
from helper.distributed import DistEnv
from helper.loop import format_duration
from helper.speed import autocast
from helper.teacher_cache.store import (CacheKey, CachePaths, build_lock, check_cache, finish_file,
                                        start_file)

# Views per teacher forward: large enough to fill the device, small enough for its memory
# with resnet32x4 at fp32 (CPU: no faster beyond a few hundred; CUDA figure unmeasured).
BUILD_BATCH = {"cpu": 256, "cuda": 4096}
PRINT_EVERY_S = 10.0


class BuildProgress:
    """Prints ``teacher cache: built X/Y views (P%), R views/s, eta H:MM:SS`` every
    ``PRINT_EVERY_S`` seconds and at the end (rank 0 counts its share × world size)."""

    def __init__(self, total: int, scale: int, enabled: bool) -> None:
        self.total, self.scale, self.enabled = total, scale, enabled
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def __call__(self, count: int) -> None:
        self.done += count * self.scale
        now = time.perf_counter()
        if self.enabled and (now - self.last >= PRINT_EVERY_S or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - min(self.done, self.total)) / max(rate, 1e-9)
            print(f"teacher cache: built {min(self.done, self.total):,}/{self.total:,} views "
                  f"({100 * min(self.done, self.total) / self.total:.0f}%), {rate:,.0f} views/s, "
                  f"eta {format_duration(eta)}", flush=True)


def sweep(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mean, std,
          pad: int, fmt: torch.memory_format, out: np.ndarray, begin: int, end: int, batch: int,
          progress: Callable[[int], None] = lambda n: None) -> None:
    """Writes ``forward``'s ``[b, K]`` output for view ids ``begin .. end - 1`` of ``images``
    (``[N, C, H, W]`` uint8 on the device) into rows ``begin .. end - 1`` of ``out``."""
    for first in range(begin, end, batch):
        last = min(first + batch, end)
        views = torch.arange(first, last, device=images.device)
        x = view_images(images, views, mean, std, pad, fmt)
        out[first:last] = forward(x).float().cpu().numpy()  # host sync: once per build batch
        progress(last - first)


def rank_rows(num_images: int, pad: int, env: DistEnv) -> tuple[int, int]:
    """``(begin, end)`` view ids this rank builds: the views of its contiguous share of images."""
    per = views_per_image(pad)
    lo = num_images * env.rank // env.world_size
    hi = num_images * (env.rank + 1) // env.world_size
    return lo * per, hi * per


def build_cache(paths: CachePaths, key: CacheKey, teacher: nn.Module, images: torch.Tensor,
                mean, std, fmt: torch.memory_format, env: DistEnv,
                batch: int = 0) -> dict[str, Any]:
    """Builds the cache of ``key`` at ``paths`` (every rank calls this together).

    Rank 0 takes the build lock, and skips the build when another run finished a valid cache
    meanwhile; otherwise every rank fills its rows of a temporary file, and rank 0 checksums
    it and renames it into place.

    Args:
        teacher: the teacher network on ``env.device`` (put in eval mode here).
        images: ``[N, C, H, W]`` uint8 training images on ``env.device``.
        mean, std: normalisation of the loader.
        fmt: memory format of the teacher's input.
        batch: views per forward; 0 picks :data:`BUILD_BATCH` for the device.

    Returns:
        ``{"views": built views (all ranks), "seconds": wall time, "views_per_s": rate,
        "skipped": True when a valid cache was found under the lock}``.
    """
    rows = images.shape[0] * views_per_image(key.pad)
    frozen = FrozenTeacher(teacher, None, lambda: autocast(env.device, key.precision))
    start = time.perf_counter()
    with build_lock(paths) if env.is_main else contextlib.nullcontext():
        tmp = None
        if env.is_main and check_cache(paths, key, rows, key.num_classes) is not None:
            tmp = start_file(paths, rows, key.num_classes)
        tmp = distributed.broadcast_object(tmp, env)
        if tmp is None:
            return {"views": 0, "seconds": time.perf_counter() - start, "views_per_s": 0.0,
                    "skipped": True}
        try:
            _fill(tmp, lambda x: frozen(x).logits, images, mean, std, fmt, key, env,
                  batch or BUILD_BATCH.get(env.device.type, 1024))
            seconds = time.perf_counter() - start
            if env.is_main:
                finish_file(paths, tmp, key, rows, key.num_classes,
                            {"built_seconds": round(seconds, 3), "world_size": env.world_size,
                             "torch": torch.__version__})
        except BaseException:
            if env.is_main and os.path.exists(tmp):
                os.unlink(tmp)
            raise
    distributed.barrier(env)
    return {"views": rows, "seconds": seconds, "views_per_s": rows / max(seconds, 1e-9), "skipped": False}


def _fill(tmp: str, forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, mean, std,
          fmt: torch.memory_format, key: CacheKey, env: DistEnv, batch: int) -> None:
    """This rank's rows of the temporary file ``tmp``; returns when every rank has written."""
    rows = images.shape[0] * views_per_image(key.pad)
    begin, end = rank_rows(images.shape[0], key.pad, env)
    out = np.memmap(tmp, dtype="<f4", mode="r+", shape=(rows, key.num_classes))
    sweep(forward, images, mean, std, key.pad, fmt, out, begin, end, batch,
          BuildProgress(rows, env.world_size, env.is_main))
    out.flush()
    del out
    distributed.barrier(env)
