"""GPU acceptance: one command that settles whether the CUDA-graph step may become the default.

    python scripts/gpu_acceptance.py --out docs/acceptance        # on one GPU, ≤ 6 minutes
    python scripts/gpu_acceptance.py --cpu-smoke --out /tmp/acc   # the same code paths on the CPU (< 60 s)

Sections: environment; the host-sync screen of every method on the device; graph vs eager
twins over 3 short epochs for every capturable method (zero fallbacks, state within 1e-4 in
fp32); bf16 + channels_last twins; the teacher-cache path; device memory over 9 recaptures;
digits end to end with ``--cuda_graphs on`` vs ``off``; nvJPEG vs PIL decoding; the
benchmark's step rows with and without graphs; the ImageNet loader's images/s. Runs are built
only through ``helper.student`` (as ``train_student.py``) and the benchmark's functions.

Writes ``gpu_acceptance.md`` into ``--out``; the exit status is the number of failed sections.
``--cpu-smoke`` replaces CUDA graphs with stand-ins that re-run the step: it checks that the
script works, and measures nothing.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Optional, Sequence


import torch

from scripts.acceptance import report
from scripts.acceptance.sections import SECTIONS, Context, run_section


def parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder of the Markdown report")
    p.add_argument("--cpu-smoke", action="store_true", help="run every section on the CPU with stand-ins")
    p.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    p.add_argument("--sections", default=",".join(k for k, _ in SECTIONS),
                   help=f"comma-separated subset of: {', '.join(k for k, _ in SECTIONS)}")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the sections and writes the report; returns the number of failed sections."""
    args = parse(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --cpu-smoke to check the script on the CPU", file=sys.stderr)
        return len(SECTIONS)
    device = torch.device("cpu") if args.cpu_smoke else torch.device(args.device)
    wanted = args.sections.split(",")
    sections = []
    with tempfile.TemporaryDirectory(prefix="gpu_acceptance_") as scratch:
        ctx = Context(device, scratch, args.cpu_smoke)
        for key, fn in SECTIONS:
            if key in wanted:
                section = run_section(key, fn, ctx)
                sections.append(section)
                print(f"{section.name}: {section.verdict} ({section.seconds:.1f} s)", flush=True)
    title = "GPU acceptance" + (" (CPU smoke run: stand-ins, not a measurement)" if args.cpu_smoke else "")
    path = report.write(args.out, report.markdown(title, [f"device: {device}"], sections))
    failed = sum(s.passed is False for s in sections)
    print(f"{failed} failed section(s); report: {path}", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
