"""Distil a student from a frozen teacher with any registered method (and an added logit loss).

    python train_student.py --path_t save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \
        --model_s resnet8x4 --distill wttm --ttm_l 0.1 -r 1 -a 0 -b 3 --trial 1

Total loss = r·CE + a·ADD + b·MAIN (ADD = --add, MAIN = --distill). The run is assembled in
``helper/student.py``; ``--help`` lists every flag. See README.
"""
from __future__ import annotations

from typing import Optional, Sequence

from dataset import Data
from errors import exit_on_user_error
from helper.student import train


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None, data: Optional[Data] = None) -> str:
    """Distils the student (on ``data``, a loaded data set, when given; else the flags' data
    set); returns the path of its best checkpoint."""
    return train(argv, data)


if __name__ == "__main__":
    main()
