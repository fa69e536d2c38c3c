"""The exact teacher-output cache: the teacher once per checkpoint and data set, not per run.

For logit-only objectives (``kd``, ``ttm``, ``wttm``, ``dist``, ``dkd`` as ``--distill`` or
``--add``) the teacher's output depends only on the training view, and the CIFAR loader has
a finite set of them (:mod:`dataset.views`: 50,000 images × 162 views for CIFAR-100). The
teacher's float32 logits for every view are built once (:mod:`helper.teacher_cache.build`),
stored under ``<save_root>/cache/`` (:mod:`helper.teacher_cache.store`), and a run looks its
batch's rows up by the view ids its loader reports instead of running the teacher.

``--teacher_cache``: ``auto`` uses a valid cache when there is one; ``build`` builds a missing
or refused one first, then uses it; ``off`` never touches the cache folder. A run's header
line and its ``config.json`` say whether the cache was used and, if not, why.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from dataset.base import ImageDataset
from dataset.views import views_per_image
from distiller_zoo import Outputs
from helper import distributed
from helper.config import Config
from helper.distributed import DistEnv
from helper.teacher_cache.build import build_cache
from helper.teacher_cache.store import (CacheKey, CachePaths, cache_paths, check_cache, images_sha256,
                                        open_table, table_bytes)

MODES = ("auto", "off", "build")
PAD = 4  # the loader's RandomCrop padding (DeviceLoader's default, which runs use)
# A device copy of the table is made when it takes at most this share of the free memory.
DEVICE_COPY_SHARE = 0.5


class CachedTeacher:
    """A teacher whose outputs are looked up: ``(images, views) → Outputs(logits [B, K])``.

    ``logits`` are float32 rows of the table for the view ids ``views [B]`` (the images are
    not read); ``feats`` is None. On the CPU the rows are gathered from the shared read-only
    map; on CUDA from a device copy of the table when it fits (no host sync; ``capturable``),
    else from the map with one host sync per step.

    Args:
        table: ``[rows, K]`` float32 host tensor (the memory map).
        device: where the run's tensors live.
    """

    feature_kind = None

    def __init__(self, table: torch.Tensor, device: torch.device) -> None:
        self.host, self.device = table, device
        self.table = table
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            if table.numel() * 4 <= DEVICE_COPY_SHARE * free:
                self.table = copy_to_device(table, device)
        self.capturable = self.table.device == device
        # read by helper.graph_step.graph_plan: a host gather cannot be replayed from a graph
        self.graph_safe = self.capturable
        self.graph_unsafe_reason = "the teacher cache gathers its rows on the host (no device copy)"

    def __call__(self, images: torch.Tensor, views: Optional[torch.Tensor] = None) -> Outputs:
        if views is None:
            raise RuntimeError("the cached teacher needs the loader's view ids (report_views)")
        if self.capturable:
            return Outputs(self.table.index_select(0, views))
        rows = self.host.index_select(0, views.cpu())  # host sync: the ids come from the device
        return Outputs(rows.pin_memory().to(self.device, non_blocking=True))


def copy_to_device(table: torch.Tensor, device: torch.device, chunk_rows: int = 1 << 18) -> torch.Tensor:
    """A device copy of a host table, copied in chunks (the map is read once, page by page)."""
    out = torch.empty(table.shape, dtype=table.dtype, device=device)
    for first in range(0, table.shape[0], chunk_rows):
        out[first:first + chunk_rows].copy_(table[first:first + chunk_rows])
    return out


@dataclass(frozen=True)
class CachePlan:
    """What a run does with the cache, decided before it trains.

    Attributes:
        mode: the ``--teacher_cache`` flag.
        use: the run looks the teacher's logits up instead of running it.
        build: the cache is (re)built first.
        reason: why the cache is or is not used (one phrase for the header line).
        key, paths: the cache the run reads (None when the cache is not considered).
    """

    mode: str
    use: bool
    build: bool
    reason: str
    key: Optional[CacheKey] = None
    paths: Optional[CachePaths] = None

    def header_line(self) -> str:
        if self.use:
            return f"teacher cache: {'building, then ' if self.build else ''}used ({self.reason})"
        return f"teacher cache: not used ({self.reason})"

    def record(self) -> dict[str, Any]:
        """What ``config.json`` records under ``teacher_cache_use``."""
        return {"mode": self.mode, "used": self.use, "built": self.build, "reason": self.reason,
                "file": self.paths.data if self.use and self.paths else None}


def cache_key(cfg: Config, env: DistEnv, data: ImageDataset) -> CacheKey:
    """The key of the cache this run would read (hashes the training images once)."""
    return CacheKey(
        teacher_sha256=cfg.teacher_sha256, teacher_arch=cfg.model_t, dataset=data.name,
        data_sha256=images_sha256(data.train_images), image_shape=tuple(data.train_images.shape),
        num_classes=int(data.num_classes), pad=PAD, mean=tuple(map(float, data.mean)),
        std=tuple(map(float, data.std)), precision=cfg.precision,
        channels_last=bool(cfg.channels_last), device_type=env.device.type)


def plan(cfg: Config, env: DistEnv, data: Any, feature_kind: Optional[str]) -> CachePlan:
    """Decides whether this run uses the cache (rank 0 decides; every rank gets its plan).

    ``feature_kind`` is the objective's (``DistillObjective.feature_kind``): None when the
    methods in use read the teacher's logits alone. ``--teacher_cache off`` returns at once.
    """
    mode = cfg.teacher_cache
    if mode == "off":
        return CachePlan(mode, False, False, "--teacher_cache off")
    if cfg.get("teacher_train_mode"):
        return CachePlan(mode, False, False, "--teacher_train_mode: the teacher's outputs are drawn "
                         "afresh each step; the live teacher runs")
    if feature_kind is not None:
        return CachePlan(mode, False, False, f"the methods in use read the teacher's {feature_kind} "
                         f"features (--distill {cfg.distill}); the live teacher runs")
    if not isinstance(data, ImageDataset):
        return CachePlan(mode, False, False, f"--dataset {cfg.dataset} has no finite set of training "
                         "views; the live teacher runs")
    decided = _decide(cfg, env, data, mode) if env.is_main else None
    return distributed.broadcast_object(decided, env)


def _decide(cfg: Config, env: DistEnv, data: ImageDataset, mode: str) -> CachePlan:
    key = cache_key(cfg, env, data)
    paths = cache_paths(os.path.join(cfg.save_root, "cache"), key)
    rows = data.train_images.shape[0] * views_per_image(PAD)
    why = check_cache(paths, key, rows, key.num_classes)
    size = f"{rows:,} views, {table_bytes(rows, key.num_classes) / 1e9:.2f} GB"
    if why is None:
        return CachePlan(mode, True, False, paths.data, key, paths)
    if why == "missing" and mode == "auto":
        return CachePlan(mode, False, False, f"no cache for this teacher and data set yet; "
                         f"--teacher_cache build builds one ({size})", key, paths)
    # build mode, or a file that is there but refused: never used as it is, rebuilt
    note = "building it" if why == "missing" else f"refused ({why}), rebuilding it"
    return CachePlan(mode, True, True, f"{paths.data}: {note}, {size}", key, paths)


def teacher_for_run(plan_: CachePlan, env: DistEnv, data: ImageDataset, teacher: nn.Module,
                    fmt: torch.memory_format) -> Optional[CachedTeacher]:
    """The run's cached teacher (building the cache first when planned), or None when the
    plan does not use it. Every rank calls this together."""
    if not plan_.use:
        return None
    key, paths = plan_.key, plan_.paths
    rows = data.train_images.shape[0] * views_per_image(key.pad)
    if plan_.build:
        stats = build_cache(paths, key, teacher, data.train_images, data.mean, data.std, fmt, env)
        if env.is_main and not stats["skipped"]:
            print(f"teacher cache: built {paths.data} ({stats['views']:,} views in "
                  f"{stats['seconds']:.1f}s, {stats['views_per_s']:,.0f} views/s)", flush=True)
    why = check_cache(paths, key, rows, key.num_classes, verify_data=False)  # rank 0 verified it
    if why is not None:
        raise RuntimeError(f"teacher cache {paths.data} changed under the run: {why}")
    return CachedTeacher(open_table(paths, rows, key.num_classes), env.device)
