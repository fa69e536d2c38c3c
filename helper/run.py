"""What both entry scripts do around the loop: seeds, data, run folder, resume."""
from __future__ import annotations

import contextlib

import os
import random
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

import models
from dataset import Data, ImageDataset, load_dataset
from helper import distributed
from helper.checkpoint import load_checkpoint, set_rng_state
from helper.config import Config
from helper.distributed import DistEnv
from errors import UserError
from helper.logbook import Logbook, write_json
from helper.loop import Progress, Trainer

EVAL_BATCH = 500  # evaluation batch size: no effect on accuracy, fewer launches
MAX_WORKERS = 32  # cap of the default workers per rank: each forks and holds prefetched batches


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: Config, env: DistEnv) -> Data:
    """Loads the data set once; an in-memory one moves its uint8 tensors onto this rank's
    device, an image folder stays on disk (its loaders stream the files)."""
    data = load_dataset(cfg.dataset, cfg.data_folder)
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
    train, test = data.loaders(per_rank, eval_batch, cfg.seed, rank=env.rank, world_size=env.world_size,
                               device=env.device, memory_format=memory_format, workers=workers,
                               decode=cfg.get("decode", "auto"))
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


def open_run_dir(cfg: Config, env: DistEnv, run_dir: str, extra: Optional[dict[str, Any]] = None) -> None:
    """Creates the run folder and writes ``config.json`` (rank 0).

    A fresh (non-resumed) start in a folder that already holds a finished or resumable run
    is refused rather than silently mixing two runs' files.
    """
    if not env.is_main:
        return
    if not cfg.resume and any(os.path.exists(os.path.join(run_dir, f)) for f in ("resume.pth", "summary.json")):
        raise UserError(f"run folder {run_dir} already holds a run; pass --resume to continue it, "
                        f"or choose another --trial/--run_name")
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create run folder {run_dir}: {err.strerror}") from None
    write_json(os.path.join(run_dir, "config.json"), {**dict(cfg), **(extra or {})})


def restore(cfg: Config, env: DistEnv, run_dir: str, arch: str, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer, loader: Any,
            load_task_state: Callable[[dict[str, Any]], None] = lambda s: None) -> Progress:
    """Restores a run from ``resume.pth`` in its folder; a fresh Progress when there is none.

    Model, optimiser, epoch, best accuracy, the loader's position, every global random state
    and the methods' own state come back, so the continued run is the same run.
    """
    path = os.path.join(run_dir, "resume.pth")
    if not cfg.resume or not os.path.exists(path):
        if cfg.resume and env.is_main:
            print(f"no resume checkpoint in {run_dir}; starting fresh", flush=True)
        return Progress()
    state = load_checkpoint(path, "resume checkpoint")
    if state.get("arch") != arch:
        raise UserError(f"{path} is a run of {state.get('arch')}, not {arch}")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["loader"])
    load_task_state(state.get("task_state", {}))
    set_rng_state(state["rng"], env.device)
    if env.is_main:
        print(f"resumed {run_dir} after epoch {state['epoch']}", flush=True)
    return Progress(state["epoch"], float(state["best_acc"]), int(state.get("best_epoch", 0)))


def make_logbook(env: DistEnv, run_dir: str, progress: Progress, text_log: Optional[str] = None) -> Optional[Logbook]:
    """The rank-0 logbook, dropping rows of epochs after the resumed one."""
    return Logbook(run_dir, text_log, start_epoch=progress.epoch + 1) if env.is_main else None


def train_and_report(trainer: Trainer, progress: Progress) -> str:
    """Runs the remaining epochs, prints which checkpoint holds the best epoch, leaves the group.

    The trainer's loaders are closed when the epochs end or fail (no loader worker outlives
    the run).

    Returns:
        The path of the best checkpoint, ``<run_dir>/<arch>_best.pth``, or of the last one
        ``<arch>_last.pth`` when no epoch scored above 0 % (no best checkpoint is written then).
    """
    try:
        progress = trainer.fit(progress)
    finally:
        close_loaders(trainer.train_loader, trainer.test_loader)
    best = os.path.join(trainer.run_dir, f"{trainer.arch}_best.pth")
    last = os.path.join(trainer.run_dir, f"{trainer.arch}_last.pth")
    if trainer.env.is_main:
        trainer.logbook.close()
        if progress.best_epoch:
            print(f"best test accuracy {progress.best_acc:.2f} at epoch {progress.best_epoch}; "
                  f"best checkpoint: {best}", flush=True)
        else:
            print(f"test accuracy never rose above 0; no best checkpoint was written "
                  f"(the last epoch's weights: {last})", flush=True)
    distributed.teardown(trainer.env)
    return best if progress.best_epoch else last
