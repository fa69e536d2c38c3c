"""What both entry scripts do around the loop: seeds, data, run folder, resume."""
from __future__ import annotations

import json
import os
import random
from typing import Any, Callable, Optional

import numpy as np
import torch

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


def resumed_seed(cfg: Config, run_dir: str) -> Config:
    """``cfg`` with the seed of the run it resumes, when ``--resume`` is given without ``--seed``.

    A drawn seed differs on every start, but the continued run must keep the one it began
    with (the loader's shuffles and crops derive from it); it is read from the run's
    ``config.json``. Without a previous run, ``cfg`` is returned unchanged.
    """
    path = os.path.join(run_dir, "config.json")
    if not (cfg.resume and cfg.seed_drawn and os.path.exists(path)):
        return cfg
    try:
        with open(path) as handle:
            seed = int(json.load(handle)["seed"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read the seed of the run being resumed from {path} ({err}); "
                        f"pass --seed") from None
    return cfg.replace(seed=seed)


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


def restore(trainer: Trainer, load_task_state: Callable[[dict[str, Any]], None] = lambda s: None) -> Progress:
    """Restores a run from ``resume.pth`` in its folder; a fresh Progress when there is none.

    Model, optimiser, epoch, best accuracy, the loader's generators, every global random
    state and the methods' own state come back, so the continued run is the same run.
    """
    path = os.path.join(trainer.run_dir, "resume.pth")
    if not trainer.cfg.resume or not os.path.exists(path):
        if trainer.cfg.resume and trainer.env.is_main:
            print(f"no resume checkpoint in {trainer.run_dir}; starting fresh", flush=True)
        return Progress()
    state = load_checkpoint(path, "resume checkpoint")
    if state.get("arch") != trainer.arch:
        raise UserError(f"{path} is a run of {state.get('arch')}, not {trainer.arch}")
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.train_loader.load_state_dict(state["loader"])
    load_task_state(state.get("task_state", {}))
    set_rng_state(state["rng"], trainer.env.device)
    if trainer.env.is_main:
        print(f"resumed {trainer.run_dir} after epoch {state['epoch']}", flush=True)
    return Progress(state["epoch"], float(state["best_acc"]), int(state.get("best_epoch", 0)))


def make_logbook(env: DistEnv, run_dir: str, progress: Progress, text_log: Optional[str] = None) -> Optional[Logbook]:
    """The rank-0 logbook, dropping rows of epochs after the resumed one."""
    return Logbook(run_dir, text_log, start_epoch=progress.epoch + 1) if env.is_main else None


def train_and_report(trainer: Trainer, progress: Progress) -> str:
    """Runs the remaining epochs, prints where the best checkpoint is, leaves the group.

    Returns:
        The path of the best checkpoint, ``<run_dir>/<arch>_best.pth``.
    """
    progress = trainer.fit(progress)
    best = os.path.join(trainer.run_dir, f"{trainer.arch}_best.pth")
    if trainer.env.is_main:
        trainer.logbook.close()
        print(f"best test accuracy {progress.best_acc:.2f} at epoch {progress.best_epoch}; "
              f"best checkpoint: {best}", flush=True)
    distributed.teardown(trainer.env)
    return best
