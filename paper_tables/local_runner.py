"""The table runner's local mode: trials on a pool of GPU/CPU slots, with progress.

``scripts/reproduce.py`` plans the trials; :class:`LocalRun` runs them here, one
``train_student.py`` run per slot (torchrun's processes for a run on several GPUs), and
prints a line when each starts and ends and, every ``--progress_s`` seconds, each running
trial's epoch, accuracy and ETA.
"""
from __future__ import annotations

import collections
import os
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from typing import IO, Optional, Sequence

from paper_tables import trial_progress as tp
from paper_tables.gpu_slots import Slot, slot_launch, slot_name
from paper_tables.trial_lock import LOG, acquire, outcome, release
from paper_tables.trial_plan import Trial

POLL_S = 0.2  # how often the runner polls its processes (no file reads)
STOP_GRACE_S = 30  # how long interrupted runs get to end before they are killed


def report(i: int, n: int, trial: Trial, result: dict) -> bool:
    """Prints the end of trial ``i`` of ``n`` (done, skip, or FAILED with the log's last
    lines); returns whether it succeeded."""
    tag = f"[{i:>{len(str(n))}}/{n}]"
    if result.get("skipped"):
        print(f"{tag} skip   {trial.run_name}: {result['skipped']}", flush=True)
    elif result["ok"]:
        print(f"{tag} done   {trial.run_name}: best {result['best']:.2f}, last {result['last']:.2f} "
              f"({tp.format_duration(result['seconds'])})", flush=True)
    else:
        log = os.path.join(trial.run_dir, LOG)
        tail = [result["error"]] if "error" in result else []
        if os.path.exists(log):
            with open(log) as handle:
                tail += [line.rstrip() for line in handle.readlines()[-3:]]
        print(f"{tag} FAILED {trial.run_name} (exit {result.get('returncode')}); log {log}:\n    "
              + "\n    ".join(tail), flush=True)
    return bool(result["ok"])


@dataclass
class Running:
    """A trial this runner started: its process, log, slot, and where it began."""

    trial: Trial
    slot: Slot
    proc: subprocess.Popen
    log: IO[str]
    started_s: float
    start_epoch: int


class LocalRun:
    """Runs trials on a pool of slots, one ``train_student.py`` run per slot.

    Everything happens in the calling thread: start trials on free slots, poll the
    processes, report each that ends, and print progress every ``progress_s`` seconds. Any
    exception (Ctrl-C, or a closed stdout under ``| head``) stops the running trials with
    SIGINT, as Ctrl-C in a terminal does (each resumes from its last epoch next time), and
    releases their locks before it propagates.

    Args:
        trials: the trials to run, in order.
        slots: one entry per concurrent run (see :func:`paper_tables.gpu_slots.gpu_slots`).
        progress_s: seconds between progress prints (0: none).
        threads: CPU threads per process (None: as the environment says).
    """

    def __init__(self, trials: Sequence[Trial], slots: Sequence[Slot], progress_s: float,
                 threads: Optional[int] = None) -> None:
        self.pending = collections.deque(trials)
        self.free = list(slots)
        self.slots = len(slots)
        self.running: list[Running] = []
        self.progress_s = progress_s
        self.threads = threads
        self.token = uuid.uuid4().hex
        self.total, self.done, self.ok = len(trials), 0, True
        self.past_s_per_epoch: list[float] = []  # of the trials that ended, for the ETAs
        self.head_start = {t.run_dir: tp.latest_epoch(t.run_dir) for t in trials if t.state == "resume"}

    def run(self) -> bool:
        """Runs every trial; True when all succeeded (or were skipped as running elsewhere)."""
        next_progress = time.time() + self.progress_s
        try:
            while self.pending or self.running:
                self._start_free()
                if self.running:
                    time.sleep(POLL_S)
                self._reap()
                if self.progress_s > 0 and self.running and time.time() >= next_progress:
                    self._print_progress()
                    next_progress = time.time() + self.progress_s
        except BaseException as err:
            self._stop(grace_s=2.0 if isinstance(err, KeyboardInterrupt) else 0.0)
            raise
        return self.ok

    def _start_free(self) -> None:
        while self.pending and self.free:
            trial, slot = self.pending.popleft(), self.free.pop(0)
            holder = acquire(trial.run_dir, self.token)
            if holder:
                self.free.insert(0, slot)
                self._finish(trial, {"ok": True, "skipped": f"running elsewhere ({holder})"})
                continue
            flags, env = slot_launch(slot, os.environ, self.threads)
            cmd = trial.cmd + flags
            log = open(os.path.join(trial.run_dir, LOG), "a")
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
            except OSError as err:  # e.g. --python names no interpreter
                log.close()
                release(trial.run_dir, self.token)
                self.free.insert(0, slot)
                self._finish(trial, {"ok": False, "error": f"cannot start {cmd[0]}: {err.strerror}"})
                continue
            self.running.append(Running(trial, slot, proc, log, time.time(), self.head_start.get(trial.run_dir, 0)))
            print(f"start  {trial.run_name} on {slot_name(slot)}", flush=True)

    def _reap(self) -> None:
        for r in [r for r in self.running if r.proc.poll() is not None]:
            self.running.remove(r)
            r.log.close()
            release(r.trial.run_dir, self.token)
            self.free.append(r.slot)
            seconds, epochs = time.time() - r.started_s, tp.latest_epoch(r.trial.run_dir) - r.start_epoch
            if r.proc.returncode == 0 and epochs > 0:
                self.past_s_per_epoch.append(seconds / epochs)
            self._finish(r.trial, outcome(r.trial.run_dir, r.proc.returncode, seconds))

    def _finish(self, trial: Trial, result: dict) -> None:
        self.done += 1
        self.ok &= report(self.done, self.total, trial, result)

    def _print_progress(self) -> None:
        now = time.time()
        statuses = [tp.read_status(r.trial.run_dir, r.started_s, r.start_epoch, r.trial.epochs, now)
                    for r in self.running]
        queued = [max(t.epochs - self.head_start.get(t.run_dir, 0), 0) for t in self.pending]
        mean_rate = tp.mean_s_per_epoch(statuses, self.past_s_per_epoch)
        eta = tp.plan_eta(statuses, queued, self.slots, self.past_s_per_epoch)
        print(f"progress: {len(self.running)} running, {len(self.pending)} queued, {self.done}/{self.total} "
              f"ended; plan ETA {tp.format_duration(eta)}", flush=True)
        for r, status in zip(self.running, statuses):
            print(f"  {r.trial.run_name} on {slot_name(r.slot)}: {tp.describe(status, mean_rate)}", flush=True)

    def _stop(self, grace_s: float) -> None:
        """Ends the running trials (SIGINT after ``grace_s``, SIGKILL after STOP_GRACE_S more)."""
        deadline = time.time() + grace_s
        for r in self.running:
            try:
                r.proc.wait(timeout=max(deadline - time.time(), 0.0))
            except subprocess.TimeoutExpired:
                pass
        for r in self.running:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGINT)
        deadline = time.time() + STOP_GRACE_S
        for r in self.running:
            try:
                r.proc.wait(timeout=max(deadline - time.time(), 0.1))
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait()
            r.log.close()
            release(r.trial.run_dir, self.token)
        self.running = []
