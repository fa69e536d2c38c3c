"""End to end: ``train_student.py`` on the digits set (see train_utils for the shrunk data).

Every registered method and the paper's two combinations train one epoch for a
same-architecture pair (resnet14 → resnet8) and a cross-architecture pair (resnet14 →
MobileNetV2); the seed READMEs' commands run unchanged; outputs, teacher loading, clean
errors and ``--resume`` of a crashed CRD run (memory bank and sampler restored).
"""
from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import pytest
import torch

import models
import helper.student
from distiller_zoo import METHODS
from helper.distill import teacher_arch_from_path
from train_utils import run_student
from train_utils import (TEACHER_ARCH, assert_one_line_error, digits_teacher, load,
                         read_metrics)

NUM_CLASSES = 10
PAIRS = {"same": "resnet8", "cross": "MobileNetV2"}  # students of the resnet14 teacher
# By construction: FSP needs equal channel counts per stage, AB one connector per teacher stage,
# ReviewKD as many student stages as teacher stages.
UNBUILDABLE = {("fsp", "cross"), ("abound", "cross"), ("reviewkd", "cross"),
               ("vitkd", "same"), ("vitkd", "cross")}  # ViTKD needs ViT tokens: tests/training/test_vit_runs.py
CONFIGS = {name: ["--distill", name] for name in METHODS.names()}
CONFIGS["kd"] = ["--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0"]  # the seed's KD
CONFIGS["crd+wttm"] = ["--distill", "crd", "--add", "wttm", "-a", "1", "-b", "0.8"]
CONFIGS["itrd+wttm"] = ["--distill", "itrd", "--add", "wttm", "-a", "1", "-b", "1"]

# The example commands of the seed READMEs (HobbitLong/RepDistiller, zkxufo/TTM), verbatim.
README_COMMANDS = {
    "repdistiller-kd": "python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth "
                       "--distill kd --model_s resnet8x4 -r 0.1 -a 0.9 -b 0 --trial 1",
    "repdistiller-crd": "python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth "
                        "--distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1",
    "repdistiller-crd+kd": "python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth "
                           "--distill crd --model_s resnet8x4 -a 1 -b 0.8 --trial 1",
    "ttm-ttm": "python3 train_student.py --path_t ./save/models/vgg13_vanilla/ckpt_epoch_240.pth "
               "--model_s vgg8 --distill ttm --ttm_l 0.1 -r 1 -b 45 -a 0 --trial 1",
    "ttm-crd+wttm": "python3 train_student.py --path_t ./save/models/vgg13_vanilla/ckpt_epoch_240.pth "
                    "--model_s vgg8 --distill crd --add wttm --ttm_l 0.2 -b 0.8 -a 4 --trial 1",
}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return digits_teacher(tmp_path_factory)


pytestmark = pytest.mark.usefixtures("one_thread")


def student_args(teacher: str, root, student: str = "resnet8", *extra: str) -> list[str]:
    return ["--path_t", teacher, "--model_s", student, "--dataset", "digits", "--epochs", "1",
            "--init_epochs", "1", "--nce_k", "16", "--batch_size", "32", "--seed", "1",
            "--save_root", str(root), "--device", "cpu", *extra]


def expect_user_error(capsys, argv, *fragments: str) -> str:
    with pytest.raises(SystemExit) as info:
        run_student(argv)
    assert info.value.code == 2
    line = assert_one_line_error(capsys.readouterr().err)
    for fragment in fragments:
        assert fragment in line, line
    return line


