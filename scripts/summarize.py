"""The report: our accuracies next to the paper's, in the paper's layout, and every other run.

    python scripts/summarize.py [--save_root save/reproduce] [--table 1] [--no_plots]
    python scripts/summarize.py --table imagenet     # the ImageNet table
    python scripts/summarize.py --paper --table imagenet   # the paper's table and sources, no runs
    python scripts/summarize.py --save_root save     # train_student.py's own runs

Reads the run folders under ``<save_root>/student_model/``. The trial folders that
``scripts/reproduce.py`` writes (``table<T>/``, ``imagenet/``, ``imagenet-teachers/`` or
``deit/``, then ``<teacher>-<student>/<method>/trial_<k>``) fill, for each table, methods as
rows and teacher→student pairs as columns (the ImageNet tables show every column of the
paper, run or not; rows with no public code, KD-Zero, are reported only); each cell gives the
mean ± std over finished trials of the best-epoch test top-1 and of the last-epoch test
top-1, the number of trials, the paper's value and our difference from it. Every other run
folder (``train_student.py``'s own run names) is grouped with the runs whose ``config.json``
agrees on the flags that act on the run (not trial, seed, run name, paths, output flags,
the flags of methods it does not use, or what the run recorded about itself such as the
teacher's SHA-256), one row per group. The notes say where each paper number came from.
Writes ``report.md``, ``report.csv`` (one row per cell), ``runs.csv`` (one row per group)
and, unless ``--no_plots``, one PNG per cell (test accuracy against epoch, trials
overlaid, the paper's value as a line) under ``<save_root>/report/``.
"""
from __future__ import annotations

import argparse
import glob
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence


from errors import UserError, exit_on_user_error
from paper_tables.cells import TABLES, Cell, table_key
from paper_tables.recipes import all_cells, method_names, pairs_of
from paper_tables.paper_view import paper_text
from paper_tables.recipes_imagenet import table_notes
from paper_tables.report_format import markdown, plain, plot_curves, write_csv
from paper_tables.run_groups import (RunGroup, TrialResult, TrialStats, group_runs, method_label,
                               read_trial, run_folders, varying_keys)

HEADER = ("best = mean ± std over finished trials of each trial's best-epoch test top-1 (%); "
          "last = the same for each trial's last epoch; the signed number in brackets is the "
          "difference from the paper; n = finished trials, + unfinished ones, which no mean includes; "
          "paper = the paper's value, which it does not say is best or last epoch. "
          "std is the sample standard deviation (n - 1); '-' for a single trial.")
CSV_COLUMNS = ["table", "teacher", "student", "method", "n_finished", "n_unfinished", "epochs",
               "best_mean", "best_std", "last_mean", "last_std", "paper", "paper_std",
               "paper_runs", "diff_best", "diff_last", "note", "paper_origin"]


PAPER_DATA = {"cifar100": "CIFAR-100", "imagenet": "ImageNet val"}
WRAP = 40  # terminal text: longer cells continue on the next lines
RUN_COLUMNS = ["teacher", "student", "method", "r", "a", "b", "other", "dataset", "epochs", "n_finished",
               "n_unfinished", "best_mean", "best_std", "last_mean", "last_std", "runs"]
RUN_HEADER = ("One row per configuration: runs whose config.json agrees on every flag that acts on the "
              "run (not trial, seed, run name, paths, output flags, the flags of methods it does not use, "
              "or what the run recorded, such as the teacher's SHA-256); 'other' lists the settings that "
              "differ between rows. "
              "best = mean ± std over finished runs of each run's best-epoch test top-1 (%); last = the "
              "same for the last epoch; n = finished runs, + unfinished ones, which no mean includes; "
              "std is the sample standard deviation (n - 1); '-' for a single run.")
LAYOUT = ("summarize.py reads run folders holding metrics.csv (with at least one epoch) and "
          "config.json under {root}: reproduce.py's table<T>/<teacher>-<student>/<method>/trial_<k>/ "
          "or train_student.py's <run_name>/; give --save_root the --save_root the runs were "
          "made with (train_student.py's default is ./save, reproduce.py's save/reproduce)")


@dataclass
class CellResult(TrialStats):
    """The trials of one paper cell."""

    cell: Cell
    trials: list[TrialResult] = field(default_factory=list)

    def diff(self, which: str) -> Optional[float]:
        mean = self.stat(which)[0]
        return None if mean is None or self.cell.paper is None else mean - self.cell.paper


