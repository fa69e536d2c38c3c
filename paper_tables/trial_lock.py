"""Trial locks and one trial run, for the table runner (``scripts/reproduce.py``).

While a trial runs, its folder holds ``.reproduce.lock`` naming the process or SLURM job
that owns it, so a second runner (or a rerun while SLURM jobs are queued) skips it. A lock
whose process has ended, or whose job ``squeue`` no longer lists, is stale and ignored.

Standard library only, and nothing from this repository: a SLURM job unpickles
:func:`execute`, which ``reproduce.py`` registers to be pickled by value, so the job needs
no import path to this repository. A job of several tasks (nodes × GPUs) runs one
``train_student.py`` process per task; :func:`distributed_env` gives each the variables of
torch's env:// rendezvous from submitit (which every SLURM job of the runner has).
"""
from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import time
from typing import Optional

LOCK = ".reproduce.lock"
LOG = "reproduce.log"


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


def lock_holder(run_dir: str) -> str:
    """Who holds a live lock on the trial ('' when nobody does)."""
    info = _read_lock(run_dir)
    if not info or not _alive(info):
        return ""
    if info.get("pid") and info.get("host"):
        return f"pid {info['pid']} on {info['host']}"
    return f"slurm job {info.get('slurm_job')}"


def write_lock(run_dir: str, info: dict, exclusive: bool) -> bool:
    """Writes the lock file; with ``exclusive``, only if there is none (False otherwise)."""
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
    if write_lock(run_dir, me, exclusive=True):
        return ""
    info = _read_lock(run_dir) or {}
    if info.get("token") != token and _alive(info):
        return lock_holder(run_dir) or "another runner"
    write_lock(run_dir, me, exclusive=False)  # ours (submitted for us) or stale
    return ""


def release(run_dir: str, token: str) -> None:
    """Drops the trial's lock if ``token`` holds it."""
    info = _read_lock(run_dir)
    if info and info.get("token") == token:
        os.unlink(os.path.join(run_dir, LOCK))


def outcome(run_dir: str, code: int, seconds: float) -> dict:
    """A finished run's result: ok when it exited 0 and its ``summary.json`` says finished."""
    result = {"ok": False, "returncode": code, "seconds": seconds}
    try:
        with open(os.path.join(run_dir, "summary.json")) as handle:
            summary = json.load(handle)
        result.update(ok=code == 0 and bool(summary.get("finished")), best=summary.get("best_acc"),
                      last=summary.get("last_acc"))
    except (OSError, ValueError):
        pass
    return result


def distributed_env() -> dict:
    """This SLURM task's rendezvous variables (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), from submitit's view of the job.

    Every task keeps every GPU of its node visible: rank r's ``--device auto`` is
    ``cuda:<LOCAL_RANK>``.
    """
    from submitit.helpers import TorchDistributedEnvironment  # present in the runner's jobs
    d = TorchDistributedEnvironment()
    return {"MASTER_ADDR": str(d.master_addr), "MASTER_PORT": str(d.master_port), "RANK": str(d.rank),
            "WORLD_SIZE": str(d.world_size), "LOCAL_RANK": str(d.local_rank),
            "LOCAL_WORLD_SIZE": str(d.local_world_size)}


def _run(cmd: list[str], env: dict, log_path: str) -> int:
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(cmd)}\n")
        log.flush()
        return subprocess.run(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT).returncode


def execute(cmd: list[str], run_dir: str, env: dict, token: str, distributed: bool = False) -> dict:
    """Runs one trial under its lock, output appended to ``run_dir/reproduce.log`` (SLURM jobs).

    With ``distributed``, this is one task of a multi-task job: rank 0 holds the lock and
    writes ``reproduce.log``; the other ranks write ``reproduce.rank<r>.log`` and stand down
    when someone else's live lock holds the trial (rank 0 does too).
    """
    rank = 0
    if distributed:
        env = {**env, **distributed_env()}
        rank = int(env["RANK"])
    if rank:
        info = _read_lock(run_dir) or {}
        if info.get("token") not in (None, token) and _alive(info):
            return {"ok": True, "skipped": "running elsewhere", "rank": rank}
        start = time.time()
        code = _run(cmd, env, os.path.join(run_dir, f"reproduce.rank{rank}.log"))
        return {"ok": code == 0, "returncode": code, "seconds": time.time() - start, "rank": rank}
    owner = acquire(run_dir, token)
    if owner:
        return {"ok": True, "skipped": f"running elsewhere ({owner})"}
    start = time.time()
    try:
        code = _run(cmd, env, os.path.join(run_dir, LOG))
    finally:
        release(run_dir, token)
    return outcome(run_dir, code, time.time() - start)
