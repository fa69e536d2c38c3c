"""Speed benchmark: data pipeline, training step, whole epoch and CRD negative sampling.

    python scripts/benchmark.py --out bench/                 # CUDA when present, else CPU
    python scripts/benchmark.py --quick --out /tmp/bench     # tiny CPU run (the pytest)
    python scripts/benchmark.py --pairs resnet32x4:resnet8x4 --methods wttm --settings fp32,bf16+cl

Every number comes from the code the entry scripts run: a step is
``train_student.assemble_step`` driven by ``Trainer.train_epoch`` (teacher under
``inference_mode``, student forward/backward, SGD step, device meters), an epoch adds
``evaluate`` over the test loader, the loader is ``DeviceLoader`` and CRD sampling is
``ContrastSampler``. Images are synthetic uint8 CIFAR-shaped tensors (timing does not depend
on pixel values); the networks keep their random initialisation.

Timing: the device is drained before and after each timed call (CUDA events on the GPU,
``perf_counter`` elsewhere); warm-up and compilation are timed apart; the tables give the
median with quartiles and min/max over repeats. ``--budget_s`` bounds the whole run: work
is done in priority order and whatever would not fit is listed as skipped.
Writes ``benchmark.json`` and ``benchmark.md`` into ``--out`` (rewritten after every item,
so a killed run leaves what it had) and prints the Markdown.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import models  # noqa: E402
from helper.student import assemble_step, build_objective, parse_config  # noqa: E402
from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset  # noqa: E402
from dataset.loader import DeviceLoader  # noqa: E402
from distiller_zoo.crd import ContrastSampler  # noqa: E402
from helper import distributed  # noqa: E402
from helper.evaluate import evaluate  # noqa: E402
from helper.loop import NonFiniteLoss, Trainer  # noqa: E402
from helper.run import make_loaders  # noqa: E402
from helper.speed import CompiledOrEager, memory_format  # noqa: E402

PAIRS = ("resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2", "vgg13:vgg8", "ResNet50:MobileNetV2",
         "resnet32x4:ShuffleV2")
METHODS = ("kd", "wttm", "crd", "dkd", "itrd")
HEADLINE = "resnet32x4:resnet8x4"  # the epoch target: WTTM under 1.5 s per epoch on an H100
RECIPE_ROW = {"kd": "KD", "wttm": "WTTM", "crd": "CRD", "dkd": "DKD", "itrd": "ITRD"}
EAGER = ("fp32", "fp32+cl", "bf16", "bf16+cl")
COMPILED = tuple(s + "+compile" for s in EAGER)
EXPERIMENTAL = ("fp32+cudnn", "bf16+cl+cudnn", "bf16+cl+cg", "fp32+cg")  # cudnn is not a flag; cg = --compile_mode reduce-overhead
# Dense tensor-core peaks (TFLOP/s) from NVIDIA's H100/H200 SXM data sheets; fp32 convolutions
# run as TF32 under PyTorch's default cudnn.allow_tf32=True. Only used for the FLOP floor.
PEAK_TFLOPS = {"H100": {"fp32": 495.0, "bf16": 989.0}, "H200": {"fp32": 495.0, "bf16": 989.0}}
QUICK = dict(pairs="resnet8:resnet8", methods="crd", settings="fp32", warmup=1, steps=1, repeats=2,
             step_images=256, loader_images=256, loader_repeats=2, ref_images=128, ref_workers=1,
             crd_images=2000, crd_k=256, crd_repeats=3, ref_crd_repeats=2, epoch_images=128,
             epoch_repeats=1, nce_k=128)


# ----------------------------------------------------------------------------- timing

@dataclass(frozen=True)
class Setting:
    """One point of the speed grid, named like ``bf16+cl+compile``.

    ``+cl`` is ``--channels_last``, ``+compile`` is ``--compile``, ``+cg`` is ``--compile
    --compile_mode reduce-overhead`` (CUDA graphs, against launch overhead); ``+cudnn``
    (``torch.backends.cudnn.benchmark``) is not a flag of the scripts and is measured as
    evidence for one.
    """

    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cudnn_benchmark: bool = False
    cudagraphs: bool = False

    @classmethod
    def parse(cls, name: str) -> "Setting":
        parts = name.split("+")
        unknown = set(parts[1:]) - {"cl", "compile", "cudnn", "cg"}
        if parts[0] not in ("fp32", "bf16") or unknown or {"compile", "cg"} <= set(parts):
            raise ValueError(f"bad setting {name!r}: <fp32|bf16>[+cl][+compile|+cg][+cudnn]")
        return cls(parts[0], "cl" in parts, bool({"compile", "cg"} & set(parts)), "cudnn" in parts, "cg" in parts)

    @property
    def name(self) -> str:
        flags = [f for f, on in (("cl", self.channels_last), ("compile", self.compile and not self.cudagraphs),
                                 ("cg", self.cudagraphs), ("cudnn", self.cudnn_benchmark)) if on]
        return "+".join([self.precision, *flags])

    def flags(self) -> list[str]:
        return (["--precision", self.precision] + ["--channels_last"] * self.channels_last
                + ["--compile"] * self.compile + ["--compile_mode", "reduce-overhead"] * self.cudagraphs)


class Clock:
    """Wall time of a call with the device drained before and after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def seconds(self, fn: Callable[[], Any], events: bool = True) -> float:
        """CUDA events on the GPU (``events``), else ``perf_counter`` around synchronisations."""
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
    """Median, quartiles, min/max, mean and std of the repeats."""
    q1, _, q3 = statistics.quantiles(samples, n=4, method="inclusive") if len(samples) > 1 else samples * 3
    return {"median": statistics.median(samples), "q1": q1, "q3": q3, "min": min(samples),
            "max": max(samples), "mean": statistics.fmean(samples),
            "std": statistics.stdev(samples) if len(samples) > 1 else 0.0, "n": len(samples)}


