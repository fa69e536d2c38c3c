"""The paper's table cells as data, and each cell as a ``train_student.py`` command.

``paper_tables/recipes.json`` holds every cell of the two CIFAR-100 tables of the official README
(Table 1: same-architecture pairs, Table 2: different-architecture pairs): teacher, student,
method, the paper's accuracy and run count, and each hyperparameter with its source. This
module reads it into :class:`Cell` objects and turns each runnable cell into flags. The
ImageNet tables (``recipes_imagenet.json``, ``recipes_imagenet_teachers.json``, ``recipes_deit.json``)
are read by :mod:`paper_tables.recipes_imagenet`; ``recipes_cifar_extra.json`` holds opt-in rows
beyond the paper on the CIFAR-100 tables (ReviewKD, KD++ and CTKD where their official CIFAR-100
recipe names the pair). :func:`all_cells` returns every table together.

DIST's weights are its official CIFAR-100 config's (``-b 2``, β = γ = 1, τ 4; the recipe
file cites it). Where the paper is silent we fill the gap and say so in :attr:`Cell.note`
(the report marks those cells; ``docs/REPRODUCE.md`` explains each choice):

* DKD on the two pairs the paper leaves n/a: mdistiller's defaults (β 8).
* WTTM without CE (paper Table 6, opt-in): β is not published; we use the pair's WTTM β.
* The vanilla student row (opt-in): plain cross-entropy through ``train_student.py``
  (``--distill kd -r 1 -a 0 -b 0``). The teacher row is never a run.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Iterable, Sequence

from errors import UserError
from paper_tables.cells import DEFAULT_TABLES, TABLES, Cell, TableKey, method_key, student_flags
from paper_tables.recipes_imagenet import checked_values, load_imagenet_tables

RECIPES_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes.json")
EXTRA_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes_cifar_extra.json")
WTTM_NO_CE = "WTTM w/o CE"


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
NOTE_DKD_NA = "no paper value (n/a in the paper); our choice: mdistiller defaults, DKD beta 8"
NOTE_NO_CE = "our choice: beta is unpublished for WTTM without CE; we use the pair's WTTM beta"
NOTE_STUDENT = "vanilla student: plain cross-entropy (--distill kd -r 1 -a 0 -b 0)"


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
                          default=e["method"] not in ("teacher", "student"),
                          origin=e.get("result_origin") or ""))
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


@functools.lru_cache(maxsize=4)
def load_extra_cells(path: str = EXTRA_JSON) -> tuple[Cell, ...]:
    """The opt-in rows beyond the paper on CIFAR-100 Tables 1 and 2 (no paper value).

    Raises:
        ValueError: a pair the tables do not have, a key that is not a flag, an unknown source.
    """
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    paper = {(c.teacher, c.student): c for c in load_cells() if c.method == "teacher"}
    cells = []
    for e in data["entries"]:
        where = f"{e['method']} on {e['teacher']}:{e['student']}"
        home = paper.get((e["teacher"], e["student"]))
        if home is None:
            raise ValueError(f"{where}: not a pair of CIFAR-100 Tables 1 and 2")
        hp = checked_values(e["hyperparameters"], data["source_tags"], where)
        cells.append(Cell(home.table, home.column, e["teacher"], e["student"], e["method"], None, None,
                          default_runs(home.table), tuple(hp.items()), e["note"], default=False,
                          origin=e["origin"]))
    return tuple(cells)


@functools.lru_cache(maxsize=4)
def unavailable_methods(path: str = EXTRA_JSON) -> dict[str, str]:
    """Methods with no row on CIFAR-100 (method key → why), for a one-line refusal."""
    with open(path, encoding="utf-8") as handle:
        return {method_key(k): v for k, v in json.load(handle)["unavailable"].items()}


def default_runs(table: TableKey) -> int:
    """A CIFAR-100 table's usual run count (5 in Table 1, 3 in Table 2)."""
    with open(RECIPES_JSON, encoding="utf-8") as handle:
        runs = json.load(handle)["runs_averaged"]
    return int(runs["same_arch" if table == 1 else "different_arch"]["default"])


def all_cells() -> tuple[Cell, ...]:
    """The cells of every table: CIFAR-100 Tables 1 and 2 (the paper's rows, then the opt-in
    rows beyond it), then the ImageNet tables (ImageNet, stronger teachers, DeiT)."""
    return load_cells() + load_extra_cells() + load_imagenet_tables()


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
        tables: table keys (1, 2, ``"imagenet"``, ``"imagenet-teachers"``, ``"deit"``); empty:
            every table when ``pairs`` names
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
    by_key = {method_key(m): m for m in method_names(chosen)}
    wanted = []
    for name in methods:
        if method_key(name) not in by_key:
            why = unavailable_methods().get(method_key(name)) if all(isinstance(t, int) for t in tables) else None
            raise UserError(why or f"unknown method {name!r}; choose from {', '.join(by_key.values())}")
        wanted.append(by_key[method_key(name)])
    if "teacher" in wanted:
        raise UserError("the teacher row is not a distillation run: fetch the teachers "
                        "(scripts/fetch_pretrained_teachers.sh) or train them "
                        "(scripts/train_all_teachers.sh)")
    quoted = [c for c in chosen if c.method in wanted and not c.runnable]
    if quoted:
        raise UserError(f"{quoted[0].method} on {quoted[0].pair} is {quoted[0].note}")
    return [c for c in chosen if c.method in wanted]


def add_combinations() -> list[tuple[str, str, float]]:
    """The ``(--distill, --add, -a)`` combinations the tables run with a non-zero added term
    (CIFAR-100 and ImageNet), one per pair of method names, sorted."""
    combos: dict[tuple[str, str], float] = {}
    for cell in all_cells():
        if not cell.runnable:
            continue
        values = dict(cell.hparams)
        if values.get("add") not in (None, "none") and values.get("a"):
            combos.setdefault((values["distill"], values["add"]), float(values["a"]))
    return sorted((distill, add, alpha) for (distill, add), alpha in combos.items())
