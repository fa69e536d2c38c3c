"""The paper's ImageNet tables as :class:`~paper_tables.cells.Cell` objects.

Three recipe files, one per table, each holding its cells (teacher, student, method, the
paper's value and where that value came from), the table's common recipe and each method's
hyperparameters, every value naming its source:

* ``recipes_imagenet.json`` (``--table imagenet``): ResNet-34 → ResNet-18 and ResNet-50 →
  MobileNetV1 with the twelve columns of the official README (KD, CRD, SRRL, ReviewKD, ITRD,
  DKD, DIST, KD++, NKD, CTKD, KD-Zero, WTTM) under torchdistill's recipe (100 epochs, SGD
  lr 0.1 at global batch 256, ×0.1 after epochs 30, 60, 90).
* ``recipes_imagenet_teachers.json`` (``--table imagenet-teachers``): ResNet-18 from
  ResNet-34/50/101/152 with KD, DIST and WTTM under the same recipe; its ResNet-34 column is
  the ImageNet table's runs (``same_run_as``), not a second copy of them.
* ``recipes_deit.json`` (``--table deit``): DeiT III-S → DeiT-Ti with KD, ViTKD, NKD, WTTM and
  the two ViTKD combinations under cls_KD's DeiT recipe (300 epochs, AdamW, cosine).

A runnable cell's flags are the recipe's, the method's, ``--dataset imagenet`` and ``--model_t
<teacher>`` (the published weight files carry no architecture). A cell without
hyperparameters holds the paper's value only (KD-Zero: no public code).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

from paper_tables.cells import IMAGENET, Cell, TableKey, student_flags

HERE = os.path.dirname(os.path.abspath(__file__))
IMAGENET_JSON = os.path.join(HERE, "recipes_imagenet.json")
TEACHERS_JSON = os.path.join(HERE, "recipes_imagenet_teachers.json")
DEIT_JSON = os.path.join(HERE, "recipes_deit.json")
TABLE_FILES = (IMAGENET_JSON, TEACHERS_JSON, DEIT_JSON)


def checked_values(specs: dict[str, Any], tags: dict[str, str], where: str) -> dict[str, Any]:
    """``{key: {"value": v, "source": tag}}`` → ``{key: v}``, every key a ``train_student.py``
    flag and every tag a known source.

    Raises:
        ValueError: an unknown flag, a missing or unknown source.
    """
    flags = student_flags()
    unknown = sorted(set(specs) - set(flags))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not train_student.py flags")
    for key, spec in specs.items():
        if spec.get("source") not in tags:
            raise ValueError(f"{where}: {key} cites unknown source {spec.get('source')!r}")
    return {key: spec["value"] for key, spec in specs.items()}


def _read(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@functools.lru_cache(maxsize=8)
def load_imagenet_cells(path: str = IMAGENET_JSON) -> tuple[Cell, ...]:
    """Every cell of one ImageNet recipe file, in the file's (the paper's) order.

    Raises:
        ValueError: the file names a flag ``train_student.py`` does not have, or a value
            without a known source.
    """
    data = _read(path)
    table: TableKey = data["table"]
    tags = data["source_tags"]
    recipe = checked_values(data["recipe"], tags, f"{table} recipe")
    runs = int(data["runs"]["value"])
    columns = {(p["teacher"], p["student"]): int(p["column"]) for p in data["pairs"]}
    cells = []
    for e in data["entries"]:
        where = f"{e['method']} on {e['teacher']}:{e['student']}"
        if e["top1_source"] not in tags:
            raise ValueError(f"{where}: top1 cites unknown source {e['top1_source']!r}")
        hp = checked_values(e["hyperparameters"], tags, where)
        if hp:
            hp = {**recipe, **hp, "dataset": IMAGENET, "model_t": e["teacher"]}
        cells.append(Cell(table, columns[(e["teacher"], e["student"])], e["teacher"], e["student"],
                          e["method"], e["top1"], None, runs, tuple(hp.items()), e["note"],
                          default=bool(e["default"]), dataset=IMAGENET,
                          origin=e.get("paper_origin", ""), run_table=e.get("same_run_as")))
    return tuple(cells)


@functools.lru_cache(maxsize=1)
def load_imagenet_tables() -> tuple[Cell, ...]:
    """The cells of the three ImageNet tables (ImageNet, stronger teachers, DeiT).

    Raises:
        ValueError: a cell that shares another table's runs (``same_run_as``) whose command
            differs from that table's cell.
    """
    cells = tuple(c for path in TABLE_FILES for c in load_imagenet_cells(path))
    own = {(c.table, c.teacher, c.student, c.method): c for c in cells}
    for c in cells:
        if c.run_table is None:
            continue
        other = own.get((c.run_table, c.teacher, c.student, c.method))
        if other is None or other.hparams != c.hparams:
            raise ValueError(f"{c.method} on {c.pair} in {c.table} shares the runs of {c.run_table}, "
                             "whose cell " + ("is missing" if other is None else "runs other flags"))
    return cells


@functools.lru_cache(maxsize=8)
def imagenet_notes(path: str = IMAGENET_JSON) -> tuple[str, ...]:
    """A table's notes (recipe, batch, where the paper's numbers came from), for the report."""
    return tuple(_read(path)["notes"])


def table_notes(table: TableKey) -> tuple[str, ...]:
    """The notes of the ImageNet table ``table`` (empty for the CIFAR-100 tables)."""
    for path in TABLE_FILES:
        if _read(path)["table"] == table:
            return imagenet_notes(path)
    return ()
