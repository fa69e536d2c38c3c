"""Reproducing the paper's tables: the cells as data (``recipes``), each cell's trials as
``train_student.py`` commands (``trial_plan``), running them here or on SLURM (``local_runner``,
``slurm_runner``, ``gpu_slots``, ``trial_lock``, ``trial_progress``), packing several runs per
GPU (``calibrate``, ``packing``, ``pack_plan``) and the report (``run_groups``,
``report_format``). ``scripts/reproduce.py`` and ``scripts/summarize.py`` are its front ends.
"""
