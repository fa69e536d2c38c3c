"""Where the tables' programs are: the repository root and the entry script runs are built from."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STUDENT = os.path.join(REPO, "train_student.py")
