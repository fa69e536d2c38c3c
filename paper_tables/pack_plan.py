"""The packing plan of a local table run: one calibration per pair, the chosen K, the estimate.

``scripts/reproduce.py`` groups the trials still to run by what their speed depends on
(teacher, student, data set, per-process batch, speed flags), calibrates each group with
its first trial's configuration (:mod:`paper_tables.calibrate`; the methods of a pair are taken
to pack alike), picks K (:func:`paper_tables.packing.choose_k`) and projects the plan's
device-hours and wall time (:func:`paper_tables.packing.estimate`). Calibration rounds run on
the first device of the plan; a GPU plan assumes its GPUs are alike.
"""
from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

from paper_tables import calibrate, packing, trial_progress
from paper_tables.gpu_slots import Slot, slot_launch
from paper_tables.trial_plan import Trial, run_values


@dataclass
class PackingPlan:
    """What the runner does: ``k`` runs per device, and what it expects of them.

    Attributes:
        k: runs per GPU group (per CPU without GPUs).
        auto: whether K was chosen by calibration.
        calibrations: one per group of trials, with its trials' work (images).
        estimate: the projection (None when a dry run found no calibration cached).
        mps: how the MPS daemon is reached, None when it is not running.
    """

    k: int
    auto: bool
    calibrations: list[tuple[calibrate.Calibration, list[Trial]]]
    estimate: Optional[packing.Estimate]
    mps: Optional[str]


def say(line: str) -> None:
    """Prints a plan line at once (a calibration's progress must not wait in a pipe's buffer)."""
    print(line, flush=True)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else the platform's machine type."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "cpu"


def device_of(slot: Slot, environ: Mapping[str, str]) -> tuple[str, Optional[str], str]:
    """``(device, CUDA_VISIBLE_DEVICES entry, name)`` of a slot's first device."""
    if slot.cpu:
        return "cpu", None, f"{cpu_name()} ({packing.available_cores()} cores)"
    import torch
    gpu = slot_launch(Slot(slot.gpus[:1]), environ)[1]["CUDA_VISIBLE_DEVICES"]
    return "cuda", gpu, torch.cuda.get_device_name(slot.gpus[0])


