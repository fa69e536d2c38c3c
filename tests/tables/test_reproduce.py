"""The table runner and the report: every cell's command, and a real miniature reproduction.

The miniature trains a tiny digits teacher with scripts/train_all_teachers.sh, puts it where
the recipe expects resnet56, runs KD and WTTM × 2 trials × 1 epoch through
scripts/reproduce.py (the student shrunk to resnet8 by pass-through flags, for speed), then
checks the report against the metrics files, a rerun that must run nothing, an unfinished
trial, and the submitit path.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys

import pytest

from train_utils import REPO

from paper_tables import recipes, trial_lock
from teacher_zoo.published import teacher_checkpoint
from train_utils import load_script

reproduce = load_script("reproduce")
summarize = load_script("summarize")


def _dry_run(capsys, *argv: str) -> list[list[str]]:
    """The commands a dry run prints, split into argument lists."""
    assert reproduce.main(["--dry-run", *argv]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def _flags(cmd: list[str]) -> dict[str, str]:
    """``--flag value`` pairs of a command (the last one wins, as in argparse)."""
    start = cmd.index("--path_t")
    args = cmd[start:]
    out, i = {}, 0
    while i < len(args):
        if args[i] == "--resume":
            out["--resume"] = ""
            i += 1
        else:
            out[args[i]] = args[i + 1]
            i += 2
    return out


def _cell(table, pair, method):
    return next(c for c in recipes.load_cells() if c.table == table and c.pair == pair and c.method == method)


# --- the dry run over both tables ----------------------------------------------------------

def test_dry_run_has_a_command_for_every_runnable_cell_and_trial(capsys):
    cmds = _dry_run(capsys, "--save_root", "/nonexistent/rep", "--", "--dataset", "digits", "--epochs", "1")
    defaults = [c for c in recipes.load_cells() if c.default]
    assert len(defaults) == 14 * 13  # 14 distillation rows × (7 + 6) pairs
    assert len(cmds) == sum(c.runs for c in defaults)
    by_run = {_flags(c)["--run_name"]: c for c in cmds}
    for cell in defaults:
        for k in range(1, cell.runs + 1):
            cmd = by_run[cell.run_name(k)]
            flags = _flags(cmd)
            assert flags["--path_t"] == teacher_checkpoint(os.path.join("save", "models"), cell.teacher)
            assert flags["--model_s"] == cell.student and flags["--trial"] == flags["--seed"] == str(k)
            assert "--resume" in flags and flags["--save_root"] == "/nonexistent/rep"
            assert flags["--teacher_cache"] == "build"  # the first logit run of a teacher builds it
            assert " ".join(cell.flags()) in " ".join(cmd)
            assert cmd[-4:] == ["--dataset", "digits", "--epochs", "1"]  # pass-through, last


def test_paper_run_counts_are_the_default_trials():
    cells = {(c.table, c.method): c.runs for c in recipes.load_cells() if c.default}
    assert cells[(1, "WTTM")] == 5 and cells[(1, "ITRD")] == 3 and cells[(1, "WTTM+ITRD")] == 3
    assert cells[(2, "WTTM")] == 3 and cells[(2, "KD")] == 3


@pytest.mark.parametrize("table, pair, method, expected", [
    (1, "resnet32x4:resnet8x4", "WTTM", "--distill wttm -r 1 -a 0 -b 3 --ttm_l 0.1"),
    (1, "resnet32x4:resnet8x4", "WTTM+CRD", "--distill crd --add wttm -r 1 -a 4 -b 0.8 --ttm_l 0.2"),
    (1, "vgg13:vgg8", "TTM", "--distill ttm -r 1 -a 0 -b 45 --ttm_l 0.1"),
    (1, "wrn_40_2:wrn_16_2", "KD", "--distill kd --add kd -r 0.1 -a 0.9 -b 0 --kd_T 4"),
    (1, "resnet110:resnet32", "WTTM+ITRD",
     "--distill itrd --add wttm -r 1 -a 0.015 -b 1 --ttm_l 0.3 --lambda_corr 2 --lambda_mutual 1 --alpha_it 1.01"),
    (2, "ResNet50:vgg8", "ITRD", "--distill itrd -r 1 -a 0 -b 1 --lambda_corr 2 --lambda_mutual 0 --alpha_it 1.5"),
    (1, "resnet56:resnet20", "DKD", "--distill dkd -r 1 -a 0 -b 1 --dkd_alpha 1 --dkd_beta 2 --dkd_T 4 --dkd_warmup 20"),
    (2, "vgg13:MobileNetV2", "DKD", "--dkd_beta 6"),
    (1, "resnet32x4:resnet8x4", "FitNet", "--distill hint -r 1 -a 0 -b 100 --hint_layer 2"),
    (1, "resnet32x4:resnet8x4", "CRD", "--distill crd -r 1 -a 0 -b 0.8 --feat_dim 128 --mode exact --nce_k 16384"),
])
def test_cell_flags_match_the_paper(table, pair, method, expected):
    flags = _cell(table, pair, method).flags()
    pairs = dict(zip(flags[::2], flags[1::2]))
    wanted = expected.split()
    assert len(flags) % 2 == 0 and dict(zip(wanted[::2], wanted[1::2])).items() <= pairs.items()


def test_dist_takes_its_official_cifar_config_and_cites_it(capsys):
    """hunto/image_classification_sota dist_cifar.yaml: kd_loss_weight 2, kd dist_t4 (β = γ = 1, τ 4)."""
    with open(recipes.RECIPES_JSON) as handle:
        data = json.load(handle)
    assert "dist_cifar.yaml" in data["source_tags"]["dist-cifar-config"]
    assert "resnet_dist.yaml" in data["source_tags"]["dist-imagenet-config"]
    dist = [e for e in data["entries"] if e["method"] == "DIST"]
    assert len(dist) == 13 and all(e["hyperparameters"]["b"] == {**e["hyperparameters"]["b"], "value": 2.0,
                                                                  "source": "dist-cifar-config"} for e in dist)
    for table in ("1", "2"):
        cmds = [c for c in _dry_run(capsys, "--table", table, "--method", "DIST", "--trials", "1")]
        assert len(cmds) == {"1": 7, "2": 6}[table]
        for cmd in cmds:
            flags = _flags(cmd)
            assert (flags["--distill"], flags["-r"], flags["-a"], flags["-b"]) == ("dist", "1", "0", "2")
            assert (flags["--dist_beta"], flags["--dist_gamma"], flags["--dist_tau"]) == ("1", "1", "4")
    assert not _cell(1, "resnet56:resnet20", "DIST").note  # a sourced value, not a gap we filled


def test_gaps_in_the_paper_are_filled_and_marked():
    for table, pair in ((1, "resnet110:resnet20"), (2, "ResNet50:vgg8")):
        dkd = _cell(table, pair, "DKD")
        assert dkd.paper is None and "--dkd_beta 8" in " ".join(dkd.flags()) and "no paper value" in dkd.note
    no_ce = _cell(1, "resnet32x4:resnet8x4", recipes.WTTM_NO_CE)
    assert not no_ce.default and "-r 0" in " ".join(no_ce.flags()) and "--ttm_l 0.5" in " ".join(no_ce.flags())
    student = _cell(2, "wrn_40_2:ShuffleV1", "student")
    assert not student.default and student.flags() == ["--distill", "kd", "-r", "1", "-a", "0", "-b", "0"]
    assert not _cell(1, "vgg13:vgg8", "teacher").runnable


def test_flags_agree_with_the_recipe_commands():
    """Where recipes.json spells out the official command, our flags say the same."""
    with open(recipes.RECIPES_JSON) as handle:
        entries = json.load(handle)["entries"]
    checked = 0
    for e in entries:
        if not (e["command"] or "").startswith("python3 train_student.py"):
            continue
        official = shlex.split(e["command"])[2:]
        table = int(e["brief_table"].split()[-1])
        ours = ["--path_t", "x", "--model_s", e["student"],
                *_cell(table, f"{e['teacher']}:{e['student']}", e["method"]).flags()]
        theirs, mine = _flags(official), _flags(ours)
        for flag, value in theirs.items():
            if flag in ("--path_t", "--trial"):
                continue
            assert flag in mine and (mine[flag] == value or float(mine[flag]) == float(value)), (e["id"], flag)
        checked += 1
    assert checked >= 90  # TTM, WTTM, the combinations, CRD, ITRD and KD on every pair


def test_every_flag_is_one_train_student_accepts():
    from helper.student_flags import build_parser
    parser = build_parser()
    seen = set()
    for cell in recipes.load_cells():
        if cell.runnable and tuple(cell.flags()[::2]) not in seen:
            seen.add(tuple(cell.flags()[::2]))
            parser.parse_args(["--path_t", "t.pth", "--model_s", cell.student, *cell.flags()])


def test_selection_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as err:
        reproduce.main(["--dry-run", "--method", "nope"])
    assert err.value.code == 2 and "unknown method 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["--dry-run", "--table", "2", "--pair", "resnet56:resnet20"])
    with pytest.raises(SystemExit):
        reproduce.main(["--dry-run", "--method", "teacher"])
    assert "not a distillation run" in capsys.readouterr().err


def test_method_names_are_forgiving(capsys):
    cmds = _dry_run(capsys, "--pair", "resnet32x4:resnet8x4", "--method", "wttm_plus_crd",
                    "--method", "wttm w/o ce", "--trials", "1")
    assert [_flags(c)["--run_name"] for c in cmds] == [
        "table1/resnet32x4-resnet8x4/WTTM_plus_CRD/trial_1", "table1/resnet32x4-resnet8x4/WTTM_w_o_CE/trial_1"]


def test_a_live_lock_keeps_a_trial_from_running_twice(tmp_path, capsys):
    run_dir = tmp_path / "student_model" / "table1" / "resnet56-resnet20" / "KD" / "trial_1"
    run_dir.mkdir(parents=True)
    lock = run_dir / trial_lock.LOCK
    argv = ["--save_root", str(tmp_path), "--pair", "resnet56:resnet20", "--method", "KD", "--trials", "1"]
    lock.write_text(json.dumps({"token": "x", "host": trial_lock.socket.gethostname(), "pid": os.getpid()}))
    assert _dry_run(capsys, *argv) == []  # held by a live process: nothing to run
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(json.dumps({"token": "x", "host": trial_lock.socket.gethostname(), "pid": int(dead.stdout)}))
    assert len(_dry_run(capsys, *argv)) == 1  # a stale lock does not block
    assert trial_lock.acquire(str(run_dir), "mine") == "" and json.loads(lock.read_text())["token"] == "mine"
    trial_lock.release(str(run_dir), "mine")
    assert not lock.exists()


# --- a real miniature reproduction on digits ------------------------------------------------

PAIR, METHODS = "resnet56:resnet20", ("KD", "WTTM")
PASS = ["--dataset", "digits", "--epochs", "1", "--model_s", "resnet8", "--print_freq", "1000"]


def _run(args: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, **kw)


def _reproduce(root, methods=METHODS, trials=2, *extra: str) -> list[str]:
    method_args = [a for m in methods for a in ("--method", m)]
    # --teacher_cache off: building a cache of digits' 218k views would dominate these tiny runs
    return [sys.executable, "scripts/reproduce.py", *extra, "--gpus", "cpu", "--jobs-per-gpu", "2",
            "--teacher_cache", "off",
            "--pair", PAIR, *method_args,
            "--trials", str(trials), "--save_root", str(root / "rep"), "--teacher_root", str(root / "teachers"),
            "--", *PASS]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini")
    teachers = root / "teachers"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KD_TEACHER_DIR": str(teachers), "PYTHON": sys.executable}
    out = _run(["bash", "scripts/train_all_teachers.sh", "resnet8", "--dataset", "digits", "--epochs", "1",
                "--save_root", str(root / "train"), "--device", "cpu", "--print_freq", "1000"], env)
    assert out.returncode == 0, out.stdout + out.stderr
    tiny = teachers / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    assert tiny.exists() and "all 1 teacher(s) in place" in out.stdout
    # the recipe's teacher for resnet56:resnet20, made tiny (the checkpoint records arch resnet8)
    (teachers / "resnet56_vanilla").mkdir()
    shutil.copy(tiny, teachers / "resnet56_vanilla" / "ckpt_epoch_240.pth")
    argv = _reproduce(root)
    first = _run(argv, env)
    assert first.returncode == 0, first.stdout + first.stderr
    return {"root": root, "env": env, "argv": argv, "first": first, "rep": root / "rep"}


def _trial_dirs(rep, method):
    return sorted((rep / "student_model" / "table1" / "resnet56-resnet20" / method).glob("trial_*"))


def _curve(trial_dir):
    with open(trial_dir / "metrics.csv") as handle:
        return [float(r["test_acc"]) for r in csv.DictReader(handle)]


def _report_rows(rep):
    summarize.main(["--save_root", str(rep)])
    with open(rep / "report" / "report.csv") as handle:
        return {r["method"]: r for r in csv.DictReader(handle)}


def test_miniature_reproduction_runs_every_trial(mini):
    assert "4 to run (4 new" in mini["first"].stdout
    assert mini["first"].stdout.count(" done ") == 4
    for method in METHODS:
        dirs = _trial_dirs(mini["rep"], method)
        assert [d.name for d in dirs] == ["trial_1", "trial_2"]
        for d in dirs:
            summary = json.loads((d / "summary.json").read_text())
            config = json.loads((d / "config.json").read_text())
            assert summary["finished"] and summary["epochs"] == 1
            assert config["dataset"] == "digits" and config["model_s"] == "resnet8"
            assert config["distill"] == {"KD": "kd", "WTTM": "wttm"}[method]


def test_report_numbers_match_the_metrics_files(mini, capsys):
    rows = _report_rows(mini["rep"])
    printed = capsys.readouterr().out
    assert "best" in printed and "last" in printed and "resnet56→resnet20" in printed
    for method in METHODS:
        curves = [_curve(d) for d in _trial_dirs(mini["rep"], method)]
        best, last = [max(c) for c in curves], [c[-1] for c in curves]
        row, paper = rows[method], _cell(1, PAIR, method).paper
        assert int(row["n_finished"]) == 2 and int(row["n_unfinished"]) == 0
        assert float(row["best_mean"]) == pytest.approx(statistics.fmean(best), abs=1e-3)
        assert float(row["best_std"]) == pytest.approx(statistics.stdev(best), abs=1e-3)
        assert float(row["last_mean"]) == pytest.approx(statistics.fmean(last), abs=1e-3)
        assert float(row["paper"]) == paper
        assert float(row["diff_best"]) == pytest.approx(statistics.fmean(best) - paper, abs=1e-3)
        png = mini["rep"] / "report" / "curves" / "table1" / "resnet56-resnet20" / f"{method}.png"
        assert png.stat().st_size > 1000
    md = (mini["rep"] / "report" / "report.md").read_text()
    assert "best-epoch" in md and "last epoch" in md and "| KD | best |" in md


def test_rerun_runs_nothing(mini):
    stamps = {d: (d / "metrics.csv").stat().st_mtime_ns for m in METHODS for d in _trial_dirs(mini["rep"], m)}
    again = _run(mini["argv"], mini["env"])
    assert again.returncode == 0 and "0 to run" in again.stdout and "4 finished" in again.stdout
    assert " done " not in again.stdout
    assert stamps == {d: (d / "metrics.csv").stat().st_mtime_ns for d in stamps}


def test_unfinished_trial_is_counted_apart_then_resumed_through_submitit(mini, capsys):
    rep = mini["rep"]
    trial_2 = _trial_dirs(rep, "KD")[1]
    (trial_2 / "summary.json").unlink()  # as if killed before its end
    before = _report_rows(rep)["KD"]
    assert (before["n_finished"], before["n_unfinished"]) == ("1", "1")
    assert before["best_mean"] == f"{max(_curve(_trial_dirs(rep, 'KD')[0])):.4f}"
    assert "1 +1 unfinished" in capsys.readouterr().out
    planned = _run(_reproduce(mini["root"], ["KD"], 2, "--dry-run"), mini["env"])
    lines = [ln for ln in planned.stdout.splitlines() if not ln.startswith("#")]
    assert len(lines) == 1 and "KD/trial_2" in lines[0] and "--resume" in lines[0]
    submitted = _run(_reproduce(mini["root"], ["KD"], 2, "--slurm", "--slurm_cluster", "local",
                                "--slurm_time", "10"), mini["env"], timeout=600)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "submitted table1/resnet56-resnet20/KD/trial_2" in submitted.stdout
    assert json.loads((trial_2 / "summary.json").read_text())["finished"]
    after = _report_rows(rep)["KD"]
    curves = [_curve(d) for d in _trial_dirs(rep, "KD")]
    assert after["n_finished"] == "2" and after["n_unfinished"] == "0"
    assert float(after["best_mean"]) == pytest.approx(statistics.fmean(max(c) for c in curves), abs=1e-3)


def test_verify_scores_a_teacher_against_an_expected_table(mini, capsys):
    from teacher_zoo import cli as teachers
    root = str(mini["root"] / "teachers")
    import torch
    stored = torch.load(os.path.join(root, "resnet8_vanilla", "ckpt_epoch_240.pth"),
                        map_location="cpu", weights_only=True)["best_acc"]
    argv = ["verify", "resnet8", "--root", root, "--dataset", "digits", "--device", "cpu"]
    assert teachers.main(argv + ["--expected", f"resnet8={stored}"]) == 0
    assert "ok" in capsys.readouterr().out
    assert teachers.main(argv + ["--expected", f"resnet8={stored + 5}"]) == 1
    assert "FLAG" in capsys.readouterr().out
