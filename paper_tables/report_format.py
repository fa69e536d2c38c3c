"""Text and picture forms of the reproduction report: markdown and aligned-text tables, CSV
files, and a cell's accuracy curves (``scripts/summarize.py`` writes them)."""
from __future__ import annotations

import csv
import os
import textwrap
from typing import Optional, Sequence

from paper_tables.run_groups import TrialResult


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def plain(header: list[str], rows: list[list[str]], wrap: Optional[int] = None) -> str:
    """Columns aligned with spaces; a cell longer than ``wrap`` characters continues on the
    next lines (broken at spaces), so that a long value does not widen every row."""
    def lines(cell: str) -> list[str]:
        if wrap is None or len(cell) <= wrap:
            return [cell]
        return textwrap.wrap(cell, wrap, break_on_hyphens=False) or [""]

    table = [[lines(cell) for cell in row] for row in [header] + rows]
    widths = [max(len(part) for row in table for part in row[i]) for i in range(len(header))]
    out = []
    for row in table:
        for k in range(max(len(cell) for cell in row)):
            parts = [cell[k] if k < len(cell) else "" for cell in row]
            out.append("  ".join(v.ljust(w) for v, w in zip(parts, widths)).rstrip())
    return "\n".join(out)


def write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    """One CSV row per dict; floats with 4 decimals, None as an empty field."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else (f"{v:.4f}" if isinstance(v, float) else v)
                             for k, v in row.items()})


def plot_curves(trials: Sequence[TrialResult], paper: Optional[float], title: str, path: str) -> None:
    """Test accuracy against epoch for each trial, the paper's value as a dashed line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for t in trials:
        ax.plot(t.epochs, t.acc, linestyle="-" if t.finished else ":", marker="." if len(t.acc) < 20 else None,
                label=f"{t.name} (best {t.best:.2f}, last {t.last:.2f}{'' if t.finished else ', unfinished'})")
    if paper is not None:
        ax.axhline(paper, color="black", linestyle="--", label=f"paper {paper:.2f}")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
