"""Progress of running trials, read from their ``metrics.csv``, and ETAs for a trial and a plan.

``scripts/reproduce.py`` prints one line per running trial every ``--progress_s`` seconds:
its latest epoch, latest and best test accuracy, elapsed time and ETA, and the ETA of the
whole plan. Rates come from what this runner has seen: the epochs a trial finished since
the runner started it, over the wall-clock time since then (data loading and the teacher's
evaluation included, so early estimates err long). Standard library only.
"""
from __future__ import annotations

import csv
import heapq
import json
import os
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class TrialStatus:
    """A running trial as its files show it.

    Attributes:
        epoch: the latest finished epoch (0 before the first one).
        total: the epochs the run is set to train.
        last_acc, best_acc: latest and best test top-1 (%), None before the first epoch.
        elapsed_s: seconds since this runner started the trial.
        new_epochs: epochs finished since this runner started it (a resumed trial's earlier
            epochs are not counted in its rate).
    """

    epoch: int
    total: int
    last_acc: Optional[float]
    best_acc: Optional[float]
    elapsed_s: float
    new_epochs: int

    @property
    def s_per_epoch(self) -> Optional[float]:
        """Wall-clock seconds per epoch so far; None until an epoch has finished."""
        return self.elapsed_s / self.new_epochs if self.new_epochs > 0 else None

    def remaining_s(self, fallback_s_per_epoch: Optional[float] = None) -> Optional[float]:
        """Seconds until the trial ends at its own rate (else the fallback); None if unknown."""
        rate = self.s_per_epoch or fallback_s_per_epoch
        return None if rate is None else max(self.total - self.epoch, 0) * rate


def latest_epoch(run_dir: str) -> int:
    """The last epoch recorded in ``run_dir/metrics.csv`` (0 when none)."""
    rows = _rows(run_dir)
    return int(rows[-1]["epoch"]) if rows else 0


def planned_epochs(run_dir: str, default: int) -> int:
    """The ``epochs`` of the run's ``config.json`` (written when it starts), else ``default``."""
    try:
        with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
            return int(json.load(handle)["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def read_status(run_dir: str, started_s: float, start_epoch: int, total: int, now_s: float) -> TrialStatus:
    """A trial's status from its folder.

    Args:
        run_dir: the trial folder.
        started_s: when this runner started it (``time.time()`` seconds).
        start_epoch: its latest epoch when it was started (a resumed trial's head start).
        total: its planned epochs, used until its ``config.json`` says otherwise.
        now_s: the current ``time.time()``.
    """
    rows = _rows(run_dir)
    accs = [float(r["test_acc"]) for r in rows if "test_acc" in r]
    epoch = int(rows[-1]["epoch"]) if rows else 0
    return TrialStatus(epoch, planned_epochs(run_dir, total), accs[-1] if accs else None,
                       max(accs) if accs else None, max(now_s - started_s, 0.0),
                       max(epoch - start_epoch, 0))


def plan_eta(running: Sequence[TrialStatus], queued_epochs: Sequence[int], slots: int,
             past_s_per_epoch: Sequence[float] = ()) -> Optional[float]:
    """Seconds until the last trial of the plan ends; None before any rate is known.

    Running trials go at their own rate; queued ones take the mean rate seen so far (of
    the running trials and ``past_s_per_epoch``, the trials already ended) and start in
    order on the first slot to come free (the runner's own first-come schedule).

    Args:
        running: the running trials.
        queued_epochs: epochs still to train for each queued trial, in start order.
        slots: how many trials run at once.
        past_s_per_epoch: seconds per epoch of the trials that have ended.
    """
    rate = mean_s_per_epoch(running, past_s_per_epoch)
    if rate is None:
        return None
    free_at = [s.remaining_s(rate) or 0.0 for s in running]
    free_at += [0.0] * max(slots - len(free_at), 0)
    heapq.heapify(free_at)
    for epochs in queued_epochs:
        heapq.heappush(free_at, heapq.heappop(free_at) + epochs * rate)
    return max(free_at)


def mean_s_per_epoch(running: Sequence[TrialStatus], past_s_per_epoch: Sequence[float] = ()) -> Optional[float]:
    """The mean seconds per epoch over running trials with a rate and ended ones; None if none."""
    rates = [s.s_per_epoch for s in running if s.s_per_epoch is not None] + list(past_s_per_epoch)
    return statistics.fmean(rates) if rates else None


def format_duration(seconds: Optional[float]) -> str:
    """``42s``, ``12m05s``, ``3h07m``, ``2d04h``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def describe(status: TrialStatus, fallback_s_per_epoch: Optional[float] = None) -> str:
    """``epoch 37/240, test acc 61.20 (best 63.05), 12m05s elapsed, ETA 1h02m``."""
    if status.last_acc is None:
        acc = "no epoch finished yet"
    else:
        acc = f"test acc {status.last_acc:.2f} (best {status.best_acc:.2f})"
    return (f"epoch {status.epoch}/{status.total}, {acc}, {format_duration(status.elapsed_s)} elapsed, "
            f"ETA {format_duration(status.remaining_s(fallback_s_per_epoch))}")


def _rows(run_dir: str) -> list[dict]:
    """The ``epoch`` and ``test_acc`` columns of ``metrics.csv`` (helper.logbook's format).

    Read here with the csv module: ``helper.logbook.read_metrics`` imports torch, which
    would stall the runner's loop for seconds the first time.
    """
    rows = []
    try:
        with open(os.path.join(run_dir, "metrics.csv"), newline="", encoding="utf-8") as handle:
            for raw in csv.DictReader(handle):
                row = {"epoch": int(raw["epoch"])}
                if raw.get("test_acc") not in (None, ""):
                    row["test_acc"] = float(raw["test_acc"])
                rows.append(row)
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or not a metrics file
        return []
    return rows
