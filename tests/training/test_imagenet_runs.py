"""End to end: ``train_teacher.py`` and ``train_student.py`` with ``--dataset imagenet``.

A tiny generated ILSVRC-style folder (``imagenet_fixtures``), cut down to its 5 odd training
files (grayscale, CMYK, PNG named .JPEG, nested, corrupt) and 3 validation images,
drives the real scripts in-process: a resnet18 teacher trained for one epoch, then
mobilenet_v1 students (KD, WTTM, CRD), ``--resume``, bad input, and ``python -m teacher_zoo
verify --imagenet``. 224-pixel networks are slow on one CPU thread, hence batch 4 and one or
two epochs.
"""
from __future__ import annotations

import glob
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

import models
import train_student
import train_teacher
from teacher_zoo import cli as teachers
from imagenet_fixtures import WNIDS, make_tiny_imagenet
from train_utils import assert_one_line_error, load, read_metrics

TEACHER = "resnet18"
STUDENT = "mobilenet_v1"
BARE_NAME = "resnet18-f37072fd.pth"  # torchvision's file name: a bare state dict


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """The fixture folder without its plain training images and validation images 1-2 of each
    class: every class keeps one or two odd training files, and one validation image."""
    root = str(tmp_path_factory.mktemp("imagenet"))
    make_tiny_imagenet(root)
    for path in glob.glob(f"{root}/train/*/*_[0-5].*") + glob.glob(f"{root}/val/*/*000[12].JPEG"):
        os.remove(path)
    return root


def data_args(folder: str, save_root, *extra: str) -> list[str]:
    return ["--dataset", "imagenet", "--data_folder", folder, "--batch_size", "4", "--epochs", "1",
            "--seed", "1", "--workers", "0", "--save_root", str(save_root), "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def teacher(folder, tmp_path_factory) -> str:
    """The best (or last) checkpoint of a resnet18 trained one epoch on the folder."""
    save = tmp_path_factory.mktemp("teacher_save")
    return train_teacher.main(["--model", TEACHER, *data_args(folder, save)])


@pytest.fixture(scope="module")
def bare_teacher(teacher, tmp_path_factory) -> str:
    """The teacher's weights as torchvision ships them: a bare state dict in ``<arch>_imagenet/``,
    a plain dict without BatchNorm counters (IMAGENET1K_V1 files hold none)."""
    path = tmp_path_factory.mktemp("models") / f"{TEACHER}_imagenet" / BARE_NAME
    path.parent.mkdir()
    torch.save({k: v for k, v in load(teacher)["model"].items() if not k.endswith(".num_batches_tracked")}, path)
    return str(path)


def student(teacher_path: str, folder: str, save_root, *extra: str) -> Path:
    """Runs ``train_student.py``; returns the run folder."""
    argv = ["--path_t", teacher_path, "--model_s", STUDENT, "--nce_k", "2", "--feat_dim", "16",
            *data_args(folder, save_root, *extra)]
    return Path(train_student.main(argv)).parent


def test_teacher_run_streams_the_folder_and_logs_the_skipped_file(teacher):
    run_dir = Path(teacher).parent
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "imagenet" and config["workers"] == 0 and config["decode"] == "auto"
    header, rows = read_metrics(run_dir / "metrics.csv")
    assert "skipped_files" in header and rows[0]["skipped_files"] == "1"  # the corrupt JPEG
    ckpt = load(teacher)
    assert ckpt["arch"] == TEACHER
    assert ckpt["model"]["fc.weight"].shape == (len(WNIDS), 512)  # 3 classes from the folders


@pytest.mark.parametrize("term, flags", [
    ("loss_add_kd", ["--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0"]),  # the seed's KD
    ("loss_main_wttm", ["--distill", "wttm"]),
], ids=["kd", "wttm"])
def test_students_distil_from_a_bare_torchvision_style_teacher(term, flags, teacher, bare_teacher,
                                                               folder, tmp_path, capsys):
    children = set(multiprocessing.active_children())
    run_dir = student(bare_teacher, folder, tmp_path, *flags, "--workers", "2")
    assert set(multiprocessing.active_children()) == children  # the loaders' workers ended
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_t"] == TEACHER and config["workers"] == 2  # arch from the folder name
    _, teacher_rows = read_metrics(Path(teacher).parent / "metrics.csv")
    # the same weights score the same on the same validation images
    assert config["teacher_test_acc"] == pytest.approx(float(teacher_rows[0]["test_acc"]), abs=1e-3)
    header, rows = read_metrics(run_dir / "metrics.csv")
    assert term in header and float(rows[0][term]) > 0 and rows[0]["skipped_files"] == "1"
    assert json.loads((run_dir / "summary.json").read_text())["finished"]
    out = capsys.readouterr().out
    assert "5 training and 3 validation images, 3 classes" in out and "2 loader workers" in out


def test_a_failing_run_stops_its_loader_workers(folder, tmp_path, capsys):
    children = set(multiprocessing.active_children())
    argv = ["--model", STUDENT, *data_args(folder, tmp_path), "--workers", "2", "--learning_rate", "1e30"]
    with pytest.raises(SystemExit) as info:  # the weights overflow after the first step
        train_teacher.main(argv)
    assert info.value.code == 2 and "loss became" in capsys.readouterr().err
    assert set(multiprocessing.active_children()) == children


def test_crd_resume_continues_exactly(teacher, folder, tmp_path):
    straight = student(teacher, folder, tmp_path, "--distill", "crd", "--epochs", "2", "--run_name", "a")
    first = student(teacher, folder, tmp_path, "--distill", "crd", "--run_name", "b")
    resumed = student(teacher, folder, tmp_path, "--distill", "crd", "--epochs", "2", "--run_name", "b",
                      "--resume")
    assert first == resumed
    a, b = load(straight / f"{STUDENT}_last.pth"), load(resumed / f"{STUDENT}_last.pth")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    bank_a = load(straight / "resume.pth")["task_state"]["main"]
    bank_b = load(resumed / "resume.pth")["task_state"]["main"]
    assert bank_a.keys() == bank_b.keys() and any("memory" in k for k in bank_a)
    for key, value in bank_a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, bank_b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(straight / "metrics.csv")[1]) == strip(read_metrics(resumed / "metrics.csv")[1])


