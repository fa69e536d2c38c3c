"""A run folder is owned by one process for the whole run (``helper/run_lock.py``).

A second ``train_student.py`` / ``train_teacher.py`` on a folder that a live process holds
(the same ``--run_name``, or a requeued ``--resume``) stops with one line naming the holder
and writes nothing; a lock whose holder died (``kill -9``) is taken over; a run that ends or
fails releases the folder, and one refused before its first file leaves no folder behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train_student
import train_teacher
from helper.run_lock import LOCK_NAME, RunLock
from train_utils import assert_one_line_error, digits_teacher, subprocess_env
from train_utils import run_student, run_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

# A process that takes the lock of a folder, says so, and holds it until killed.
HOLDER = ("import sys, time; from helper.run_lock import RunLock; "
          "lock = RunLock(sys.argv[1]).__enter__(); print('held', flush=True); time.sleep(120)")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return digits_teacher(tmp_path_factory)


@pytest.fixture
def holder():
    """Starts a separate process holding the lock of a folder; yields a starter, kills it after."""
    procs = []

    def start(folder: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)],
                                stdout=subprocess.PIPE, text=True, env=subprocess_env())
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def student_args(teacher: str, root: Path, *extra: str) -> list[str]:
    return ["--path_t", teacher, "--model_s", "resnet8", "--dataset", "digits", "--epochs", "1",
            "--batch_size", "32", "--save_root", str(root), "--device", "cpu", "--run_name", "same",
            "--seed", "1", *extra]


def refused(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return assert_one_line_error(capsys.readouterr().err)


def test_a_second_process_on_a_held_folder_is_refused_naming_the_holder(teacher, tmp_path, capsys, holder):
    folder = tmp_path / "student_model" / "same"
    proc = holder(folder)
    line = refused(capsys, train_student.main, student_args(teacher, tmp_path, "--ttm_l", "0.3"))
    assert f"run folder {folder} is in use by pid {proc.pid} on {socket.gethostname()}, running since" in line
    assert "--run_name" in line
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_NAME]  # nothing of the second run
    # a requeued --resume of the same run is refused the same way while the first one runs
    line = refused(capsys, train_student.main, student_args(teacher, tmp_path, "--resume"))
    assert f"pid {proc.pid}" in line
    proc.send_signal(signal.SIGKILL)  # the holder dies without cleaning up: the lock is free
    proc.wait()
    assert (folder / LOCK_NAME).exists()
    run_student(student_args(teacher, tmp_path))
    assert (folder / "summary.json").exists() and not (folder / LOCK_NAME).exists()  # released


def test_teacher_runs_lock_their_folder_too(tmp_path, capsys):
    argv = ["--model", "resnet8", "--dataset", "digits", "--epochs", "1", "--seed", "1",
            "--save_root", str(tmp_path), "--device", "cpu", "--run_name", "t"]
    folder = tmp_path / "models" / "t"
    with RunLock(str(folder)):  # held by this process, through another open file
        info = json.loads((folder / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        line = refused(capsys, train_teacher.main, argv)
        assert f"pid {os.getpid()}" in line
    run_teacher(argv)  # released when the block ended
    assert (folder / "summary.json").exists()


def test_a_refused_run_leaves_no_folder_and_a_failed_one_releases_it(teacher, tmp_path, capsys):
    root = tmp_path / "new_root"
    line = refused(capsys, train_student.main, student_args(teacher, root, "--batch_size", "4096"))
    assert "--batch_size 4096 is larger than the training set" in line
    assert not root.exists()  # the folders the lock created are removed again
    with RunLock(str(tmp_path / "kept")):
        pass
    assert not (tmp_path / "kept").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError):
        with RunLock(str(tmp_path / "mine")):
            (tmp_path / "mine" / "file").write_text("x")
            raise RuntimeError("the run failed")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["file"]  # released, kept
    with RunLock(str(tmp_path / "mine")):  # and free again
        pass
