"""The report on runs outside reproduce.py's layout: grouped by config.json, not by name.

Run folders are written here as ``train_student.py`` leaves them (``config.json``,
``metrics.csv``, ``summary.json``), with made-up accuracies, so every expected number is
computed from the files in the test.
"""
from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest

from train_utils import REPO

from paper_tables import run_groups
from train_utils import load_script



summarize = load_script("summarize")

BASE = {"model_t": "resnet32x4", "model_s": "resnet8x4", "distill": "wttm", "add": "kd", "gamma": 1.0,
        "alpha": 0.0, "beta": 3.0, "ttm_l": 0.1, "kd_T": 4.0, "epochs": 3, "dataset": "cifar100",
        "lr_decay_epochs": [150, 180, 210], "batch_size": 64}


def _run(root, name: str, config: dict, accs: list[float], finished: bool = True) -> None:
    folder = root / "student_model" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    rows = ["epoch,lr,train_loss,test_acc"] + [f"{i},0.05,1.5,{a}" for i, a in enumerate(accs, 1)]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")
    if finished:
        (folder / "summary.json").write_text(json.dumps({"finished": True, "best_acc": max(accs),
                                                         "last_acc": accs[-1], "epochs": len(accs)}))


def _trial_config(k: int, **changes) -> dict:
    """What differs between trials of one configuration: identity, paths, output flags (at the
    top level and in the ``flags`` as given, which config.json also records)."""
    own = {"trial": str(k), "seed": 100 + k, "run_name": None, "save_root": f"/scratch/{k}",
           "path_t": f"/teachers/{k}.pth", "data_folder": f"./data{k}", "device": ["cuda", "cpu", "cuda:1"][k % 3],
           "print_freq": 10 * k, "resume": k == 3}
    config = {**BASE, **own, "seed_drawn": k == 2, "teacher_test_acc": 79.4 + k / 100, **changes}
    return {**config, "flags": {**BASE, **own, "alpha": None if k == 2 else 0.0, **changes}}


def _rows(out) -> list[dict]:
    with open(out / "runs.csv") as handle:
        return list(csv.DictReader(handle))


def test_plain_runs_group_by_config_not_by_name(tmp_path, capsys):
    curves = {1: [10, 30, 20], 2: [15, 25, 35], 3: [12, 40, 38]}
    for k, accs in curves.items():  # names as the seed, and the lead's longer default, would write them
        _run(tmp_path, ["S:resnet8x4_T:resnet32x4_cifar100_wttm_r:1.0_a:0.0_b:3.0_1",
                        "S:resnet8x4_T:resnet32x4_cifar100_wttm_l:0.1_r:1_a:0_b:3_seed:102_2",
                        f"sweeps/mine/run{k}"][k - 1], _trial_config(k), accs)
    _run(tmp_path, "S:resnet8x4_T:resnet32x4_cifar100_wttm_r:1.0_a:0.0_b:3.0_x", _trial_config(1, ttm_l=0.2),
         [40, 42, 41])
    _run(tmp_path, "crd_1", _trial_config(1, distill="crd", add="wttm", alpha=4.0, beta=0.8), [50, 51], finished=False)
    assert summarize.main(["--save_root", str(tmp_path), "--no_plots"]) == 0
    printed = capsys.readouterr().out
    rows = _rows(tmp_path / "report")
    assert len(rows) == 3
    same = next(r for r in rows if r["other"] == "ttm_l=0.1")
    best, last = [max(c) for c in curves.values()], [c[-1] for c in curves.values()]
    assert (same["method"], same["r"], same["a"], same["b"]) == ("wttm", "1", "0", "3")
    assert same["n_finished"] == "3" and same["n_unfinished"] == "0"
    assert float(same["best_mean"]) == pytest.approx(statistics.fmean(best), abs=1e-3)
    assert float(same["best_std"]) == pytest.approx(statistics.stdev(best), abs=1e-3)
    assert float(same["last_mean"]) == pytest.approx(statistics.fmean(last), abs=1e-3)
    assert len(same["runs"].split(";")) == 3 and "sweeps/mine/run3" in same["runs"]
    single = next(r for r in rows if r["other"] == "ttm_l=0.2")
    assert single["n_finished"] == "1" and single["best_std"] == "" and float(single["best_mean"]) == 42
    crd = next(r for r in rows if r["method"] == "crd+wttm")
    assert (crd["n_finished"], crd["n_unfinished"], crd["best_mean"]) == ("0", "1", "")
    assert f"{statistics.fmean(best):.2f} ± {statistics.stdev(best):.2f}" in printed
    assert "0 +1 unfinished" in printed and "one row per configuration" in printed
    assert "| crd+wttm |" in (tmp_path / "report" / "report.md").read_text()