def flag(argv: list[str], name: str, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def expected_terms(argv: list[str]) -> set[str]:
    """The loss columns a run of these flags logs (besides loss_ce)."""
    distill, add = flag(argv, "--distill"), flag(argv, "--add", "kd")
    alpha, beta = float(flag(argv, "-a", 0)), flag(argv, "-b")
    terms = {f"loss_add_{add}"} if alpha else set()
    main_zero = METHODS.get(distill).main_is_zero or (beta is not None and float(beta) == 0)
    return terms if main_zero else terms | {f"loss_main_{distill}"}


def check_one_epoch_run(best: str, argv: list[str]) -> dict:
    run_dir = Path(best).parent
    header, rows = read_metrics(run_dir / "metrics.csv")
    assert len(rows) == 1
    loss_columns = {c for c in header if c.startswith("loss_")}
    assert loss_columns == {"loss_ce"} | expected_terms(argv)
    for key, value in rows[0].items():
        assert math.isfinite(float(value)), (key, value)
    return {"run_dir": run_dir, "row": rows[0], "config": json.loads((run_dir / "config.json").read_text())}


# ---- every method, both pairs -------------------------------------------------------------

@pytest.mark.parametrize("pair", list(PAIRS))
@pytest.mark.parametrize("config", list(CONFIGS))
def test_method_trains_one_epoch(teacher, tmp_path, capsys, config, pair):
    argv = student_args(teacher, tmp_path, PAIRS[pair], *CONFIGS[config])
    name = flag(argv, "--distill")
    if (name, pair) in UNBUILDABLE:
        expect_user_error(capsys, argv, name, PAIRS[pair])
        assert not (tmp_path / "student_model").exists()
        return
    run = check_one_epoch_run(run_student(argv), argv)
    out = capsys.readouterr().out
    stage = name in ("abound", "factor", "fsp")
    assert ("init stage epoch 1/1" in out) == stage
    resume = load(run["run_dir"] / "resume.pth")
    assert resume["epoch"] == 1 and "main" in resume["task_state"]
    assert run["config"]["distill"] == name and run["config"]["model_t"] == TEACHER_ARCH


# ---- the seed READMEs' commands ---------------------------------------------------------------

@pytest.mark.parametrize("command", list(README_COMMANDS))
def test_readme_command_runs_unchanged(teacher, tmp_path, command):
    seed_args = shlex.split(README_COMMANDS[command])[2:]
    appended = ["--dataset", "digits", "--epochs", "1", "--path_t", teacher, "--save_root",
                str(tmp_path / "save"), "--device", "cpu"]
    run = check_one_epoch_run(run_student(seed_args + appended), seed_args)
    config = run["config"]
    assert config["gamma"] == float(flag(seed_args, "-r", 1.0))
    assert config["alpha"] == float(flag(seed_args, "-a")) and config["beta"] == float(flag(seed_args, "-b"))
    assert config["add"] == flag(seed_args, "--add", "kd") and config["trial"] == "1"
    assert config["ttm_l"] == float(flag(seed_args, "--ttm_l", 1.0))
    # the run name (the seed's fields, the added method, its temperature or l, shell-safe), and
    # its text log: one accuracy per epoch, then 'best: ...'
    run_name = {"repdistiller-kd": "S-resnet8x4_T-resnet14_digits_kd+kd_r0.1_a0.9_b0_kdT4_trial1",
                "repdistiller-crd": "S-resnet8x4_T-resnet14_digits_crd_r1_a0_b0.8_trial1",
                "repdistiller-crd+kd": "S-resnet8x4_T-resnet14_digits_crd+kd_r1_a1_b0.8_kdT4_trial1",
                "ttm-ttm": "S-vgg8_T-resnet14_digits_ttm_r1_a0_b45_l0.1_trial1",
                "ttm-crd+wttm": "S-vgg8_T-resnet14_digits_crd+wttm_r1_a4_b0.8_l0.2_trial1"}[command]
    assert TEACHER_ARCH == "resnet14"
    assert run["run_dir"] == tmp_path / "save" / "student_model" / run_name
    acc = float(run["row"]["test_acc"])
    log = (tmp_path / "save" / "student_log" / f"{run_name}.txt").read_text().splitlines()
    assert log == [f"{acc:.2f}", f"best: {acc:.2f}"]


# ---- outputs, checkpoints and resume ------------------------------------------------------

def same_state(a, b, path="") -> None:
    """Recursively equal (dicts, tensors bit for bit, numbers)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), path
        for key in a:
            same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


def clone_state(state):
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    return state.detach().clone() if isinstance(state, torch.Tensor) else state


class Crash(Exception):
    """Stands in for a kill in the middle of an epoch."""


def test_crd_checkpoints_and_resume_after_a_crash(teacher, tmp_path, monkeypatch, capsys):
    argv = student_args(teacher, tmp_path, "resnet8", "--distill", "crd", "--epochs", "2",
                        "--save_freq", "1", "--run_name", "crd_run")
    crd_cls = METHODS.get("crd")
    forward = crd_cls.forward

    def crash_in_epoch_2(self, student, teacher_out, batch):
        if batch.epoch == 2:
            raise Crash
        return forward(self, student, teacher_out, batch)

    monkeypatch.setattr(crd_cls, "forward", crash_in_epoch_2)
    with pytest.raises(Crash):
        run_student(argv)
    monkeypatch.setattr(crd_cls, "forward", forward)
    run_dir = tmp_path / "student_model" / "crd_run"
    saved = load(run_dir / "resume.pth")
    assert saved["epoch"] == 1
    main_state = saved["task_state"]["main"]
    memory = "criterion.contrast.memory_v1"
    assert {memory, "criterion.contrast.memory_v2", "criterion.contrast.params",
            "criterion.embed_s.linear.weight"} <= main_state.keys()
    assert (main_state["criterion.contrast.params"][2:4] > 0).all()  # Z set from the first batch

    # the student checkpoints hold the plain reference keys and nothing of the method
    reference = models.create_model("resnet8", NUM_CLASSES).state_dict().keys()
    for name in ("resnet8_best.pth", "ckpt_epoch_1.pth"):
        ckpt = load(run_dir / name)
        assert ckpt["model"].keys() == reference and "task_state" not in ckpt
        assert ckpt["arch"] == "resnet8" and type(ckpt["best_acc"]) is float
        models.create_model("resnet8", NUM_CLASSES).load_state_dict(ckpt["model"])

    captured = {}
    real_restore = helper.loop.Trainer.restore

    def spy(trainer, state, load_task_state):
        objective = load_task_state.__self__  # the objective's load_task_state
        captured["before"] = clone_state(objective.task_state())
        real_restore(trainer, state, load_task_state)
        captured["after"] = clone_state(objective.task_state())

    monkeypatch.setattr(helper.loop.Trainer, "restore", spy)
    capsys.readouterr()
    best = run_student(argv + ["--resume"])
    assert "resumed" in capsys.readouterr().out
    # a freshly built method differs from the saved one; after restore it is the saved one
    assert not torch.equal(captured["before"]["main"][memory], main_state[memory])
    same_state(captured["after"], saved["task_state"])

    header, rows = read_metrics(run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and "loss_main_crd" in header
    last = load(run_dir / "resnet8_last.pth")
    assert last["epoch"] == 2 and last["model"].keys() == reference and "task_state" not in last
    assert Path(best) == run_dir / "resnet8_best.pth"
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is True


# ---- the teacher: loading, recognising, measuring -----------------------------------------

def test_published_style_teacher_and_default_weight(teacher, tmp_path, capsys):
    """A RepDistiller-style file without 'arch' is recognised from its folder name; the
    unset -b resolves to the method's usual weight and is printed; teacher accuracy logged."""
    ckpt = load(teacher)
    published = tmp_path / "save" / "models" / f"{TEACHER_ARCH}_vanilla" / "ckpt_epoch_240.pth"
    published.parent.mkdir(parents=True)
    torch.save({"model": ckpt["model"], "epoch": 240, "accuracy": ckpt["accuracy"]}, published)
    best = run_student(student_args(str(published), tmp_path / "save", "resnet8",
                                           "--distill", "attention"))
    out = capsys.readouterr().out
    assert "loss = 1·CE + 1000·attention" in out
    config = json.loads((Path(best).parent / "config.json").read_text())
    assert config["model_t"] == TEACHER_ARCH and config["beta"] == 1000.0 and config["alpha"] == 0.0
    assert config["objective"] == "loss = 1·CE + 1000·attention"
    # measured before training on the same test set the teacher's run scored it on
    assert config["teacher_test_acc"] == pytest.approx(ckpt["accuracy"], abs=1e-6)
    assert f"test acc {ckpt['accuracy']:.2f}" in out


@pytest.mark.parametrize("path, arch", [
    ("save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth", "wrn_40_2"),
    ("save/models/resnet32x4_vanilla/ckpt_epoch_240.pth", "resnet32x4"),
    ("save/models/ResNet50_vanilla/ckpt_epoch_240.pth", "ResNet50"),
    ("save/models/MobileNetV2_vanilla/ckpt_epoch_240.pth", "MobileNetV2"),
    ("save/models/wrn_16_1_digits_lr_0.05_decay_0.0005_trial_0/wrn_16_1_best.pth", "wrn_16_1"),
    ("save/models/vgg13_cifar100_lr_0.05_decay_0.0005_trial_0/vgg13_best.pth", "vgg13"),
])
def test_teacher_arch_from_folder_name(path, arch):
    assert teacher_arch_from_path(path) == arch


def test_teacher_file_problems_are_one_line_errors(teacher, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(Path(teacher).read_bytes()[:20000])
    no_model = tmp_path / "no_model.pth"
    torch.save({"epoch": 3}, no_model)
    unknown_arch = tmp_path / "somewhere" / "ckpt.pth"
    unknown_arch.parent.mkdir()
    torch.save({"model": load(teacher)["model"]}, unknown_arch)
    cases = [
        (["--path_t", teacher, "--model_t", "resnet8"], ["does not match architecture resnet8"]),
        (["--path_t", str(corrupt)], ["corrupt"]),
        (["--path_t", str(truncated)], ["corrupt"]),
        (["--path_t", str(tmp_path / "missing.pth")], ["not found", "missing.pth"]),
        (["--path_t", str(no_model), "--model_t", TEACHER_ARCH], ["no 'model'"]),
        (["--path_t", str(unknown_arch)], ["cannot tell the teacher's architecture", "--model_t"]),
        (["--path_t", teacher, "--model_t", "resnet9"], ["unknown teacher model 'resnet9'"]),
    ]
    for extra, fragments in cases:
        argv = student_args(teacher, tmp_path / "save", "resnet8") + extra
        expect_user_error(capsys, argv, *fragments)
    assert not (tmp_path / "save" / "student_model").exists()


@pytest.mark.parametrize("extra, fragment", [
    (["--model_s", "resnet9"], "unknown student model 'resnet9'"),
    (["-b", "-1"], "--beta must be a finite non-negative"),
    (["-a", "nan"], "--alpha must be a finite non-negative"),
    (["--kd_T", "0"], "--kd_T must be > 0"),
    (["--add", "none", "-a", "1"], "--add is none"),
    (["--init_epochs", "-1"], "--init_epochs"),
    (["--distill", "crd", "--nce_k", "0"], "--nce_k"),
    (["--distill", "nope"], "--distill"),
    (["--add", "crd"], "--add"),  # only logit methods can be added
])
def test_bad_student_flags(teacher, tmp_path, capsys, extra, fragment):
    expect_user_error(capsys, student_args(teacher, tmp_path) + extra, fragment)


def test_crd_says_when_nce_k_exceeds_the_negatives_available(teacher, tmp_path, caplog):
    """64 training digits: each class has about 58 samples of other classes to draw from."""
    with caplog.at_level("WARNING"):
        run_student(student_args(teacher, tmp_path, "resnet8", "--distill", "crd", "--nce_k", "60"))
    said = [r.getMessage() for r in caplog.records if "--nce_k" in r.getMessage()]
    assert len(said) == 1 and "--nce_k 60 is more than the" in said[0]
    assert "drawn with replacement" in said[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        run_student(student_args(teacher, tmp_path, "resnet8", "--distill", "crd", "--nce_k", "16"))
    assert not [r for r in caplog.records if "--nce_k" in r.getMessage()]
