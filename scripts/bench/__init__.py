"""The speed benchmark behind ``python scripts/benchmark.py``, one job per module.

- :mod:`~scripts.bench.timing`: settings, the device-draining clock, summaries, FLOP and
  kernel counters.
- :mod:`~scripts.bench.measure_loader` / :mod:`~scripts.bench.measure_crd`: the CIFAR data
  pipeline against the reference-style one, CRD negative sampling against the reference's.
- :mod:`~scripts.bench.measure_step` / :mod:`~scripts.bench.measure_epoch`: the training step
  and whole epoch, built only through ``helper.student`` and ``helper.loop.Trainer``.
- :mod:`~scripts.bench.measure_split`: the whole epoch under ``Trainer.fit``, split into the time
  in the step and outside it (default CUDA-graph step vs ``--cuda_graphs off``).
- :mod:`~scripts.bench.measure_cache` / :mod:`~scripts.bench.measure_packing`: the teacher-output
  cache (build rate, cached vs live step) and K packed runs (``helper.tables.calibrate``).
- :mod:`~scripts.bench.cost` / :mod:`~scripts.bench.measure_cost`: the projected cost of Tables 1
  and 2 and of the flagship run (the arithmetic, and the measured figures it is fed).
- :mod:`~scripts.bench.imagenet_files` / :mod:`~scripts.bench.measure_imagenet`: ILSVRC-style
  JPEGs, the ImageNet loader (CPU workers vs GPU decode) and the 224-pixel WTTM step.
- :mod:`~scripts.bench.plan`: priorities and the time budget; :mod:`~scripts.bench.sections`
  runs the sections in that order; :mod:`~scripts.bench.targets` states the issues' targets
  and judges them (full CUDA runs only; the teacher cache's CPU target on the CPU);
  :mod:`~scripts.bench.report` and :mod:`~scripts.bench.report_table_cost` write Markdown and
  JSON; :mod:`~scripts.bench.cli` is the command line.
"""
