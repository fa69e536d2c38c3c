"""Reproduce the paper's tables: one ``train_student.py`` run per cell and trial.

    python scripts/reproduce.py --table 1                     # Table 1 with the paper's run counts
    python scripts/reproduce.py --pair resnet32x4:resnet8x4 --method WTTM --trials 5
    python scripts/reproduce.py --table 2 --dry-run           # print every command, run nothing
    python scripts/reproduce.py --table 1 --gpus 0,1,2,3 --jobs-per-gpu auto --estimate
    python scripts/reproduce.py --table imagenet --data_folder /data/ILSVRC2012 --gpus_per_run 8
    python scripts/reproduce.py --table imagenet --data_folder DIR --slurm --slurm_nodes 2 --slurm_gpus 8
    python scripts/reproduce.py --table imagenet-teachers --data_folder DIR --gpus_per_run 8
    python scripts/reproduce.py --table deit --data_folder DIR --gpus_per_run 8
    python scripts/reproduce.py --table 1 --methods ReviewKD,KD++,CTKD    # opt-in rows beyond the paper
    python scripts/reproduce.py --pair resnet56:resnet20 --method KD -- --dataset digits --epochs 1

Trial k of a cell runs in ``<save_root>/student_model/<table1|table2|imagenet|imagenet-teachers|deit>/<teacher>-
<student>/<method>/trial_<k>/``. A trial with ``summary.json`` is finished and skipped; any
other is started with ``--resume``, which continues from its ``resume.pth`` (or starts
fresh). A lock file in the trial folder keeps a second runner, or a queued SLURM job, from
running the same trial twice. Trial k runs with ``--seed k``. Locally, each run gets its
devices from ``--gpus`` (``--device cuda`` with ``CUDA_VISIBLE_DEVICES`` naming its GPUs,
or ``--device cpu``) and its share of the CPU threads; ``--gpus_per_run N`` launches each
run through torchrun on N GPUs; ``--jobs-per-gpu auto`` packs as many runs per GPU as a
short, cached calibration finds fastest. Arguments after ``--`` go to every
``train_student.py`` command unchanged (a ``--device`` among them is refused locally,
since ``--gpus`` decides). See docs/REPRODUCE.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Optional, Sequence


from errors import UserError, exit_on_user_error
from paper_tables import packing
from paper_tables import gpu_slots as slots
from paper_tables.gpu_slots import Slot, describe_slots, gpu_slots, refuse_device_flag
from paper_tables.local_runner import LocalRun
from paper_tables.pack_plan import describe, plan_packing
from paper_tables.cells import table_key
from paper_tables.recipes import all_cells
from teacher_zoo.published import teacher_checkpoint
from paper_tables.slurm_runner import run_slurm
from paper_tables.trial_plan import (Trial, build_trials, display_path, missing_data_folder,
                               plan_cells, run_values)

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the paper's table cells (train_student.py), skipping finished trials.",
        epilog="Arguments after -- are passed to every train_student.py command; a --device among "
               "them is refused for local runs, whose devices --gpus decides.")
    sel = p.add_argument_group("what to run")
    sel.add_argument("--table", type=table_key, action="append", default=[],
                     metavar="{1,2,imagenet,imagenet-teachers,deit}",
                     help="1: CIFAR-100 same-architecture pairs, 2: different-architecture pairs, imagenet: "
                          "the ImageNet table (twelve columns), imagenet-teachers: ResNet-18 from ResNet-34/50/"
                          "101/152, deit: DeiT III-S -> DeiT-Ti (repeatable; default 1 and 2, or the tables "
                          "of --pair)")
    sel.add_argument("--pair", action="append", default=[], metavar="TEACHER:STUDENT",
                     help="only this pair (repeatable), e.g. resnet32x4:resnet8x4 or resnet34:resnet18")
    sel.add_argument("--method", action="append", default=[], metavar="NAME",
                     help="only this method (repeatable), case-insensitive: a paper name (KD, WTTM, "
                          "WTTM+CRD, FitNet, ...) or train_student.py's --distill[+--add] spelling "
                          "(wttm, crd+wttm, hint, ...); opt-in rows: student, 'WTTM w/o CE', and on CIFAR-100 "
                          "the rows beyond the paper ReviewKD, KD++, CTKD")
    sel.add_argument("--methods", action="append", default=[], metavar="NAME,NAME,...",
                     help="the same as --method, several at once, comma-separated (e.g. ReviewKD,KD++,CTKD)")
    sel.add_argument("--trials", type=int, default=None,
                     help="trials per cell (default: the paper's run count for the cell; 1 on ImageNet)")
    where = p.add_argument_group("where")
    where.add_argument("--save_root", default=os.path.join("save", "reproduce"),
                       help="runs go to <save_root>/student_model/<table>/<pair>/<method>/trial_<k>, "
                            "calibrations to <save_root>/calibration (default %(default)s)")
    where.add_argument("--teacher_root", default=os.path.join("save", "models"),
                       help="teachers are <teacher_root>/<arch>_vanilla/ckpt_epoch_240.pth (CIFAR-100) and "
                            "<teacher_root>/<arch>_imagenet/<published file> (ImageNet: torchvision's ResNets, "
                            "mmcls's DeiT III-S; default %(default)s)")
    where.add_argument("--data_folder", default=None,
                       help="passed on as train_student.py's --data_folder (needed by the ImageNet table: "
                            "the ILSVRC-2012 folder with train/ and val/)")
    how = p.add_argument_group("how")
    how.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="print every command (and what is skipped), run nothing")
    how.add_argument("--gpus", default=None,
                     help="comma-separated GPU ids as torch numbers them, or 'cpu' (default: every "
                          "visible GPU, else the CPU); a GPU run gets --device cuda, a CPU run --device cpu")
    how.add_argument("--gpus_per_run", "--gpus-per-run", type=int, default=1,
                     help="GPUs of one run: torchrun --standalone --nproc_per_node N on N of --gpus "
                          "(on the CPU: N gloo processes; default 1)")
    how.add_argument("--jobs-per-gpu", "--jobs_per_gpu", dest="jobs_per_gpu", default="1",
                     help="runs packed on each GPU (group) at once, or 'auto': the fastest K of 1, 2, 4, 8, 16 "
                          "by a short calibration cached under <save_root>/calibration (default 1)")
    how.add_argument("--estimate", action="store_true",
                     help="print the plan's projected GPU-hours and wall time on this machine (calibrating "
                          "if needed), run nothing")
    how.add_argument("--recalibrate", action="store_true", help="measure again instead of using the cache")
    how.add_argument("--calibration_steps", type=int, default=30,
                     help="training steps each calibration process times, after 5 warm-up steps (default "
                          "%(default)s; on a CPU an ImageNet step can take a minute: give fewer)")
    how.add_argument("--calibration_progress_s", type=float, default=30,
                     help="while a calibration round runs, say what it is doing every this many seconds "
                          "(default %(default)s; 0: never)")
    how.add_argument("--progress_s", "--progress-s", dest="progress_s", type=float, default=300,
                     help="print each running trial's epoch, accuracy and ETA every this many seconds "
                          "(default 300; 0: never)")
    how.add_argument("--teacher_cache", default="build", choices=("auto", "off", "build"),
                     help="passed to every run: build (default) makes the first logit-only run of a "
                          "teacher build the exact teacher-output cache that the others then read "
                          "(feature methods keep the live teacher); off: every run runs its teacher")
    how.add_argument("--python", default=sys.executable,
                     help=f"interpreter for train_student.py (default {display_path(sys.executable)})")
    slurm = p.add_argument_group("SLURM (through submitit)")
    slurm.add_argument("--slurm", action="store_true", help="submit one job per trial instead of running here")
    slurm.add_argument("--slurm_partition", default=None, help="(default: the cluster's)")
    slurm.add_argument("--slurm_time", type=int, default=24 * 60, help="minutes per job (default %(default)s)")
    slurm.add_argument("--slurm_nodes", type=int, default=1, help="nodes per job (default %(default)s)")
    slurm.add_argument("--slurm_gpus", type=int, default=1,
                       help="GPUs per node, one task (train_student.py process) each (default %(default)s)")
    slurm.add_argument("--slurm_cpus", type=int, default=4, help="CPUs per task (default %(default)s)")
    slurm.add_argument("--slurm_mem_gb", type=int, default=32, help="memory per node (default %(default)s GB)")
    slurm.add_argument("--slurm_array_parallelism", type=int, default=64, help="jobs running at once (default %(default)s)")
    slurm.add_argument("--slurm_cluster", default=None, choices=("slurm", "local"),
                       help="submitit cluster (default: slurm when available); local runs the jobs "
                            "as processes on this machine, to try the submission path")
    slurm.add_argument("--wait", action="store_true", help="wait for the submitted jobs and report them")
    return p


def base_slots(args: argparse.Namespace, jobs: int = 1) -> list[Slot]:
    """``--gpus``/``--gpus_per_run`` checked against the visible GPUs, ``jobs`` runs per group."""
    cpu_only = (args.gpus or "").strip().lower() == "cpu"
    return gpu_slots(args.gpus, jobs, 0 if cpu_only else slots.visible_gpu_count(), args.gpus_per_run)


def check_args(args: argparse.Namespace, passthrough: Sequence[str]) -> None:
    """Refuses values no run could use (one line each)."""
    for name in ("trials", "gpus_per_run", "slurm_nodes", "calibration_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    for name in ("progress_s", "calibration_progress_s"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name):g}")
    args.jobs_per_gpu = packing.parse_jobs_per_gpu(args.jobs_per_gpu)
    if args.slurm and (args.jobs_per_gpu == packing.AUTO or args.estimate or args.gpus_per_run != 1):
        raise UserError("--jobs-per-gpu auto, --gpus_per_run and --estimate shape local runs; a SLURM "
                        "job's shape is --slurm_nodes × --slurm_gpus")
    if not args.slurm:
        refuse_device_flag(passthrough)


def _print_counts(trials: list[Trial]) -> None:
    todo = [t for t in trials if t.state in ("new", "resume")]
    counts = {s: sum(t.state == s for t in trials) for s in ("new", "resume", "finished", "running")}
    print(f"# {len(trials)} trial{'' if len(trials) == 1 else 's'}: {len(todo)} to run ({counts['new']} new, {counts['resume']} to "
          f"resume), {counts['finished']} finished, {counts['running']} running elsewhere", flush=True)


def _print_plan(trials: list[Trial], dry_run: bool, notes: Sequence[str]) -> None:
    for note in notes:
        print(note, flush=True)
    if not dry_run:
        return
    noted = set()
    for t in trials:
        if t.cell.note and t.cell.cell_dir not in noted:
            noted.add(t.cell.cell_dir)
            print(f"# {t.cell.cell_dir}: {t.cell.note}")
        if t.state in ("finished", "running"):
            print(f"# {t.state}: {t.run_name}" + (f" ({t.holder})" if t.holder else ""))
        else:
            print(shlex.join(t.cmd))


def check_inputs(todo: Sequence[Trial], args: argparse.Namespace) -> None:
    """Teachers and data folders the runs need: refused when running, a warning in a dry run
    or an estimate."""
    teachers = {teacher_checkpoint(args.teacher_root, t.cell.teacher, t.cell.dataset) for t in todo}
    missing = sorted(path for path in teachers if not os.path.exists(path))
    problems = []
    if missing:
        problems.append(f"missing teacher checkpoint(s): {', '.join(missing)}; run bash "
                        "scripts/fetch_pretrained_teachers.sh (--imagenet [ARCH ...] for the ImageNet "
                        "ResNets, --deit for the DeiT III-S teacher) "
                        "or scripts/train_all_teachers.sh")
    data = missing_data_folder(todo)
    if data:
        problems.append(data)
    for message in problems:
        if not (args.dry_run or args.estimate):
            raise UserError(message)
        print(f"warning: {message}", file=sys.stderr)


def prefetch_data(todo: Sequence[Trial]) -> None:
    """Downloads CIFAR-100 once here, so that parallel runs (or SLURM jobs on nodes without
    internet) do not each fetch it."""
    folders = {run_values(t.argv).data_folder or "./data" for t in todo if run_values(t.argv).dataset == "cifar100"}
    for folder in sorted(folders):
        from dataset import load_dataset
        load_dataset("cifar100", folder, download=True)


def local_setup(todo: list[Trial], args: argparse.Namespace, base: list[Slot]) -> tuple[list[Slot], int, list[str]]:
    """Slots (after packing ``base``, one per GPU group), CPU threads per process, and the
    plan's comment lines."""
    plan = None
    if todo and (args.jobs_per_gpu == packing.AUTO or args.estimate):
        if args.estimate:
            print(f"# estimate: the plan's device-hours and wall time from the measured speed of each pair's "
                  f"training step ({len(todo)} trial{'s' if len(todo) != 1 else ''} to run); a calibration "
                  "not in the cache is measured first, which takes minutes (longer on a CPU)", flush=True)
        plan = plan_packing(todo, base, args.jobs_per_gpu, args, os.environ, measure=not args.dry_run)
    k = plan.k if plan else (1 if args.jobs_per_gpu == packing.AUTO else args.jobs_per_gpu)
    threads = packing.thread_share(packing.available_cores(), len(base) * k * base[0].procs,
                                   os.environ.get("OMP_NUM_THREADS"))
    slots = base_slots(args, k)
    notes = describe(plan, base, threads) if plan else []
    return slots, threads, [f"# runs at once: {describe_slots(slots, os.environ, threads)}"] + notes


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    own, passthrough = split_passthrough(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    args.method += [name.strip() for names in args.methods for name in names.split(",") if name.strip()]
    check_args(args, passthrough)
    no_slots = args.slurm or (args.dry_run and args.gpus is None and not args.estimate
                              and args.jobs_per_gpu != packing.AUTO)
    cells = all_cells()
    trials = build_trials(plan_cells(cells, args), args, passthrough, 1 if args.slurm else args.gpus_per_run)
    todo = [t for t in trials if t.state in ("new", "resume")]
    base = [] if no_slots else base_slots(args)  # bad --gpus: one line before any output
    _print_counts(trials)
    slots, threads, notes = ([], None, []) if no_slots else local_setup(todo, args, base)
    if args.slurm and args.slurm_nodes * args.slurm_gpus > 1:
        notes = [f"# each job: {args.slurm_nodes} node(s) × {args.slurm_gpus} task(s), one train_student.py "
                 "process per GPU (torch env:// rendezvous from submitit)"]
    _print_plan(trials, args.dry_run, notes)
    check_inputs(todo, args)
    if args.dry_run or args.estimate or not todo:
        return 0
    prefetch_data(todo)
    ok = run_slurm(todo, args) if args.slurm else LocalRun(todo, slots, args.progress_s, threads).run()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
