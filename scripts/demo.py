"""The offline demo: a teacher and two distilled students (KD, WTTM) on bundled digits.

    python scripts/demo.py [--epochs 12] [--save_root save/demo] [--threads N]

Runs on the CPU in a few minutes; prints both students' accuracies and their run folders.

Threads: torch's default is one per core, which on a machine other processes keep busy
makes every OpenMP barrier wait for a thread that is not running (issue 13: 20-41 s per
teacher epoch on a busy 2-core machine, against 3 s alone; measured again on a 2-core machine
at load 2-3, one resnet14 epoch on digits: 26-28 s with 2 threads, 6-8 s with 1, alternating
runs). The demo therefore uses the cores
nobody else is using: the usable cores less the 1-minute load average, to the nearest core, at least
1 and at most :data:`MAX_THREADS` (digits' 32-pixel batches gain little beyond that).
``--threads`` or ``OMP_NUM_THREADS`` override the choice.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Mapping, Optional

import torch


import train_student
import train_teacher

TEACHER, STUDENT = "resnet14", "resnet8"
MAX_THREADS = 8


def idle_cores(cores: Optional[int] = None, load: Optional[float] = None) -> int:
    """Threads for the demo: ``cores`` (default: the cores this process may use) less
    ``load`` (default: the 1-minute load average), to the nearest core, within [1, MAX_THREADS]."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(MAX_THREADS, int(cores - load + 0.5)))


def choose_threads(flag: Optional[int], environ: Mapping[str, str]) -> tuple[int, str]:
    """The demo's torch threads and why: ``--threads``, else ``OMP_NUM_THREADS``, else the
    idle cores."""
    if flag:
        return flag, "--threads"
    if environ.get("OMP_NUM_THREADS", "").isdigit() and int(environ["OMP_NUM_THREADS"]) > 0:
        return int(environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    return idle_cores(), "idle cores: usable cores less the 1-minute load average"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--save_root", default="save/demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the cores other processes leave idle)")
    args = parser.parse_args()
    threads, why = choose_threads(args.threads, os.environ)
    torch.set_num_threads(threads)
    print(f"demo: {threads} torch thread{'s' if threads > 1 else ''} ({why})", flush=True)
    common = ["--dataset", "digits", "--epochs", str(args.epochs), "--lr_decay_epochs",
              f"{args.epochs * 2 // 3}", "--save_root", args.save_root, "--device", args.device,
              "--seed", "1", "--print_freq", "1000", "--resume"]
    best_teacher = train_teacher.main(["--model", TEACHER, *common])
    students = {
        "KD": ["--distill", "kd", "--add", "kd", "-r", "0.1", "-a", "0.9", "-b", "0", "--kd_T", "4"],
        "WTTM": ["--distill", "wttm", "--ttm_l", "0.2", "-r", "1", "-a", "0", "-b", "3"],
    }
    results = {}
    for label, flags in students.items():
        run = f"demo_{label.lower()}"
        train_student.main(["--path_t", best_teacher, "--model_s", STUDENT, *flags, *common, "--run_name", run])
        folder = os.path.join(args.save_root, "student_model", run)
        with open(os.path.join(folder, "summary.json")) as handle:
            results[label] = (json.load(handle), folder)
    print("\n=== demo results (digits, test accuracy %) ===")
    print(f"teacher {TEACHER}: {best_teacher}")
    for label, (summary, folder) in results.items():
        print(f"{label:5s} student {STUDENT}: best {summary['best_acc']:.2f} (epoch {summary['best_epoch']}), "
              f"last {summary['last_acc']:.2f}  run folder: {folder}")


if __name__ == "__main__":
    main()
