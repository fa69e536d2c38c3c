"""How the benchmark measures: settings of the speed grid, a device-draining clock, summaries
of repeats, and FLOP/kernel counters.

Timing drains the device before and after each timed call (CUDA events on the GPU,
``perf_counter`` elsewhere); warm-up and compilation are timed apart by the callers.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# Dense tensor-core peaks (TFLOP/s) from NVIDIA's H100/H200 SXM data sheets; fp32 convolutions
# run as TF32 under PyTorch's default cudnn.allow_tf32=True. Only used for the FLOP floor.
PEAK_TFLOPS = {"H100": {"fp32": 495.0, "bf16": 989.0}, "H200": {"fp32": 495.0, "bf16": 989.0}}


@dataclass(frozen=True)
class Setting:
    """One point of the speed grid, named like ``bf16+cl+compile``.

    ``+cl`` is ``--channels_last``, ``+compile`` is ``--compile``, ``+cg`` is ``--compile
    --compile_mode reduce-overhead`` (CUDA graphs, against launch overhead); ``+eager`` is
    ``--cuda_graphs off`` (without it a CUDA step is replayed from a graph where it can be, the
    scripts' default; the CPU is always eager); ``+cudnn`` (``torch.backends.cudnn.benchmark``)
    is not a flag of the scripts and is measured as evidence for one.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    cudagraphs: bool = False
    eager: bool = False

    @classmethod
    def parse(cls, name: str) -> "Setting":
        """``"bf16+cl+compile"`` → the setting; raises ValueError on an unknown part (``+eager``
        with ``+compile``/``+cg`` is one: a compiled step is never graph-captured by the loop)."""
        parts = name.split("+")
        unknown = set(parts[1:]) - {"cl", "compile", "cudnn", "cg", "eager"}
        if (parts[0] not in ("fp32", "bf16") or unknown or {"compile", "cg"} <= set(parts)
                or ("eager" in parts and {"compile", "cg"} & set(parts))):
            raise ValueError(f"bad setting {name!r}: <fp32|bf16>[+cl][+compile|+cg|+eager][+cudnn]")
        return cls(parts[0], "cl" in parts, bool({"compile", "cg"} & set(parts)), "cudnn" in parts, "cg" in parts,
                   "eager" in parts)

    @property
    def name(self) -> str:
        flags = [f for f, on in (("cl", self.channels_last), ("compile", self.compile and not self.cudagraphs),
                                 ("cg", self.cudagraphs), ("eager", self.eager), ("cudnn", self.cudnn_benchmark))
                 if on]
        return "+".join([self.precision, *flags])

    def flags(self) -> list[str]:
        """The ``train_student.py`` flags of this setting (``+cudnn`` has none)."""
        return (["--precision", self.precision] + ["--channels_last"] * self.channels_last
                + ["--compile"] * self.compile + ["--compile_mode", "reduce-overhead"] * self.cudagraphs
                + ["--cuda_graphs", "off"] * self.eager)


def parse_settings(text: str) -> list[Setting]:
    """A comma-separated list of setting names."""
    return [Setting.parse(s) for s in text.split(",") if s]


def apply_global_switches(setting: Setting, cuda: bool) -> None:
    """Global switches of a setting: ``cudnn.benchmark``, and a fresh compiler cache when
    compiling (every model instance is a new guard; without a reset dynamo's recompile limit
    would silently run later settings eagerly)."""
    if cuda:
        torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    if setting.compile and hasattr(torch, "compiler"):
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
    except Exception:
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