def test_reproduce_trials_fill_the_table_and_other_runs_stay_apart(tmp_path, capsys):
    trial = tmp_path / "student_model" / "table1" / "resnet56-resnet20" / "KD"
    for k, accs in ((1, [60, 70]), (2, [65, 66])):
        _run(tmp_path, f"table1/resnet56-resnet20/KD/trial_{k}",
             _trial_config(k, model_t="resnet56", model_s="resnet20", distill="kd", alpha=0.9), accs)
    _run(tmp_path, "mine", _trial_config(1), [30, 31])
    assert summarize.main(["--save_root", str(tmp_path), "--no_plots"]) == 0
    out = capsys.readouterr().out
    assert "Table 1" in out and "resnet56→resnet20" in out and "Other runs" in out
    rows = _rows(tmp_path / "report")
    assert [r["runs"] for r in rows] == ["mine"]  # the trials are the table's, not runs.csv's
    with open(tmp_path / "report" / "report.csv") as handle:
        kd = next(r for r in csv.DictReader(handle) if r["method"] == "KD")
    assert kd["n_finished"] == "2" and float(kd["best_mean"]) == pytest.approx(68.0)
    assert trial.exists()
    os.remove(tmp_path / "report" / "runs.csv")
    assert summarize.main(["--save_root", str(tmp_path), "--no_plots", "--table", "1"]) == 0
    assert "Other runs" not in capsys.readouterr().out and not (tmp_path / "report" / "runs.csv").exists()


def test_training_config_drops_identity_paths_and_output_flags():
    kept = run_groups.training_config(_trial_config(1, my_folder="/x", path_extra="y", new_flag=3))
    # kd_T is --add kd's, and -a 0 leaves that loss out; a flag added later still separates runs
    assert kept == {**{k: v for k, v in BASE.items() if k != "kd_T"}, "new_flag": 3}
    assert run_groups.training_config(_trial_config(1)) == run_groups.training_config(_trial_config(2))


def _recorded(k: int, **changes) -> dict:
    """A trial's config.json with what a run records about itself beside its flags."""
    config = _trial_config(k, **changes)
    return {**config, "teacher_sha256": f"{k}" * 64, "world_size": k, "base_learning_rate": 0.05,
            "teacher_cache_use": {"mode": "auto", "used": k % 2 == 0, "built": False}}


def test_groups_follow_the_flags_that_act_not_what_a_run_recorded(tmp_path, capsys):
    for k in (1, 2, 3):  # one configuration, whatever each run recorded about itself
        _run(tmp_path, f"wttm{k}", _recorded(k), [20.0 + k, 30.0])
    crd = dict(distill="crd", add="none", alpha=0.0, beta=0.8, nce_k=4096)
    for k, ttm_l in ((1, 0.1), (2, 0.7)):  # --ttm_l does not act on a CRD run
        _run(tmp_path, f"crd{k}", _recorded(k, ttm_l=ttm_l, **crd), [40.0, 41.0 + k])
    assert summarize.main(["--save_root", str(tmp_path), "--no_plots"]) == 0
    printed = capsys.readouterr().out
    rows = {r["method"]: r for r in _rows(tmp_path / "report")}
    assert sorted(rows) == ["crd", "wttm"] and rows["wttm"]["n_finished"] == "3" and rows["crd"]["n_finished"] == "2"
    assert "ttm_l" not in rows["crd"]["other"] and "nce_k=4096" in rows["crd"]["other"]
    assert "ttm_l=0.1" in rows["wttm"]["other"] and "nce_k" not in rows["wttm"]["other"]
    for field in ("teacher_sha256", "teacher_cache_use", "world_size", "base_learning_rate"):
        assert field not in printed


def test_long_settings_wrap_instead_of_widening_every_row(tmp_path, capsys):
    for k, note in ((1, "short"), (2, "a long value " * 12)):
        _run(tmp_path, f"run{k}", _trial_config(1, note=note.strip()), [10.0, 11.0])
    assert summarize.main(["--save_root", str(tmp_path), "--no_plots"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()
    assert max(len(line) for line in table) < 150, table
    assert len(table) > 4  # the long value continues on further lines of its row
    text = " ".join(" ".join(line.split()) for line in table)
    assert "a long value" in text and "note=short" in text


def test_nothing_understood_names_the_layouts_it_expects(tmp_path, capsys):
    (tmp_path / "student_model" / "old_run").mkdir(parents=True)
    (tmp_path / "student_model" / "old_run" / "metrics.csv").write_text("epoch,test_acc\n1,5\n")
    messages = []
    for root in (tmp_path, tmp_path / "nothing_here"):
        with pytest.raises(SystemExit) as err:
            summarize.main(["--save_root", str(root), "--no_plots"])
        messages.append(capsys.readouterr().err.strip().splitlines())
        assert err.value.code == 2
        last = messages[-1][-1]
        assert last.startswith("error: nothing to report under") and "metrics.csv" in last and "config.json" in last
        assert "table<T>/<teacher>-<student>/<method>/trial_<k>/" in last and "<run_name>/" in last
    assert len(messages[0]) == 2 and "without a readable config.json left out: old_run" in messages[0][0]
    assert len(messages[1]) == 1


def test_report_into_a_closed_pipe_ends_quietly(tmp_path):
    for k in range(60):  # rows padded to the widest 'other' value: well over a pipe's 64 kB
        _run(tmp_path, f"run{k}", _trial_config(1, note=f"{k}-" + "x" * 1500), [10.0 + k, 11.0])
    proc = subprocess.Popen([sys.executable, "scripts/summarize.py", "--save_root", str(tmp_path), "--no_plots"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read()
    assert first.startswith("Other runs under") and proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
