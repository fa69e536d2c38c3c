"""The paper's table cells as data, and each cell as a ``train_student.py`` command.

``scripts/recipes.json`` holds every cell of the two CIFAR-100 tables of the official README
(Table 1: same-architecture pairs, Table 2: different-architecture pairs): teacher, student,
method, the paper's accuracy and run count, and each hyperparameter with its source. This
module reads it into :class:`Cell` objects and turns each runnable cell into flags. The
ImageNet table (``scripts/recipes_imagenet.json``) is read by :mod:`helper.tables.recipes_imagenet`;
:func:`all_cells` returns the three tables together.

Where the paper is silent we fill the gap and say so in :attr:`Cell.note` (the report marks
those cells; ``docs/REPRODUCE.md`` explains each choice):

* DIST: no per-pair weights are published; the official code's defaults
  (``--dist_beta 1 --dist_gamma 1 --dist_tau 4``) with ``-b 1``.
* DKD on the two pairs the paper leaves n/a: mdistiller's defaults (β 8).
* WTTM without CE (paper Table 6, opt-in): β is not published; we use the pair's WTTM β.
* The vanilla student row (opt-in): plain cross-entropy through ``train_student.py``
  (``--distill kd -r 1 -a 0 -b 0``). The teacher row is never a run.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

from errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPES_JSON = os.path.join(REPO, "scripts", "recipes.json")
TableKey = Union[int, str]
IMAGENET = "imagenet"
TABLES: dict[TableKey, str] = {1: "same-architecture pairs", 2: "different-architecture pairs",
                               IMAGENET: "ImageNet (ILSVRC-2012)"}
DEFAULT_TABLES = (1, 2)  # what runs when neither --table nor --pair says otherwise
WTTM_NO_CE = "WTTM w/o CE"
TEACHER_FILE = os.path.join("{arch}_vanilla", "ckpt_epoch_240.pth")


def table_key(text: str) -> TableKey:
    """``--table`` as typed → the table's key: ``"1"`` → 1, ``"ImageNet"`` → ``"imagenet"``."""
    key = text.strip().lower()
    if key in ("1", "2"):
        return int(key)
    if key == IMAGENET:
        return IMAGENET
    raise argparse.ArgumentTypeError(f"unknown table {text!r}; choose 1, 2 or imagenet")


def table_dir(table: TableKey) -> str:
    """The folder of a table's runs: ``table1``, ``table2``, ``imagenet``."""
    return f"table{table}" if isinstance(table, int) else str(table)



@functools.lru_cache(maxsize=1)
def student_flags() -> dict[str, str]:
    """Recipe hyperparameter → ``train_student.py`` flag, in the order commands write them.

    Derived from the student parser (its methods' flags come from the registry): every
    destination names its flag, and ``r``/``a``/``b`` name ``-r``/``-a``/``-b``. The loss
    terms come first (``--distill --add -r -a -b``), then the rest in the parser's order.
    """
    from helper.config import option_names  # the parser imports torch: only when needed
    from helper.student_flags import build_parser

    options = option_names(build_parser())
    by_key = {dest: flag for dest, flag in options.items()}
    by_key.update({flag.lstrip("-"): flag for flag in options.values() if not flag.startswith("--")})
    first = ["distill", "add", "r", "a", "b"]
    rest = [k for k in by_key if k not in first and k not in ("gamma", "alpha", "beta", "help", "h")]
    return {k: by_key[k] for k in first + rest}


# Recipe entries that are not flags, and why.
NOT_FLAGS = {
    "learning_rate": "derived by train_student.py from --model_s (0.01 for the light students)",
    "T_equiv": "1 / ttm_l, informational",
    "at_p": "AT's p = 2 is fixed in the loss, as in RepDistiller",
    "rkd_distance_weight": "RKD's 25 is fixed in the loss, as in RepDistiller",
    "rkd_angle_weight": "RKD's 50 is fixed in the loss, as in RepDistiller",
    "dkd_ce_weight": "DKD's CE weight is -r",
    "train": "reference rows only",
}
DKD_DEFAULTS = {"dkd_ce_weight": 1.0, "dkd_alpha": 1.0, "dkd_beta": 8.0, "dkd_T": 4.0,
                "dkd_warmup": 20}
