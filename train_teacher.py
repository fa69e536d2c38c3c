"""Train a teacher (or any network) from scratch with the reference CIFAR-100 recipe.

    python train_teacher.py --model resnet32x4
    python train_teacher.py --model resnet8 --dataset digits --epochs 5

Writes ``save/models/<model>_<dataset>_lr_<lr>_decay_<wd>_trial_<trial>/`` (see README); the
run is assembled in ``helper/teacher_run.py``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from dataset import Data
from errors import exit_on_user_error
from helper.teacher_run import train


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None, data: Optional[Data] = None) -> str:
    """Trains the network (on ``data``, a loaded data set, when given; else the flags' data
    set); returns the path of its best checkpoint."""
    return train(argv, data)


if __name__ == "__main__":
    main()
