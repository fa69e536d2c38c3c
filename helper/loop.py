"""The one generic training loop, shared by teacher and student training.

The loop sees an *objective* (a module mapping a batch to named loss terms; the student
plus whatever the methods own) and, for distillation, a frozen *teacher* callable. It knows
nothing about which method runs. Meters stay on the device; the host reads them every
``--print_freq`` steps and at the end of an epoch (the only sync points).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from helper import distributed
from helper.checkpoint import atomic_save, rng_state, set_rng_state
from helper.config import Config
from helper.distributed import DistEnv
from errors import UserError
from helper.evaluate import evaluate
from helper.graph_step import step_record
from helper.logbook import Logbook, write_json
from helper.optim import LRSchedule
from helper.step import StepOut, unpack


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class Progress:
    """Where a run stands: the last finished epoch and the best test accuracy so far."""

    epoch: int = 0
    best_acc: float = 0.0
    best_epoch: int = 0


class DeviceMeters:
    """Sums of loss terms and correct predictions, kept on the device (no per-step sync).

    The sums live in one vector, so an update is a handful of kernels whatever the number of
    terms (a step's own cost is what this loop is about).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: Optional[list[str]] = None
        self.total: Optional[torch.Tensor] = None  # [sum of each term..., correct]
        self.count = 0

    def update(self, terms: dict[str, torch.Tensor], correct: torch.Tensor, batch: int) -> None:
        """Adds one batch: ``terms`` are 0-d means over its ``batch`` samples, ``correct`` 0-d."""
        if self.names is None:
            self.names = list(terms)
        elif list(terms) != self.names:
            raise ValueError(f"loss terms changed within an epoch: {self.names} -> {list(terms)}")
        means = torch.stack([v.detach().reshape(()).float() for v in terms.values()])
        row = torch.cat([means * batch, correct.reshape(1).float()])
        self.total = row if self.total is None else self.total + row
        self.count += batch

    def read(self, env: Optional[DistEnv] = None) -> dict[str, float]:
        """Means over the samples seen (summed over ranks); synchronises with the host."""
        if self.total is None or self.names is None:
            raise ValueError("no batch was seen")
        packed = torch.cat([self.total, self.total.new_tensor([self.count])])
        if env is not None:
            packed = distributed.all_reduce_sum(packed, env)
        values = packed.tolist()
        count = max(values[-1], 1.0)
        out = {n: v / count for n, v in zip(self.names, values[:-2])}
        out["acc"] = 100.0 * values[-2] / count
        return out


class RunClock:
    """Elapsed wall time of this process's part of a run and the ETA of the rest, from the
    mean epoch time so far (checkpointing and validation included)."""

    def __init__(self, done: int, total: int) -> None:
        self.start, self.first, self.total = time.perf_counter(), done, total

    def tick(self, epoch: int) -> str:
        """``elapsed H:MM:SS eta H:MM:SS`` after finishing ``epoch``."""
        elapsed = time.perf_counter() - self.start
        per_epoch = elapsed / max(epoch - self.first, 1)
        return f"elapsed {format_duration(elapsed)} eta {format_duration(per_epoch * (self.total - epoch))}"


def format_duration(seconds: float) -> str:
    """``3725.2`` → ``1:02:05``."""
    whole = int(round(max(seconds, 0.0)))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass
class Trainer:
    """Everything the generic loop needs for one run.

    Attributes:
        cfg: the validated configuration.
        env: this process's rank and device.
        objective: the trainable module (maybe DDP-wrapped): ``objective(images, labels,
            index, epoch, teacher_out)`` returns ``{"loss": 0-d, "logits": [B, K],
            "terms": {name: 0-d}}``.
        model: the network that is evaluated and checkpointed (the student; unwrapped).
        arch: its architecture name (checkpoint file names and ``'arch'``).
        optimizer: over the trainable parameters (``--opt``).
        train_loader / test_loader: on-device loaders yielding ``(images, labels, index)``.
        run_dir: the run folder.
        logbook: per-epoch records (rank 0 only; None elsewhere).
        step: the per-batch step (:class:`~helper.step.TrainStep`, or a CUDA-graph step).
        schedule: the learning rate of every step (set per epoch, or per iteration).
        task_state: returns the method-owned state saved in the resume checkpoint only.
        memory_format: of the input batches.
        step_mode: how the step was planned to run (the header's line); ``summary.json``
            records it, or the fallback a CUDA-graph step took.
    """

    cfg: Config
    env: DistEnv
    objective: nn.Module
    model: nn.Module
    arch: str
    optimizer: torch.optim.Optimizer
    train_loader: Any
    test_loader: Iterable
    run_dir: str
    logbook: Optional[Logbook]
    step: Callable[..., StepOut]
    schedule: LRSchedule
    task_state: Callable[[], dict[str, Any]] = field(default=lambda: {})
    memory_format: torch.memory_format = torch.contiguous_format
    step_mode: str = "eager"

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training set; returns mean loss terms and accuracy."""
        cfg, device = self.cfg, self.env.device
        self.objective.train()
        meters = DeviceMeters(device)
        steps = len(self.train_loader)
        for step, batch in enumerate(self.train_loader, start=1):
            if self.schedule.per_iteration:  # warm-up / cosine: a rate per step
                self.set_lr(self.schedule.at(epoch, step - 1, steps))
            images, labels, index, views = unpack(batch)
            out = self.step(images, labels, index, views, epoch)
            meters.update({"loss": out.loss, **{f"loss_{k}": v for k, v in out.terms.items()}},
                          out.correct, labels.shape[0])
            if step % cfg.print_freq == 0 or step == steps:
                stats = meters.read(self.env)  # sync point: once per print_freq steps
                self._check_finite(stats, epoch, step)
                if self.env.is_main and step % cfg.print_freq == 0:
                    print(f"epoch {epoch} [{step}/{steps}] loss {stats['loss']:.4f} acc {stats['acc']:.2f}",
                          flush=True)
        return stats

    def _check_finite(self, stats: dict[str, float], epoch: int, step: int) -> None:
        if not math.isfinite(stats["loss"]):
            bad = [k for k, v in stats.items() if not math.isfinite(v)]
            resume = os.path.join(self.run_dir, "resume.pth")
            kept = (f"the last good checkpoint is kept: {resume}" if os.path.exists(resume)
                    else "no checkpoint had been written yet")
            raise NonFiniteLoss(
                f"loss became {stats['loss']} at epoch {epoch}, step {step} ({', '.join(bad)}); "
                f"run stopped, {kept}")

    def save_checkpoints(self, progress: Progress, test_acc: float) -> None:
        """Best, periodic and resume checkpoints for the epoch just finished (rank 0)."""
        cfg, epoch = self.cfg, progress.epoch
        model_sd = self.model.state_dict()
        plain = {"model": model_sd, "epoch": epoch, "best_acc": float(progress.best_acc), "arch": self.arch}
        if progress.best_epoch == epoch:
            atomic_save({**plain, "accuracy": float(test_acc)}, os.path.join(self.run_dir, f"{self.arch}_best.pth"))
        if epoch % cfg.save_freq == 0:
            atomic_save({**plain, "accuracy": float(test_acc), "optimizer": self.optimizer.state_dict()},
                        os.path.join(self.run_dir, f"ckpt_epoch_{epoch}.pth"))
        if epoch == cfg.epochs:
            atomic_save({**plain, "accuracy": float(test_acc), "optimizer": self.optimizer.state_dict()},
                        os.path.join(self.run_dir, f"{self.arch}_last.pth"))

    def save_resume(self, progress: Progress) -> None:
        """The resume checkpoint: everything needed to continue bit-for-bit (rank 0)."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": progress.epoch,
            "best_acc": float(progress.best_acc),
            "best_epoch": progress.best_epoch,
            "arch": self.arch,
            "task_state": self.task_state(),
            "loader": self.train_loader.state_dict(),
            "rng": rng_state(self.env.device),
        }
        atomic_save(state, os.path.join(self.run_dir, "resume.pth"))

    def skipped_files(self) -> dict[str, int]:
        """Image files left out so far because they cannot be decoded (each warned about once):
        ``skipped_files`` in the training set, ``skipped_val_files`` in the validation set,
        each file counted once over all ranks and epochs; only counts above 0 ({} for
        in-memory data, whose loaders skip nothing)."""
        out = {}
        for column, loader in (("skipped_files", self.train_loader), ("skipped_val_files", self.test_loader)):
            if not hasattr(loader, "skipped"):
                continue
            files = [set(loader.skipped)] * self.env.world_size
            if self.env.enabled:  # a rank's shard changes every epoch: the union, not a sum
                torch.distributed.all_gather_object(files, set(loader.skipped))
            if set().union(*files):
                out[column] = len(set().union(*files))
        return out

    def restore(self, state: dict[str, Any], load_task_state: Callable[[dict[str, Any]], None]) -> None:
        """Continues the run saved in ``state`` (a ``resume.pth``): network, optimiser, the
        loader's position, the methods' own state and every global random state come back,
        so the continued run is the same run."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_loader.load_state_dict(state["loader"])
        load_task_state(state.get("task_state", {}))
        set_rng_state(state["rng"], self.env.device)
        if self.env.is_main:
            print(f"resumed {self.run_dir} after epoch {state['epoch']}", flush=True)

    def set_lr(self, lr: float) -> None:
        """Sets the learning rate of every parameter group."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def fit(self, progress: Progress) -> Progress:
        """Trains from ``progress.epoch + 1`` to ``cfg.epochs``; returns the final progress."""
        cfg = self.cfg
        clock = RunClock(progress.epoch, cfg.epochs)
        for epoch in range(progress.epoch + 1, cfg.epochs + 1):
            lr = self.schedule.at(epoch, 0, len(self.train_loader))  # the epoch's first step's
            self.set_lr(lr)
            start = time.perf_counter()
            train = self.train_epoch(epoch)
            distributed.share_buffers(self.model, self.env)  # score the network rank 0 saves
            test = evaluate(self.model, self.test_loader, cfg.precision, self.memory_format, self.env)
            seconds = time.perf_counter() - start
            progress.epoch = epoch
            if test["acc1"] > progress.best_acc:
                progress.best_acc, progress.best_epoch = test["acc1"], epoch
            skipped = self.skipped_files()  # on every rank: gathers the ranks' files
            if self.env.is_main:
                row = {"epoch": epoch, "lr": lr, "train_loss": train["loss"], "train_acc": train["acc"],
                       "test_acc": test["acc1"], "test_acc5": test["acc5"], "test_loss": test["loss"],
                       "seconds": seconds}
                row.update({k: v for k, v in train.items() if k.startswith("loss_")})
                row.update(skipped)
                self.save_checkpoints(progress, test["acc1"])
                assert self.logbook is not None
                self.logbook.log_epoch(row)
                self.save_resume(progress)
                print(f"epoch {epoch}/{cfg.epochs} lr {lr:.4g} train_loss {train['loss']:.4f} "
                      f"train_acc {train['acc']:.2f} test_acc {test['acc1']:.2f} "
                      f"(best {progress.best_acc:.2f}) {seconds:.1f}s {clock.tick(epoch)}", flush=True)
            distributed.barrier(self.env)
        if self.env.is_main:
            last = self.logbook.rows[-1]["test_acc"] if self.logbook and self.logbook.rows else 0.0
            write_json(os.path.join(self.run_dir, "summary.json"), {
                "best_acc": progress.best_acc, "best_epoch": progress.best_epoch,
                "last_acc": last, "epochs": cfg.epochs, "finished": True,
                **step_record(self.step, self.step_mode)})  # the mode used, and any graph fallback
        return progress