NOTE_DIST = ("our choice: DIST weights are unpublished; official-code defaults "
             "dist_beta 1, dist_gamma 1, dist_tau 4 with -b 1")
NOTE_DKD_NA = "no paper value (n/a in the paper); our choice: mdistiller defaults, DKD beta 8"
NOTE_NO_CE = "our choice: beta is unpublished for WTTM without CE; we use the pair's WTTM beta"
NOTE_STUDENT = "vanilla student: plain cross-entropy (--distill kd -r 1 -a 0 -b 0)"


@dataclass(frozen=True)
class Cell:
    """One cell of a paper table: a method on a teacher→student pair.

    Attributes:
        table: 1 (same-architecture pairs), 2 (different-architecture pairs) or ``"imagenet"``.
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
        return f"{table_dir(self.table)}/{self.teacher}-{self.student}/{method_slug(self.method)}"

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
            if values.get(key) is not None:
                out += [flag, format_value(values[key])]
        return out


def method_slug(method: str) -> str:
    """A folder-safe method name: ``WTTM+CRD`` → ``WTTM_plus_CRD``."""
    return re.sub(r"[^A-Za-z0-9]+", "_", method.replace("+", "_plus_")).strip("_")


def _method_key(name: str) -> str:
    return re.sub(r"[^a-z0-9+]", "", name.lower().replace("_plus_", "+"))


def format_value(value: Any) -> str:
    """A flag value as the paper writes it: ``1.0`` → ``1``, ``0.015`` → ``0.015``."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def teacher_checkpoint(root: str, arch: str, dataset: str = "cifar100") -> str:
    """Where a teacher lives: ``<root>/<arch>_vanilla/ckpt_epoch_240.pth`` for CIFAR-100,
    ``<root>/<arch>_imagenet/<torchvision's file name>`` for ImageNet."""
    if dataset == IMAGENET:
        from helper.teachers import imagenet_teacher_path  # imports torch: only when needed
        return imagenet_teacher_path(root, arch)
    return os.path.join(root, TEACHER_FILE.format(arch=arch))


def _values(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in hyperparameters.items()}


