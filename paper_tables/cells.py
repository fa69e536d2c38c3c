"""The vocabulary of the paper's tables: table keys, a table cell, and a cell's flags.

A leaf of :mod:`paper_tables`: the CIFAR-100 recipes (:mod:`paper_tables.recipes`) and the
ImageNet and DeiT ones build :class:`Cell` objects from their recipe files with it.
"""
from __future__ import annotations

import argparse
import functools
import re
from dataclasses import dataclass
from typing import Any, Optional, Union

from errors import UserError

TableKey = Union[int, str]
IMAGENET = "imagenet"
IMAGENET_TEACHERS = "imagenet-teachers"
DEIT = "deit"
TABLES: dict[TableKey, str] = {1: "same-architecture pairs", 2: "different-architecture pairs",
                               IMAGENET: "ImageNet (ILSVRC-2012)",
                               IMAGENET_TEACHERS: "ImageNet, ResNet-18 from stronger teachers",
                               DEIT: "ImageNet, DeiT III-S → DeiT-Ti"}
DEFAULT_TABLES = (1, 2)  # what runs when neither --table nor --pair says otherwise


def table_key(text: str) -> TableKey:
    """``--table`` as typed → the table's key: ``"1"`` → 1, ``"ImageNet"`` → ``"imagenet"``,
    ``"imagenet_teachers"`` → ``"imagenet-teachers"``, ``"DeiT"`` → ``"deit"``."""
    key = text.strip().lower().replace("_", "-")
    if key in ("1", "2"):
        return int(key)
    if key in TABLES:
        return key
    raise argparse.ArgumentTypeError(f"unknown table {text!r}; choose {', '.join(map(str, TABLES))}")


def table_dir(table: TableKey) -> str:
    """The folder of a table's runs: ``table1``, ``table2``, ``imagenet``, ``imagenet-teachers``,
    ``deit``."""
    return f"table{table}" if isinstance(table, int) else str(table)



@functools.lru_cache(maxsize=1)
def student_flags() -> dict[str, str]:
    """Recipe hyperparameter → ``train_student.py`` flag, in the order commands write them.

    Derived from the student parser (its methods' flags come from the registry): every
    destination names its flag, and ``r``/``a``/``b`` name ``-r``/``-a``/``-b``. The loss
    terms come first (``--distill --add -r -a -b``), then the rest in the parser's order.
    """
    from helper.student_flags import build_parser

    options = build_parser().option_names()
    by_key = {dest: flag for dest, flag in options.items()}
    by_key.update({flag.lstrip("-"): flag for flag in options.values() if not flag.startswith("--")})
    first = ["distill", "add", "r", "a", "b"]
    rest = [k for k in by_key if k not in first and k not in ("gamma", "alpha", "beta", "help", "h")]
    return {k: by_key[k] for k in first + rest}


@dataclass(frozen=True)
class Cell:
    """One cell of a paper table: a method on a teacher→student pair.

    Attributes:
        table: 1 (same-architecture pairs), 2 (different-architecture pairs), ``"imagenet"``,
            ``"imagenet-teachers"`` (ResNet-18 from stronger teachers) or ``"deit"``.
        column: the pair's column in that table, 1-based.
        teacher, student: architecture names.
        method: the paper's row name (``"WTTM+CRD"``, ``"KD"``, ``"teacher"``, ...).
        paper: the paper's mean top-1 (%), None where it prints n/a.
        paper_std: the paper's standard deviation, when it gives one.
        runs: the number of runs the paper averages (the default ``--trials``).
        hparams: resolved hyperparameters (recipe key → value); empty when not runnable.
        note: what we chose where the paper is silent; empty when nothing was chosen.
        default: whether the cell is run when no ``--method`` is given.
        dataset: the data set the paper's value was measured on (``cifar100``, ``imagenet``).
        origin: where the paper's value came from, and under which recipe.
        run_table: the table whose folder holds this cell's trials when another table runs
            the very same command (the stronger-teacher table's ResNet-34 column is the
            ImageNet table's); None: its own table.
    """

    table: TableKey
    column: int
    teacher: str
    student: str
    method: str
    paper: Optional[float]
    paper_std: Optional[float]
    runs: int
    hparams: tuple[tuple[str, Any], ...]
    note: str = ""
    default: bool = True
    dataset: str = "cifar100"
    origin: str = ""
    run_table: Optional[TableKey] = None

    @property
    def runnable(self) -> bool:
        return bool(self.hparams)

    @property
    def pair(self) -> str:
        return f"{self.teacher}:{self.student}"

    @property
    def cell_dir(self) -> str:
        """``table1/resnet32x4-resnet8x4/WTTM_plus_CRD`` (``imagenet/resnet34-resnet18/KD``):
        where the cell's trials live."""
        table = self.table if self.run_table is None else self.run_table
        return f"{table_dir(table)}/{self.teacher}-{self.student}/{method_slug(self.method)}"

    def run_name(self, trial: int) -> str:
        return f"{self.cell_dir}/trial_{trial}"

    def flags(self) -> list[str]:
        """The method's ``train_student.py`` flags (no teacher, student, trial or paths)."""
        if not self.runnable:
            raise UserError(f"{self.method} on {self.pair} is not a training run" +
                            (f" ({self.note})" if self.note else ""))
        values = dict(self.hparams)
        if not values.get("a"):
            values.pop("add", None)  # an -a 0 extra loss is no loss: leave --add out
        out: list[str] = []
        for key, flag in student_flags().items():
            value = values.get(key)
            if isinstance(value, bool):  # a switch (--teacher_train_mode): named when on
                out += [flag] if value else []
            elif value is not None:
                out += [flag, format_value(value)]
        return out


def method_slug(method: str) -> str:
    """A folder-safe method name: ``WTTM+CRD`` → ``WTTM_plus_CRD``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", method.replace("+", "_plus_")).strip("_")


def method_key(name: str) -> str:
    """A method name compared loosely: ``WTTM + CRD``, ``wttm_plus_crd`` → ``wttm+crd``."""
    return re.sub(r"[^a-z0-9+]", "", name.lower().replace("_plus_", "+"))


def format_value(value: Any) -> str:
    """A flag value as the paper writes it: ``1.0`` → ``1``, ``0.015`` → ``0.015``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