def collect(save_root: str, tables: Sequence[object]) -> list[CellResult]:
    """Every cell that has at least one trial with a finished epoch, in the paper's order."""
    out = []
    for cell in all_cells():
        if tables and cell.table not in tables:
            continue
        pattern = os.path.join(save_root, "student_model", cell.cell_dir, "trial_*")
        folders = sorted(glob.glob(pattern), key=lambda p: int(p.rsplit("_", 1)[-1])
                         if p.rsplit("_", 1)[-1].isdigit() else math.inf)
        trials = [t for t in map(read_trial, folders) if t is not None]
        if trials:
            out.append(CellResult(cell, trials))
    return out


def table_name(table: object, short: bool = False) -> str:
    """``Table 1: same-architecture pairs`` (``Table 1``), ``ImageNet (ILSVRC-2012)`` (``ImageNet``,
    ``ImageNet teachers``, ``DeiT``)."""
    if isinstance(table, int):
        return f"Table {table}" if short else f"Table {table}: {TABLES[table]}"
    if short:
        return {"imagenet": "ImageNet", "imagenet-teachers": "ImageNet teachers", "deit": "DeiT"}.get(str(table), str(table))
    return TABLES[table]


def _fmt(mean: Optional[float], std: Optional[float], diff: Optional[float]) -> str:
    if mean is None:
        return ""
    text = f"{mean:.2f} ± " + (f"{std:.2f}" if std is not None else "-")
    return text + (f" ({diff:+.2f})" if diff is not None else "")


def _paper(cell: Cell) -> str:
    mark = " †" if cell.runnable and cell.note and cell.paper is not None else ""
    return "n/a ‡" if cell.paper is None else f"{cell.paper:.2f}{mark}"


def _lines(result: Optional[CellResult]) -> list[str]:
    """The best, last and n lines of one cell ('' where the cell has no run)."""
    if result is None:
        return ["", "", ""]
    (bm, bs), (lm, ls) = result.stat("best"), result.stat("last")
    unfinished = f" +{len(result.unfinished)} unfinished" if result.unfinished else ""
    return [_fmt(bm, bs, result.diff("best")), _fmt(lm, ls, result.diff("last")),
            f"{len(result.finished)}{unfinished}"]


def grid(results: list[CellResult], table: object) -> tuple[list[str], list[list[str]]]:
    """The paper-layout table: header and rows (method, stat, one column per pair); a row
    this project cannot run shows the paper's values only (stat ``reported``). The ImageNet
    tables (one run per cell) show every pair and default row of the paper, run or not."""
    mine = [r for r in results if r.cell.table == table]
    cells = [c for c in all_cells() if c.table == table]
    by_key = {(r.cell.method, r.cell.teacher, r.cell.student): r for r in mine}
    shown = [r.cell for r in mine]
    if not isinstance(table, int):
        shown = [c for c in cells if c.runnable and (c.default or (c.method, c.teacher, c.student) in by_key)]
    pairs = [(t, s) for tab, t, s in pairs_of(shown) if tab == table]
    paper = {(c.method, c.teacher, c.student): _paper(c) for c in cells}
    header = ["method", "stat"] + [f"{t}→{s}" for t, s in pairs]
    rows = [["teacher", "paper"] + [paper[("teacher", t, s)] for t, s in pairs]]
    for method in method_names(shown):
        columns = [_lines(by_key.get((method, t, s))) + [paper.get((method, t, s), "")] for t, s in pairs]
        for i, stat in enumerate(("best", "last", "n", "paper")):
            rows.append([method if i == 0 else "", stat] + [col[i] for col in columns])
    for method in method_names(c for c in cells if not c.runnable and c.method != "teacher"):
        rows.append([method, "reported"] + [paper.get((method, t, s), "") for t, s in pairs])
    return header, rows


def notes(results: list[CellResult]) -> list[str]:
    out = []
    for note in dict.fromkeys(r.cell.note for r in results if r.cell.note):
        methods = sorted({r.cell.method for r in results if r.cell.note == note})
        out.append(f"{', '.join(methods)}: {note}")
    epochs = {t.planned_epochs for r in results for t in r.trials}
    if len(epochs) > 1:
        out.append(f"warning: trials of different lengths are mixed (epochs: {sorted(map(str, epochs))})")
    return out


