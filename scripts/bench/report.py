"""The benchmark's outputs: ``benchmark.json`` (the result dict) and ``benchmark.md``.

Each section module renders its own tables and target lines (``tables(result)``,
``targets(result)``) with the helpers here. Targets are figures for one H100/H200: judged (met
/ not met) only in a full run on CUDA; a ``--quick`` run says on every line that it is a smoke
run, not a measurement, and CPU figures say that they are CPU figures.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any, Sequence

import torch

SMOKE = "smoke run (--quick): not a measurement"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def header(device: torch.device, argv: list[str]) -> dict[str, Any]:
    """What the numbers were measured on and with (``argv``: the benchmark's flags)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    info = {"device": name, "device_type": device.type, "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "platform": platform.platform(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": argv}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["git"] = _git()
    return info


def _git() -> Any:
    try:
        run = lambda *a: subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True,  # noqa: E731
                                        timeout=10).stdout.strip()
        return run("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if run("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def judged(result: dict[str, Any], target: str, met: bool) -> str:
    """The tail of a target line: the target and its verdict, or why it is not judged."""
    if result.get("smoke"):
        return SMOKE
    if result["header"]["device_type"] != "cuda":
        return f"target {target}; CPU figure, not judged"
    return f"target {target}: **{'met' if met else 'not met'}**"


def quartiles(s: dict[str, float], scale: float = 1.0, d: int = 2) -> tuple[str, str, str]:
    """(median, 'q1–q3', 'min–max') formatted."""
    return (f"{s['median'] * scale:.{d}f}", f"{s['q1'] * scale:.{d}f}–{s['q3'] * scale:.{d}f}",
            f"{s['min'] * scale:.{d}f}–{s['max'] * scale:.{d}f}")


def table(head: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table (``None`` cells are empty) and a blank line."""
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out + [""]


def workers(n: int) -> str:
    return f"{n} worker" + ("" if n == 1 else "s")


def step_word(mode: str) -> str:
    """A step's header line (``step_mode``) in one word: graph or eager, and a fallback."""
    return ("graph" if mode.startswith("CUDA graph") else "eager") + (" (fell back)" if "ran eagerly" in mode else "")


def how(r: dict[str, Any]) -> str:
    """The compile status, the step mode in one word (the full line is in the JSON), the note."""
    return f"{r['compile']}; step {step_word(r.get('step_mode') or '')}" + (f"; {r['note']}" if r.get("note") else "")


def tflops(r: dict[str, Any], d: int = 2) -> tuple[Any, Any]:
    """(GFLOP per step, TFLOP/s at the median) of a step row, or Nones."""
    flops = r.get("flops_per_step")
    if not flops:
        return None, None
    return f"{flops / 1e9:.{d}f}", f"{flops / (r['ms_per_step']['median'] / 1e3) / 1e12:.2f}"


def render(result: dict[str, Any], parts: Sequence[Any]) -> str:
    """The whole report as Markdown; ``parts`` are the section modules, in report order."""
    h = result["header"]
    lines = [f"# Benchmark on {h['device']}", ""]
    if result.get("smoke"):
        lines += [f"**{SMOKE}**: tiny sizes that check every section runs; no figure below "
                  "is a measurement and no target is judged.", ""]
    lines += [f"torch {h['torch']}, CUDA {h['cuda']}, cuDNN {h['cudnn']}, Triton {h['triton']}; "
              f"{h['threads']} torch threads, {h['cpu_count']} CPUs; Python {h['python']}, {h['platform']}; "
              f"git {h['git']}; started {h['started']}, took {result.get('elapsed_s', 0):.0f} s.", "",
              f"Command: `python scripts/benchmark.py {' '.join(h['argv'])}`", "", "## Targets", ""]
    for part in parts:
        lines += part.targets(result)
    lines.append("")
    for part in parts:
        lines += part.tables(result)
    for title, key in (("Skipped", "skipped"), ("Errors", "errors")):
        if result[key]:
            lines += [f"## {title}", ""] + [f"- {item}" for item in result[key]] + [""]
    return "\n".join(lines)


def write_outputs(out: str, result: dict[str, Any], text: str) -> None:
    """Writes ``result`` as benchmark.json and ``text`` as benchmark.md into ``out`` (each via a
    temporary file and a rename, so a killed run leaves whole files)."""
    os.makedirs(out, exist_ok=True)
    for name, body in (("benchmark.json", json.dumps(result, indent=2, default=str)), ("benchmark.md", text + "\n")):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as handle:
            handle.write(body)
        os.replace(tmp, os.path.join(out, name))
