"""Speed benchmark: data pipelines, training step, whole epoch and its step/outside split, CRD
negative sampling, the teacher-output cache, packed runs, the projected cost of Tables 1 and 2,
the ImageNet loader and step, and the DeiT-S → DeiT-Ti row.

    python scripts/benchmark.py --out bench/                 # CUDA when present, else CPU
    python scripts/benchmark.py --quick --out /tmp/bench     # smoke run (the pytest): not a measurement
    python scripts/benchmark.py --pairs resnet32x4:resnet8x4 --methods wttm --settings fp32,fp32+graph,bf16+cl
    python scripts/benchmark.py --imagenet --out bench-imagenet/   # only the ImageNet rows
    python scripts/benchmark.py --sections deit --out bench-deit/  # only the DeiT rows
    python scripts/benchmark.py --sections steps,split,cache,packing,cost --settings fp32,fp32+graph

Every number comes from the code the entry scripts run: a step is built by ``helper.student``
(``parse_config``, ``build_objective``, ``assemble_step``) and driven by
``helper.loop.Trainer.train_epoch``; an epoch adds ``evaluate`` over the run's own test loader;
the epoch split runs ``Trainer.fit`` with the step timed per call; the cache rows use
``helper.teacher_cache``, the packed rows ``paper_tables.calibrate``; the cost projection is
arithmetic on those figures and the paper's cells; the loaders are ``DeviceLoader`` and
``ImageFolderData.loaders``; the DeiT augmentation rows run the loader's own batched ops.
Images are synthetic (timing does not depend on pixel values) and networks keep their random
initialisation.

Timing: the device is drained before and after each timed call (CUDA events on the GPU,
``perf_counter`` elsewhere); warm-up and compilation are timed apart; the tables give the
median with quartiles and min/max over repeats. ``--budget_s`` bounds the whole run: work is
done in priority order and whatever would not fit is listed as skipped. Targets are judged
only by a full run on CUDA (the teacher cache's CPU target: by a full run on the CPU). Writes
``benchmark.json`` and ``benchmark.md`` into ``--out`` (rewritten after every item, so a
killed run leaves what it had) and prints the Markdown. The code lives in ``scripts/bench/``.
"""
from __future__ import annotations

from errors import exit_on_user_error
from scripts.bench import cli

main = exit_on_user_error(cli.main)

if __name__ == "__main__":
    main()
