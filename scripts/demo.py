"""The offline demo: a teacher and two distilled students (KD, WTTM) on bundled digits.

    python scripts/demo.py [--epochs 12] [--save_root save/demo]

Runs on the CPU in a few minutes; prints both students' accuracies and their run folders.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_student  # noqa: E402
import train_teacher  # noqa: E402

TEACHER, STUDENT = "resnet14", "resnet8"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--save_root", default="save/demo")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
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
