"""The run folder around the loop: seeding, ``config.json``, the resume file, the logbook and
the end-of-run report."""
from __future__ import annotations

import os
import random
from typing import Any, Optional

import numpy as np
import torch

from errors import UserError
from helper import distributed
from helper.checkpoint import load_checkpoint
from helper.config import Config
from helper.data_setup import close_loaders
from helper.distributed import DistEnv
from helper.logbook import Logbook, write_json
from helper.loop import Progress, Trainer


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def read_resume(cfg: Config, env: DistEnv, run_dir: str, arch: str) -> Optional[dict[str, Any]]:
    """The run's ``resume.pth`` when ``--resume`` asks for it and it exists, else None (a
    fresh start, said when ``--resume`` found nothing).

    Raises:
        UserError: the file is a run of another architecture, or unreadable.
    """
    path = os.path.join(run_dir, "resume.pth")
    if not cfg.resume or not os.path.exists(path):
        if cfg.resume and env.is_main:
            print(f"no resume checkpoint in {run_dir}; starting fresh", flush=True)
        return None
    state = load_checkpoint(path, "resume checkpoint")
    if state.get("arch") != arch:
        raise UserError(f"{path} is a run of {state.get('arch')}, not {arch}")
    return state


def progress_of(state: Optional[dict[str, Any]]) -> Progress:
    """Where a resumed run stands (a fresh Progress without a resume file)."""
    if state is None:
        return Progress()
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
