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
Arguments after ``--`` go to every ``train_student.py`` command unchanged. See
docs/REPRODUCE.md.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import queue
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from errors import UserError, exit_on_user_error  # noqa: E402
from helper.recipes import Cell, load_cells, select, teacher_checkpoint  # noqa: E402

LOCK = ".reproduce.lock"
LOG = "reproduce.log"


@dataclass
class Trial:
    """One run of one cell: where it lives, how it is run, what state it is in."""

    cell: Cell
    run_name: str
    run_dir: str
    cmd: list[str]
    state: str  # new | resume | finished | running
    holder: str = ""


# --- locks and one run: standard library only, since a SLURM job unpickles `execute` -------

def _read_lock(run_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(run_dir, LOCK)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _alive(info: dict) -> bool:
    """Whether the runner or SLURM job that holds a lock still exists."""
    if info.get("host") == socket.gethostname() and info.get("pid"):
        try:
            os.kill(int(info["pid"]), 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    if info.get("slurm_job"):
        try:
            out = subprocess.run(["squeue", "-h", "-j", str(info["slurm_job"])],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return out.returncode == 0 and bool(out.stdout.strip())
    return info.get("host") != socket.gethostname()  # another machine: assume it still runs


def _holder(run_dir: str) -> str:
    """Who holds a live lock on the trial ('' when nobody does)."""
    info = _read_lock(run_dir)
    if not info or not _alive(info):
        return ""
    if info.get("pid") and info.get("host"):
        return f"pid {info['pid']} on {info['host']}"
    return f"slurm job {info.get('slurm_job')}"


def _write_lock(run_dir: str, info: dict, exclusive: bool) -> bool:
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK)
    if exclusive:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        return True
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(info, handle)
    os.replace(tmp, path)
    return True


def _slurm_job() -> Optional[str]:
    """This process's SLURM job id as submitit and squeue write it (``123_4`` in an array)."""
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    return os.environ.get("SLURM_JOB_ID")


def acquire(run_dir: str, token: str) -> str:
    """Takes the trial's lock for ``token``; returns '' on success, else the live holder."""
    me = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
          "slurm_job": _slurm_job()}
    if _write_lock(run_dir, me, exclusive=True):
        return ""
    info = _read_lock(run_dir) or {}
    if info.get("token") != token and _alive(info):
        return _holder(run_dir) or "another runner"
    _write_lock(run_dir, me, exclusive=False)  # ours (submitted for us) or stale
    return ""


def release(run_dir: str, token: str) -> None:
    info = _read_lock(run_dir)
    if info and info.get("token") == token:
        os.unlink(os.path.join(run_dir, LOCK))


def execute(cmd: list[str], run_dir: str, env: dict, token: str) -> dict:
    """Runs one trial under its lock, output appended to ``run_dir/reproduce.log``."""
    holder = acquire(run_dir, token)
    if holder:
        return {"ok": True, "skipped": f"running elsewhere ({holder})"}
    start = time.time()
    try:
        with open(os.path.join(run_dir, LOG), "a") as log:
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            code = subprocess.run(cmd, env={**os.environ, **env}, stdout=log,
                                  stderr=subprocess.STDOUT).returncode
    finally:
        release(run_dir, token)
    result = {"ok": False, "returncode": code, "seconds": time.time() - start}
    try:
        with open(os.path.join(run_dir, "summary.json")) as handle:
            summary = json.load(handle)
        result.update(ok=code == 0 and bool(summary.get("finished")), best=summary.get("best_acc"),
                      last=summary.get("last_acc"))
    except (OSError, ValueError):
        pass
    return result


# --- planning ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Run the paper's table cells (train_student.py), skipping finished trials.",
        epilog="Arguments after -- are passed to every train_student.py command.")
    sel = p.add_argument_group("what to run")
    sel.add_argument("--table", type=int, choices=(1, 2), action="append", default=[],
                     help="1: same-architecture pairs, 2: different-architecture pairs (repeatable; default both)")
    sel.add_argument("--pair", action="append", default=[], metavar="TEACHER:STUDENT",
                     help="only this pair (repeatable), e.g. resnet32x4:resnet8x4")
    sel.add_argument("--method", action="append", default=[], metavar="NAME",
                     help="only this method, paper name (repeatable): KD, WTTM, WTTM+CRD, DKD, ...; "
                          "opt-in rows: student, 'WTTM w/o CE'")
    sel.add_argument("--trials", type=int, default=None,
                     help="trials per cell (default: the paper's run count for the cell, 5 or 3)")
    where = p.add_argument_group("where")
    where.add_argument("--save_root", default=os.path.join("save", "reproduce"),
                       help="runs go to <save_root>/student_model/<table>/<pair>/<method>/trial_<k>")
    where.add_argument("--teacher_root", default=os.path.join("save", "models"),
                       help="teachers are <teacher_root>/<arch>_vanilla/ckpt_epoch_240.pth")
    how = p.add_argument_group("how")
    how.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                     help="print every command (and what is skipped), run nothing")
    how.add_argument("--gpus", default=None,
                     help="comma-separated GPU ids, or 'cpu' (default: every visible GPU, else the CPU)")
    how.add_argument("--jobs-per-gpu", "--jobs_per_gpu", dest="jobs_per_gpu", type=int, default=1,
                     help="runs packed on each GPU at once (on the CPU when there is no GPU; default 1: "
                          "one run after the other)")
    how.add_argument("--python", default=sys.executable, help="interpreter for train_student.py")
    slurm = p.add_argument_group("SLURM (through submitit)")
    slurm.add_argument("--slurm", action="store_true", help="submit one job per trial instead of running here")
    slurm.add_argument("--slurm_partition", default=None)
    slurm.add_argument("--slurm_time", type=int, default=24 * 60, help="minutes per job")
    slurm.add_argument("--slurm_gpus", type=int, default=1, help="GPUs per job")
    slurm.add_argument("--slurm_cpus", type=int, default=4, help="CPUs per job")
    slurm.add_argument("--slurm_mem_gb", type=int, default=32)
    slurm.add_argument("--slurm_array_parallelism", type=int, default=64, help="jobs running at once")
    slurm.add_argument("--slurm_cluster", default=None, choices=("slurm", "local"),
                       help="submitit cluster (default: slurm when available); local runs the jobs "
                            "as processes on this machine, to try the submission path")
    slurm.add_argument("--wait", action="store_true", help="wait for the submitted jobs and report them")
    return p


