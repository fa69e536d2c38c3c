"""Per-epoch records of a run: ``metrics.csv``, TensorBoard events, the seed's text log.

All files are rewritten atomically from the in-memory rows, so a crash never leaves a
half-written line, and a resumed run drops the rows of epochs it is about to redo.
"""
from __future__ import annotations

import csv
import io
import json
import os
import warnings
from typing import Any, Optional

from helper.checkpoint import atomic_write_text

BASE_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_acc", "test_acc5", "test_loss", "seconds"]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


class Logbook:
    """Writes one row per epoch into a run folder (rank 0 only).

    Args:
        run_dir: the run folder (``metrics.csv`` and ``tensorboard/`` go there).
        text_log: optional path of the seed's plain text log (one test accuracy per line,
            then ``best: …``).
        start_epoch: rows with ``epoch >= start_epoch`` already on disk are dropped (resume).
    """

    def __init__(self, run_dir: str, text_log: Optional[str] = None, start_epoch: int = 1) -> None:
        self.run_dir = run_dir
        self.csv_path = os.path.join(run_dir, "metrics.csv")
        self.text_log = text_log
        self.rows: list[dict[str, Any]] = [r for r in read_metrics(self.csv_path)
                                           if int(r["epoch"]) < start_epoch]
        self._tb = None
        self._tb_failed = False

    def _writer(self):
        if self._tb is None and not self._tb_failed:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(os.path.join(self.run_dir, "tensorboard"))
            except Exception as err:  # tensorboard missing or broken: keep the CSV going
                warnings.warn(f"TensorBoard logging disabled: {err}")
                self._tb_failed = True
        return self._tb

    def log_epoch(self, row: dict[str, Any]) -> None:
        """Appends one epoch's row and rewrites the files."""
        self.rows.append(dict(row))
        columns = list(BASE_COLUMNS) + sorted({k for r in self.rows for k in r} - set(BASE_COLUMNS))
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(columns)
        for r in self.rows:
            writer.writerow([_fmt(r.get(c, "")) for c in columns])
        atomic_write_text(self.csv_path, out.getvalue())
        tb = self._writer()
        if tb is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    tb.add_scalar(key, value, int(row["epoch"]))
            tb.flush()
        if self.text_log:
            lines = [f"{r['test_acc']:.2f}" for r in self.rows]
            best = max(r["test_acc"] for r in self.rows)
            atomic_write_text(self.text_log, "\n".join(lines + [f"best: {best:.2f}"]) + "\n")

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Reads a ``metrics.csv`` into dicts of floats (``epoch`` as int); [] if absent."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for key, value in raw.items():
                if value in ("", None):
                    continue
                row[key] = int(value) if key == "epoch" else float(value)
            rows.append(row)
    return rows


def write_json(path: str, data: Any) -> None:
    """Writes ``data`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=False) + "\n")
