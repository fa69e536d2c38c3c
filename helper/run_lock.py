"""One process owns a run folder for the whole run.

Two processes started with the same run folder (the same ``--run_name``, or a requeued
``--resume`` that starts while the first is still running) would otherwise both write into
it: mixed ``config.json``, two event files, last-writer checkpoints. The owner holds an
exclusive ``fcntl.flock`` on ``<run folder>/.run.lock`` from before anything is loaded until
the run ends; the kernel drops it when the process dies, however it dies (a ``kill -9``
leaves a file whose lock nobody holds, which the next run simply takes). The file names the
holder (pid, host, start time) for the one-line refusal the second process prints.

Standard library only (``flock`` is local to a machine, and NFS maps it to a byte-range lock
that the server arbitrates).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import time
from typing import Optional

from errors import UserError

LOCK_NAME = ".run.lock"


def _describe(path: str) -> str:
    """The holder as its lock file names it: ``pid 123 on host, since 2024-05-01 12:00:00``."""
    try:
        with open(path, encoding="utf-8") as handle:
            info = json.load(handle)
        since = datetime.datetime.fromtimestamp(float(info["started"])).strftime("%Y-%m-%d %H:%M:%S")
        return f"pid {info['pid']} on {info['host']}, running since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


class RunLock:
    """The exclusive lock of one run folder, as a context manager.

    Entering creates the folder if needed (and remembers which folders it created), takes the
    lock without waiting and writes the holder's name into the lock file. Leaving deletes the
    lock file, releases the lock, and removes the folders it created if the run wrote nothing
    into them (a run refused before its first file leaves no empty folder behind).

    Args:
        run_dir: the run folder.
        enabled: False on DDP ranks other than 0 (rank 0 owns the folder for the job).

    Raises:
        UserError: another live process holds the folder (one line naming it), or the folder
            cannot be created.
    """

    def __init__(self, run_dir: str, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.path = os.path.join(run_dir, LOCK_NAME)
        self._fd: Optional[int] = None
        self._created: list[str] = []

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self._make_folder()
            try:
                self._acquire()
            except BaseException:
                self._remove_created()
                raise
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_folder(self) -> None:
        missing, probe = [], os.path.abspath(self.run_dir)
        while not os.path.isdir(probe):
            missing.append(probe)
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        try:
            os.makedirs(self.run_dir, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create run folder {self.run_dir}: {err.strerror}") from None
        self._created = missing  # deepest first

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock run folder {self.run_dir}: {err.strerror}") from None
                raise UserError(f"run folder {self.run_dir} is in use by {_describe(self.path)}; "
                                f"wait for that run to end, or choose another --trial/--run_name") from None
            # the previous owner may have deleted the file between our open and our lock:
            # then we locked a file nobody else can see; open the current one again
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode("utf-8"))
        self._fd = fd

    def release(self) -> None:
        """Deletes the lock file and drops the lock (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so no one locks a file being deleted
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                os.rmdir(folder)  # only when empty: a run that wrote a file keeps its folder
            except OSError:
                break
        self._created = []
