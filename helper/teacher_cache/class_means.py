"""The teacher's class means (KD++'s ``center_emb_train.json``): computed once, kept on disk.

KD++ (WangYZ1608/Knowledge-Distillation-via-ND, ``ImageNet/emb_fea_distribution.py``,
``CIFAR/emb_fea_distribution.py``) averages the teacher's pooled embedding per class over one
pass of the training set, the teacher in eval mode, the images under the *training*
augmentation (its loaders reuse the training data set with its random crop and flip). We do the
same with the data set's own training loader and a fixed seed, so the result is a function of
the file's key; the reference also rounds each value to 4 decimals (a JSON artefact), which we
do not. Under torchrun every rank sums its shard and the sums and counts are all-reduced (a
shard padded to a multiple of the ranks counts a few images twice, as ``DistributedSampler``).

The ``[K, D]`` float32 means live in ``<save_root>/cache/<arch>-<dataset>-classmeans-<digest>.pt``
beside the teacher-output cache, keyed the same way (teacher SHA-256 and data identity), as a
``torch.save`` dict of tensors and plain values read back with ``weights_only=True``; a file
that does not load, has another key or fails its SHA-256 is rebuilt.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from torch import nn

from errors import UserError
from helper import distributed
from helper.config import Config
from helper.distributed import DistEnv
from helper.data_setup import EVAL_BATCH, close_loaders, default_workers
from helper.student_flags import methods_in_use
from helper.teacher_cache.store import CachePaths, build_lock, images_sha256

FORMAT = "teacher-class-means/1"
SEED = 0  # seed of the one augmented pass: fixed, so the means depend on the key alone


@dataclass(frozen=True)
class MeansKey:
    """What the class means depend on; a stored file is used only when all agree."""

    teacher_sha256: str
    teacher_arch: str
    dataset: str
    data_sha256: str
    num_classes: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    device_type: str

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()


def needs_class_means(cfg: Any) -> bool:
    """Whether a method in use reads the teacher class means."""
    return any(cls.needs_class_means for cls in methods_in_use(cfg))


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a network's state dict (names, shapes, bytes), for a teacher without a file."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        array = np.ascontiguousarray(value.detach().to("cpu").float().numpy())
        digest.update(f"{name}{tuple(value.shape)}".encode())
        digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def data_sha256(data: Any) -> str:
    """Identity of the training set: its pixels and labels (in memory), or its file list and
    labels (an image folder: the files themselves are not read)."""
    digest = hashlib.sha256()
    images = getattr(data, "train_images", None)
    if images is not None:
        digest.update(images_sha256(images).encode())
    else:
        digest.update("\n".join(data.folder.train.paths).encode())
    labels = np.ascontiguousarray(data.train_labels.to("cpu", torch.int64).numpy())
    digest.update(memoryview(labels).cast("B"))
    return digest.hexdigest()


def means_key(cfg: Config, env: DistEnv, data: Any, teacher: nn.Module) -> MeansKey:
    return MeansKey(
        teacher_sha256=cfg.get("teacher_sha256") or state_sha256(teacher), teacher_arch=cfg.model_t,
        dataset=data.name, data_sha256=data_sha256(data), num_classes=int(data.num_classes),
        image_size=int(data.image_size), mean=tuple(map(float, data.mean)),
        std=tuple(map(float, data.std)), seed=SEED, device_type=env.device.type)


def means_path(folder: str, key: MeansKey) -> str:
    return os.path.join(folder, f"{key.teacher_arch}-{key.dataset}-classmeans-{key.digest()[:16]}.pt")


def _tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(t.numpy())).cast("B")).hexdigest()


def load_means(path: str, key: MeansKey) -> tuple[Optional[torch.Tensor], str]:
    """``(means [K, D] float32 CPU, "")`` when ``path`` holds a valid file for ``key``, else
    ``(None, why)``."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file is rebuilt, never trusted
        return None, f"unreadable ({type(err).__name__})"
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != key.as_json():
        return None, "another format or key"
    means = state.get("means")
    if (not isinstance(means, torch.Tensor) or means.dtype != torch.float32 or means.dim() != 2
            or means.shape[0] != key.num_classes):
        return None, "means of the wrong shape or type"
    if _tensor_sha256(means) != state.get("sha256") or not torch.isfinite(means).all():
        return None, "checksum mismatch"
    return means, ""