# ----------------------------------------------------------------------------- building

def synthetic_data(n_train: int, n_test: int, classes: int = 100) -> ImageDataset:
    """CIFAR-shaped uint8 images with balanced labels (``i % classes``), on the CPU."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (max(n_test, 1), 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset("synthetic", train, torch.arange(n_train) % classes, test,
                        torch.arange(test.shape[0]) % classes, classes, CIFAR100_MEAN, CIFAR100_STD)


def recipe_flags(teacher: str, student: str, method: str) -> list[str]:
    """The paper recipe's flags for the cell, else the headline pair's, else the method alone."""
    try:
        from helper import recipes
        cells = [c for c in recipes.load_cells() if c.method == RECIPE_ROW.get(method) and c.runnable]
        for pair in ((teacher, student), tuple(HEADLINE.split(":"))):
            for cell in cells:
                if (cell.teacher, cell.student) == pair:
                    return cell.flags()
    except Exception as err:  # the recipes are a convenience here, not a dependency
        warnings.warn(f"recipes unavailable ({err}); using --distill {method} defaults")
    return ["--distill", method]


def student_config(pair: str, method: str, setting: Setting, env: distributed.DistEnv,
                   save_root: str, extra: list[str]):
    """The validated config ``train_student.py`` would build for this cell and setting."""
    teacher, student = pair.split(":")
    argv = ["--path_t", "unused.pth", "--model_s", student, *recipe_flags(teacher, student, method),
            "--seed", "1", "--save_root", save_root, "--print_freq", str(10 ** 9),
            *setting.flags(), *extra]
    return parse_config(argv, env, teacher)


class CycledBatches:
    """A loader of ``steps`` batches cycling through a few prepared ones (no loader cost)."""

    def __init__(self, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self.batches = batches
        self.steps = 1

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def build_trainer(pair: str, method: str, setting: Setting, env: distributed.DistEnv,
                  data: ImageDataset, args: argparse.Namespace, loader: Any, test_loader: Any = ()):
    """Teacher, objective, optimiser and Trainer exactly as ``train_student.main`` assembles them."""
    teacher_name, student_name = pair.split(":")
    extra = ["--nce_k", str(args.nce_k)] if args.nce_k else []
    cfg = student_config(pair, method, setting, env, args.save_root, extra)
    torch.manual_seed(0)
    teacher = models.create_model(teacher_name, data.num_classes).to(env.device).eval().requires_grad_(False)
    objective = build_objective(cfg, env, data, teacher)
    fmt = memory_format(setting.channels_last)
    step = assemble_step(cfg, env, objective, teacher, fmt)
    trainer = Trainer(cfg, env, step.trainable, step.student, student_name, step.optimizer, loader,
                      test_loader, args.save_root, None, teacher=step.teacher, memory_format=fmt)
    return trainer, objective, step.teacher


def compile_status(objective: Any, frozen: Any) -> str:
    """``compiled``, ``eager fallback`` (the switch warned and ran eagerly) or ``off``."""
    wrapped = [m for m in (objective.student, frozen.model) if isinstance(m, CompiledOrEager)]
    if not wrapped:
        return "off"
    return "eager fallback" if any(m._compiled is None for m in wrapped) else "compiled"


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


# ----------------------------------------------------------------------------- sections

class ReferenceStyleCIFAR(torch.utils.data.Dataset):
    """The seed's training pipeline per sample, written here without torchvision: PIL image,
    RandomCrop(32, padding=4) with zero fill, RandomHorizontalFlip(), ToTensor(),
    Normalize(mean, std); random draws from torch as torchvision makes them. Falls back to
    the same steps in numpy when Pillow is missing (the row says so)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, C] as CIFAR's arrays
        self.labels = labels.cpu().tolist()
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        top, left = (int(v) for v in torch.randint(0, 9, (2,)))
        flip = bool(torch.rand(1) < 0.5)
        try:
            from PIL import Image
        except ImportError:
            padded = np.zeros((40, 40, 3), np.uint8)
            padded[4:36, 4:36] = self.images[index]
            pixels = padded[top:top + 32, left:left + 32][:, ::-1 if flip else 1]
        else:
            padded = Image.new("RGB", (40, 40))
            padded.paste(Image.fromarray(self.images[index]), (4, 4))
            img = padded.crop((left, top, left + 32, top + 32))
            if flip:
                img = img.transpose(getattr(Image, "Transpose", Image).FLIP_LEFT_RIGHT)
            pixels = np.array(img, copy=True)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), self.labels[index], index


