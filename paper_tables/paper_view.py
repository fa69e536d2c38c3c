"""The paper's tables as the paper prints them, with where every number came from and what we
run for it (``scripts/summarize.py --paper``; no run folders needed).

One row per method (the paper's columns, in its order), one column per teacher→student pair,
then how the row is reproduced: ``runs`` (a default row), ``opt-in`` (run when named), or
``reported only`` (no public code). The source lines name, for each cell, the origin of the
paper's value and the note on our recipe, grouped where they agree.
"""
from __future__ import annotations

from typing import Optional, Sequence

from paper_tables.cells import Cell, TableKey
from paper_tables.recipes import all_cells, method_names, pairs_of
from paper_tables.recipes_imagenet import table_notes
from paper_tables.report_format import plain


def _value(cell: Optional[Cell]) -> str:
    if cell is None:
        return ""
    return "n/a" if cell.paper is None else f"{cell.paper:.2f}"


def how(cells: list[Cell]) -> str:
    """How a row is reproduced: ``runs``, ``opt-in`` or ``reported only``."""
    if not any(c.runnable for c in cells):
        return "reported only"
    return "runs" if any(c.default for c in cells) else "opt-in"


def paper_cells(table: TableKey) -> list[Cell]:
    """The cells of ``table`` the paper prints (rows beyond the paper left out)."""
    cells = [c for c in all_cells() if c.table == table]
    printed = {c.method for c in cells if c.paper is not None}
    return [c for c in cells if c.method in printed]


def paper_grid(table: TableKey) -> tuple[list[str], list[list[str]]]:
    """Header and rows: method, the paper's value per pair, how the row is reproduced."""
    cells = paper_cells(table)
    pairs = [(t, s) for _, t, s in pairs_of(cells)]
    by_key = {(c.method, c.teacher, c.student): c for c in cells}
    header = ["method"] + [f"{t}→{s}" for t, s in pairs] + ["here"]
    rows = []
    for method in method_names(cells):
        mine = [c for c in cells if c.method == method]
        label = "not a run" if method == "teacher" else how(mine)
        rows.append([method] + [_value(by_key.get((method, t, s))) for t, s in pairs] + [label])
    return header, rows


def paper_sources(table: TableKey) -> list[str]:
    """One line per method (and pairs, where they differ): the origin of the paper's value,
    and our note on the recipe (or that the row runs under the table's recipe)."""
    cells = [c for c in paper_cells(table) if c.method != "teacher"]
    groups: dict[tuple[str, str, str], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.method, c.origin, c.note), []).append(c)
    pairs = {(c.teacher, c.student) for c in cells}
    out = []
    for (method, origin, note), members in groups.items():
        mine = {(c.teacher, c.student) for c in members}
        where = "" if mine == pairs else " (" + ", ".join(f"{t}→{s}" for t, s in sorted(mine)) + ")"
        ours = note or ("the table's recipe" if any(c.runnable for c in members) else "")
        out.append(f"{method}{where}: paper's value from {origin or 'the paper'}" + (f"; here: {ours}" if ours else ""))
    return out


def paper_report(table: TableKey) -> tuple[list[str], list[list[str]], list[str]]:
    """A table's paper grid and its notes (sources, then the table's recipe notes)."""
    header, rows = paper_grid(table)
    return header, rows, paper_sources(table) + list(table_notes(table))


def paper_text(tables: Sequence[TableKey], titles: Sequence[str], wrap: int) -> str:
    """The paper's tables with each cell's source, as text (``summarize.py --paper``)."""
    out = []
    for table, title in zip(tables, titles):
        header, rows, lines = paper_report(table)
        out += [f"{title}: the paper's top-1 (%)", plain(header, rows, wrap=wrap), "Sources:"]
        out += [f"  {line}" for line in lines] + [""]
    return "\n".join(out)
