"""What both entry scripts do around the loop: seeds, data, run folder, resume."""
from __future__ import annotations

import os
import random
from typing import Any, Callable, Optional

import numpy as np
import torch

import models
from dataset import ImageDataset, load_dataset
from dataset.loader import DeviceLoader
from helper import distributed
from helper.checkpoint import load_checkpoint, set_rng_state
from helper.config import Config
from helper.distributed import DistEnv
from errors import UserError
from helper.logbook import Logbook, write_json
from helper.loop import Progress, Trainer

EVAL_BATCH = 500  # evaluation batch size: no effect on accuracy, fewer launches


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: Config, env: DistEnv) -> ImageDataset:
    """Loads the data set once and moves its uint8 tensors onto this rank's device."""
    return load_dataset(cfg.dataset, cfg.data_folder).to(env.device)


def check_data_fits(cfg: Config, data: ImageDataset, archs: tuple[str, ...]) -> None:
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


def make_loaders(cfg: Config, env: DistEnv, data: ImageDataset,
                 memory_format: torch.memory_format) -> tuple[DeviceLoader, DeviceLoader]:
    """The shuffled, augmented training loader (this rank's shard) and the test loader."""
    if cfg.batch_size % env.world_size:
        raise UserError(f"--batch_size {cfg.batch_size} must be divisible by the {env.world_size} ranks")
    train = DeviceLoader(data.train_images, data.train_labels, cfg.batch_size // env.world_size,
                         data.mean, data.std, train=True, seed=cfg.seed, rank=env.rank,
                         world_size=env.world_size, memory_format=memory_format)
    test = DeviceLoader(data.test_images, data.test_labels, EVAL_BATCH, data.mean, data.std,
                        train=False, seed=cfg.seed, memory_format=memory_format)
    return train, test


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

    Returns:
        The path of the best checkpoint, ``<run_dir>/<arch>_best.pth``, or of the last one
        ``<arch>_last.pth`` when no epoch scored above 0 % (no best checkpoint is written then).
    """
    progress = trainer.fit(progress)
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
