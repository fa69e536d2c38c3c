"""Shared helpers of the end-to-end tests of ``train_teacher.py`` and ``train_student.py``.

The end-to-end tests call the entry scripts' ``main(argv)`` in-process on the bundled digits
set. To keep the whole suite within a few minutes on 2 CPU cores they shrink digits to its
first ``SMALL_TRAIN`` training and ``SMALL_TEST`` test images (the split is already shuffled
and stratified, so every class is present): everything else (flags, loader, augmentation,
loop, checkpoints, logs) is the real code path. The shrunk set is handed to the entry
scripts' ``main(argv, data)`` by :func:`run_student` / :func:`run_teacher`.

Run as a script, this module is the subprocess launcher of the tests that need a real
process (``kill -9``, exit status, stderr)::

    python tests/train_utils.py teacher|student N_TRAIN N_TEST -- ARGS...

which shrinks digits to ``N_TRAIN``/``N_TEST`` images and runs ``train_<who>.main(ARGS)``.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "tests" / "data"  # the golden numbers and layouts

SMALL_TRAIN = 64
SMALL_TEST = 50
TEACHER_ARCH = "resnet14"
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_acc", "test_acc5", "test_loss",
                  "seconds"]


def shrink(data, n_train: int, n_test: int):
    """The first ``n_train`` training and ``n_test`` test images of an ImageDataset."""
    return dataclasses.replace(
        data, train_images=data.train_images[:n_train], train_labels=data.train_labels[:n_train],
        test_images=data.test_images[:n_test], test_labels=data.test_labels[:n_test])


def small_data(argv: Sequence[str], n_train: int = SMALL_TRAIN, n_test: int = SMALL_TEST):
    """The shrunk digits set when ``argv`` trains on ``--dataset digits``; None otherwise
    (the run loads its data set itself)."""
    import dataset

    args = list(argv)
    if "--dataset" not in args or args[args.index("--dataset") + 1] != "digits":
        return None
    return shrink(dataset.load_dataset("digits", "unused"), n_train, n_test)


def run_student(argv: Sequence[str], n_train: int = SMALL_TRAIN, n_test: int = SMALL_TEST) -> str:
    """``train_student.main(argv)`` on the shrunk digits set (when ``argv`` asks for digits)."""
    import train_student

    return train_student.main(list(argv), small_data(argv, n_train, n_test))


def run_teacher(argv: Sequence[str], n_train: int = SMALL_TRAIN, n_test: int = SMALL_TEST) -> str:
    """``train_teacher.main(argv)`` on the shrunk digits set (when ``argv`` asks for digits)."""
    import train_teacher

    return train_teacher.main(list(argv), small_data(argv, n_train, n_test))


def read_metrics(path: os.PathLike) -> tuple[list[str], list[dict[str, str]]]:
    """``metrics.csv`` → (header, rows as dicts of strings)."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def load(path: os.PathLike) -> dict[str, Any]:
    """A checkpoint, loaded the only way the project allows."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def only_run_dir(root: os.PathLike) -> Path:
    """The single run folder directly under ``root``."""
    dirs = [p for p in Path(root).iterdir() if p.is_dir()]
    assert len(dirs) == 1, f"expected one run folder in {root}, found {dirs}"
    return dirs[0]


_TEACHERS: dict[str, str] = {}


def digits_teacher(tmp_path_factory) -> str:
    """The best checkpoint of a ``TEACHER_ARCH`` teacher trained for one epoch on the small
    digits set; trained once per test session and shared by every test module."""
    if TEACHER_ARCH not in _TEACHERS:
        root = tmp_path_factory.mktemp("teacher")
        _TEACHERS[TEACHER_ARCH] = run_teacher([
            "--model", TEACHER_ARCH, "--dataset", "digits", "--epochs", "1", "--seed", "3",
            "--save_root", str(root), "--device", "cpu"])
    return _TEACHERS[TEACHER_ARCH]


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """The environment of a child run: deterministic thread count, no network."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    # Any download attempt goes to a closed loopback port and fails at once (urllib honours
    # the proxy variables), instead of waiting on the real network.
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[key] = "http://127.0.0.1:9"
    for key in ("no_proxy", "NO_PROXY"):
        env.pop(key, None)
    return env


def launcher_command(who: str, args: Sequence[str], n_train: int = SMALL_TRAIN,
                     n_test: int = SMALL_TEST) -> list[str]:
    """The command line of a child run of ``train_<who>.main(args)`` on shrunk digits."""
    return [sys.executable, str(Path(__file__).resolve()), who, str(n_train), str(n_test), "--",
            *args]


def assert_one_line_error(stderr: str) -> str:
    """stderr is exactly one ``error: ...`` line, with no traceback; returns that line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module, once per test session (tests call its
    ``main`` only)."""
    import importlib.util

    module_name = f"_script_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def _launch(argv: Sequence[str]) -> None:
    who, n_train, n_test, sep, *args = argv
    assert sep == "--" and who in ("teacher", "student"), argv
    (run_teacher if who == "teacher" else run_student)(args, int(n_train), int(n_test))


if __name__ == "__main__":
    _launch(sys.argv[1:])
