"""The benchmark's outputs: ``benchmark.json`` (the result dict) and ``benchmark.md``.

Targets are the issues' figures for one H100/H200. They are judged (met / not met) only for a
full run on CUDA; a ``--quick`` run says on every line that it is a smoke run, not a
measurement, and CPU figures say that they are CPU figures.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any, Optional

import torch

from scripts.bench import report_table_cost as table_cost
from scripts.bench import targets as goals

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
    except Exception:
        info["triton"] = None
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        info["git"] = commit + (" (uncommitted changes)" if dirty else "")
    except Exception:
        info["git"] = None
    return info


def _q(s: dict[str, float], scale: float = 1.0, d: int = 2) -> tuple[str, str, str]:
    """(median, 'q1–q3', 'min–max') formatted."""
    return (f"{s['median'] * scale:.{d}f}", f"{s['q1'] * scale:.{d}f}–{s['q3'] * scale:.{d}f}",
            f"{s['min'] * scale:.{d}f}–{s['max'] * scale:.{d}f}")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out + [""]


def render(result: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    h = result["header"]
    lines = [f"# Benchmark on {h['device']}", ""]
    if result.get("smoke"):
        lines += [f"**{goals.SMOKE}**: tiny sizes that check every section runs; no figure below "
                  "is a measurement and no target is judged.", ""]
    lines += [f"torch {h['torch']}, CUDA {h['cuda']}, cuDNN {h['cudnn']}, Triton {h['triton']}; "
              f"{h['threads']} torch threads, {h['cpu_count']} CPUs; Python {h['python']}, {h['platform']}; "
              f"git {h['git']}; started {h['started']}, took {result.get('elapsed_s', 0):.0f} s.", "",
              f"Command: `python scripts/benchmark.py {' '.join(h['argv'])}`", "", "## Targets", ""]
    lines += goals.target_lines(result) + [""]
    sections = set(result["sections"])
    lines += _cifar_tables(result, sections)
    for name, part in (("split", table_cost.split_lines), ("cache", table_cost.cache_lines),
                       ("packing", table_cost.packing_lines), ("cost", table_cost.cost_lines)):
        lines += part(result, _table) if name in sections else []
    lines += _imagenet_tables(result) if "imagenet" in sections else []
    for title, key in (("Skipped", "skipped"), ("Errors", "errors")):
        if result[key]:
            lines += [f"## {title}", ""] + [f"- {item}" for item in result[key]] + [""]
    return "\n".join(lines)


def _cifar_tables(result: dict[str, Any], sections: set[str]) -> list[str]:
    """The tables of the CIFAR sections that were selected."""
    lines = []
    if "data" in sections:
        lines += ["## Data pipeline (batch 64, random crop + flip + normalise)", ""]
        lines += _table(["pipeline", "images", "workers", "images/s", "ms/batch", "s/pass IQR", "s/pass min–max"],
                        [[r["pipeline"], r["images"], r["workers"], f"{r['images_per_s']:,.0f}",
                          f"{r['ms_per_batch']:.3f}", *_q(r["s_per_pass"], d=3)[1:]] for r in result["loader"]])
    if "crd" in sections:
        lines += ["## CRD negatives per batch of 64", ""]
        lines += _table(["sampler", "N", "K", "ms median", "IQR", "min–max"],
                        [[r["sampler"], r["n_data"], r["k"], *_q(r["ms"], d=3)] for r in result["crd"]])
    if "steps" in sections:
        lines += ["## Training step (batch 64: teacher forward + student forward/backward + SGD)", "",
                  "ms/step over repeats; first call = the warm-up steps incl. compilation; "
                  "TFLOP/s = counted FLOPs / median; loader share = DeviceLoader ms/batch / (that + step).", ""]
        lines += _table(["teacher:student", "method", "setting", "ms/step", "IQR", "min–max", "first call s",
                         "GFLOP/step", "TFLOP/s", "kernels", "loader share", "compile; step; note"],
                        [_step_cells(result, r) for r in result["steps"]])
    if "epoch" in sections:
        lines += [f"## Whole epoch (train + validation), {result['args']['headline']} WTTM", ""]
        lines += _table(["setting", "train/test images", "steps", "train s", "eval s", "epoch s (IQR)",
                         "first epoch s", "full CIFAR epoch s", "240 epochs min", "FLOP floor s"],
                        [_epoch_cells(r) for r in result["epoch"]])
    return lines


def _imagenet_tables(result: dict[str, Any]) -> list[str]:
    section = result.get("imagenet") or {}
    files = section.get("files")
    lines = ["## ImageNet data pipeline (training loader, 224-pixel views)", ""]
    if files:
        lines += [f"{files['train_files']} training files ({files['unique_files']} distinct JPEGs of 500×375 "
                  f"or 375×500, quality 90, {files['mean_kb']:.0f} KiB mean; the rest hard links) in "
                  f"{files['classes']} class folders, written in {files['seconds']:.1f} s; in the page "
                  "cache, so disk reads are not measured.", ""]
    lines += _table(["pipeline", "workers", "batch", "images", "images/s", "ms/batch", "s/pass IQR", "first pass s"],
                    [_imagenet_loader_cells(r) for r in section.get("loader", [])])
    steps = section.get("steps", [])
    title = f"{steps[0]['pair']} WTTM, batch {steps[0]['batch']}" if steps else "WTTM"
    lines += [f"## ImageNet training step ({title}, 224 px, 1000 classes)", "",
              "Synthetic batches; built through helper.student like the CIFAR rows. "
              "100 epochs = the step alone over 1,281,167 images (no loader, no validation).", ""]
    lines += _table(["teacher:student", "setting", "ms/step", "IQR", "images/s", "first call s", "GFLOP/step",
                     "TFLOP/s", "100 epochs h", "compile; step; note"], [_imagenet_step_cells(r) for r in steps])
    return lines


def _imagenet_loader_cells(r: dict[str, Any]) -> list[Any]:
    if r.get("unavailable"):
        return [r["pipeline"], None, r["batch"], None, r["unavailable"], None, None, None]
    return [r["pipeline"], r["workers"], r["batch"], r["images"], f"{r['images_per_s']:,.0f}",
            f"{r['ms_per_batch']:.2f}", _q(r["s_per_pass"], d=3)[1], f"{r['first_pass_s']:.2f}"]


def _imagenet_step_cells(r: dict[str, Any]) -> list[Any]:
    med, iqr, _ = _q(r["ms_per_step"], d=1)
    flops = r.get("flops_per_step")
    return [r["pair"], r["setting"], med, iqr, f"{r['images_per_s']:,.1f}", f"{r['first_call_s']:.2f}",
            f"{flops / 1e9:.1f}" if flops else None,
            f"{flops / (r['ms_per_step']['median'] / 1e3) / 1e12:.2f}" if flops else None,
            f"{r['projected_100_epochs_h']:,.1f}", _how(r)]


def _how(r: dict[str, Any]) -> str:
    """The compile status, the step mode in one word (the full line is in the JSON), the note."""
    mode = r.get("step_mode") or ""
    word = "graph" if mode.startswith("CUDA graph") else "eager"
    word += " (capture fell back)" if "ran eagerly" in mode else ""
    return f"{r['compile']}; step {word}" + (f"; {r['note']}" if r.get("note") else "")


def _step_cells(result: dict[str, Any], r: dict[str, Any]) -> list[Any]:
    med, iqr, rng = _q(r["ms_per_step"])
    flops = r.get("flops_per_step")
    share = goals.loader_share(result, r)
    return [r["pair"], r["method"], r["setting"], med, iqr, rng, f"{r['first_call_s']:.2f}",
            f"{flops / 1e9:.2f}" if flops else None,
            f"{flops / (r['ms_per_step']['median'] / 1e3) / 1e12:.2f}" if flops else None,
            r.get("kernels_per_step"), f"{100 * share:.2f} %" if share is not None else None, _how(r)]


def _epoch_cells(r: dict[str, Any]) -> list[Any]:
    floor: Optional[float] = r.get("flop_floor_s")
    return [r["setting"], f"{r['train_images']}/{r['test_images']}", r["steps_per_epoch"],
            _q(r["train_s"], d=3)[0], _q(r["eval_s"], d=3)[0], " ".join(_q(r["epoch_s"], d=3)[:2]),
            f"{r['first_epoch_s']:.2f}", f"{r['full_epoch_s']:.2f}", f"{r['projected_240_s'] / 60:.1f}",
            f"{floor:.3f}" if floor else None]


def write_outputs(out: str, result: dict[str, Any]) -> str:
    """Writes benchmark.json and benchmark.md into ``out`` (each via a temporary file and a
    rename); returns the Markdown."""
    os.makedirs(out, exist_ok=True)
    text = render(result)
    for name, body in (("benchmark.json", json.dumps(result, indent=2, default=str)), ("benchmark.md", text + "\n")):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as handle:
            handle.write(body)
        os.replace(tmp, os.path.join(out, name))
    return text
