"""The table runner's local mode, without training: ``| head``, ``--gpus``, method spellings,
progress and ETAs.

Runs go through a fake ``train_student.py`` (``--python`` names a wrapper that runs
:data:`FAKE`): it records its command line and environment (``launch.json``; a rank r > 0
of a distributed job ``launch_rank<r>.json``), then rank 0 writes one ``metrics.csv`` row
(test accuracy 10 × epoch) every ``--delay`` seconds and a ``summary.json`` at the end, as
the real one does.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest

from train_utils import REPO

from paper_tables import gpu_slots, packing, recipes, trial_lock, trial_progress
from train_utils import load_script
from paper_tables.slurm_runner import slurm_job_function
from paper_tables.trial_plan import paper_method
from errors import UserError



reproduce = load_script("reproduce")

FAKE = r'''
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
for flag in ("--save_root", "--run_name", "--device"):
    p.add_argument(flag)
p.add_argument("--epochs", type=int, default=3)
p.add_argument("--delay", type=float, default=0.0)
a, _ = p.parse_known_args(sys.argv[2:])
d = os.path.join(a.save_root, "student_model", a.run_name)
os.makedirs(d, exist_ok=True)
rank = int(os.environ.get("RANK", "0"))
env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                      "OMP_NUM_THREADS")}
with open(os.path.join(d, "launch.json" if rank == 0 else f"launch_rank{rank}.json"), "w") as h:
    json.dump({"argv": sys.argv[1:], "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(), **env}, h)
if rank:
    sys.exit(0)
with open(os.path.join(d, "config.json"), "w") as h:
    json.dump({"epochs": a.epochs}, h)
rows = ["epoch,test_acc"]
for e in range(1, a.epochs + 1):
    time.sleep(a.delay)
    rows.append(f"{e},{10 * e}")
    with open(os.path.join(d, "m.tmp"), "w") as h:
        h.write("\n".join(rows) + "\n")
    os.replace(os.path.join(d, "m.tmp"), os.path.join(d, "metrics.csv"))
with open(os.path.join(d, "summary.json"), "w") as h:
    json.dump({"finished": True, "best_acc": 10.0 * a.epochs, "last_acc": 10.0 * a.epochs}, h)
'''
PAIR = "resnet56:resnet20"
TRIAL_DIR = ("student_model", "table1", "resnet56-resnet20", "KD")


@pytest.fixture
def fake(tmp_path):
    """A wrapper to pass as --python, a teacher file where the recipe expects it, and argv."""
    (tmp_path / "fake_train.py").write_text(FAKE)
    wrapper = tmp_path / "fake_python"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / "fake_train.py"))} "$@"\n')
    wrapper.chmod(0o755)
    teacher = tmp_path / "teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"not read by the runner")

    def argv(*extra: str, trials: int = 1, epochs: int = 1, delay: float = 0.0) -> list[str]:
        return ["--pair", PAIR, "--method", "KD", "--trials", str(trials), "--python", str(wrapper),
                "--save_root", str(tmp_path / "rep"), "--teacher_root", str(tmp_path / "teachers"), *extra,
                "--", "--dataset", "digits", "--epochs", str(epochs), "--delay", str(delay)]

    argv.root = tmp_path / "rep"
    return argv


def _trial(root, k: int):
    return root.joinpath(*TRIAL_DIR, f"trial_{k}")


def _launch(root, k: int) -> dict:
    return json.loads((_trial(root, k) / "launch.json").read_text())


def _closed_early(argv: list[str], lines: int, wait_for=None) -> tuple[int, list[str], str]:
    """Runs a script with stdout a pipe that is closed after ``lines`` lines (``| head``),
    and after ``wait_for`` (a path) exists, if given."""
    proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    read = [proc.stdout.readline() for _ in range(lines)]
    deadline = time.time() + 60
    while wait_for is not None and not wait_for.exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.stdout.close()
    err = proc.stderr.read()
    return proc.wait(timeout=60), read, err


# --- | head -------------------------------------------------------------------------------

def test_dry_run_into_a_closed_pipe_ends_quietly(tmp_path):
    code, read, err = _closed_early(["scripts/reproduce.py", "--table", "1", "--dry-run",
                                     "--save_root", str(tmp_path)], 3)
    assert read[0].startswith("# 462 trials") and "train_student.py" in read[2]
    assert code == 141  # the plan (about 130 kB) was cut off mid-print
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_run_into_a_closed_pipe_stops_its_trials_quietly(fake):
    trial = _trial(fake.root, 1)
    code, read, err = _closed_early(["scripts/reproduce.py", *fake("--gpus", "cpu", "--progress_s", "0.2",
                                                                    epochs=50, delay=0.2)],
                                    3, wait_for=trial / "launch.json")
    assert read[0].startswith("# 1 trial") and read[1].startswith("# runs at once: the CPU ×1")
    assert read[2].startswith("start") and code == 141
    assert "Traceback" not in err and "BrokenPipe" not in err
    assert not (trial / "summary.json").exists()  # stopped mid-run, at the next progress print
    assert not (trial / trial_lock.LOCK).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(_launch(fake.root, 1)["pid"], 0)


# --- --gpus --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, visible, message", [
    ("0,,x", 4, "id 2 is empty"), ("x", 4, "'x' is not a GPU id"), ("-1", 4, "'-1' is not a GPU id"),
    ("", 4, "id 1 is empty"), ("1,0,1", 4, "GPU 1 is listed twice"), ("3", 1, "there is no GPU 3"),
    ("0", 0, "sees no GPU"),
])
def test_bad_gpu_ids_are_refused(spec, visible, message):
    with pytest.raises(UserError, match=re.escape(message)):
        gpu_slots.gpu_slots(spec, 1, visible)


Slot, CPU = gpu_slots.Slot, gpu_slots.Slot()


@pytest.mark.parametrize("spec, jobs, visible, per_run, slots", [
    (None, 2, 2, 1, [Slot((0,)), Slot((1,))] * 2),  # round-robin: the first runs spread over the GPUs
    (None, 1, 0, 1, [CPU]), ("cpu", 3, 8, 1, [CPU] * 3), ("CPU", 1, 0, 1, [CPU]),
    ("2, 0", 1, 3, 1, [Slot((2,)), Slot((0,))]),
    ("0,1,2,3", 1, 4, 2, [Slot((0, 1), 2), Slot((2, 3), 2)]),
    (None, 2, 4, 4, [Slot((0, 1, 2, 3), 4)] * 2), ("cpu", 1, 2, 2, [Slot((), 2)]),
])
def test_good_gpu_ids_make_slots(spec, jobs, visible, per_run, slots):
    assert gpu_slots.gpu_slots(spec, jobs, visible, per_run) == slots


def test_gpus_that_do_not_split_into_runs_are_refused():
    with pytest.raises(UserError, match=r"--gpus_per_run 2 needs the GPUs in groups of 2, but 3 GPUs \(0,1,2\)"):
        gpu_slots.gpu_slots("0,1,2", 1, 4, 2)


def test_a_slot_maps_through_our_own_visible_devices():
    cuda = ["--device", "cuda"]
    assert gpu_slots.slot_launch(Slot((1,)), {"CUDA_VISIBLE_DEVICES": "5,7"}) == (cuda, {"CUDA_VISIBLE_DEVICES": "7"})
    assert gpu_slots.slot_launch(Slot((1,)), {}) == (cuda, {"CUDA_VISIBLE_DEVICES": "1"})
    assert gpu_slots.slot_launch(CPU, {"CUDA_VISIBLE_DEVICES": "5"}) == (["--device", "cpu"], {"CUDA_VISIBLE_DEVICES": ""})
    group = Slot((0, 2), 2)
    assert gpu_slots.slot_launch(group, {"CUDA_VISIBLE_DEVICES": "4,5,6"}, threads=3) == (
        cuda, {"CUDA_VISIBLE_DEVICES": "4,6", "OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"})
    assert gpu_slots.slot_name(group) == "GPUs 0,2" and gpu_slots.slot_name(Slot((), 2)) == "the CPU (2 processes)"


@pytest.mark.parametrize("gpus, visible", [("0,,x", 2), ("3", 1), ("0,0", 2)])
def test_bad_gpus_are_one_line_before_anything_runs(fake, monkeypatch, capsys, gpus, visible):
    monkeypatch.setattr(gpu_slots, "visible_gpu_count", lambda: visible)
    for extra in (["--dry-run"], []):
        with pytest.raises(SystemExit) as err:
            reproduce.main(fake("--gpus", gpus, *extra))
        out = capsys.readouterr()
        assert err.value.code == 2 and out.out == ""
        assert out.err.count("\n") == 1 and out.err.startswith(f"error: --gpus '{gpus}'")
    assert not fake.root.exists()


def test_gpu_and_cpu_slots_tell_train_student_their_device(fake, monkeypatch, capsys):
    monkeypatch.setattr(gpu_slots, "visible_gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert reproduce.main(fake("--gpus", "1", trials=1)) == 0
    launched = _launch(fake.root, 1)
    assert launched["argv"][-2:] == ["--device", "cuda"] and launched["cuda"] == "7"
    assert "on GPU 1" in capsys.readouterr().out
    assert reproduce.main(fake("--gpus", "cpu", trials=2)) == 0  # trial 1 is finished: only trial 2 runs
    launched = _launch(fake.root, 2)
    assert launched["argv"][-2:] == ["--device", "cpu"] and launched["cuda"] == ""
    assert "on the CPU" in capsys.readouterr().out


@pytest.mark.parametrize("flag", [["--device", "cuda:1"], ["--device=cpu"], ["--dev", "cpu"]])
def test_a_device_after_double_dash_is_refused_locally(fake, capsys, flag):
    argv = fake("--gpus", "cpu") + flag
    with pytest.raises(SystemExit) as err:
        reproduce.main(argv)
    message = capsys.readouterr().err
    assert err.value.code == 2 and message.count("\n") == 1 and "--gpus" in message
    assert reproduce.main(fake("--slurm", "--dry-run") + flag) == 0  # a SLURM job's device is the user's call
    assert capsys.readouterr().out.rstrip().endswith(shlex.join(flag))


def test_a_run_on_several_gpus_is_launched_through_torchrun(fake, monkeypatch, capsys):
    monkeypatch.setattr(gpu_slots, "visible_gpu_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(packing, "available_cores", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert reproduce.main(fake("--gpus", "1,2,3,0", "--gpus_per_run", "2", "--jobs-per-gpu", "2", trials=1)) == 0
    launched = _launch(fake.root, 1)
    argv = launched["argv"]
    assert argv[:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train_student.py"]
    assert argv[-2:] == ["--device", "cuda"] and launched["cuda"] == "5,6"  # the first group: GPUs 1 and 2
    assert launched["OMP_NUM_THREADS"] == "2"  # 16 cores over 2 groups × 2 runs × 2 processes
    out = capsys.readouterr().out
    assert "GPUs 1,2 ×2 (--device cuda, CUDA_VISIBLE_DEVICES=5,6, torchrun ×2)" in out and "on GPUs 1,2" in out


# --- --method spellings ---------------------------------------------------------------------

def _run_names(capsys, *methods: str) -> list[str]:
    argv = ["--dry-run", "--pair", "resnet32x4:resnet8x4", "--trials", "1"]
    assert reproduce.main(argv + [a for m in methods for a in ("--method", m)]) == 0
    return [shlex.split(line)[shlex.split(line).index("--run_name") + 1]
            for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]


def test_method_takes_train_student_spellings(capsys):
    names = _run_names(capsys, "crd+wttm", "WTTM", "hint", "kd", "Wttm+Crd", "ITRD+wttm")
    # kd is the KD row, not the opt-in plain student; crd+wttm and Wttm+Crd are one row
    assert sorted(n.split("/")[2] for n in names) == ["FitNet", "KD", "WTTM", "WTTM_plus_CRD", "WTTM_plus_ITRD"]


def test_each_row_has_one_train_student_spelling():
    """Every default row is reached by its --distill (+ weighted --add) names, in either order."""
    cells = recipes.load_cells()
    for cell in (c for c in cells if c.default):
        flags = cell.flags()
        names = {flags[flags.index("--distill") + 1]}
        if "--add" in flags:
            names.add(flags[flags.index("--add") + 1])
        for spelled in ("+".join(sorted(names)), "+".join(sorted(names, reverse=True)).upper()):
            assert paper_method(spelled, cells) == cell.method, spelled
    assert paper_method("no_such", cells) == "no_such"


# --- progress -------------------------------------------------------------------------------

PROGRESS = re.compile(r"^  (\S+) on the CPU: epoch (\d+)/(\d+), test acc ([\d.]+) \(best ([\d.]+)\), "
                      r"(\S+) elapsed, ETA (\S+)$")


def test_progress_lines_come_between_start_and_done(fake, capsys):
    assert reproduce.main(fake("--gpus", "cpu", "--progress_s", "0.3", trials=2, epochs=4, delay=0.25)) == 0
    lines = capsys.readouterr().out.splitlines()
    for k in (1, 2):
        name = f"table1/resnet56-resnet20/KD/trial_{k}"
        start = lines.index(f"start  {name} on the CPU")
        done = next(i for i, line in enumerate(lines) if line.startswith(f"[{k}/2] done   {name}:"))
        mine = [PROGRESS.match(line) for line in lines[start:done]]
        mine = [m for m in mine if m and m.group(1) == name]
        assert mine, lines
        for m in mine:
            epoch = int(m.group(2))
            assert 1 <= epoch <= 4 and m.group(3) == "4"
            assert float(m.group(4)) == float(m.group(5)) == 10.0 * epoch  # the fake's own rows
            assert m.group(7) != "?"
    heads = [line for line in lines if line.startswith("progress: ")]
    assert any("1 running, 1 queued" in h for h in heads)
    assert all(re.search(r"plan ETA (\d+s|\?)$", h) for h in heads)


def _metrics(folder, epochs: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["epoch,lr,test_acc"] + [f"{e},0.05,{50 + e % 3}" for e in range(1, epochs + 1)]
    (folder / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_status_and_etas_from_metrics(tmp_path):
    _metrics(tmp_path / "a", 10)
    a = trial_progress.read_status(str(tmp_path / "a"), started_s=1000.0, start_epoch=0, total=100, now_s=1100.0)
    assert (a.epoch, a.total, a.last_acc, a.best_acc, a.s_per_epoch) == (10, 100, 51.0, 52.0, 10.0)
    assert a.remaining_s() == 900.0
    assert trial_progress.describe(a) == ("epoch 10/100, test acc 51.00 (best 52.00), 1m40s elapsed, ETA 15m00s")
    _metrics(tmp_path / "b", 50)  # resumed at epoch 40: only 10 epochs are this run's
    (tmp_path / "b" / "config.json").write_text(json.dumps({"epochs": 60}))
    b = trial_progress.read_status(str(tmp_path / "b"), started_s=0.0, start_epoch=40, total=100, now_s=50.0)
    assert (b.total, b.s_per_epoch, b.remaining_s()) == (60, 5.0, 50.0)
    # a: free at 900 s, b: at 50 s; the queued 100-epoch trials run at the mean 7.5 s/epoch
    assert trial_progress.plan_eta([a, b], [100, 100], slots=2) == pytest.approx(50 + 750 + 750)
    assert trial_progress.plan_eta([a, b], [100], slots=3) == pytest.approx(900)
    fresh = trial_progress.read_status(str(tmp_path / "none"), 0.0, 0, 240, 30.0)
    assert fresh.epoch == 0 and fresh.last_acc is None and trial_progress.plan_eta([fresh], [240], 1) is None
    assert trial_progress.plan_eta([fresh], [240], 1, past_s_per_epoch=[2.0]) == pytest.approx(2 * 480)
    assert "no epoch finished yet" in trial_progress.describe(fresh) and "ETA ?" in trial_progress.describe(fresh)


@pytest.mark.parametrize("seconds, text", [(None, "?"), (42.4, "42s"), (725, "12m05s"), (3 * 3600 + 7 * 60, "3h07m"),
                                           (2 * 86400 + 4 * 3600, "2d04h")])
def test_durations_read_well(seconds, text):
    assert trial_progress.format_duration(seconds) == text


# --- SLURM -----------------------------------------------------------------------------------

def test_a_job_of_several_tasks_gives_each_its_rank(fake, capsys):
    """--slurm_gpus 2 on submitit's local cluster: two tasks, one process each, one rendezvous."""
    argv = fake("--slurm", "--slurm_cluster", "local", "--slurm_gpus", "2", "--slurm_time", "5", trials=1)
    assert reproduce.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 node(s) × 2 task(s)" in out and "(1 node × 2 tasks)" in out and "[1/1] done" in out
    trial = _trial(fake.root, 1)
    ranks = [json.loads((trial / name).read_text()) for name in ("launch.json", "launch_rank1.json")]
    assert [(r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"]) for r in ranks] == [("0", "0", "2"), ("1", "1", "2")]
    assert ranks[0]["MASTER_ADDR"] == ranks[1]["MASTER_ADDR"] and ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"]
    assert "--device" not in ranks[0]["argv"]  # a job's device is --device auto: cuda:<LOCAL_RANK>
    assert (trial / trial_lock.LOG).exists() and (trial / "reproduce.rank1.log").exists()
    assert not (trial / trial_lock.LOCK).exists()
    with pytest.raises(SystemExit):  # submitit's local cluster has one node
        reproduce.main(fake("--slurm", "--slurm_cluster", "local", "--slurm_nodes", "2", trials=2))
    assert "submitit refuses the job shape" in capsys.readouterr().err


# --- SLURM: the job's function travels by value ----------------------------------------------

def test_the_slurm_job_function_unpickles_without_this_repository(tmp_path):
    import cloudpickle
    payload = cloudpickle.dumps(slurm_job_function())
    run_dir = tmp_path / "trial"
    code = ("import pickle, sys; f = pickle.loads(sys.stdin.buffer.read()); "
            f"print(f(['true'], {str(run_dir)!r}, {{}}, 'tok')['returncode'])")
    out = subprocess.run([sys.executable, "-I", "-c", code], input=payload, capture_output=True, cwd=tmp_path,
                         env={"PATH": os.environ.get("PATH", "")}, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "0" and (run_dir / trial_lock.LOG).exists()
    assert not (run_dir / trial_lock.LOCK).exists()