def _display(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def plan(args: argparse.Namespace, passthrough: Sequence[str]) -> list[Trial]:
    """The trials of the selected cells, trial-major (every cell's trial 1 comes first)."""
    cells = select(load_cells(), args.table, args.pair, args.method)
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
                holder = _holder(run_dir)
                state = "running" if holder else \
                    "resume" if os.path.exists(os.path.join(run_dir, "resume.pth")) else "new"
            trials.append(Trial(cell, name, run_dir, cmd, state, holder))
    return trials


def _slots(args: argparse.Namespace) -> list[Optional[str]]:
    """One entry per concurrent run: a GPU id, or None for the CPU."""
    if args.jobs_per_gpu < 1:
        raise UserError("--jobs-per-gpu must be at least 1")
    if args.gpus is None:
        import torch
        gpus = [str(i) for i in range(torch.cuda.device_count())]
    elif args.gpus.strip().lower() in ("cpu", "none", ""):
        gpus = []
    else:
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
    return [g for g in gpus for _ in range(args.jobs_per_gpu)] or [None] * args.jobs_per_gpu


def _print_plan(trials: list[Trial], dry_run: bool) -> None:
    todo = [t for t in trials if t.state in ("new", "resume")]
    counts = {s: sum(t.state == s for t in trials) for s in ("new", "resume", "finished", "running")}
    print(f"# {len(trials)} trial{'' if len(trials) == 1 else 's'}: {len(todo)} to run ({counts['new']} new, {counts['resume']} to "
          f"resume), {counts['finished']} finished, {counts['running']} running elsewhere", flush=True)
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


def _report(i: int, n: int, trial: Trial, result: dict) -> bool:
    tag = f"[{i:>{len(str(n))}}/{n}]"
    if result.get("skipped"):
        print(f"{tag} skip   {trial.run_name}: {result['skipped']}", flush=True)
    elif result["ok"]:
        print(f"{tag} done   {trial.run_name}: best {result['best']:.2f}, last {result['last']:.2f} "
              f"({result['seconds']:.0f} s)", flush=True)
    else:
        log = os.path.join(trial.run_dir, LOG)
        tail = [result["error"]] if "error" in result else []
        if os.path.exists(log):
            with open(log) as handle:
                tail += [line.rstrip() for line in handle.readlines()[-3:]]
        print(f"{tag} FAILED {trial.run_name} (exit {result.get('returncode')}); log {log}:\n    "
              + "\n    ".join(tail), flush=True)
    return bool(result["ok"])


def run_local(trials: list[Trial], slots: list[Optional[str]]) -> bool:
    """Runs the trials on a pool of slots (one subprocess per slot); True if all succeeded."""
    free: "queue.Queue[Optional[str]]" = queue.Queue()
    for slot in slots:
        free.put(slot)
    token, done, lock = uuid.uuid4().hex, [0], threading.Lock()

    def one(trial: Trial) -> bool:
        slot = free.get()
        try:
            print(f"start  {trial.run_name} on {'the CPU' if slot is None else 'GPU ' + slot}", flush=True)
            # train_student's --device auto then picks this slot's GPU, or the CPU
            env = {"CUDA_VISIBLE_DEVICES": "" if slot is None else slot}
            result = execute(trial.cmd, trial.run_dir, env, token)
        finally:
            free.put(slot)
        with lock:
            done[0] += 1
            return _report(done[0], len(trials), trial, result)

    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(slots))
    try:
        return all(list(pool.map(one, trials)))
    finally:  # on Ctrl-C the running trials stop with it (resumable); queued ones never start
        pool.shutdown(wait=True, cancel_futures=True)


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
    tokens = [uuid.uuid4().hex for _ in trials]
    with executor.batch():
        jobs = [executor.submit(execute, t.cmd, t.run_dir, {}, tok) for t, tok in zip(trials, tokens)]
    for job, trial, tok in zip(jobs, trials, tokens):
        _write_lock(trial.run_dir, {"token": tok, "slurm_job": job.job_id, "host": socket.gethostname(),
                                    "since": time.time()}, exclusive=True)
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
        ok &= _report(i, len(jobs), trial, result)
    return ok


def prefetch_data(passthrough: Sequence[str]) -> None:
    """Downloads CIFAR-100 once here, so that parallel runs (or SLURM jobs on nodes without
    internet) do not each fetch it."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dataset", default="cifar100")
    p.add_argument("--data_folder", default="./data")
    known, _ = p.parse_known_args(passthrough)
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
    trials = plan(args, passthrough)
    _print_plan(trials, args.dry_run)
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
    ok = run_slurm(todo, args) if args.slurm else run_local(todo, _slots(args))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