def _resolve(entry: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A table entry's runnable hyperparameters and the gap-filling note (empty if none)."""
    method, hp = entry["method"], _values(entry["hyperparameters"])
    if method == "teacher":
        return {}, ""
    if method == "student":
        return {"distill": "kd", "r": 1.0, "a": 0.0, "b": 0.0}, NOTE_STUDENT
    note = ""
    if method == "DIST" and hp.get("b") is None:
        hp["b"], note = 1.0, NOTE_DIST
    if method == "DKD":
        if any(hp.get(k) is None for k in DKD_DEFAULTS):
            note = NOTE_DKD_NA
        hp = {**DKD_DEFAULTS, **{k: v for k, v in hp.items() if v is not None}}
        hp.update(r=hp.pop("dkd_ce_weight"), a=0.0, b=1.0)
    flags = {k: v for k, v in student_flags().items() if k not in NOT_FLAGS}
    unknown = set(hp) - set(flags) - set(NOT_FLAGS)
    missing = [k for k in flags if k in hp and hp[k] is None and k not in ("kd_T", "add")]
    if unknown or missing:
        raise ValueError(f"{entry['id']}: unhandled hyperparameters {sorted(unknown)} / "
                         f"values missing for {missing}")
    return {k: v for k, v in hp.items() if k in flags}, note


@functools.lru_cache(maxsize=4)
def load_cells(path: str = RECIPES_JSON) -> tuple[Cell, ...]:
    """Every cell of both tables, in the paper's order, plus the opt-in WTTM-w/o-CE row."""
    with open(path) as handle:
        data = json.load(handle)
    cells = []
    for e in data["entries"]:
        table = int(e["brief_table"].split()[-1])
        runs = e["runs_averaged"] or data["runs_averaged"][e["group"]]["default"]
        hp, note = _resolve(e)
        cells.append(Cell(table, e["column"], e["teacher"], e["student"], e["method"],
                          e["top1"], e["top1_std"], runs, tuple(hp.items()), note,
                          default=e["method"] not in ("teacher", "student")))
    wttm = {(c.teacher, c.student): dict(c.hparams) for c in cells if c.method == "WTTM"}
    columns = {(c.teacher, c.student): c.column for c in cells if c.table == 1}
    for e in data["extra_tables"]["wttm_without_ce_table6"]:
        pair = (e["teacher"], e["student"])
        hp = _values(e["hyperparameters"])
        flags = {"distill": hp["distill"], "r": hp["r"], "a": 0.0,
                 "b": hp["b"] if hp["b"] is not None else wttm[pair]["b"], "ttm_l": hp["ttm_l"]}
        cells.append(Cell(1, columns[pair], *pair, WTTM_NO_CE, e["top1"], None,
                          e["runs_averaged"], tuple(flags.items()),
                          NOTE_NO_CE if hp["b"] is None else "", default=False))
    return tuple(cells)


def all_cells() -> tuple[Cell, ...]:
    """The cells of every table: CIFAR-100 Tables 1 and 2, then the ImageNet table."""
    from helper.tables.recipes_imagenet import load_imagenet_cells  # it builds on this module's Cell
    return load_cells() + load_imagenet_cells()


def method_names(cells: Iterable[Cell]) -> list[str]:
    """Distinct method names in first-seen (paper) order."""
    return list(dict.fromkeys(c.method for c in cells))


def pairs_of(cells: Iterable[Cell]) -> list[tuple[TableKey, str, str]]:
    """Distinct ``(table, teacher, student)`` in table, then column order."""
    order = list(TABLES)
    seen = sorted({(order.index(c.table), c.column, c.table, c.teacher, c.student) for c in cells})
    return [(table, teacher, student) for _, _, table, teacher, student in seen]


def select(cells: Sequence[Cell], tables: Sequence[TableKey] = (), pairs: Sequence[str] = (),
           methods: Sequence[str] = ()) -> list[Cell]:
    """The runnable cells matching the filters.

    Args:
        tables: table keys (1, 2, ``"imagenet"``); empty: every table when ``pairs`` names
            some, else :data:`DEFAULT_TABLES` (the CIFAR-100 tables).
        pairs: ``"teacher:student"`` strings (empty: every pair of the tables).
        methods: paper method names, case and punctuation insensitive (``wttm+crd``);
            without it, the tables' default methods (every distillation method).

    Raises:
        UserError: an unknown pair or method, or a row that is not a training run.
    """
    tables = tables or (() if pairs else DEFAULT_TABLES)
    chosen = [c for c in cells if not tables or c.table in tables]
    if pairs:
        known = {c.pair for c in chosen}
        bad = [p for p in pairs if p not in known]
        if bad:
            raise UserError(f"unknown pair {bad[0]!r} for the chosen table(s); choose from "
                            f"{', '.join(sorted(known))}")
        chosen = [c for c in chosen if c.pair in pairs]
    if not methods:
        return [c for c in chosen if c.default]
    by_key = {_method_key(m): m for m in method_names(chosen)}
    wanted = []
    for name in methods:
        if _method_key(name) not in by_key:
            raise UserError(f"unknown method {name!r}; choose from {', '.join(by_key.values())}")
        wanted.append(by_key[_method_key(name)])
    if "teacher" in wanted:
        raise UserError("the teacher row is not a distillation run: fetch the teachers "
                        "(scripts/fetch_pretrained_teachers.sh) or train them "
                        "(scripts/train_all_teachers.sh)")
    quoted = [c for c in chosen if c.method in wanted and not c.runnable]
    if quoted:
        raise UserError(f"{quoted[0].method} on {quoted[0].pair} is {quoted[0].note}")
    return [c for c in chosen if c.method in wanted]
