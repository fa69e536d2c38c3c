"""The teacher zoo: the published teachers (CIFAR-100, ImageNet, DeiT), fetching and checking
their files, and scoring them (``python -m teacher_zoo check|list|verify``).

- :mod:`teacher_zoo.published`: names, files, paths and published top-1 (no torch);
- :mod:`teacher_zoo.fetch`: the fetch script's helpers (safe extraction, SHA-256 checks);
- :mod:`teacher_zoo.files`: loading a file into its architecture, scoring it;
- ``python -m teacher_zoo``: the ``check``, ``list`` and ``verify`` commands.
"""
