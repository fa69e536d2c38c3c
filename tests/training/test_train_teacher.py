"""End to end: ``train_teacher.py`` on the digits set (see train_utils for the shrunk data).

The run folder and its files, the checkpoints' contents, the LR schedule as logged, the light
models' default LR, clean one-line errors (some through a real process), a NaN loss that
stops the run and keeps the last good checkpoint, and ``--resume`` after a real ``kill -9``
mid-epoch ending bit-for-bit on the uninterrupted run's weights.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import models
import helper.teacher_run
import train_teacher
from train_utils import run_teacher
from train_utils import (METRIC_COLUMNS, assert_one_line_error, launcher_command,
                         load, read_metrics, subprocess_env)

NUM_CLASSES = 10  # digits


pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_args(root, *extra: str, model: str = "resnet8") -> list[str]:
    return ["--model", model, "--dataset", "digits", "--batch_size", "32", "--save_root", str(root),
            "--device", "cpu", *extra]


def expect_user_error(capsys, argv, match: str) -> str:
    with pytest.raises(SystemExit) as info:
        run_teacher(argv)
    assert info.value.code == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert match in line, line
    return line


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- a full run and everything it writes ------------------------------------------------

def test_run_folder_checkpoints_and_logs(tmp_path, capsys):
    argv = teacher_args(tmp_path / "save", "--epochs", "3", "--lr_decay_epochs", "1,2",
                        "--save_freq", "2", "--print_freq", "1")
    best = Path(run_teacher(argv))
    out = capsys.readouterr().out
    run_dir = best.parent
    assert run_dir.parent == tmp_path / "save" / "models"
    assert run_dir.name == "resnet8_digits_lr_0.05_decay_0.0005_trial_0"  # starts with the arch
    assert best.name == "resnet8_best.pth" and f"best checkpoint: {best}" in out

    files = {p.name for p in run_dir.iterdir() if p.is_file()}
    assert files == {"config.json", "metrics.csv", "resnet8_best.pth", "resnet8_last.pth",
                     "ckpt_epoch_2.pth", "resume.pth", "summary.json"}  # no temp files left over
    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events

    config = json.loads((run_dir / "config.json").read_text())
    assert config["seed_drawn"] is True and isinstance(config["seed"], int) and config["seed"] > 0
    assert config["model"] == "resnet8" and config["epochs"] == 3 and config["learning_rate"] == 0.05
    assert config["lr_decay_epochs"] == [1, 2]

    header, rows = read_metrics(run_dir / "metrics.csv")
    assert header == METRIC_COLUMNS + ["loss_ce"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # the LR drops after each --lr_decay_epochs milestone
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.005, 0.0005])
    for r in rows:
        values = {k: float(v) for k, v in r.items()}
        assert all(math.isfinite(v) for v in values.values()), r
        assert 0 <= values["test_acc"] <= values["test_acc5"] <= 100 and 0 <= values["train_acc"] <= 100
        assert values["loss_ce"] == values["train_loss"] and values["seconds"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    for tag in ("lr", "train_loss", "test_acc", "test_loss", "loss_ce"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2, 3], tag
    assert [e.value for e in acc.Scalars("lr")] == pytest.approx([0.05, 0.005, 0.0005])

    summary = json.loads((run_dir / "summary.json").read_text())
    accs = [float(r["test_acc"]) for r in rows]
    assert summary["finished"] is True and summary["epochs"] == 3
    assert summary["best_acc"] == pytest.approx(max(accs), abs=1e-3)
    assert summary["best_epoch"] == accs.index(max(accs)) + 1
    assert summary["last_acc"] == pytest.approx(accs[-1], abs=1e-3)

    fresh = models.create_model("resnet8", NUM_CLASSES)
    ckpts = {name: load(run_dir / name) for name in
             ("resnet8_best.pth", "resnet8_last.pth", "ckpt_epoch_2.pth", "resume.pth")}
    for name, ckpt in ckpts.items():
        assert {"model", "epoch", "best_acc", "arch"} <= ckpt.keys(), name
        assert type(ckpt["best_acc"]) is float and type(ckpt["epoch"]) is int, name
        assert ckpt["arch"] == "resnet8"
        fresh.load_state_dict(ckpt["model"], strict=True)  # the plain reference keys
    assert ckpts["resnet8_best.pth"]["epoch"] == summary["best_epoch"]
    assert ckpts["resnet8_best.pth"]["best_acc"] == summary["best_acc"]
    assert ckpts["ckpt_epoch_2.pth"]["epoch"] == 2 and "optimizer" in ckpts["ckpt_epoch_2.pth"]
    assert ckpts["resnet8_last.pth"]["epoch"] == ckpts["resume.pth"]["epoch"] == 3
    same_tensors(ckpts["resnet8_last.pth"]["model"], ckpts["resume.pth"]["model"])
    assert {"optimizer", "loader", "rng", "best_epoch"} <= ckpts["resume.pth"].keys()

    # a fresh start in a folder that holds a run is refused ...
    expect_user_error(capsys, argv, "already holds a run")
    # ... --resume of the finished run trains nothing more
    run_teacher(argv + ["--resume"])
    assert "resumed" in capsys.readouterr().out
    assert len(read_metrics(run_dir / "metrics.csv")[1]) == 3
    same_tensors(load(run_dir / "resnet8_last.pth")["model"], ckpts["resnet8_last.pth"]["model"])

    # the recorded seed reproduces the run: its first epoch, again, with --seed given
    again = Path(run_teacher(teacher_args(tmp_path / "again", "--epochs", "1", "--lr_decay_epochs",
                                                 "1,2", "--seed", str(config["seed"]))))
    first = read_metrics(again.parent / "metrics.csv")[1][0]
    assert {k: v for k, v in first.items() if k != "seconds"} == \
        {k: v for k, v in rows[0].items() if k != "seconds"}
    assert json.loads((again.parent / "config.json").read_text())["seed_drawn"] is False


@pytest.mark.parametrize("model, extra, lr", [
    ("MobileNetV2", [], 0.01), ("ShuffleV1", [], 0.01), ("ShuffleV2", [], 0.01), ("resnet8", [], 0.05),
    ("ShuffleV2", ["--learning_rate", "0.02"], 0.02),
])
def test_default_learning_rate_in_config_json(tmp_path, monkeypatch, model, extra, lr):
    class Stop(Exception):
        pass

    def stop(*args, **kwargs):  # config.json is written; no need to train
        raise Stop

    monkeypatch.setattr(helper.teacher_run, "make_loaders", stop)
    with pytest.raises(Stop):
        run_teacher(teacher_args(tmp_path, "--epochs", "1", *extra, model=model))
    (run_dir,) = (tmp_path / "models").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["learning_rate"] == lr and config["base_learning_rate"] == lr
    assert run_dir.name == f"{model}_digits_lr_{lr}_decay_0.0005_trial_0"


# ---- clean errors -----------------------------------------------------------------------

@pytest.mark.parametrize("extra, match", [
    (["--epochs", "0"], "--epochs must be positive"),
    (["--batch_size", "-1"], "--batch_size must be positive"),
    (["--lr_decay_epochs", "a,b"], "--lr_decay_epochs must be comma-separated integers"),
    (["--learning_rate", "-1"], "--learning_rate"),
    (["--device", "tpu:x"], "--device"),
])
def test_bad_flags_in_process(tmp_path, capsys, extra, match):
    expect_user_error(capsys, teacher_args(tmp_path, *extra), match)


def test_unwritable_save_root(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    expect_user_error(capsys, teacher_args(blocker / "x"), "cannot create save folder")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            expect_user_error(capsys, teacher_args(locked / "save"), "save folder")
        finally:
            locked.chmod(0o700)


def test_bad_input_through_a_real_process(tmp_path):
    """Exit status 2 and one ``error:`` line on stderr, no traceback, from the real script."""
    empty = tmp_path / "no_data"
    empty.mkdir()
    cases = {
        "unknown model": (["--model", "resnet9", "--dataset", "digits"], "unknown model 'resnet9'"),
        "nan lr": (["--model", "resnet8", "--dataset", "digits", "--learning_rate", "nan"],
                   "--learning_rate must be a finite positive number"),
        # offline (downloads go to a closed loopback port) with an empty data folder
        "no cifar": (["--model", "resnet8", "--dataset", "cifar100", "--data_folder", str(empty)],
                     "cifar-100-python.tar.gz"),  # says where to put the archive
    }
    procs = {}
    for name, (args, _) in cases.items():  # in parallel: each pays the interpreter start-up
        save = tmp_path / name.replace(" ", "_")
        procs[name] = subprocess.Popen(
            [sys.executable, str(Path(train_teacher.__file__)), *args, "--save_root", str(save),
             "--device", "cpu", "--epochs", "1"],
            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (name, err)
        assert cases[name][1] in assert_one_line_error(err), (name, err)
    assert list(empty.iterdir()) == []  # no partial download left behind


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # an LR multiplied by 1e30 after epoch 1: the weights overflow early in epoch 2
    common = teacher_args(tmp_path, "--seed", "1", "--run_name", "nan_run", "--lr_decay_epochs", "1",
                          "--lr_decay_rate", "1e30")
    run_teacher(common + ["--epochs", "1"])
    run_dir = tmp_path / "models" / "nan_run"
    kept = {name: (run_dir / name).read_bytes() for name in
            ("resume.pth", "resnet8_best.pth", "resnet8_last.pth", "metrics.csv", "summary.json")}
    capsys.readouterr()

    line = expect_user_error(capsys, common + ["--epochs", "2", "--resume"], "loss became")
    assert "epoch 2" in line and f"last good checkpoint is kept: {run_dir / 'resume.pth'}" in line
    for name, content in kept.items():
        assert (run_dir / name).read_bytes() == content, f"{name} was touched by the failed epoch"
    assert not (run_dir / "ckpt_epoch_2.pth").exists()
    assert not any(p.name.startswith(".tmp") for p in run_dir.iterdir())
    assert load(run_dir / "resume.pth")["epoch"] == 1  # the kept checkpoint is the good epoch

    # a run that fails in its first epoch names no checkpoint, since none exists
    line = expect_user_error(capsys, teacher_args(tmp_path, "--seed", "1", "--run_name", "nan_first",
                                                  "--learning_rate", "1e30", "--epochs", "1"),
                             "loss became")
    assert "no checkpoint had been written yet" in line
    assert not (tmp_path / "models" / "nan_first" / "resume.pth").exists()


# ---- resume after a real kill -9 ----------------------------------------------------------

def test_resume_after_kill_9_ends_bitwise_identical(tmp_path):
    """Uninterrupted 3 epochs vs. killed mid-epoch 2 and resumed: identical final weights."""
    n_train, n_test = 192, 50  # 6 steps an epoch at batch 32: room to kill mid-epoch
    common = ["--model", "resnet8", "--dataset", "digits", "--epochs", "3", "--seed", "11",
              "--batch_size", "32", "--print_freq", "1", "--device", "cpu", "--lr_decay_epochs", "2"]

    def launch(root, *extra, **kw):
        return subprocess.Popen(launcher_command("teacher", common + ["--save_root", str(root), *extra],
                                                 n_train, n_test),
                                env=subprocess_env(threads=1), text=True, **kw)

    whole = launch(tmp_path / "whole", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = launch(tmp_path / "killed", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    watchdog = threading.Timer(300, killed.kill)  # a hung child must not hang the suite
    watchdog.start()
    seen = []
    try:
        for line in killed.stdout:  # progress lines: "epoch 2 [2/6] loss ..."
            seen.append(line)
            if line.startswith("epoch 2 [2/"):
                os.kill(killed.pid, signal.SIGKILL)
                break
        killed.wait(timeout=60)
    finally:
        watchdog.cancel()
        killed.stdout.close()
    assert seen and seen[-1].startswith("epoch 2 [2/"), "".join(seen[-20:])
    assert killed.returncode == -signal.SIGKILL
    run_name = "resnet8_digits_lr_0.05_decay_0.0005_trial_0"
    killed_dir, whole_dir = tmp_path / "killed" / "models" / run_name, tmp_path / "whole" / "models" / run_name
    assert [r["epoch"] for r in read_metrics(killed_dir / "metrics.csv")[1]] == ["1"]  # died in epoch 2
    assert load(killed_dir / "resume.pth")["epoch"] == 1

    resumed = subprocess.run(launcher_command("teacher", common + ["--save_root", str(tmp_path / "killed"),
                                                                   "--resume"], n_train, n_test),
                             env=subprocess_env(threads=1), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and "after epoch 1" in resumed.stdout
    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err

    a, b = load(whole_dir / "resnet8_last.pth"), load(killed_dir / "resnet8_last.pth")
    same_tensors(a["model"], b["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        same_tensors(pa, pb)  # momentum buffers too
    assert (a["epoch"], a["best_acc"]) == (b["epoch"], b["best_acc"])
    _, rows_a = read_metrics(whole_dir / "metrics.csv")
    _, rows_b = read_metrics(killed_dir / "metrics.csv")
    assert len(rows_b) == 3
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b)
    assert json.loads((killed_dir / "summary.json").read_text())["finished"] is True


# ---- files a loader could not decode ----------------------------------------------------

def test_skipped_validation_files_are_counted_apart_from_training_ones(tmp_path):
    """A tiny ImageNet-style folder with its corrupt training JPEG and one corrupt validation
    file: each is counted in its own column of metrics.csv."""
    import glob

    from imagenet_fixtures import make_tiny_imagenet

    root = tmp_path / "imagenet"
    make_tiny_imagenet(str(root))
    for path in glob.glob(f"{root}/train/*/*_[0-5].*") + glob.glob(f"{root}/val/*/*000[12].JPEG"):
        os.remove(path)  # the odd training files and one validation image per class remain
    Path(sorted(glob.glob(f"{root}/val/*/*"))[0]).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG")
    with pytest.warns(UserWarning, match="cannot decode"):
        best = run_teacher(["--model", "resnet18", "--dataset", "imagenet", "--data_folder",
                                   str(root), "--batch_size", "4", "--epochs", "1", "--seed", "1",
                                   "--workers", "0", "--save_root", str(tmp_path), "--device", "cpu"])
    header, rows = read_metrics(Path(best).parent / "metrics.csv")
    assert header[:len(METRIC_COLUMNS)] == METRIC_COLUMNS
    assert (rows[0]["skipped_files"], rows[0]["skipped_val_files"]) == ("1", "1")


# ---- the demo's threads -----------------------------------------------------------------

def test_demo_uses_the_cores_other_processes_leave_idle():
    from train_utils import load_script

    demo = load_script("demo")
    assert demo.idle_cores(cores=2, load=0.1) == 2  # alone: every core
    assert demo.idle_cores(cores=2, load=1.9) == 1  # busy (the 2-core machine): one
    assert demo.idle_cores(cores=2, load=7.0) == 1  # never fewer than one
    assert demo.idle_cores(cores=64, load=0.0) == demo.MAX_THREADS
    assert 1 <= demo.idle_cores() <= demo.MAX_THREADS  # this machine's own figures
    assert demo.choose_threads(3, {"OMP_NUM_THREADS": "2"}) == (3, "--threads")
    assert demo.choose_threads(None, {"OMP_NUM_THREADS": "2"}) == (2, "OMP_NUM_THREADS")
    threads, why = demo.choose_threads(None, {})
    assert threads == demo.idle_cores() and "load average" in why
