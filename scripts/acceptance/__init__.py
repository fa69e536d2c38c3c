"""The GPU acceptance run (``scripts/gpu_acceptance.py``): host-sync screen, graph vs eager
twins, whole runs, decoding and the benchmark's step rows, each a section of one report."""
