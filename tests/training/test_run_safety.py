"""Runs are never silently mixed, messages name only what exists, files are readable.

``--resume`` merges the command line into the saved run's flags and refuses any change to how
the run trains; default run names tell apart runs that differ in any training flag; every
output file gets the mode the umask gives a normal file; the wrong inputs give one line.
"""
from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

import pytest
import torch

import helper.loop
from distiller_zoo import METHODS
from helper import distributed, resume
from helper.augment_flags import AUGMENT_FLAGS
from helper.student_flags import build_parser, default_run_name, legacy_run_name, parse_config
from train_utils import assert_one_line_error, digits_teacher, only_run_dir, read_metrics
from train_utils import run_student

ENV = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return digits_teacher(tmp_path_factory)


pytestmark = pytest.mark.usefixtures("one_thread")


def args(teacher: str, root: Path, *extra: str) -> list[str]:
    return ["--path_t", teacher, "--model_s", "resnet8", "--dataset", "digits", "--epochs", "1",
            "--batch_size", "32", "--save_root", str(root), "--device", "cpu", *extra]


def user_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as info:
        run_student(argv)
    assert info.value.code == 2
    return assert_one_line_error(capsys.readouterr().err)


# ---- --resume -------------------------------------------------------------------------------

def test_resume_refuses_changes_and_keeps_the_runs_own_values(teacher, tmp_path, capsys):
    base = args(teacher, tmp_path, "--run_name", "fixed", "--distill", "kd", "--add", "kd",
                "-r", "0.1", "-a", "0.9", "-b", "0", "--seed", "5", "--lr_decay_epochs", "1")
    run_student(base)
    run_dir = tmp_path / "student_model" / "fixed"
    config_before = (run_dir / "config.json").read_bytes()
    capsys.readouterr()

    # what the issue saw: another method, another l, another temperature, another schedule
    line = user_error(capsys, base + ["--resume", "--distill", "wttm"])
    assert "--resume of" in line and "--distill kd → wttm" in line
    line = user_error(capsys, base + ["--resume", "--kd_T", "2", "--lr_decay_epochs", "150,180,210",
                                      "--batch_size", "16"])
    assert "--kd_T 4.0 → 2.0" in line and "--lr_decay_epochs 1 → 150,180,210" in line
    assert "--batch_size 32 → 16" in line
    line = user_error(capsys, base + ["--resume", "--distill", "crd"])  # was a raw optimizer traceback
    assert "--distill kd → crd" in line
    line = user_error(capsys, base + ["--resume", "--epochs", "1", "--seed", "6"])
    assert "--seed 5 → 6" in line
    assert (run_dir / "config.json").read_bytes() == config_before  # never rewritten by a refusal
    assert len(read_metrics(run_dir / "metrics.csv")[1]) == 1

    # flags of methods the run does not use, and output/speed flags, may differ
    run_student(base + ["--resume", "--ttm_l", "0.3", "--print_freq", "7", "--nce_k", "9"])
    # flags left out take the run's values; --epochs may grow, and the LR follows the run's schedule
    minimal = ["--path_t", teacher, "--save_root", str(tmp_path), "--run_name", "fixed", "--device", "cpu",
               "--resume", "--epochs", "2"]
    run_student(minimal)
    rows = read_metrics(run_dir / "metrics.csv")[1]
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 0.005])  # not the default 0.05
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    assert config["epochs"] == 2 and config["distill"] == "kd" and config["alpha"] == 0.9
    assert config["seed"] == 5 and config["seed_drawn"] is False and config["batch_size"] == 32
    line = user_error(capsys, minimal[:-1] + ["1"])
    assert "--epochs 2 → 1 (it may only grow)" in line


