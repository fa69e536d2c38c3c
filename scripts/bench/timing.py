"""How the benchmark measures and what fits: settings of the speed grid, a device-draining
clock, summaries of repeats, FLOP/kernel counters, the time budget, and one run's state.

Timing drains the device before and after each timed call (CUDA events on the GPU,
``perf_counter`` elsewhere); warm-up and compilation are timed apart by the callers. A failed
measurement is recorded in the report, not raised, and the run goes on.
"""
from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from helper import distributed

# Dense tensor-core peaks (TFLOP/s) from NVIDIA's H100/H200 SXM data sheets; fp32 convolutions
# and matmuls run as TF32 under PyTorch's defaults. Only used for the FLOP floor.
PEAK_TFLOPS = {"H100": {"fp32": 495.0, "bf16": 989.0}, "H200": {"fp32": 495.0, "bf16": 989.0}}
# Seconds a kind of item is assumed to cost until one has been measured: (CUDA, CPU).
FIRST_COST = {"eager": (20.0, 20.0), "compile": (150.0, 600.0), "packing": (120.0, 120.0),
              "cache": (60.0, 60.0), "imagenet loader": (60.0, 60.0), "imagenet eager": (60.0, 60.0),
              "imagenet compile": (240.0, 1200.0), "deit augment": (60.0, 60.0), "deit eager": (60.0, 60.0),
              "deit compile": (240.0, 1200.0)}
EXTRAS = ("cl", "compile", "cg", "graph", "eager", "cudnn")
SETTING_FORM = "<fp32|bf16>[+cl][+compile|+cg|+graph|+eager][+cudnn]"


@dataclass(frozen=True)
class Setting:
    """One point of the speed grid, named like ``bf16+cl+compile``.

    The plain point is the scripts' default step (eager: ``--cuda_graphs off`` is the
    default). ``+cl`` is ``--channels_last``, ``+compile`` is ``--compile``, ``+cg`` is
    ``--compile --compile_mode reduce-overhead`` (CUDA graphs through the compiler), ``+graph``
    is ``--cuda_graphs on`` (the loop captures the whole step; the CPU stays eager), ``+eager``
    passes ``--cuda_graphs off`` explicitly (the plain point's step, kept for old command
    lines), ``+cudnn`` (``torch.backends.cudnn.benchmark``) is not a flag of the scripts.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    cudagraphs: bool = False
    graph: bool = False
    eager: bool = False

    @classmethod
    def parse(cls, name: str) -> "Setting":
        """``"bf16+cl+compile"`` → the setting; raises ValueError on an unknown part or an
        impossible mix (a compiled step is never captured by the loop; graph and eager)."""
        head, *parts = name.split("+")
        extras = set(parts)
        if (head not in ("fp32", "bf16") or extras - set(EXTRAS) or len(extras) != len(parts)
                or len(extras & {"compile", "cg", "graph", "eager"}) > 1):
            raise ValueError(f"bad setting {name!r}: {SETTING_FORM}")
        return cls(head, "cl" in extras, bool({"compile", "cg"} & extras), "cudnn" in extras, "cg" in extras,
                   "graph" in extras, "eager" in extras)

    @property
    def name(self) -> str:
        on = {"cl": self.channels_last, "compile": self.compile and not self.cudagraphs, "cg": self.cudagraphs,
              "graph": self.graph, "eager": self.eager, "cudnn": self.cudnn_benchmark}
        return "+".join([self.precision, *(extra for extra in EXTRAS if on[extra])])

    def flags(self) -> list[str]:
        """The ``train_student.py`` flags of this setting (``+cudnn`` has none)."""
        return (["--precision", self.precision] + ["--channels_last"] * self.channels_last
                + ["--compile"] * self.compile + ["--compile_mode", "reduce-overhead"] * self.cudagraphs
                + ["--cuda_graphs", "on"] * self.graph + ["--cuda_graphs", "off"] * self.eager)


def parse_settings(text: str) -> list[Setting]:
    """A comma-separated list of setting names."""
    return [Setting.parse(s) for s in text.split(",") if s]


def apply_global_switches(setting: Setting, cuda: bool) -> None:
    """Global switches of a setting: ``cudnn.benchmark``, and a fresh compiler cache when
    compiling (every model instance is a new guard; without a reset dynamo's recompile limit
    would silently run later settings eagerly)."""
    if cuda:
        torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    if setting.compile:
        torch.compiler.reset()


class Clock:
    """Wall time of a call with the device drained before and after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], Any], events: bool = True) -> float:
        """Seconds ``fn()`` takes: CUDA events on the GPU (``events``), else ``perf_counter``
        around synchronisations (use that when ``fn`` waits on the host, e.g. for workers)."""
        self.sync()
        if self.cuda and events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - begin


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, quartiles, min/max, mean and std of the repeats (in the samples' unit)."""
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "q1": q1, "q3": q3, "min": min(samples),
            "max": max(samples), "mean": statistics.fmean(samples),
            "std": statistics.stdev(samples) if len(samples) > 1 else 0.0, "n": len(samples)}


