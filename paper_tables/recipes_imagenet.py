"""The paper's ImageNet table as :class:`~paper_tables.cells.Cell` objects.

``paper_tables/recipes_imagenet.json`` holds the table of the official README (ResNet-34 →
ResNet-18 and ResNet-50 → MobileNetV1: KD, CRD, ReviewKD, ITRD, DKD, DIST, WTTM, plus the
teacher and vanilla-student rows), the common recipe (torchdistill's: 100 epochs, SGD lr 0.1
at global batch 256, momentum 0.9, weight decay 1e-4, ×0.1 after epochs 30, 60 and 90) and
each method's hyperparameters, every value naming its source. A runnable cell's flags are
the recipe's, the method's, ``--dataset imagenet`` and ``--model_t <teacher>`` (torchvision's
weight files carry no architecture). ReviewKD is not implemented here: its cells hold the
paper's value only, and selecting them is a one-line error.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any

from paper_tables.cells import IMAGENET, Cell, student_flags

IMAGENET_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipes_imagenet.json")


def _checked_values(specs: dict[str, Any], tags: dict[str, str], where: str) -> dict[str, Any]:
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


@functools.lru_cache(maxsize=4)
def load_imagenet_cells(path: str = IMAGENET_JSON) -> tuple[Cell, ...]:
    """Every cell of the ImageNet table, in the file's (the paper's) order.

    Raises:
        ValueError: the file names a flag ``train_student.py`` does not have, or a value
            without a known source.
    """
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    tags = data["source_tags"]
    recipe = _checked_values(data["recipe"], tags, "recipe")
    runs = int(data["runs"]["value"])
    columns = {(p["teacher"], p["student"]): int(p["column"]) for p in data["pairs"]}
    cells = []
    for e in data["entries"]:
        where = f"{e['method']} on {e['teacher']}:{e['student']}"
        if e["top1_source"] not in tags:
            raise ValueError(f"{where}: top1 cites unknown source {e['top1_source']!r}")
        hp = _checked_values(e["hyperparameters"], tags, where)
        if hp:
            hp = {**recipe, **hp, "dataset": IMAGENET, "model_t": e["teacher"]}
        cells.append(Cell(IMAGENET, columns[(e["teacher"], e["student"])], e["teacher"], e["student"],
                          e["method"], e["top1"], None, runs, tuple(hp.items()), e["note"],
                          default=bool(e["default"]), dataset=IMAGENET,
                          origin=e.get("paper_origin", "")))
    return tuple(cells)


@functools.lru_cache(maxsize=4)
def imagenet_notes(path: str = IMAGENET_JSON) -> tuple[str, ...]:
    """The table's notes (recipe, batch, where the paper's numbers came from), for the report."""
    with open(path, encoding="utf-8") as handle:
        return tuple(json.load(handle)["notes"])