def test_resume_refuses_another_teacher_file(teacher, tmp_path, capsys):
    base = args(teacher, tmp_path, "--run_name", "fixed", "--seed", "2")
    run_student(base)
    other = tmp_path / "resnet14_other" / "t.pth"  # the same architecture, other weights
    other.parent.mkdir()
    ckpt = torch.load(teacher, weights_only=True)
    ckpt["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    torch.save(ckpt, other)
    capsys.readouterr()
    changed = [a if a != teacher else str(other) for a in base]
    line = user_error(capsys, changed + ["--resume", "--epochs", "2"])
    assert "teacher_sha256" in line


def test_resume_without_a_saved_run_starts_fresh_and_says_so(teacher, tmp_path, capsys):
    run_student(args(teacher, tmp_path, "--run_name", "new", "--resume", "--seed", "1"))
    assert "no resume checkpoint" in capsys.readouterr().out


# ---- default run names ----------------------------------------------------------------------

def _name(*flags: str) -> str:
    cfg = parse_config(["--path_t", "t.pth", "--model_s", "resnet8", "--distill", "crd", "--add", "wttm",
                        "-a", "1", *flags], ENV, "resnet32x4")
    return default_run_name(cfg)


def _other_value(action) -> list[str]:
    """A valid value for ``action`` other than its default."""
    if action.const is True:  # store_true
        return [action.option_strings[0]]
    if action.choices:
        return [action.option_strings[0], str(next(c for c in action.choices if c != action.default))]
    default = action.default
    if action.dest == "lr_decay_epochs":
        return [action.option_strings[0], "100,200"]
    if default is None or isinstance(default, str):
        return [action.option_strings[0], {"learning_rate": "0.02", "beta": "0.7", "seed": "9",
                                           "alpha": "2", "dkd_beta": "3", "model_s": "resnet14",
                                           "trial": "3", "batch_size": "32", "weight_decay": "0.001",
                                           "aa": "rand-m9-mstd0.5-inc1", "opt_betas": "0.9,0.99",
                                           "clip_grad": "5"}[action.dest]]
    value = default * 2 if default else 1
    if action.dest in ("nce_m", "momentum", "drop_path", "teacher_drop_path", "smoothing",
                       "mixup_prob"):  # each must stay below 1
        value = 0.3
    return [action.option_strings[0], str(value)]


def test_runs_that_differ_in_one_training_flag_get_two_folders():
    """Every flag of the parser that changes what a crd+wttm run computes changes its name."""
    parser = build_parser()
    used = {f.dest for name in ("crd", "wttm") for f in METHODS.get(name).flags}
    every_method_flag = {f.dest for _, cls in METHODS.items() for f in cls.flags}
    base = _name()
    checked = []
    for action in parser.flags:
        dest = action.dest
        if (not action.option_strings or dest in resume.FREE_TO_CHANGE or dest == "help"
                or dest in ("epochs", "path_t", "model_t", "distill", "add", "alpha")
                or (dest in every_method_flag and dest not in used)):
            continue
        if dest in AUGMENT_FLAGS:  # image-folder data only
            assert _name("--dataset", "imagenet", *_other_value(action)) != _name("--dataset", "imagenet"), dest
        else:
            assert _name(*_other_value(action)) != base, dest
        checked.append(dest)
    assert {"ttm_l", "nce_k", "gamma", "beta", "seed", "batch_size", "learning_rate", "precision",
            "sync_bn", "trial", "dataset", "model_s", "opt", "sched", "clip_grad", "smoothing", "aa",
            "mixup", "teacher_train_mode"} <= set(checked)
    # the method and the added method are in the name too
    assert _name("--add", "ttm") != base and "crd+wttm" in base
    assert parse_config(["--path_t", "t", "--distill", "wttm"], ENV, "resnet8").distill == "wttm"
    # readable: the seed's fields, the added method's l, the trial last
    assert base.startswith("S-resnet8_T-resnet32x4_cifar100_crd+wttm_r1_a1_b0.8_")
    assert "_l1_" in base and base.endswith("_trial0")
    assert parser.option_names()["gamma"] == "-r"


@pytest.mark.parametrize("flags, name", [
    (["--distill", "wttm", "--ttm_l", "0.1", "-r", "1", "-a", "0", "-b", "3", "--trial", "1"],
     "S-resnet8x4_T-resnet32x4_cifar100_wttm_r1_a0_b3_l0.1_trial1"),
    (["--distill", "kd", "--add", "kd", "-r", "0.1", "-a", "0.9", "-b", "0", "--kd_T", "4"],
     "S-resnet8x4_T-resnet32x4_cifar100_kd+kd_r0.1_a0.9_b0_kdT4_trial0"),
    (["--distill", "crd", "--nce_k", "4096", "--mode", "relax", "--precision", "bf16", "--sync_bn",
      "--lr_decay_epochs", "100,200", "--weight_decay", "5e-5", "--seed", "9", "--trial", "a/b c"],
     "S-resnet8x4_T-resnet32x4_cifar100_crd_r1_a0_b0.8_mode-relax_ncek4096_lrdecayepochs100-200_"
     "weightdecay5e-05_syncbn_precision-bf16_seed9_trial-a-b-c"),
])
def test_run_names_are_shell_safe_and_unambiguous(flags, name):
    """No colon or other character a shell or a Windows file system reads specially; the
    teacher is ``T-``, KD's temperature ``kdT``; one spelling of numbers (``1``, not ``1.0``)."""
    cfg = parse_config(["--path_t", "t.pth", "--model_s", "resnet8x4", *flags], ENV, "resnet32x4")
    assert default_run_name(cfg) == name
    assert shlex.quote(name) == name and ":" not in name
    # every flag has one key; no key is another key followed by digits (e.g. a flag 'a' and 'a1')
    keys = {dest: dest.replace("_", "") for dest in (a.dest for a in build_parser()._actions)}
    assert len(set(keys.values())) == len(keys) and not any(any(c.isdigit() for c in k) for k in keys.values())


def test_resume_finds_a_run_started_under_the_old_name(teacher, tmp_path, capsys):
    """A run folder named the way earlier versions named it (``S:…_T:…_r:1.0_…``) is
    continued by ``--resume`` with the same flags, in that folder."""
    flags = args(teacher, tmp_path, "--distill", "wttm", "--ttm_l", "0.5", "--seed", "3")
    run_student(flags)
    new = only_run_dir(tmp_path / "student_model")
    cfg = json.loads((new / "config.json").read_text(encoding="utf-8"))
    old = new.parent / legacy_run_name(cfg)
    assert old.name.startswith("S:resnet8_T:resnet14_digits_wttm_r:1.0_a:0.0_b:3.0_") and "_l:0.5_" in old.name
    new.rename(old)
    capsys.readouterr()
    run_student(flags + ["--resume", "--epochs", "2"])
    assert f"resumed {old} after epoch 1" in capsys.readouterr().out
    assert only_run_dir(tmp_path / "student_model") == old  # no second folder under the new name
    assert [r["epoch"] for r in read_metrics(old / "metrics.csv")[1]] == ["1", "2"]


# ---- files a team can read ------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_output_files_get_the_umask_mode(teacher, tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        run_student(args(teacher, tmp_path, "--seed", "1"))
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "resnet8_best.pth" for p in files) and any(p.suffix == ".txt" for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == \
        {p.name: oct(mode) for p in files}


# ---- messages that tell the truth -------------------------------------------------------------

def test_a_run_that_never_beats_zero_names_only_files_that_exist(teacher, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(helper.loop, "evaluate", lambda *a, **k: {"acc1": 0.0, "acc5": 0.0, "loss": 9.0})
    path = Path(run_student(args(teacher, tmp_path, "--seed", "1")))
    out = capsys.readouterr().out
    assert path.exists() and path.name == "resnet8_last.pth"
    assert "no best checkpoint was written" in out and "resnet8_best.pth" not in out


def test_teacher_folder_batch_too_large_and_plain_ce_warning(teacher, tmp_path, capsys):
    folder = Path(teacher).parent
    line = user_error(capsys, args(str(folder), tmp_path))
    assert "is a folder" in line and "resnet14_best.pth" in line
    line = user_error(capsys, args(teacher, tmp_path, "--batch_size", "4096"))
    assert "--batch_size 4096 is larger than the training set (64 images" in line
    assert not (tmp_path / "student_model").exists()  # refused before anything is written
    run_student(args(teacher, tmp_path, "--seed", "1"))  # the defaults: kd, -a 0, -b 0
    err = capsys.readouterr().err
    assert "warning: every distillation weight is 0" in err and "--add" in err and "-b" in err
    run_student(args(teacher, tmp_path, "--seed", "1", "--distill", "wttm"))
    assert "warning" not in capsys.readouterr().err


def test_config_records_resolved_values_as_readable_utf8(teacher, tmp_path):
    best = run_student(args(teacher, tmp_path, "--distill", "dkd", "--seed", "1"))
    text = (Path(best).parent / "config.json").read_text(encoding="utf-8")
    config = json.loads(text)
    assert config["dkd_beta"] == 8.0 and config["flags"]["dkd_beta"] is None  # resolved, and as given
    assert "1·CE" in text and "\\u00b7" not in text
    assert len(config["teacher_sha256"]) == 64


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        run_student(["--help"])
    out = capsys.readouterr().out
    for action in build_parser().flags:
        if action.option_strings and action.dest != "help":
            assert action.option_strings[-1] in out, action.dest
    blocks = out.split("\n  -")
    undocumented = [b.split()[0] for b in blocks[1:] if "default" not in b and not b.startswith("h,")]
    assert undocumented == [], undocumented
    assert "(default: 16384)" in out and "(default: off)" in out


def test_a_long_recipe_still_names_a_valid_folder():
    """The DeiT recipe's flags make a name beyond 255 bytes; it is cut with a hash of the
    whole, still tells runs apart and keeps the trial last."""
    deit = ["--dataset", "imagenet", "--opt", "adamw", "--wd_skip", "norm_bias_tokens", "--sched", "cosine",
            "--warmup_epochs", "20", "--min_lr", "1e-05", "--clip_grad", "5", "--smoothing", "0.1",
            "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25", "--train_interpolation", "bicubic",
            "--eval_interpolation", "bicubic", "--teacher_train_mode", "--teacher_drop_path", "0.05",
            "--batch_size", "1024", "--learning_rate", "0.001", "--weight_decay", "0.05"]
    long_name = _name(*deit)
    assert len(long_name.encode()) <= 200 and long_name.endswith("_trial0") and "_h" in long_name
    assert _name(*deit, "--clip_grad", "4") != long_name
    assert long_name.startswith("S-resnet8_T-resnet32x4_imagenet_crd+wttm_")