def count_flops(fn: Callable[[], Any]) -> Optional[float]:
    """FLOPs of ``fn()`` by ``torch.utils.flop_counter`` (convolutions and matmuls), or None."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())
    except Exception:  # a counter that cannot trace an op is no measurement to fail over
        return None


def count_kernels(fn: Callable[[], Any], clock: Clock) -> Optional[int]:
    """GPU kernels (and copies) launched by ``fn()``: the launch-overhead floor's size."""
    if not clock.cuda:
        return None
    try:
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            clock.sync()
        return sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)
    except Exception:
        return None


def peak_tflops(clock: Clock, precision: str) -> Optional[float]:
    """The dense tensor-core peak of this GPU for ``precision`` from :data:`PEAK_TFLOPS`, or None."""
    if not clock.cuda:
        return None
    name = torch.cuda.get_device_name(clock.device)
    return next((p[precision] for key, p in PEAK_TFLOPS.items() if key in name), None)


class Budget:
    """A deadline and running estimates of what each kind of item costs (seconds).

    An eager kind's estimate is its last measurement; a compile kind's never drops below half
    its previous estimate (compilation varies). Kinds: the keys of :data:`FIRST_COST`.
    """

    def __init__(self, seconds: float, cuda: bool) -> None:
        self.deadline = time.perf_counter() + seconds if seconds > 0 else float("inf")
        self.cost = {kind: pair[0 if cuda else 1] for kind, pair in FIRST_COST.items()}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, kind: str, reserve: float = 0.0) -> bool:
        return self.left() >= self.cost[kind] + reserve

    def record(self, kind: str, seconds: float) -> None:
        self.cost[kind] = max(seconds, self.cost[kind] * 0.5) if kind.endswith("compile") else seconds


def run_item(result: dict[str, Any], name: str, fn: Callable[[], Any], cuda: bool) -> Any:
    """Runs one measurement; an error is recorded in ``result["errors"]`` (not raised) and
    the run goes on. Compilation warnings are attached to a dict result as ``warnings``."""
    print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as err:  # one failed row must not cost the others
            traceback.print_exc()
            result["errors"].append({"item": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            out = None
        finally:
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    notes = sorted({str(w.message)[:200] for w in caught if "compile" in str(w.message).lower()})
    if isinstance(out, dict) and notes:
        out["warnings"] = notes
    return out


@dataclass
class Bench:
    """One benchmark run: where it runs, its options, its budget and what it measured so far.

    Attributes:
        result: the report's data (see :func:`scripts.bench.report.render`).
        save: writes ``result`` out (called after every item).
        flops: FLOPs per step already counted, by row key.
    """

    env: distributed.DistEnv
    args: Any
    clock: Clock
    budget: Budget
    result: dict[str, Any]
    save: Callable[[], None]
    flops: dict = field(default_factory=dict)

    def item(self, name: str, fn: Callable[[], Any]) -> Any:
        return run_item(self.result, name, fn, self.clock.cuda)

    def skip(self, name: str, why: str = "time budget") -> None:
        self.result["skipped"].append(f"{name} ({why})")

    def budgeted(self, kind: str, name: str, fn: Callable[[], Any], reserve: float = 0.0) -> Any:
        """Runs ``fn`` as item ``name`` when the budget has room for a ``kind`` item (else
        lists it as skipped), records its cost, saves the result; returns ``fn``'s value."""
        if not self.budget.fits(kind, reserve):
            self.skip(name)
            return None
        start = time.perf_counter()
        out = self.item(name, fn)
        self.budget.record(kind, time.perf_counter() - start)
        self.save()
        return out