# ---- bad input: one line, exit 2, nothing written ----------------------------------------

def _flat_val(root: Path) -> None:
    for path in list((root / "val").rglob("*.JPEG")):
        path.rename(root / "val" / path.name)
    for wnid in WNIDS:
        shutil.rmtree(root / "val" / wnid)


def _mismatch(root: Path) -> None:
    (root / "val" / WNIDS[2]).rename(root / "val" / "n09999999")


def _gone(root: Path) -> None:
    shutil.rmtree(root)


@pytest.mark.parametrize("script", ["teacher", "student"])
@pytest.mark.parametrize("breakage, fragment", [
    (_gone, "does not exist; expected DIR/train/<wnid>/*.JPEG"),
    (_flat_val, "sort them into val/<wnid>/"),
    (_mismatch, "only in val/: n09999999"),
], ids=["missing", "flat-val", "mismatch"])
def test_bad_folders_are_one_line(script, breakage, fragment, folder, teacher, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(folder, root)
    breakage(root)
    save = tmp_path / "save"
    if script == "teacher":
        argv = ["--model", TEACHER, *data_args(str(root), save)]
    else:
        argv = ["--path_t", teacher, "--model_s", STUDENT, *data_args(str(root), save)]
    expect_nothing_written(capsys, script, argv, save, fragment)


def expect_nothing_written(capsys, script: str, argv: list[str], save: Path, *fragments: str) -> None:
    main = train_teacher.main if script == "teacher" else train_student.main
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    line = assert_one_line_error(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, line
    assert not save.exists() or not any(save.iterdir()), list(save.rglob("*"))


def test_a_teacher_file_of_another_architecture(folder, tmp_path, capsys):
    wrong = tmp_path / f"{TEACHER}_imagenet" / BARE_NAME  # the folder says resnet18
    wrong.parent.mkdir()
    torch.save(models.create_model(STUDENT, len(WNIDS)).state_dict(), wrong)
    save = tmp_path / "save"
    expect_nothing_written(capsys, "student", ["--path_t", str(wrong), "--model_s", STUDENT,
                                               *data_args(folder, save)],
                           save, "does not match architecture resnet18")


@pytest.mark.parametrize("case", ["cifar-teacher-on-imagenet", "cifar-student-on-imagenet",
                                  "imagenet-model-on-digits", "negative-workers"])
def test_networks_for_other_data_and_bad_flags(case, folder, teacher, tmp_path, capsys):
    save = tmp_path / "save"
    script, argv, fragment = {
        "cifar-teacher-on-imagenet": ("teacher", ["--model", "resnet8", *data_args(folder, save)],
                                      "resnet8 is a network for 32-pixel images, but --dataset imagenet"),
        "cifar-student-on-imagenet": ("student", ["--path_t", teacher, "--model_s", "resnet8",
                                                  *data_args(folder, save)],
                                      "resnet8 is a network for 32-pixel images"),
        "imagenet-model-on-digits": ("teacher", ["--model", TEACHER, *data_args(folder, save),
                                                 "--dataset", "digits"],
                                     "resnet18 is a network for 224-pixel images, but --dataset digits"),
        "negative-workers": ("teacher", ["--model", TEACHER, *data_args(folder, save), "--workers", "-1"],
                             "--workers must be 0 or more"),
    }[case]
    expect_nothing_written(capsys, script, argv, save, fragment)


# ---- python -m teacher_zoo verify --imagenet -----------------------------------------

def test_verify_scores_imagenet_teachers_on_val(teacher, bare_teacher, folder, capsys):
    root = str(Path(bare_teacher).parent.parent)
    _, rows = read_metrics(Path(teacher).parent / "metrics.csv")
    measured = float(rows[0]["test_acc"])
    argv = ["verify", "--imagenet", "--root", root, "--data_folder", folder, "--device", "cpu",
            "--workers", "0"]
    assert teachers.main(argv + ["--expected", f"resnet18={measured}"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert lines[TEACHER].split()[1] == f"{measured:.2f}" and lines[TEACHER].endswith("ok")
    assert "missing" in lines["resnet34"] and "73.31" in lines["resnet34"]
    assert "missing" in lines["resnet50"] and "76.13" in lines["resnet50"]
    assert teachers.main(argv + [TEACHER]) == 1  # torchvision's 69.76 is far from this teacher
    assert "FLAG: more than 0.3 points off" in capsys.readouterr().out
