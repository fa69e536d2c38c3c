"""The data side of a run: the data set loaded once, checked against the networks, and this
rank's loaders (with the training-batch augmentations the flags ask for)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Optional

import torch

import models
from dataset import Data, ImageDataset, load_dataset
from errors import UserError
from helper.augment_flags import train_augment
from helper.config import Config
from helper.distributed import DistEnv

EVAL_BATCH = 500  # evaluation batch size: no effect on accuracy, fewer launches
MAX_WORKERS = 32  # cap of the default workers per rank: each forks and holds prefetched batches


def load_data(cfg: Config, env: DistEnv, data: Optional[Data] = None) -> Data:
    """Loads the data set once (or takes ``data``, one handed to the run, e.g. by a test); an
    in-memory one moves its uint8 tensors onto this rank's device, an image folder stays on
    disk (its loaders stream the files)."""
    data = data if data is not None else load_dataset(cfg.dataset, cfg.data_folder)
    return data.to(env.device) if isinstance(data, ImageDataset) else data


def check_data_fits(cfg: Config, data: Data, archs: tuple[str, ...]) -> None:
    """Refuses networks built for another image size than the data's, and a batch larger
    than the training set (an epoch would be one partial step)."""
    for arch in archs:
        size = models.input_size(arch)
        if size != data.image_size:
            raise UserError(f"{arch} is a network for {size}-pixel images, but --dataset {cfg.dataset} "
                            f"has {data.image_size}-pixel images; choose a model for that data set "
                            f"({', '.join(models.model_names(data.image_size))})")
    n_train = int(data.train_labels.numel())
    if cfg.batch_size > n_train:
        raise UserError(f"--batch_size {cfg.batch_size} is larger than the training set "
                        f"({n_train} images of --dataset {cfg.dataset}); an epoch would be one partial step")


def default_workers() -> int:
    """Loader worker processes per rank when ``--workers`` is not given: the CPU cores this
    process may use, shared by the ranks on this node (torchrun's ``LOCAL_WORLD_SIZE``), less
    one per rank for the rank itself, at most :data:`MAX_WORKERS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    local_ranks = max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(MAX_WORKERS, cores // local_ranks - 1))


def make_loaders(cfg: Config, env: DistEnv, data: Data,
                 memory_format: torch.memory_format) -> tuple[Any, Any]:
    """This rank's shuffled, augmented training loader and its shard of the test set.

    One call for every data set (``data.loaders``). Evaluation batches are :data:`EVAL_BATCH`
    for in-memory data; streamed ones use twice the training batch per rank (no backward pass
    to hold), at most :data:`EVAL_BATCH`, so a worker's batch stays small in shared memory.
    Close both with :func:`close_loaders` (image-folder loaders own worker processes).
    """
    if cfg.batch_size % env.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {env.world_size} ranks")
    per_rank = cfg.batch_size // env.world_size
    in_memory = isinstance(data, ImageDataset)
    eval_batch = EVAL_BATCH if in_memory else min(2 * per_rank, EVAL_BATCH)
    workers = cfg.get("workers")
    workers = default_workers() if workers is None else workers
    folder_options = {} if in_memory else {  # the transformer recipe's resampling and batch augmentations
        "train_interpolation": cfg.get("train_interpolation", "bilinear"),
        "eval_interpolation": cfg.get("eval_interpolation", "bilinear"), "augment": train_augment(cfg)}
    train, test = data.loaders(per_rank, eval_batch, cfg.seed, rank=env.rank, world_size=env.world_size,
                               device=env.device, memory_format=memory_format, workers=workers,
                               decode=cfg.get("decode", "auto"), **folder_options)
    if env.is_main and not in_memory:
        where = f"in this process ({env.device})" if train.mode == "bytes" else "in the workers"
        print(f"{cfg.dataset}: {data.train_labels.numel()} training and {data.test_labels.numel()} "
              f"validation images, {data.num_classes} classes, from {cfg.data_folder}; "
              f"{workers} loader workers per rank, decoding {where}", flush=True)
    return train, test


def close_loaders(*loaders: Any) -> None:
    """Stops the worker processes of the loaders that have them (image-folder loaders); a
    no-op for in-memory ones."""
    for loader in loaders:
        close = getattr(loader, "close", None)
        if close is not None:
            close()


@contextlib.contextmanager
def closed_on_failure(*loaders: Any) -> Iterator[None]:
    """Closes the loaders if the block fails (set-up between building the loaders and the
    first epoch: a refused run folder, a bad resume file), then lets the error through."""
    try:
        yield
    except BaseException:
        close_loaders(*loaders)
        raise