def origin_notes(results: list[CellResult]) -> list[str]:
    """Where each reported cell's paper number came from, and under which recipe: one line
    per table, method and origin (the pairs named unless it is all of the table's pairs)."""
    shown = {r.cell.table for r in results}
    columns = {(r.cell.table, r.cell.teacher, r.cell.student) for r in results}
    methods = {(r.cell.table, r.cell.method) for r in results}
    cells = [c for c in all_cells() if (c.table, c.teacher, c.student) in columns and c.origin and
             ((c.table, c.method) in methods or not c.runnable or (not isinstance(c.table, int) and c.default))]
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.table, c.method, c.origin), []).append(c)
    pairs = {t: {(c.teacher, c.student) for c in all_cells() if c.table == t} for t in shown}
    out = []
    for (table, method, origin), members in groups.items():
        mine = {(c.teacher, c.student) for c in members}
        where = "" if mine == pairs[table] else " (" + ", ".join(f"{t}→{s}" for t, s in sorted(mine)) + ")"
        out.append(f"paper's {method}, {table_name(table, short=True)}{where}: {origin}")
    return out


def csv_rows(results: list[CellResult]) -> list[dict]:
    rows = []
    for r in results:
        (bm, bs), (lm, ls) = r.stat("best"), r.stat("last")
        rows.append(dict(table=r.cell.table, teacher=r.cell.teacher, student=r.cell.student,
                         method=r.cell.method, n_finished=len(r.finished), n_unfinished=len(r.unfinished),
                         epochs=";".join(sorted({str(t.planned_epochs) for t in r.trials})),
                         best_mean=bm, best_std=bs, last_mean=lm, last_std=ls, paper=r.cell.paper,
                         paper_std=r.cell.paper_std, paper_runs=r.cell.runs, diff_best=r.diff("best"),
                         diff_last=r.diff("last"), note=r.cell.note, paper_origin=r.cell.origin))
    return rows


def run_table(groups: Sequence[RunGroup]) -> tuple[list[str], list[list[str]]]:
    """One row per group of plain runs: its configuration, n, best and last."""
    other = varying_keys(groups)
    header = ["teacher", "student", "method", "r", "a", "b"] + (["other"] if other else []) + \
             ["data", "epochs", "n", "best", "last"]
    rows = []
    for g in groups:
        c = g.config
        unfinished = f" +{len(g.unfinished)} unfinished" if g.unfinished else ""
        rows.append([str(c.get("model_t", "?")), str(c.get("model_s", "?")), method_label(c),
                     *(_num(c.get(k)) for k in ("gamma", "alpha", "beta"))]
                    + ([_other(c, other)] if other else [])
                    + [str(c.get("dataset", "?")), _num(c.get("epochs")), f"{len(g.finished)}{unfinished}",
                       _fmt(*g.stat("best"), None), _fmt(*g.stat("last"), None)])
    return header, rows


def run_csv_rows(groups: Sequence[RunGroup], root: str) -> list[dict]:
    """One CSV row per group; ``runs`` lists its folders relative to ``root``."""
    other = varying_keys(groups)
    rows = []
    for g in groups:
        c = g.config
        (bm, bs), (lm, ls) = g.stat("best"), g.stat("last")
        rows.append(dict(teacher=c.get("model_t"), student=c.get("model_s"), method=method_label(c),
                         r=_num(c.get("gamma")), a=_num(c.get("alpha")), b=_num(c.get("beta")),
                         other=_other(c, other), dataset=c.get("dataset"),
                         epochs=c.get("epochs"), n_finished=len(g.finished), n_unfinished=len(g.unfinished),
                         best_mean=bm, best_std=bs, last_mean=lm, last_std=ls,
                         runs=";".join(os.path.relpath(t.folder, root) for t in g.trials)))
    return rows


def _other(config: dict, keys: Sequence[str]) -> str:
    """``key=value`` of the varying settings this group has (a CRD group lists no ``ttm_l``)."""
    return " ".join(f"{k}={_num(config[k])}" for k in keys if k in config)


