"""Reproduce the paper's CIFAR-100 tables: one ``train_student.py`` run per cell and trial.

    python scripts/reproduce.py --table 1                     # Table 1 with the paper's run counts
    python scripts/reproduce.py --pair resnet32x4:resnet8x4 --method WTTM --trials 5
    python scripts/reproduce.py --table 2 --dry-run           # print every command, run nothing
    python scripts/reproduce.py --table 1 --gpus 0,1,2,3 --jobs-per-gpu 2
    python scripts/reproduce.py --table 1 --slurm --slurm_partition gpu
    python scripts/reproduce.py --pair resnet56:resnet20 --method KD -- --dataset digits --epochs 1

Trial k of a cell runs in ``<save_root>/student_model/table<T>/<teacher>-<student>/<method>/
trial_<k>/``. A trial with ``summary.json`` is finished and skipped; any other is started with
``--resume``, which continues from its ``resume.pth`` (or starts fresh). A lock file in the
trial folder keeps a second runner, or a queued SLURM job, from running the same trial twice.
Trial k runs with ``--seed k``: a trial can be repeated exactly and resumed (a resumed run must
keep its seed), and every method sees the same data order in the same trial.
Locally, each run gets its device from ``--gpus`` (``--device cuda`` with
``CUDA_VISIBLE_DEVICES`` naming its GPU, or ``--device cpu``), and every ``--progress_s``
seconds the runner prints each running trial's latest epoch and accuracy with ETAs.
Arguments after ``--`` go to every ``train_student.py`` command unchanged (a ``--device``
among them is refused locally, since ``--gpus`` decides). See docs/REPRODUCE.md.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import time
import uuid
from typing import Callable, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from errors import UserError, exit_on_user_error  # noqa: E402
from helper import trial_lock  # noqa: E402
from helper.gpu_slots import describe_slots, gpu_slots, refuse_device_flag  # noqa: E402
from helper.local_runner import LocalRun, Trial, report  # noqa: E402
from helper.recipes import Cell, load_cells, select, teacher_checkpoint  # noqa: E402
from helper.trial_progress import PAPER_EPOCHS  # noqa: E402


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the paper's table cells (train_student.py), skipping finished trials.",
        epilog="Arguments after -- are passed to every train_student.py command; a --device among "
               "them is refused for local runs, whose devices --gpus decides.")
    sel = p.add_argument_group("what to run")
    sel.add_argument("--table", type=int, choices=(1, 2), action="append", default=[],
                     help="1: same-architecture pairs, 2: different-architecture pairs (repeatable; default both)")
    sel.add_argument("--pair", action="append", default=[], metavar="TEACHER:STUDENT",
                     help="only this pair (repeatable), e.g. resnet32x4:resnet8x4")
    sel.add_argument("--method", action="append", default=[], metavar="NAME",
                     help="only this method (repeatable), case-insensitive: a paper name (KD, WTTM, "
                          "WTTM+CRD, FitNet, ...) or train_student.py's --distill[+--add] spelling "
                          "(wttm, crd+wttm, hint, ...); opt-in rows: student, 'WTTM w/o CE'")
    sel.add_argument("--trials", type=int, default=None,
                     help="trials per cell (default: the paper's run count for the cell, 5 or 3)")
    where = p.add_argument_group("where")
    where.add_argument("--save_root", default=os.path.join("save", "reproduce"),
                       help="runs go to <save_root>/student_model/<table>/<pair>/<method>/trial_<k> "
                            "(default %(default)s)")
    where.add_argument("--teacher_root", default=os.path.join("save", "models"),
                       help="teachers are <teacher_root>/<arch>_vanilla/ckpt_epoch_240.pth (default %(default)s)")
    how = p.add_argument_group("how")
    how.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="print every command (and what is skipped), run nothing")
    how.add_argument("--gpus", default=None,
                     help="comma-separated GPU ids as torch numbers them, or 'cpu' (default: every "
                          "visible GPU, else the CPU); a GPU run gets --device cuda, a CPU run --device cpu")
    how.add_argument("--jobs-per-gpu", "--jobs_per_gpu", dest="jobs_per_gpu", type=int, default=1,
                     help="runs packed on each GPU at once (on the CPU when there is no GPU; default 1: "
                          "one run after the other)")
    how.add_argument("--progress_s", "--progress-s", dest="progress_s", type=float, default=300,
                     help="print each running trial's epoch, accuracy and ETA every this many seconds "
                          "(default 300; 0: never)")
    how.add_argument("--python", default=sys.executable,
                     help=f"interpreter for train_student.py (default {_display(sys.executable)})")
    slurm = p.add_argument_group("SLURM (through submitit)")
    slurm.add_argument("--slurm", action="store_true", help="submit one job per trial instead of running here")
    slurm.add_argument("--slurm_partition", default=None, help="(default: the cluster's)")
    slurm.add_argument("--slurm_time", type=int, default=24 * 60, help="minutes per job (default %(default)s)")
    slurm.add_argument("--slurm_gpus", type=int, default=1, help="GPUs per job (default %(default)s)")
    slurm.add_argument("--slurm_cpus", type=int, default=4, help="CPUs per job (default %(default)s)")
    slurm.add_argument("--slurm_mem_gb", type=int, default=32, help="memory per job (default %(default)s GB)")
    slurm.add_argument("--slurm_array_parallelism", type=int, default=64, help="jobs running at once (default %(default)s)")
    slurm.add_argument("--slurm_cluster", default=None, choices=("slurm", "local"),
                       help="submitit cluster (default: slurm when available); local runs the jobs "
                            "as processes on this machine, to try the submission path")
    slurm.add_argument("--wait", action="store_true", help="wait for the submitted jobs and report them")
    return p


def plan(args: argparse.Namespace, passthrough: Sequence[str]) -> list[Trial]:
    """The trials of the selected cells, trial-major (every cell's trial 1 comes first)."""
    cells = load_cells()
    cells = select(cells, args.table, args.pair, [paper_method(m, cells) for m in args.method])
    if not cells:
        raise UserError("no runnable cell matches the selection")
    trials = []
    for k in range(1, max(args.trials or c.runs for c in cells) + 1):
        for cell in cells:
            if k > (args.trials or cell.runs):
                continue
            name = cell.run_name(k)
            run_dir = os.path.join(args.save_root, "student_model", name)
            cmd = [_display(args.python), _display(os.path.join(REPO, "train_student.py")),
                   "--path_t", teacher_checkpoint(args.teacher_root, cell.teacher),
                   "--model_s", cell.student, *cell.flags(), "--trial", str(k), "--seed", str(k),
                   "--save_root", args.save_root, "--run_name", name, "--resume", *passthrough]
            if os.path.exists(os.path.join(run_dir, "summary.json")):
                state, holder = "finished", ""
            else:
                holder = trial_lock.lock_holder(run_dir)
                state = "running" if holder else \
                    "resume" if os.path.exists(os.path.join(run_dir, "resume.pth")) else "new"
            trials.append(Trial(cell, name, run_dir, cmd, state, holder))
    return trials


def paper_method(name: str, cells: Sequence[Cell]) -> str:
    """The paper row a ``--method`` written as ``train_student.py`` spells methods stands for.

    ``wttm`` → WTTM, ``hint`` → FitNet, ``crd+wttm`` (or ``wttm+crd``) → WTTM+CRD: the
    ``--distill`` name, plus the ``--add`` name where the row weights one, in any order and
    case. Default rows win over opt-in ones (``kd`` is KD, not the plain student). Any other
    name is returned unchanged, for :func:`select` to match against the paper's names.
    """
    wanted = frozenset(part.strip().lower() for part in name.split("+"))
    for cell in sorted((c for c in cells if c.runnable), key=lambda c: not c.default):
        flags = cell.flags()
        used = {flags[flags.index("--distill") + 1]}
        if "--add" in flags:  # flags() leaves out an --add weighted 0
            used.add(flags[flags.index("--add") + 1])
        if frozenset(used) == wanted:
            return cell.method
    return name


def visible_gpu_count() -> int:
    """GPUs this process sees (tests replace this to check ``--gpus`` without GPUs)."""
    import torch
    return torch.cuda.device_count()


def local_slots(args: argparse.Namespace) -> list[Optional[int]]:
    """``--gpus``/``--jobs-per-gpu`` checked against the visible GPUs (see helper.gpu_slots)."""
    cpu_only = (args.gpus or "").strip().lower() == "cpu"
    return gpu_slots(args.gpus, args.jobs_per_gpu, 0 if cpu_only else visible_gpu_count())


def _print_plan(trials: list[Trial], dry_run: bool, slots: Optional[list[Optional[int]]]) -> None:
    todo = [t for t in trials if t.state in ("new", "resume")]
    counts = {s: sum(t.state == s for t in trials) for s in ("new", "resume", "finished", "running")}
    print(f"# {len(trials)} trial{'' if len(trials) == 1 else 's'}: {len(todo)} to run ({counts['new']} new, {counts['resume']} to "
          f"resume), {counts['finished']} finished, {counts['running']} running elsewhere", flush=True)
    if not dry_run:
        return
    if slots:
        print(f"# runs at once: {describe_slots(slots, os.environ)}")
    noted = set()
    for t in trials:
        if t.cell.note and t.cell.cell_dir not in noted:
            noted.add(t.cell.cell_dir)
            print(f"# {t.cell.cell_dir}: {t.cell.note}")
        if t.state in ("finished", "running"):
            print(f"# {t.state}: {t.run_name}" + (f" ({t.holder})" if t.holder else ""))
        else:
            print(shlex.join(t.cmd))


def slurm_job_function() -> Callable[[list[str], str, dict, str], dict]:
    """:func:`helper.trial_lock.execute`, registered with submitit's pickler (cloudpickle) to
    travel by value, so that a job unpickles it without an import path to this repository."""
    import cloudpickle
    cloudpickle.register_pickle_by_value(trial_lock)
    return trial_lock.execute


def run_slurm(trials: list[Trial], args: argparse.Namespace) -> bool:
    """Submits one job per trial through submitit; waits only with --wait (or locally)."""
    try:
        import submitit
    except ImportError:
        raise UserError("--slurm needs submitit (pip install submitit)") from None
    executor = submitit.AutoExecutor(folder=os.path.join(args.save_root, "slurm", "%j"),
                                     cluster=args.slurm_cluster)
    executor.update_parameters(name="kd-reproduce", timeout_min=args.slurm_time,
                               gpus_per_node=args.slurm_gpus, cpus_per_task=args.slurm_cpus,
                               mem_gb=args.slurm_mem_gb, slurm_partition=args.slurm_partition,
                               slurm_array_parallelism=args.slurm_array_parallelism)
    work = slurm_job_function()
    tokens = [uuid.uuid4().hex for _ in trials]
    with executor.batch():
        jobs = [executor.submit(work, t.cmd, t.run_dir, {}, tok) for t, tok in zip(trials, tokens)]
    for job, trial, tok in zip(jobs, trials, tokens):
        trial_lock.write_lock(trial.run_dir, {"token": tok, "slurm_job": job.job_id,
                                              "host": socket.gethostname(), "since": time.time()}, exclusive=True)
        print(f"submitted {trial.run_name} as job {job.job_id}", flush=True)
    if not (args.wait or args.slurm_cluster == "local"):
        print(f"# {len(jobs)} jobs submitted; logs under {os.path.join(args.save_root, 'slurm')}. "
              f"Run this command again to resume trials that time out.")
        return True
    ok = True
    for i, (trial, job) in enumerate(zip(trials, jobs), 1):
        try:
            result = job.result()
        except Exception as err:  # the job died outside train_student (node failure, time limit)
            result = {"ok": False, "error": str(err).strip().splitlines()[-1][:300]}
        ok &= report(i, len(jobs), trial, result)
    return ok


def _passthrough_values(passthrough: Sequence[str]) -> argparse.Namespace:
    """The pass-through flags the runner itself needs: data set, data folder, epochs."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="cifar100")
    p.add_argument("--data_folder", default="./data")
    p.add_argument("--epochs", type=int, default=PAPER_EPOCHS)
    known, _ = p.parse_known_args(passthrough)
    return known


def prefetch_data(passthrough: Sequence[str]) -> None:
    """Downloads CIFAR-100 once here, so that parallel runs (or SLURM jobs on nodes without
    internet) do not each fetch it."""
    known = _passthrough_values(passthrough)
    if known.dataset == "cifar100":
        from dataset import load_dataset
        load_dataset(known.dataset, known.data_folder, download=True)


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
    if args.trials is not None and args.trials < 1:
        raise UserError("--trials must be at least 1")
    if args.progress_s < 0:
        raise UserError(f"--progress_s must be >= 0, got {args.progress_s:g}")
    slots = None
    if not args.slurm:  # SLURM jobs use the GPUs their job was given (--device auto)
        refuse_device_flag(passthrough)
        if args.gpus is not None or not args.dry_run:
            slots = local_slots(args)
    trials = plan(args, passthrough)
    _print_plan(trials, args.dry_run, slots)
    todo = [t for t in trials if t.state in ("new", "resume")]
    teachers = {teacher_checkpoint(args.teacher_root, t.cell.teacher) for t in todo}
    missing = sorted(path for path in teachers if not os.path.exists(path))
    if missing:
        message = (f"missing teacher checkpoint(s): {', '.join(missing)}; run "
                   "bash scripts/fetch_pretrained_teachers.sh (or scripts/train_all_teachers.sh)")
        if not args.dry_run:
            raise UserError(message)
        print(f"warning: {message}", file=sys.stderr)
    if args.dry_run or not todo:
        return 0
    prefetch_data(passthrough)
    if args.slurm:
        ok = run_slurm(todo, args)
    else:
        ok = LocalRun(todo, slots, args.progress_s, _passthrough_values(passthrough).epochs).run()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