def spec_of(trial: Trial, procs: int, device: str, name: str, mps: bool) -> calibrate.Spec:
    """The calibration spec of a trial's configuration (its argv parsed as train_student.py would)."""
    import torch
    from helper.student_flags import build_parser
    f, _ = build_parser().parse(trial.argv)
    method = f["distill"] + (f"+{f['add']}" if f["add"] != "none" and f["alpha"] else "")
    speed = f"{f['precision']},channels_last={f['channels_last']},compile={f['compile']}:{f['compile_mode']}"
    batch = run_values(trial.argv).batch_size  # the global batch, the data set's default when unset
    return calibrate.Spec(trial.cell.teacher, f["model_s"], method, f["dataset"], max(batch // procs, 1),
                          speed, device, name, torch.__version__, mps, tuple(trial.argv))


def trial_images(trial: Trial, dataset: str) -> float:
    """Images a trial still trains: its epochs left × steps per epoch × global batch."""
    n_train = calibrate.DATASET_SHAPES[dataset][0]
    left = trial.epochs - (trial_progress.latest_epoch(trial.run_dir) if trial.state == "resume" else 0)
    return packing.images_to_train(left, n_train, run_values(trial.argv).batch_size)


def calibrate_groups(trials: Sequence[Trial], slot: Slot, ks: Sequence[int], args: argparse.Namespace,
                     environ: Mapping[str, str], measure: bool,
                     log: Callable[[str], None]) -> tuple[list[tuple[calibrate.Calibration, list[Trial]]], Optional[str]]:
    """One calibration per group of trials that pack alike (rates by K, in runs per device),
    and the MPS status they were measured under."""
    cores = packing.available_cores()
    per_device = slot.procs if slot.cpu else 1  # a CPU run's processes all share the CPU
    device, gpu, name = device_of(slot, environ)
    mps = packing.mps_status(environ) if device == "cuda" else None
    groups: dict[tuple, tuple[calibrate.Spec, list[Trial]]] = {}
    for t in trials:
        spec = spec_of(t, slot.procs, device, name, mps is not None)
        key = (spec.teacher, spec.student, spec.dataset, spec.batch, spec.speed)
        groups.setdefault(key, (spec, []))[1].append(t)
    done = []
    for spec, members in groups.values():
        cal = calibrate.calibrate(spec, [k * per_device for k in ks], os.path.join(args.save_root, "calibration"),
                                  gpu, cores, steps=args.calibration_steps, recalibrate=args.recalibrate,
                                  log=log, environ=environ, measure=measure, progress=log,
                                  progress_s=getattr(args, "calibration_progress_s", 30.0))
        cal.rates = {k // per_device: r for k, r in cal.rates.items() if k % per_device == 0}
        done.append((cal, members))
    return done, mps


def plan_packing(trials: Sequence[Trial], base: Sequence[Slot], jobs: Union[int, str], args: argparse.Namespace,
                 environ: Mapping[str, str], measure: bool = True,
                 log: Optional[Callable[[str], None]] = None) -> PackingPlan:
    """Calibrates (or reads the cache), chooses K and estimates the plan.

    Args:
        trials: the trials to run.
        base: one slot per GPU group (K = 1).
        jobs: ``--jobs-per-gpu``: a number, or ``auto``.
        args: ``save_root``, ``recalibrate``, ``calibration_steps``.
        measure: False only reads cached calibrations (a dry run).
    """
    log = log or say
    slot, auto = base[0], jobs == packing.AUTO
    per_device = slot.procs if slot.cpu else 1
    ks = packing.candidate_ks(slot.cpu, packing.available_cores() // per_device) if auto else [int(jobs)]
    done, mps = calibrate_groups(trials, slot, ks, args, environ, measure, log)
    rates = [c.rates for c, _ in done]
    work = [sum(trial_images(t, c.spec.dataset) for t in members) for c, members in done]
    try:
        k = packing.choose_k(rates, work) if auto else int(jobs)
    except ValueError:  # a dry run without a complete cache
        return PackingPlan(1, auto, done, None, mps)
    if any(k not in r for r in rates):
        return PackingPlan(k, auto, done, None, mps)
    devices = 1 if slot.cpu else slot.procs
    by_trial = {id(t): packing.RunWork(trial_images(t, c.spec.dataset), c.rates, devices)
                for c, members in done for t in members}
    runs = [by_trial[id(t)] for t in trials]  # in the runner's start order
    return PackingPlan(k, auto, done, packing.estimate(runs, k, len(base) * k), mps)


def describe(plan: PackingPlan, base: Sequence[Slot], threads: int) -> list[str]:
    """The plan's comment lines: packing (and why), threads, MPS, estimate."""
    cpu = base[0].cpu
    unit = "CPU" if cpu else "GPU"
    lines = []
    for cal, members in plan.calibrations:
        measured = ", ".join(f"K={k}: {r:,.0f}" for k, r in sorted(cal.rates.items())) or "none cached"
        lines.append(f"# calibration {cal.spec.teacher}:{cal.spec.student} ({len(members)} run"
                     f"{'s' if len(members) > 1 else ''}, measured with {cal.spec.method}, batch {cal.spec.batch} "
                     f"per process on {cal.spec.device_name}): images/s {measured}")
    how = "chosen by calibration" if plan.auto and plan.estimate else "auto: no calibration cached yet" \
        if plan.auto else "as asked"
    mps = plan.mps or "not running (optional; start it with nvidia-cuda-mps-control -d)"
    lines.append(f"# packing: {plan.k} run{'s' if plan.k > 1 else ''} per {unit} ({how}); {threads} CPU "
                 f"thread{'s' if threads > 1 else ''} per process" + ("" if cpu else f"; MPS: {mps}"))
    if plan.estimate:
        e = plan.estimate
        hours = f"{e.device_hours:,.1f}" if e.device_hours >= 10 else f"{e.device_hours:.2f}"
        lines.append(f"# estimate: {e.runs} run{'s' if e.runs != 1 else ''}, {hours} {unit}-hours, "
                     f"wall {trial_progress.format_duration(e.wall_s)} on {len(base)} {unit} slot"
                     f"{'s' if len(base) > 1 else ''} × {plan.k} (training steps at the calibrated rates; "
                     "evaluation, data loading and start-up not included)")
    return lines
