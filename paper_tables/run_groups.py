"""Run folders read back for the report: each trial's curve, and plain runs grouped by config.

A run folder is any folder under ``<save_root>/student_model/`` holding ``metrics.csv``.
``scripts/summarize.py`` puts ``reproduce.py``'s trials (``table<T>/<pair>/<method>/trial_<k>``)
into the paper's tables; every other run (``train_student.py``'s own run names, whatever they
are) is grouped with the runs that share its ``config.json``, apart from what only tells
trials apart (trial, seed, run name), where files live (paths) and what does not change the
training (output and speed-only flags). Folder names are never parsed.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

from helper.logbook import read_metrics
from helper.resume import FREE_TO_CHANGE

# config.json keys that do not make two runs different experiments: the trial's identity,
# measurements, what a resumed run may change (output, placement and speed flags), and the
# flags as typed ("flags"; the top level holds what they resolved to: -a 0 and no -a agree).
NOT_CONFIG = FREE_TO_CHANGE | {"trial", "seed", "seed_drawn", "teacher_test_acc", "objective", "flags"}
PATH_SUFFIXES = ("_path", "_folder", "_root", "_dir", "_file")
# Shown in their own columns; any other key that varies between groups is listed by name.
SHOWN = ("model_t", "model_s", "distill", "add", "gamma", "alpha", "beta", "dataset", "epochs")


@dataclass
class TrialResult:
    """One run folder read back: its test-accuracy curve and whether it finished.

    Attributes:
        name: the folder's own name (``trial_3``, or the run name's last part).
        folder: the folder's path.
        epochs, acc: epoch numbers and test top-1 (%) per recorded epoch.
        finished: whether ``summary.json`` says the run ended.
        planned_epochs: the run's ``--epochs`` (summary, else config), None if unknown.
        dataset: the data set it trained on.
    """

    name: str
    folder: str
    epochs: list[int]
    acc: list[float]
    finished: bool
    planned_epochs: Optional[int]
    dataset: str

    @property
    def best(self) -> float:
        return max(self.acc)

    @property
    def last(self) -> float:
        return self.acc[-1]


class TrialStats:
    """Mean ± std over the finished ones of ``self.trials`` (a list of TrialResult)."""

    trials: list[TrialResult]

    @property
    def finished(self) -> list[TrialResult]:
        return [t for t in self.trials if t.finished]

    @property
    def unfinished(self) -> list[TrialResult]:
        return [t for t in self.trials if not t.finished]

    def stat(self, which: str) -> tuple[Optional[float], Optional[float]]:
        """Mean and sample std of ``best`` or ``last`` over finished trials (None if absent)."""
        values = [getattr(t, which) for t in self.finished]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class RunGroup(TrialStats):
    """Runs of one configuration: ``config`` is their shared :func:`training_config`."""

    config: dict[str, Any]
    trials: list[TrialResult] = field(default_factory=list)


def read_json(path: str) -> Optional[dict]:
    """A JSON object from ``path``; None when absent or unreadable."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_trial(folder: str) -> Optional[TrialResult]:
    """A run folder's curve (None when it has not finished an epoch yet)."""
    rows = read_metrics(os.path.join(folder, "metrics.csv"))
    rows = [r for r in rows if "test_acc" in r]
    if not rows:
        return None
    summary = read_json(os.path.join(folder, "summary.json")) or {}
    config = read_json(os.path.join(folder, "config.json")) or {}
    result = TrialResult(os.path.basename(folder), folder, [int(r["epoch"]) for r in rows],
                         [float(r["test_acc"]) for r in rows], bool(summary.get("finished")),
                         summary.get("epochs", config.get("epochs")), config.get("dataset", "cifar100"))
    if result.finished and "best_acc" in summary and abs(result.best - float(summary["best_acc"])) > 0.01:
        print(f"warning: {folder}: summary.json best_acc {summary['best_acc']} differs from "
              f"metrics.csv ({result.best})", file=sys.stderr)
    return result


def run_folders(root: str) -> list[str]:
    """Every folder under ``root`` that holds a ``metrics.csv``, sorted by path."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "tensorboard")
        if "metrics.csv" in files:
            found.append(folder)
    return sorted(found)


def training_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that act on the run ``config`` describes.

    Its flags (the keys of ``config["flags"]``, at their resolved values; every key of an
    older ``config.json`` without ``flags``), less :data:`NOT_CONFIG`, path-like keys
    (``*_folder``, ``*_root``...) and the flags of methods the run does not use (a CRD run's
    ``--ttm_l``). What the run recorded about itself (``teacher_sha256``,
    ``teacher_cache_use``, ``world_size``...) is not a flag, so it never splits a group.
    """
    flags = config.get("flags")
    acting = set(flags) if isinstance(flags, Mapping) else set(config)
    unused = unused_method_flags(config)
    return {k: v for k, v in config.items()
            if k in acting and k not in NOT_CONFIG and k not in unused
            and not k.startswith("path_") and not k.endswith(PATH_SUFFIXES)}


def unused_method_flags(config: Mapping[str, Any]) -> set[str]:
    """Flags of registered methods that the run's ``--distill`` and weighted ``--add`` do not read."""
    from distiller_zoo import METHODS  # imports torch: only when grouping runs

    owners = {name: {f.dest for f in cls.flags} for name, cls in METHODS.items()}
    used = {config.get("distill")}
    if config.get("add") not in (None, "none") and config.get("alpha"):
        used.add(config.get("add"))
    every = set().union(*owners.values())
    return every - set().union(*(owners.get(name, set()) for name in used))


def group_runs(folders: Iterable[str]) -> tuple[list[RunGroup], list[str]]:
    """Groups run folders by :func:`training_config` of their ``config.json``.

    Returns:
        The groups, in the order of their first folder, and the folders left out because
        their ``config.json`` is missing or unreadable.
    """
    groups: dict[str, RunGroup] = {}
    skipped = []
    for folder in folders:
        config = read_json(os.path.join(folder, "config.json"))
        if config is None:
            skipped.append(folder)
            continue
        trial = read_trial(folder)
        if trial is None:
            continue
        shared = training_config(config)
        key = json.dumps(shared, sort_keys=True, default=str)
        groups.setdefault(key, RunGroup(shared)).trials.append(trial)
    return list(groups.values()), skipped


def varying_keys(groups: Sequence[RunGroup]) -> list[str]:
    """Config keys, other than :data:`SHOWN`, whose value is not the same in every group."""
    keys = sorted({k for g in groups for k in g.config} - set(SHOWN))
    return [k for k in keys if len({json.dumps(g.config.get(k), sort_keys=True, default=str)
                                    for g in groups}) > 1]


def method_label(config: Mapping[str, Any]) -> str:
    """``wttm``, or ``crd+wttm`` when the added loss has a non-zero weight."""
    main, add = config.get("distill", "?"), config.get("add")
    return f"{main}+{add}" if add and add != "none" and config.get("alpha") else str(main)
