"""The table runner's plan: one ``train_student.py`` command per selected cell and trial.

Trial k of a cell runs in ``<save_root>/student_model/<table>/<teacher>-<student>/<method>/
trial_<k>/`` with ``--seed k --resume``; its state (new, resume, finished, running
elsewhere) is read from that folder. A run spread over N processes is launched through
torchrun (``python -m torch.distributed.run --standalone --nproc_per_node N``), whose
workers ``helper.distributed.setup`` joins through torch's env:// rendezvous. Standard
library only (the runner stays quick to start).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

from errors import UserError
from paper_tables.paths import TRAIN_STUDENT
from paper_tables import trial_lock
from paper_tables.cells import IMAGENET, Cell
from paper_tables.recipes import select
from teacher_zoo.published import teacher_checkpoint

DEFAULT_EPOCHS = 240  # train_student.py's --epochs default (the CIFAR recipe)
# train_student.py's defaults where the flags leave them open, by data set: (epochs, batch),
# as helper.common_flags.RECIPES (which imports torch; tests/tables/test_reproduce_imagenet.py compares).
RECIPE_DEFAULTS = {"imagenet": (100, 256)}
CIFAR_DEFAULTS = (DEFAULT_EPOCHS, 64)


@dataclass
class Trial:
    """One run of one cell: where it lives, how it is launched, what state it is in.

    Attributes:
        argv: the ``train_student.py`` arguments (cell flags, trial, paths, pass-through).
        launcher: what runs them: ``[python, train_student.py]``, or the torchrun form.
        state: ``new``, ``resume``, ``finished`` or ``running`` (elsewhere, see ``holder``).
        epochs: the epochs the run trains (its last ``--epochs``).
    """

    cell: Cell
    run_name: str
    run_dir: str
    argv: list[str]
    state: str
    holder: str = ""
    launcher: list[str] = field(default_factory=list)
    epochs: int = DEFAULT_EPOCHS

    @property
    def cmd(self) -> list[str]:
        return self.launcher + self.argv


def display_path(path: str) -> str:
    """``path`` relative to the working folder when it lies below it."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def launcher(python: str, procs: int) -> list[str]:
    """The command prefix of a run of ``procs`` processes (torchrun when more than one).

    ``--standalone`` gives each run its own rendezvous on a free local port, so several
    multi-process runs can share a machine.
    """
    script = display_path(TRAIN_STUDENT)
    if procs <= 1:
        return [display_path(python), script]
    return [display_path(python), "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(procs), script]


def run_values(argv: Sequence[str]) -> argparse.Namespace:
    """What the runner reads from a run's arguments: data set, data folder, epochs, batch
    (the last occurrence wins, as in ``train_student.py``; unset: the data set's recipe)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="cifar100")
    p.add_argument("--data_folder", default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=None)
    known, _ = p.parse_known_args(list(argv))
    epochs, batch = RECIPE_DEFAULTS.get(known.dataset, CIFAR_DEFAULTS)
    known.epochs = epochs if known.epochs is None else known.epochs
    known.batch_size = batch if known.batch_size is None else known.batch_size
    return known


def trial_state(run_dir: str) -> tuple[str, str]:
    """``(state, holder)`` of a trial folder: finished, running (with its holder), resume or new."""
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return "finished", ""
    holder = trial_lock.lock_holder(run_dir)
    if holder:
        return "running", holder
    return ("resume" if os.path.exists(os.path.join(run_dir, "resume.pth")) else "new"), ""


def build_trials(cells: Sequence[Cell], args: argparse.Namespace, passthrough: Sequence[str],
                 procs: int = 1) -> list[Trial]:
    """The trials of ``cells``, trial-major (every cell's trial 1 comes first).

    Args:
        args: ``trials``, ``save_root``, ``teacher_root``, ``python``, ``data_folder``,
            ``teacher_cache`` (passed on as ``--teacher_cache``; logit-only runs then share one
            cache of each teacher's outputs, built by the first run that needs it).
        passthrough: arguments after ``--``, last on every command.
        procs: processes per run (torchrun when more than one).
    """
    trials = []
    for k in range(1, max(args.trials or c.runs for c in cells) + 1):
        for cell in cells:
            if k > (args.trials or cell.runs):
                continue
            name = cell.run_name(k)
            run_dir = os.path.join(args.save_root, "student_model", name)
            data = ["--data_folder", args.data_folder] if args.data_folder else []
            cache = getattr(args, "teacher_cache", None)
            data += ["--teacher_cache", cache] if cache else []
            argv = ["--path_t", teacher_checkpoint(args.teacher_root, cell.teacher, cell.dataset),
                    "--model_s", cell.student, *cell.flags(), "--trial", str(k), "--seed", str(k),
                    "--save_root", args.save_root, "--run_name", name, "--resume", *data, *passthrough]
            state, holder = trial_state(run_dir)
            trials.append(Trial(cell, name, run_dir, argv, state, holder, launcher(args.python, procs),
                                run_values(argv).epochs))
    return trials


def plan_cells(cells: Sequence[Cell], args: argparse.Namespace) -> list[Cell]:
    """The selected runnable cells (``--table``, ``--pair``, ``--method``), each run folder
    once (the stronger-teacher table's ResNet-34 cells are the ImageNet table's runs)."""
    chosen = select(cells, args.table, args.pair, [paper_method(m, cells) for m in args.method])
    if not chosen:
        raise UserError("no runnable cell matches the selection")
    by_dir: dict[str, Cell] = {}
    for cell in chosen:
        by_dir.setdefault(cell.cell_dir, cell)
    return list(by_dir.values())


def paper_method(name: str, cells: Sequence[Cell]) -> str:
    """The paper row a ``--method`` written as ``train_student.py`` spells methods stands for.

    ``wttm`` → WTTM, ``hint`` → FitNet, ``crd+wttm`` (or ``wttm+crd``) → WTTM+CRD: the
    ``--distill`` name, plus the ``--add`` name where the row weights one, in any order and
    case. Default rows win over opt-in ones (``kd`` is KD, not the plain student). Any other
    name is returned unchanged, for :func:`paper_tables.recipes.select` to match against the
    paper's names.
    """
    wanted = frozenset(part.strip().lower() for part in name.split("+"))
    for cell in sorted((c for c in cells if c.runnable), key=lambda c: not c.default):
        flags = cell.flags()
        used = {flags[flags.index("--distill") + 1]}
        if "--add" in flags:  # flags() leaves out an --add weighted 0
            used.add(flags[flags.index("--add") + 1])
        if frozenset(used) == wanted:
            return cell.method
    return name


def missing_data_folder(trials: Sequence[Trial]) -> Optional[str]:
    """A one-line complaint when an ImageNet trial has no ``--data_folder`` (else None)."""
    for t in trials:
        values = run_values(t.argv)
        if values.dataset == IMAGENET and not values.data_folder:
            return (f"{t.run_name} trains on ImageNet: give --data_folder DIR, the ILSVRC-2012 folder "
                    "holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    return None
