"""The acceptance sections, in report order; each returns a :class:`Section`."""
from __future__ import annotations

import platform
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

import torch

from distiller_zoo import METHODS
from scripts.acceptance import runs, twins
from helper.host_sync import Case
from paper_tables.recipes import add_combinations
from scripts.acceptance.report import Section

SMOKE_TWINS = ("wttm", "dkd", "itrd+wttm")  # the CPU smoke's subset: every path, in < 60 s


@dataclass
class Context:
    """What every section reads: the device, a scratch folder and the smoke switch."""

    device: torch.device
    root: str
    smoke: bool

    @property
    def batch(self) -> int:
        return 16 if self.smoke else 64

    @property
    def images(self) -> int:  # two full batches and a partial one per epoch
        return 2 * self.batch + self.batch // 2


def all_cases() -> list[Case]:
    return [Case(name) for name in METHODS.names()] + [Case(*combo) for combo in add_combinations()]


def environment(ctx: Context) -> Section:
    lines = [f"torch {torch.__version__}, python {platform.python_version()}, device {ctx.device}"]
    if ctx.device.type == "cuda":
        lines.append(f"GPU {torch.cuda.get_device_name(ctx.device)}, CUDA {torch.version.cuda}, "
                     f"cuDNN {torch.backends.cudnn.version()}")
    try:
        import torchvision
        lines.append(f"torchvision {torchvision.__version__}")
    except Exception as err:
        lines.append(f"torchvision unavailable ({type(err).__name__})")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines.append(f"commit {commit or 'unknown'}" + ("; --cpu-smoke: stand-ins, not a GPU measurement" if ctx.smoke else ""))
    return Section("environment", True, lines=lines)


def host_sync(ctx: Context) -> Section:
    rows = twins.screen(all_cases(), ctx.device, ctx.root, 8)
    return Section("host-sync screen", all(r["ok"] for r in rows), rows)


def capturable(ctx: Context) -> list[Case]:
    cases = [c for c in all_cases() if _graph_safe(c)]
    return [c for c in cases if c.name in SMOKE_TWINS] if ctx.smoke else cases


def _graph_safe(case: Case) -> bool:
    return all(METHODS.get(n).graph_safe for n in case.name.split("+"))


def graph_twins(ctx: Context) -> Section:
    rows = [twins.twin(c, ctx.device, ctx.root, ctx.batch, ctx.images) for c in capturable(ctx)]
    return Section("graph vs eager twins (fp32, 3 epochs)", all(r["ok"] for r in rows), rows,
                   ["per epoch 2 full batches and a partial one; LR ×0.1 before epoch 3; DKD warm-up 2 epochs"])


def bf16_channels_last(ctx: Context) -> Section:
    names = ("wttm",) if ctx.smoke else ("wttm", "dkd", "rkd", "hint")
    rows = [twins.twin(Case(n), ctx.device, ctx.root, ctx.batch, ctx.images,
                       ["--precision", "bf16", "--channels_last"], precision="bf16") for n in names]
    return Section("bf16 + channels_last twins", all(r["ok"] for r in rows), rows)


def teacher_cache(ctx: Context) -> Section:
    from dataset.views import views_per_image
    row = twins.twin(Case("wttm"), ctx.device, ctx.root, ctx.batch, ctx.images,
                     cache_rows=ctx.images * views_per_image(4))
    return Section("teacher-cache path (graph vs eager)", row["ok"], [row])


def recaptures(ctx: Context) -> Section:
    row = twins.recaptures(ctx.device, ctx.root, ctx.batch, ctx.images)
    lines = [] if ctx.device.type == "cuda" else ["no device memory on the CPU: only the captures and freed graphs are checked"]
    return Section("memory over 9 recaptures", row["ok"], [row], lines)


def digits(ctx: Context) -> Section:
    data = runs.small_digits(128, 100) if ctx.smoke else None
    result = runs.digits_runs(ctx.root, ctx.device, 1 if ctx.smoke else 3, data)
    rows, ok, lines = runs.compare_digits(result, ctx.device.type == "cuda")
    return Section("digits end to end, --cuda_graphs on vs off", ok, rows, lines)


def decoding(ctx: Context) -> Section:
    rows, ok, note = runs.decode_rows(ctx.device)
    return Section("nvJPEG vs PIL decoding", ok, rows, [note] if note else [])


def bench_steps(ctx: Context) -> Section:
    pair = "resnet8:resnet8" if ctx.smoke else "resnet32x4:resnet8x4"
    rows = runs.bench_steps(ctx.device, ctx.root, pair, ctx.smoke)
    graphs_on = [r for r in rows if r["--cuda_graphs"] == "on"]
    ok = ctx.device.type != "cuda" or all(r["step mode"].startswith("CUDA graph") and "failed" not in r["step mode"]
                                          for r in graphs_on)
    return Section(f"benchmark step section ({pair} WTTM)", ok, rows,
                   ["smoke run: timings are not measurements"] if ctx.smoke else [])


def imagenet(ctx: Context) -> Section:
    rows = runs.imagenet_loader(ctx.device, ctx.root, ctx.smoke)
    return Section("ImageNet loader images/s", True, rows)




SECTIONS: list[tuple[str, Callable[[Context], Section]]] = [
    ("environment", environment), ("host_sync", host_sync), ("twins", graph_twins), ("bf16", bf16_channels_last),
    ("cache", teacher_cache), ("recapture", recaptures), ("digits", digits), ("decode", decoding),
    ("bench", bench_steps), ("imagenet", imagenet)]


def run_section(key: str, fn: Callable[[Context], Section], ctx: Context) -> Section:
    """Runs one section; an exception fails that section only (its message is reported)."""
    start = time.perf_counter()
    try:
        section = fn(ctx)
    except Exception as err:  # one broken section must not hide the others' results
        section = Section(key, False, lines=[f"raised {type(err).__name__}: {str(err)[:500]}"])
    section.seconds = time.perf_counter() - start
    return section