def _num(value: object) -> str:
    """A config value as a flag would spell it: ``1.0`` → ``1``, None → ``-``."""
    if value is None:
        return "-"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _table_sections(results: list[CellResult], out: str, plots: bool) -> tuple[list[str], list[str]]:
    """The paper tables, notes and curves: markdown lines and plain-text lines."""
    md, text = [f"{HEADER}\n"], []
    for table in sorted({r.cell.table for r in results}):
        header, rows = grid(results, table)
        data = ", ".join(sorted({t.dataset for r in results if r.cell.table == table for t in r.trials}))
        paper_data = next(r.cell.dataset for r in results if r.cell.table == table)
        name = PAPER_DATA.get(paper_data, paper_data)
        where = name if data == paper_data else f"ours on {data}, the paper's on {name}"
        title = f"{table_name(table)} (test top-1 %, {where})"
        md += [f"## {title}\n", markdown(header, rows), ""]
        text += [title, plain(header, rows, wrap=WRAP), ""]
    extra = notes(results)
    if any(r.cell.note for r in results):
        extra.append("† a gap in the paper filled by our choice; ‡ no paper value")
    quoted = {c.method: c.note for c in all_cells() if not c.runnable and c.method != "teacher"
              and c.table in {r.cell.table for r in results}}
    extra += [f"{method}: {note}" for method, note in quoted.items()]
    extra += origin_notes(results)
    for table in sorted({r.cell.table for r in results if not isinstance(r.cell.table, int)}, key=str):
        extra += list(table_notes(table))
    if extra:
        md += ["Notes:\n"] + [f"- {n}" for n in extra] + [""]
        text += ["Notes:"] + [f"  {n}" for n in extra] + [""]
    text += [HEADER, ""]
    if plots:
        md.append("## Curves\n")
        for r in results:
            rel = os.path.join("curves", r.cell.cell_dir + ".png")
            name = f"{table_name(r.cell.table, short=True)}, {r.cell.method}, {r.cell.teacher}→{r.cell.student}"
            plot_curves(r.trials, r.cell.paper, name, os.path.join(out, rel))
            md.append(f"- [{name}]({rel})")
        md.append("")
    return md, text


def write_report(results: list[CellResult], groups: Sequence[RunGroup], root: str, out: str,
                 plots: bool) -> str:
    """Writes report.md, report.csv (cells), runs.csv (groups) and the curves; returns the
    plain-text report."""
    os.makedirs(out, exist_ok=True)
    md, text = ["# Reproduction report\n"], []
    if results:
        cell_md, cell_text = _table_sections(results, out, plots)
        md, text = md + cell_md, text + cell_text
        write_csv(os.path.join(out, "report.csv"), CSV_COLUMNS, csv_rows(results))
    if groups:
        title = f"Other runs under {root}, one row per configuration (test top-1 %)"
        header, rows = run_table(groups)
        md += [f"## {title}\n", RUN_HEADER, "", markdown(header, rows), ""]
        text += [title, plain(header, rows, wrap=WRAP), "", RUN_HEADER]
        write_csv(os.path.join(out, "runs.csv"), RUN_COLUMNS, run_csv_rows(groups, root))
    with open(os.path.join(out, "report.md"), "w") as handle:
        handle.write("\n".join(md) + "\n")
    return "\n".join(text).rstrip()


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="Summarise runs: the paper tables' cells next to the paper's "
                                            "numbers, and every other run grouped by configuration.")
    p.add_argument("--save_root", default=os.path.join("save", "reproduce"),
                   help="the --save_root the runs were made with (default save/reproduce, reproduce.py's; "
                        "train_student.py's own runs: save)")
    p.add_argument("--table", type=table_key, action="append", default=[],
                   metavar="{1,2,imagenet,imagenet-teachers,deit}",
                   help="only this paper table (repeatable; other runs are then left out)")
    p.add_argument("--paper", action="store_true",
                   help="print the paper's values of the tables (default: every table) with each cell's "
                        "source and how it is reproduced here; reads no runs")
    p.add_argument("--out", default=None, help="report folder (default <save_root>/report)")
    p.add_argument("--no_plots", "--no-plots", dest="no_plots", action="store_true",
                   help="skip the PNG curves")
    args = p.parse_args(argv)
    if args.paper:
        print(paper_text(args.table or list(TABLES), [table_name(t) for t in args.table or TABLES], WRAP))
        return 0
    root = os.path.join(args.save_root, "student_model")
    results = collect(args.save_root, args.table)
    groups, skipped = [], []
    if not args.table:
        claimed = {os.path.realpath(t.folder) for r in results for t in r.trials}
        groups, skipped = group_runs(f for f in run_folders(root) if os.path.realpath(f) not in claimed)
    if skipped:
        print(f"warning: {len(skipped)} run folder(s) without a readable config.json left out: "
              f"{', '.join(os.path.relpath(f, root) for f in skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
              file=sys.stderr)
    if not results and not groups:
        raise UserError(f"nothing to report under {root}: " + LAYOUT.format(root=root))
    out = args.out or os.path.join(args.save_root, "report")
    print(write_report(results, groups, root, out, plots=not args.no_plots))
    written = ["report.md"] + ["report.csv"] * bool(results) + ["runs.csv"] * bool(groups) + \
              ["curves/"] * bool(results and not args.no_plots)
    print(f"\nwrote {', '.join(written)} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