def loader_rows(data: ImageDataset, clock: Clock, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Images/s of our on-device loader, in both layouts."""
    n = min(args.loader_images, data.train_images.shape[0])
    images, labels = data.train_images[:n].to(clock.device), data.train_labels[:n].to(clock.device)
    rows = []
    for cl in (False, True):
        loader = DeviceLoader(images, labels, 64, data.mean, data.std, train=True, seed=0,
                              memory_format=memory_format(cl))

        def drain(loader: DeviceLoader = loader) -> None:
            for _ in loader:
                pass
        drain()
        samples = [clock.seconds(drain, events=False) for _ in range(args.loader_repeats)]
        rows.append(_loader_row("ours: DeviceLoader" + (", channels_last" if cl else ""),
                                n, 0, len(loader), samples))
    return rows


def _loader_row(name: str, n: int, workers: int, batches: int, samples: list[float]) -> dict[str, Any]:
    med = statistics.median(samples)
    return {"pipeline": name, "images": n, "workers": workers, "s_per_pass": summarize(samples),
            "images_per_s": n / med, "ms_per_batch": 1e3 * med / batches}


def reference_loader_row(data: ImageDataset, clock: Clock, args: argparse.Namespace) -> dict[str, Any]:
    """Images/s of the reference-style pipeline on the same images (workers started first)."""
    n = min(args.ref_images, data.train_images.shape[0])
    dataset = ReferenceStyleCIFAR(data.train_images[:n], data.train_labels[:n])
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, num_workers=args.ref_workers,
                                         persistent_workers=args.ref_workers > 0)

    def drain() -> None:
        for images, labels, _ in loader:  # the seed copies each batch to the device
            images.to(clock.device), labels.to(clock.device)
    drain()  # starts the workers
    samples = [clock.seconds(drain, events=False) for _ in range(args.loader_repeats)]
    try:
        import PIL  # noqa: F401
        kind = "PIL"
    except ImportError:
        kind = "numpy (Pillow missing)"
    return _loader_row(f"reference-style: {kind} per sample, DataLoader", n, args.ref_workers,
                       len(loader), samples)


def crd_rows(clock: Clock, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Contrast indices for one batch of 64: our batched sampler against the reference's
    per-sample ``numpy.random.choice(pool, K, replace=False)`` loop (one process)."""
    n, k, device = args.crd_images, args.crd_k, clock.device
    labels = torch.arange(n) % 100
    sampler = ContrastSampler(labels.to(device), k, "exact", torch.Generator(device=device).manual_seed(0))
    index = torch.randperm(n)[:64].to(device)
    for _ in range(3):
        sampler.draw(index)
    ours = [1e3 * clock.seconds(lambda: sampler.draw(index)) for _ in range(args.crd_repeats)]
    labels_np = labels.numpy()
    negatives = [np.flatnonzero(labels_np != c) for c in range(100)]  # the reference's cls_negative
    rows_idx = index.cpu().numpy()

    def reference() -> torch.Tensor:
        rows = []
        for i in rows_idx:
            pool = negatives[labels_np[i]]
            neg = np.random.choice(pool, k, replace=k > len(pool))
            rows.append(np.hstack((np.asarray([i]), neg)))
        return torch.from_numpy(np.stack(rows)).to(device)
    reference()
    ref = [1e3 * clock.seconds(reference, events=False) for _ in range(args.ref_crd_repeats)]
    common = {"batch": 64, "n_data": n, "k": k}
    return [{"sampler": "ours: ContrastSampler.draw (batched, on device)", "ms": summarize(ours), **common},
            {"sampler": "reference: numpy.random.choice per sample", "ms": summarize(ref), **common}]


def step_row(pair: str, method: str, setting: Setting, env: distributed.DistEnv, data: ImageDataset,
             batches: dict[bool, list], args: argparse.Namespace, clock: Clock,
             flops: dict[tuple[str, str], Optional[float]]) -> dict[str, Any]:
    """Times ``Trainer.train_epoch`` over prepared batches: per-step median of the repeats."""
    _configure(setting, clock)
    loader = CycledBatches(batches[setting.channels_last])
    start = time.perf_counter()
    trainer, objective, frozen = build_trainer(pair, method, setting, env, data, args, loader)
    build_s = time.perf_counter() - start
    stats: dict[str, Any] = {}

    def run() -> None:
        try:
            stats.update(trainer.train_epoch(1))
        except NonFiniteLoss:  # raised at the epoch-end read, after every step ran: timing holds
            stats["loss"], stats["note"] = float("nan"), "non-finite loss with the random-init teacher"
    loader.steps = args.warmup
    first = clock.seconds(run, events=False)  # compilation lands here
    clock.seconds(run)  # settles the allocator and autotuning
    loader.steps = args.steps
    samples = [1e3 * clock.seconds(run) / args.steps for _ in range(args.repeats)]
    row = {"pair": pair, "method": method, "setting": setting.name, "ms_per_step": summarize(samples),
           "first_call_s": first, "warmup_steps": 2 * args.warmup, "build_s": build_s,
           "compile": compile_status(objective, frozen), "loss": stats.get("loss"), "note": stats.get("note")}
    loader.steps = 1
    if (pair, method) not in flops and not setting.compile:
        flops[(pair, method)] = count_flops(run)
    row["flops_per_step"] = flops.get((pair, method))
    if pair == args.headline and method == "wttm":
        row["kernels_per_step"] = count_kernels(run, clock)
    return row


def _configure(setting: Setting, clock: Clock) -> None:
    """Global switches of a setting: cudnn.benchmark, and a fresh dynamo cache when compiling
    (every model instance is a new guard; without a reset dynamo's recompile limit would
    silently run later settings eagerly)."""
    if clock.cuda:
        torch.backends.cudnn.benchmark = setting.cudnn_benchmark
    if setting.compile and hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


def epoch_row(setting: Setting, env: distributed.DistEnv, data: ImageDataset,
              args: argparse.Namespace, clock: Clock, flops: dict) -> dict[str, Any]:
    """One whole epoch (train + validation) of the headline pair with WTTM, as ``fit`` runs it."""
    _configure(setting, clock)
    trainer, objective, frozen = build_trainer(args.headline, "wttm", setting, env, data, args, None)
    trainer.train_loader, trainer.test_loader = make_loaders(trainer.cfg, env, data, trainer.memory_format)
    cfg, fmt, model = trainer.cfg, trainer.memory_format, trainer.model

    def validate() -> None:
        evaluate(model, trainer.test_loader, cfg.precision, fmt)
    first = clock.seconds(lambda: (trainer.train_epoch(1), validate()), events=False)
    train_s, eval_s = [], []
    for epoch in range(2, 2 + args.epoch_repeats):
        train_s.append(clock.seconds(lambda: trainer.train_epoch(epoch)))
        eval_s.append(clock.seconds(validate))
    epoch_s = [a + b for a, b in zip(train_s, eval_s)]
    n_train, n_test = data.train_images.shape[0], data.test_images.shape[0]
    full = statistics.median(train_s) * 50000 / n_train + statistics.median(eval_s) * 10000 / n_test
    row = {"pair": args.headline, "method": "wttm", "setting": setting.name, "train_images": n_train,
           "test_images": n_test, "steps_per_epoch": len(trainer.train_loader), "first_epoch_s": first,
           "train_s": summarize(train_s), "eval_s": summarize(eval_s), "epoch_s": summarize(epoch_s),
           "full_epoch_s": full, "projected_240_s": 240 * full + max(first - statistics.median(epoch_s), 0.0),
           "compile": compile_status(objective, frozen)}
    row.update(_epoch_floor(trainer, clock, args, setting, flops))
    return row


def _epoch_floor(trainer: Trainer, clock: Clock, args: argparse.Namespace, setting: Setting,
                 flops: dict) -> dict[str, Any]:
    """FLOPs of a full CIFAR-100 epoch (782 steps + 10000 test images) and the time they
    need at the device's tensor-core peak. Counted on eager modules only (a counter around a
    compiled one would recompile it)."""
    batch = next(iter(trainer.train_loader))
    step = flops.get((args.headline, "wttm"))
    if step is None and not setting.compile:
        trainer.train_loader = CycledBatches([batch])
        step = count_flops(lambda: trainer.train_epoch(1))
    with torch.inference_mode():
        fwd = count_flops(lambda: trainer.model(batch[0]))
    if step is None or fwd is None:
        return {}
    total = 782 * step + 10000 * fwd / batch[0].shape[0]
    peak = args.peak_tflops or _peak(clock, setting.precision)
    return {"epoch_flops": total, "peak_tflops": peak, "flop_floor_s": total / (peak * 1e12) if peak else None}


def _peak(clock: Clock, precision: str) -> Optional[float]:
    if not clock.cuda:
        return None
    name = torch.cuda.get_device_name(clock.device)
    return next((p[precision] for key, p in PEAK_TFLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------- plan and run

def header(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on and with."""
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
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:]}
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


def priority(pair: str, method: str, setting: Setting, headline: str) -> int:
    """Order of the step grid under a time budget: what the defaults and targets need first
    (0-1 run before the epoch section, which picks the fastest headline WTTM setting)."""
    head, name = pair == headline, setting.name
    if head and method == "wttm" and name in ("bf16+cl+compile", "bf16+cl+cg", "fp32+cudnn", "bf16+cl+cudnn"):
        return 1
    if setting.cudnn_benchmark or setting.cudagraphs:
        return 4 if head and method == "wttm" else 7
    if not setting.compile:
        return 0 if head else (2 if name in ("fp32", "bf16+cl") else 3)
    if head and method == "wttm":
        return 4
    return 5 if head else 6


class Budget:
    """A deadline and running estimates of what each kind of item costs."""

    def __init__(self, seconds: float, cuda: bool) -> None:
        self.deadline = time.perf_counter() + seconds if seconds > 0 else float("inf")
        self.cost = {"eager": 20.0, "compile": 150.0 if cuda else 600.0}

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, kind: str, reserve: float = 0.0) -> bool:
        return self.left() >= self.cost[kind] + reserve

    def record(self, kind: str, seconds: float) -> None:
        self.cost[kind] = seconds if kind == "eager" else max(seconds, self.cost[kind] * 0.5)


def epoch_reserve(result: dict[str, Any], args: argparse.Namespace) -> float:
    """Seconds to keep for the epoch section, (warm-up + repeats) epochs of two settings at
    the slowest measured headline WTTM step time (0 until one is measured)."""
    rows = [r["ms_per_step"]["median"] for r in result["steps"]
            if r["pair"] == args.headline and r["method"] == "wttm"]
    if args.epoch_images <= 0 or result["epoch"] or not rows:
        return 0.0
    per_epoch = max(rows) / 1e3 * (args.epoch_images / 64) * 1.3  # + loader and validation
    return 2 * (1 + args.epoch_repeats) * per_epoch + 30.0


def run_item(result: dict[str, Any], name: str, fn: Callable[[], Any], clock: Clock) -> Any:
    """Runs one measurement; an error is recorded (not raised) and the run goes on."""
    print(f"[benchmark] {name} ...", file=sys.stderr, flush=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except Exception as err:
            traceback.print_exc()
            result["errors"].append({"item": name, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            out = None
        finally:
            gc.collect()
            if clock.cuda:
                torch.cuda.empty_cache()
    notes = sorted({str(w.message)[:200] for w in caught if "compile" in str(w.message).lower()})
    if isinstance(out, dict) and notes:
        out["warnings"] = notes
    return out


def run_steps(result: dict[str, Any], plan: list[tuple[int, str, str, Setting]], last_priority: int,
              env: distributed.DistEnv, data: ImageDataset, args: argparse.Namespace, clock: Clock,
              budget: Budget, flops: dict) -> None:
    """Runs the plan's step items up to ``last_priority`` that fit the budget."""
    batches: dict[bool, list] = {}
    for cl in (False, True):
        loader = DeviceLoader(data.train_images, data.train_labels, 64, data.mean, data.std,
                              train=True, seed=0, memory_format=memory_format(cl))
        batches[cl] = [b for _, b in zip(range(4), loader)]
    while plan and plan[0][0] <= last_priority:
        _, pair, method, setting = plan.pop(0)
        kind = "compile" if setting.compile else "eager"
        name = f"step {pair} {method} {setting.name}"
        if not budget.fits(kind, epoch_reserve(result, args)):
            result["skipped"].append(f"{name} (time budget)")
            continue
        start = time.perf_counter()
        row = run_item(result, name, lambda: step_row(pair, method, setting, env, data, batches,
                                                      args, clock, flops), clock)
        budget.record(kind, time.perf_counter() - start)
        if row is not None:
            result["steps"].append(row)
        write_outputs(args.out, result)


def run_epochs(result: dict[str, Any], env: distributed.DistEnv, args: argparse.Namespace,
               clock: Clock, budget: Budget, flops: dict) -> None:
    """The epoch section: the default setting, the fastest measured headline WTTM setting the
    scripts offer as flags, then the fastest of all (``+cudnn``/``+cg`` included)."""
    if args.epoch_images <= 0:
        result["skipped"].append("epoch (--epoch_images 0)")
        return
    head = [r for r in result["steps"] if r["pair"] == args.headline and r["method"] == "wttm"
            and r["compile"] != "eager fallback"]
    flags = [r for r in head if not ({"cudnn", "cg"} & set(r["setting"].split("+")))]
    fastest = lambda rows: [min(rows, key=lambda r: r["ms_per_step"]["median"])["setting"]] if rows else []  # noqa: E731
    names = ["fp32"] + fastest(flags) + fastest(head)
    data = synthetic_data(args.epoch_images, args.epoch_images // 5).to(env.device)
    for name in dict.fromkeys(names):
        setting = Setting.parse(name)
        need = epoch_reserve({"steps": result["steps"], "epoch": []}, args) / 2
        if setting.compile:
            need += budget.cost["compile"]
        if budget.left() < need:
            result["skipped"].append(f"epoch {name} (time budget)")
            continue
        row = run_item(result, f"epoch {name}", lambda: epoch_row(setting, env, data, args, clock, flops), clock)
        if row is not None:
            result["epoch"].append(row)
        write_outputs(args.out, result)


# ----------------------------------------------------------------------------- report

def _q(s: dict[str, float], scale: float = 1.0, d: int = 2) -> tuple[str, str, str]:
    """(median, 'q1–q3', 'min–max') formatted."""
    return (f"{s['median'] * scale:.{d}f}", f"{s['q1'] * scale:.{d}f}–{s['q3'] * scale:.{d}f}",
            f"{s['min'] * scale:.{d}f}–{s['max'] * scale:.{d}f}")


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return out + [""]


def loader_share(result: dict[str, Any], row: dict[str, Any]) -> Optional[float]:
    """Share of (loader + step) time the on-device loader takes, for a step row's layout."""
    name = "ours: DeviceLoader" + (", channels_last" if "+cl" in row["setting"] else "")
    loader = next((r for r in result["loader"] if r["pipeline"] == name), None)
    if loader is None:
        return None
    return loader["ms_per_batch"] / (loader["ms_per_batch"] + row["ms_per_step"]["median"])


def targets(result: dict[str, Any]) -> list[str]:
    """The issue's targets (stated for one H100) against what this run measured."""
    out = []
    ours = [r for r in result["loader"] if r["pipeline"] == "ours: DeviceLoader"]
    ref = [r for r in result["loader"] if r["pipeline"].startswith("reference")]
    if ours and ref:
        out.append(f"- data pipeline: ours / reference-style = **{ours[0]['images_per_s'] / ref[0]['images_per_s']:.1f}×** "
                   f"(target ≥ 20× on an H100; reference with {ref[0]['workers']} workers)")
    if len(result["crd"]) == 2:
        ratio = result["crd"][1]["ms"]["median"] / result["crd"][0]["ms"]["median"]
        out.append(f"- CRD sampling per batch: reference / ours = **{ratio:.1f}×** (target ≥ 50×)")
    for row in result["epoch"]:
        floor = row.get("flop_floor_s")
        out.append(f"- epoch ({row['setting']}): **{row['full_epoch_s']:.2f} s** per full CIFAR-100 epoch incl. "
                   f"validation, 240 epochs ≈ {row['projected_240_s'] / 60:.1f} min (target < 1.5 s / ~6 min on an H100)"
                   + (f"; FLOP floor {floor:.3f} s" if floor else ""))
    shares = [s for s in (loader_share(result, r) for r in result["steps"]) if s is not None]
    if shares:
        out.append(f"- loader share of (loader + step) time: {100 * min(shares):.2f}–{100 * max(shares):.2f} % "
                   f"over the step rows (target: not the bottleneck)")
    return out + [""]


def render(result: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    h = result["header"]
    lines = [f"# Benchmark on {h['device']}", "",
             f"torch {h['torch']}, CUDA {h['cuda']}, cuDNN {h['cudnn']}, Triton {h['triton']}; "
             f"{h['threads']} torch threads, {h['cpu_count']} CPUs; Python {h['python']}, {h['platform']}; "
             f"git {h['git']}; started {h['started']}, took {result.get('elapsed_s', 0):.0f} s.", "",
             f"Command: `python scripts/benchmark.py {' '.join(h['argv'])}`", "", "## Targets", ""]
    lines += targets(result)
    lines += ["## Data pipeline (batch 64, random crop + flip + normalise)", ""]
    lines += _table(["pipeline", "images", "workers", "images/s", "ms/batch", "s/pass IQR", "s/pass min–max"],
                    [[r["pipeline"], r["images"], r["workers"], f"{r['images_per_s']:,.0f}", f"{r['ms_per_batch']:.3f}",
                      *_q(r["s_per_pass"], d=3)[1:]] for r in result["loader"]])
    lines += ["## CRD negatives per batch of 64", ""]
    lines += _table(["sampler", "N", "K", "ms median", "IQR", "min–max"],
                    [[r["sampler"], r["n_data"], r["k"], *_q(r["ms"], d=3)] for r in result["crd"]])
    lines += ["## Training step (batch 64: teacher forward + student forward/backward + SGD)", "",
              "ms/step over repeats; first call = the warm-up steps incl. compilation; "
              "TFLOP/s = counted FLOPs / median; loader share = DeviceLoader ms/batch / (that + step).", ""]
    lines += _table(["teacher:student", "method", "setting", "ms/step", "IQR", "min–max", "first call s",
                     "GFLOP/step", "TFLOP/s", "kernels", "loader share", "compile / note"],
                    [_step_cells(result, r) for r in result["steps"]])
    lines += [f"## Whole epoch (train + validation), {result['args']['headline']} WTTM", ""]
    lines += _table(["setting", "train/test images", "steps", "train s", "eval s", "epoch s (IQR)", "first epoch s",
                     "full CIFAR epoch s", "240 epochs min", "FLOP floor s"], [_epoch_cells(r) for r in result["epoch"]])
    for title, key in (("Skipped", "skipped"), ("Errors", "errors")):
        if result[key]:
            lines += [f"## {title}", ""] + [f"- {item}" for item in result[key]] + [""]
    return "\n".join(lines)


def _step_cells(result: dict[str, Any], r: dict[str, Any]) -> list[Any]:
    med, iqr, rng = _q(r["ms_per_step"])
    flops = r.get("flops_per_step")
    share = loader_share(result, r)
    return [r["pair"], r["method"], r["setting"], med, iqr, rng, f"{r['first_call_s']:.2f}",
            f"{flops / 1e9:.2f}" if flops else None,
            f"{flops / (r['ms_per_step']['median'] / 1e3) / 1e12:.2f}" if flops else None,
            r.get("kernels_per_step"), f"{100 * share:.2f} %" if share is not None else None,
            r["compile"] + (f"; {r['note']}" if r.get("note") else "")]


def _epoch_cells(r: dict[str, Any]) -> list[Any]:
    floor = r.get("flop_floor_s")
    return [r["setting"], f"{r['train_images']}/{r['test_images']}", r["steps_per_epoch"],
            _q(r["train_s"], d=3)[0], _q(r["eval_s"], d=3)[0], " ".join(_q(r["epoch_s"], d=3)[:2]),
            f"{r['first_epoch_s']:.2f}", f"{r['full_epoch_s']:.2f}", f"{r['projected_240_s'] / 60:.1f}",
            f"{floor:.3f}" if floor else None]


def write_outputs(out: str, result: dict[str, Any]) -> str:
    """Writes benchmark.json and benchmark.md (atomically enough for a report); returns the text."""
    os.makedirs(out, exist_ok=True)
    text = render(result)
    for name, body in (("benchmark.json", json.dumps(result, indent=2, default=str)), ("benchmark.md", text + "\n")):
        tmp = os.path.join(out, f".{name}.tmp")
        with open(tmp, "w") as handle:
            handle.write(body)
        os.replace(tmp, os.path.join(out, name))
    return text


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench", help="folder for benchmark.json and benchmark.md")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true", help="tiny CPU-sized configuration (the test)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="stop starting new items after this many seconds (default 420 on CUDA, none on CPU)")
    p.add_argument("--pairs", default=None, help=f"teacher:student list (default {','.join(PAIRS)})")
    p.add_argument("--methods", default=None, help=f"method list (default {','.join(METHODS)})")
    p.add_argument("--settings", default=None,
                   help="<fp32|bf16>[+cl][+compile|+cg][+cudnn] list (default: the 8-point grid plus "
                        f"{','.join(EXPERIMENTAL)} on CUDA; the 4 eager points on CPU)")
    p.add_argument("--headline", default=None, help="pair of the epoch section (default: the first pair)")
    p.add_argument("--grid", default="full", choices=("full", "headline"),
                   help="headline: every setting on the headline pair, only the first setting on the others")
    for name, default, text in (
            ("warmup", 3, "warm-up steps (timed apart, twice)"), ("steps", 25, "steps per timed repeat"),
            ("repeats", 5, "timed repeats per setting"), ("step_images", 50000, "data set size behind the steps (CRD memory)"),
            ("loader_images", 50000, "images per pass of our loader"), ("loader_repeats", 3, "timed passes"),
            ("ref_images", 10000, "images per pass of the reference-style pipeline"),
            ("ref_workers", None, "its DataLoader workers (default min(8, CPUs), the seed's 8)"),
            ("crd_images", 50000, "N of the CRD sampling test"), ("crd_k", 16384, "K of the CRD sampling test"),
            ("crd_repeats", 20, "timed draws of ours"), ("ref_crd_repeats", 5, "timed batches of the reference"),
            ("epoch_images", None, "training images of the epoch section (test: 1/5); 0 skips it "
                                   "(default 50000 on CUDA, 2048 on CPU)"),
            ("epoch_repeats", 2, "timed epochs after the warm-up epoch"),
            ("nce_k", None, "override CRD's --nce_k in the step grid")):
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 gives steadier numbers on a shared CPU")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak for the FLOP floor (default: H100/H200 table)")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if key not in _given(argv):
                setattr(args, key, value)
    return args


def _given(argv: Optional[list[str]]) -> set[str]:
    return {a.lstrip("-").split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> None:
    cuda = device.type == "cuda"
    args.pairs = args.pairs or ",".join(PAIRS)
    args.methods = args.methods or ",".join(METHODS)
    args.settings = args.settings or ",".join(EAGER + (COMPILED + EXPERIMENTAL if cuda else ()))
    args.headline = args.headline or args.pairs.split(",")[0]
    args.budget_s = (420.0 if cuda else 0.0) if args.budget_s is None else args.budget_s
    args.ref_workers = min(8, os.cpu_count() or 1) if args.ref_workers is None else args.ref_workers
    args.epoch_images = (50000 if cuda else 2048) if args.epoch_images is None else args.epoch_images


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.resolve_device(args.device)
    resolve_defaults(args, device)
    env, clock = distributed.DistEnv(0, 1, 0, device), Clock(device)
    budget, started = Budget(args.budget_s, clock.cuda), time.perf_counter()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    settings = [Setting.parse(s) for s in args.settings.split(",")]
    plan = sorted(((priority(p, m, s, args.headline), p, m, s) for p in args.pairs.split(",")
                   for m in args.methods.split(",") for s in settings
                   if args.grid == "full" or p == args.headline or s == settings[0]), key=lambda item: item[0])
    result: dict[str, Any] = {"header": header(device), "args": vars(args), "loader": [], "crd": [],
                              "steps": [], "epoch": [], "skipped": [], "errors": []}
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as save_root:
        args.save_root = save_root
        data = synthetic_data(args.step_images, 1).to(device)
        result["loader"] = run_item(result, "data pipeline (ours)", lambda: loader_rows(data, clock, args), clock) or []
        reference = run_item(result, "data pipeline (reference-style)",
                             lambda: reference_loader_row(data, clock, args), clock)
        result["loader"] += [reference] if reference else []
        result["crd"] = run_item(result, "CRD sampling", lambda: crd_rows(clock, args), clock) or []
        write_outputs(args.out, result)
        flops: dict = {}
        run_steps(result, plan, 1, env, data, args, clock, budget, flops)
        run_epochs(result, env, args, clock, budget, flops)
        run_steps(result, plan, 99, env, data, args, clock, budget, flops)
    result["elapsed_s"] = time.perf_counter() - started
    print(write_outputs(args.out, result), flush=True)
    return result


if __name__ == "__main__":
    main()