def save_means(path: str, key: MeansKey, means: torch.Tensor, counts: torch.Tensor) -> None:
    """Writes the file atomically (temporary file, then ``os.replace``)."""
    means = means.detach().to("cpu", torch.float32).contiguous()
    state = {"format": FORMAT, "key": key.as_json(), "means": means,
             "counts": counts.detach().to("cpu", torch.int64), "sha256": _tensor_sha256(means)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def compute_class_means(teacher: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
                        num_classes: int, device: torch.device,
                        env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """``(means [K, D] float32, counts [K] int64)`` of the teacher's pooled feature per class
    over ``batches`` (``(images, labels, ...)``) of every rank; the teacher runs in eval mode.

    Raises:
        ValueError: a class has no image.
    """
    was_training = teacher.training
    teacher.eval()
    sums: Optional[torch.Tensor] = None
    counts = torch.zeros(num_classes, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for batch in batches:
            images, labels = batch[0], batch[1]
            feats, _ = teacher(images, is_feat=True)
            emb = feats[-1].double()  # fp64 sums: ~1,300 images per ImageNet class
            if sums is None:
                sums = torch.zeros(num_classes, emb.shape[1], dtype=torch.float64, device=device)
            sums.index_add_(0, labels, emb)
            counts += torch.bincount(labels, minlength=num_classes).double()
    teacher.train(was_training)
    if sums is None:
        raise ValueError("no training batch to compute the class means from")
    distributed.all_reduce_sum(sums, env)
    distributed.all_reduce_sum(counts, env)
    empty = (counts == 0).nonzero().flatten().tolist()  # host sync: once per build
    if empty:
        raise ValueError(f"classes {empty[:5]} have no training image; their mean is undefined")
    return (sums / counts[:, None]).float(), counts.round().long()


def load_or_build(path: str, key: MeansKey, build: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                  env: DistEnv) -> tuple[torch.Tensor, str]:
    """The class means at ``path``, built (every rank calls ``build``) and saved by rank 0 when
    missing or refused. Returns ``(means [K, D] CPU, status)``, status ``"loaded"`` or
    ``"built (<why>)"``. Every rank calls this together."""
    lock = build_lock(CachePaths(path, path, path + ".lock")) if env.is_main else contextlib.nullcontext()
    with lock:
        means, why = load_means(path, key) if env.is_main else (None, "")
        means, why = distributed.broadcast_object((means, why), env)
        if means is not None:
            return means, "loaded"
        means, counts = build()
        if env.is_main:
            save_means(path, key, means, counts)
    return means.cpu(), f"built ({why})"


def class_means_for_run(cfg: Config, env: DistEnv, data: Any, teacher: nn.Module) -> Optional[torch.Tensor]:
    """``[K, D]`` teacher class means on ``env.device`` when a method in use needs them (from
    ``<save_root>/cache``, computed on first use), else None. Every rank calls this together."""
    if not needs_class_means(cfg):
        return None
    key = means_key(cfg, env, data, teacher)
    path = means_path(os.path.join(cfg.save_root, "cache"), key)

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        per_rank = min(EVAL_BATCH, max(1, 2 * cfg.batch_size // env.world_size))
        workers = cfg.get("workers")
        train, test = data.loaders(per_rank, per_rank, SEED, rank=env.rank, world_size=env.world_size,
                                   device=env.device, workers=default_workers() if workers is None else workers,
                                   decode=cfg.get("decode", "auto"))
        devices = [env.device] if env.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # the methods built next draw from it
                return compute_class_means(teacher, train, int(data.num_classes), env.device, env)
        except ValueError as err:
            raise UserError(f"teacher class means of --dataset {cfg.dataset}: {err}") from None
        finally:
            close_loaders(train, test)

    means, status = load_or_build(path, key, build, env)
    if env.is_main:
        print(f"teacher class means: {status} {path}", file=sys.stdout, flush=True)
    return means.to(env.device)
