"""The speed benchmark behind ``python scripts/benchmark.py``: one module per section, and three
shared ones.

- :mod:`~scripts.bench.data`: ``data`` (the CIFAR loader against the reference-style pipeline)
  and ``crd`` (CRD negative sampling against the reference's loop).
- :mod:`~scripts.bench.step`: ``steps``, the training-step grid; every section builds its runs
  with its :func:`~scripts.bench.step.build_run` (``helper.student`` and ``helper.loop.Trainer``).
- :mod:`~scripts.bench.epoch`: ``epoch`` (a whole epoch) and ``split`` (the epoch under
  ``Trainer.fit``, in the step and outside it, eager against ``+graph``).
- :mod:`~scripts.bench.cache`, :mod:`~scripts.bench.packing`, :mod:`~scripts.bench.cost`: the
  teacher-output cache, K packed runs, and the projected cost of Tables 1 and 2.
- :mod:`~scripts.bench.imagenet`: ILSVRC-style JPEGs, the ImageNet loader and 224-pixel step.
- :mod:`~scripts.bench.deit`: the DeiT-S → DeiT-Ti row: batched augmentation against PIL
  RandAugment, the loader with the recipe's augmentations, the step, 300 epochs projected.
- Shared: :mod:`~scripts.bench.timing` (settings, clock, summaries, budget, the run's state),
  :mod:`~scripts.bench.report` (Markdown and JSON; each section renders its own tables and
  target lines), :mod:`~scripts.bench.cli` (flags, section order, main).
"""
