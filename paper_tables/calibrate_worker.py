"""One process of a packing calibration: times real training steps on synthetic batches.

    python -m paper_tables.calibrate_worker --spec DIR/spec.json --index I --first_round R

The step is built as ``train_student.py`` builds it (``helper.student_flags.parse_config``,
``build_objective``, ``helper.assemble.assemble``) and driven by ``helper.loop.Trainer.train_epoch``
over a few prepared batches of the data set's shape (random pixels, random labels and
sample indices; the teacher has random weights, which does not change the work done). The
data loader is left out, and the teacher runs live (a run that finds a teacher-output
cache skips it, and goes faster than calibrated): what is timed is the training step. The process warms up, then
for each round r from R: writes ``ready_<I>_<r>``, waits for ``go_<r>`` (written by
:class:`paper_tables.calibrate.WorkerPool` once every process of the round is ready, so that the
timed windows overlap; it holds the round's CPU-thread share), times ``steps`` steps and
writes ``result_<I>_<r>.json``: images, start and end (``time.time()`` seconds). It ends
when ``stop`` appears.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

import models
from errors import exit_on_user_error
from helper import distributed
from helper.loop import NonFiniteLoss, Trainer
from helper.speed import memory_format
from helper.assemble import assemble
from helper.student import build_objective
from helper.student_flags import parse_config

GO_TIMEOUT_S = 1800.0  # how long a ready worker waits for the others


class CycledBatches:
    """A loader of ``steps`` batches cycling through a few prepared ones."""

    def __init__(self, batches: list[tuple[torch.Tensor, ...]]) -> None:
        self.batches, self.steps = batches, 1
        self.on_step: Optional[Callable[[int], None]] = None  # told i when batch i is asked for

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for i in range(self.steps):
            if self.on_step is not None:
                self.on_step(i)  # batch i is asked for once step i - 1 has been queued
            yield self.batches[i % len(self.batches)]


def synthetic_batches(n: int, batch: int, size: int, classes: int, n_train: int, device: torch.device,
                      fmt: torch.memory_format) -> list[tuple[torch.Tensor, ...]]:
    """``n`` normalised-looking batches ``([B, 3, S, S] float, [B] labels, [B] indices)``."""
    out = []
    for _ in range(n):
        images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
        out.append((images, torch.randint(0, classes, (batch,), device=device),
                    torch.randint(0, n_train, (batch,), device=device)))
    return out


def build_trainer(spec: dict[str, Any], env: distributed.DistEnv, save_root: str) -> Trainer:
    """The run's step exactly as ``train_student.py`` assembles it, on synthetic batches."""
    argv = [*spec["argv"], "--save_root", save_root, "--seed", "1", "--print_freq", str(10 ** 9),
            "--device", spec["device"], "--batch_size", str(spec["batch"])]
    cfg = parse_config(argv, env, spec["teacher"])
    classes, n_train = int(spec["classes"]), int(spec["n_train"])
    data = SimpleNamespace(num_classes=classes, image_size=models.input_size(cfg.model_s),
                           train_labels=torch.arange(n_train, device=env.device) % classes)
    teacher = models.create_model(cfg.model_t, classes).to(env.device).eval().requires_grad_(False)
    objective = build_objective(cfg, env, data, teacher)
    fmt = memory_format(cfg.channels_last)
    loader = CycledBatches(synthetic_batches(2, cfg.batch_size, data.image_size, classes, n_train,
                                             env.device, fmt))
    return assemble(cfg, env, objective, cfg.model_s, (loader, ()), save_root, None, fmt, teacher=teacher)


def run_steps(trainer: Trainer, steps: int, report: Optional["Progress"] = None, phase: str = "") -> None:
    """``steps`` training steps; ends with the loop's host sync (its meters are read).
    ``report`` hears of each step taken (written at most once a second)."""
    trainer.train_loader.steps = steps
    trainer.train_loader.on_step = (lambda i: report.write(phase, i, steps)) if report else None
    try:
        trainer.train_epoch(1)
    except NonFiniteLoss:  # raised at the epoch-end read, after every step ran: timing holds
        pass
    if report:
        report.write(phase, steps, steps, force=True)


class Progress:
    """``progress_<I>.json``: the phase (build, warm-up, timed), the step reached and the
    seconds so far, for :class:`paper_tables.calibrate.WorkerPool` to show while it waits."""

    def __init__(self, path: str) -> None:
        self.path, self.start, self.last = path, time.time(), 0.0
        self.phase, self.phase_start = "", self.start

    def write(self, phase: str, step: int, of: int, force: bool = False) -> None:
        now = time.time()
        if phase != self.phase:
            self.phase, self.phase_start = phase, now
        if force or step <= 1 or now - self.last >= 1.0:  # a file write per step would cost time
            self.last = now
            per_step = (now - self.phase_start) / step if step else None
            write_json(self.path, {"phase": phase, "step": step, "of": of, "elapsed": now - self.start,
                                   "per_step": per_step})


def wait_for_either(go: str, stop: str, timeout_s: float) -> bool:
    """True once ``go`` exists, False once ``stop`` does."""
    deadline = time.time() + timeout_s
    while not os.path.exists(go):
        if os.path.exists(stop):
            return False
        if time.time() > deadline:
            raise TimeoutError(f"no {os.path.basename(go)} after {timeout_s:.0f} s")
        time.sleep(0.01)
    return True


def write_json(path: str, data: dict) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    os.replace(path + ".tmp", path)


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="one process of a packing calibration (paper_tables.calibrate)")
    p.add_argument("--spec", required=True, help="the round's spec.json (written by paper_tables.calibrate)")
    p.add_argument("--index", type=int, required=True, help="this process's index in the round")
    p.add_argument("--first_round", type=int, default=0, help="the first round it takes part in")
    args = p.parse_args(argv)
    with open(args.spec, encoding="utf-8") as handle:
        spec = json.load(handle)
    folder = os.path.dirname(os.path.abspath(args.spec))
    torch.manual_seed(args.index)
    env = distributed.setup(spec["device"])
    report = Progress(os.path.join(folder, f"progress_{args.index}.json"))
    report.write("building the step", 0, 0, force=True)
    with tempfile.TemporaryDirectory() as save_root:
        trainer = build_trainer(spec, env, save_root)
        run_steps(trainer, int(spec["warmup"]), report, "warm-up")
        r = args.first_round
        while True:
            open(os.path.join(folder, f"ready_{args.index}_{r}"), "w").close()
            go = os.path.join(folder, f"go_{r}")
            if not wait_for_either(go, os.path.join(folder, "stop"), GO_TIMEOUT_S):
                return 0
            with open(go, encoding="utf-8") as handle:
                torch.set_num_threads(int(handle.read().strip() or torch.get_num_threads()))
            start = time.time()
            run_steps(trainer, int(spec["steps"]), report, "timed")
            end = time.time()
            write_json(os.path.join(folder, f"result_{args.index}_{r}.json"),
                       {"images": int(spec["steps"]) * trainer.cfg.batch_size, "start": start, "end": end})
            r += 1


if __name__ == "__main__":
    sys.exit(main())
