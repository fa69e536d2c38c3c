"""The benchmark's command line: flags, the ``--quick`` sizes, device-dependent defaults, the
order the sections run in, and main."""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from errors import UserError
from helper import distributed
from scripts.bench import cache, cost, data, deit, epoch, imagenet, packing, report, step
from scripts.bench.timing import Bench, Budget, Clock, parse_settings

SECTIONS = ("data", "crd", "steps", "epoch", "split", "cache", "packing", "cost", "imagenet", "deit")
REPORT = (data, step, epoch, cache, packing, cost, imagenet, deit)  # section modules, in report order
PAIRS = ("resnet32x4:resnet8x4", "wrn_40_2:wrn_16_2", "vgg13:vgg8", "ResNet50:MobileNetV2", "resnet32x4:ShuffleV2")
METHODS = ("kd", "wttm", "crd", "dkd", "itrd")
PLAIN = ("fp32", "fp32+cl", "bf16", "bf16+cl")  # the default step: eager
COMPILED = tuple(s + "+compile" for s in PLAIN)
GRAPHED = ("fp32+graph", "bf16+cl+graph")  # --cuda_graphs on, against the eager default
# +cudnn is not a flag of the scripts; +cg is --compile --compile_mode reduce-overhead.
EXPERIMENTAL = ("fp32+cudnn", "bf16+cl+cudnn", "bf16+cl+cg", "fp32+cg")
# CPU: no bf16 by default; without AVX-512 it is emulated (a 17-step bf16 row had not finished
# after 10 minutes on the 2-vCPU development machine).
IMAGENET_SETTINGS = {"cuda": "fp32,bf16,bf16+cl,bf16+cl+compile", "cpu": "fp32,fp32+cl"}
DEIT_SETTINGS = {"cuda": "fp32,bf16,bf16+compile", "cpu": "fp32"}
QUICK = dict(pairs="resnet8:resnet8", methods="crd", settings="fp32", warmup=1, steps=1, repeats=2,
             step_images=256, loader_images=256, loader_repeats=2, ref_images=128, ref_workers=1,
             crd_images=2000, crd_k=256, crd_repeats=3, ref_crd_repeats=2, epoch_images=64,
             epoch_repeats=1, nce_k=128, imagenet_pair="resnet18:resnet18", imagenet_batch=2,
             imagenet_steps=1, imagenet_settings="fp32", imagenet_images=8, imagenet_files=8,
             imagenet_workers="1", packing_ks="1", packing_steps=1, packing_warmup=1, cache_images=4,
             cache_build_images=1, cache_steps=2, deit_methods="vitkd+nkd", deit_settings="fp32", deit_batch=2,
             deit_steps=1, deit_aug_images=4, deit_ref_images=4, deit_workers=1)
INT_FLAGS = (
    ("warmup", 3, "warm-up steps (timed apart, twice)"), ("steps", 25, "steps per timed repeat"),
    ("repeats", 5, "timed repeats per setting"), ("step_images", 50000, "data set size behind the steps (CRD memory)"),
    ("loader_images", 50000, "images per pass of our loader"), ("loader_repeats", 3, "timed passes"),
    ("ref_images", 10000, "images per pass of the reference-style pipeline"),
    ("ref_workers", None, "its DataLoader workers (default min(8, CPUs), the seed's 8)"),
    ("crd_images", 50000, "N of the CRD sampling test"), ("crd_k", 16384, "K of the CRD sampling test"),
    ("crd_repeats", 20, "timed draws of ours"), ("ref_crd_repeats", 5, "timed batches of the reference"),
    ("epoch_images", None, "training images of the epoch and split sections (test: 1/5); 0 skips them "
                           "(default 50000 on CUDA, 2048 on CPU)"),
    ("epoch_repeats", 2, "timed epochs after the warm-up epoch"),
    ("nce_k", None, "override CRD's --nce_k in the step grid"),
    ("imagenet_batch", None, "batch of the ImageNet step (default 64 on CUDA, 8 on CPU)"),
    ("imagenet_steps", None, "ImageNet steps per timed repeat (default 20 on CUDA, 2 on CPU)"),
    ("imagenet_images", None, "training-split entries of the ImageNet loader rows (default 4096 on CUDA, 512 on CPU)"),
    ("imagenet_files", 256, "distinct JPEGs among them (the rest are hard links)"),
    ("packing_steps", None, "steps each packed process times per round (default 30 on CUDA, 3 on CPU)"),
    ("packing_warmup", None, "warm-up steps of each packed process (default 5 on CUDA, 1 on CPU)"),
    ("cache_images", 64, "training images behind the cached-vs-live step (its batch: min(64, this))"),
    ("cache_build_images", None, "images whose 162 views each time the cache build (default 1024 on CUDA, 4 on CPU)"),
    ("cache_steps", None, "timed steps of each of the cached and live steps (default 25 on CUDA, 5 on CPU)"),
    ("deit_batch", None, "batch of the DeiT step (default 1024 on CUDA, the recipe's step; 2 on CPU)"),
    ("deit_steps", None, "DeiT steps per timed repeat (default 10 on CUDA, 1 on CPU)"),
    ("deit_aug_images", None, "batch of the on-device DeiT augmentation row (default 1024 on CUDA, 16 on CPU)"),
    ("deit_ref_images", None, "images per pass of the PIL RandAugment pipeline (default 4096 on CUDA, 32 on CPU)"),
    ("deit_workers", None, "its DataLoader workers (default min(16, CPUs))"))
# Defaults that depend on the device: (CUDA, CPU).
DEVICE_DEFAULTS = {"epoch_images": (50000, 2048), "imagenet_batch": (64, 8), "imagenet_steps": (20, 2),
                   "imagenet_images": (4096, 512), "packing_steps": (30, 3), "packing_warmup": (5, 1),
                   "cache_build_images": (1024, 4), "cache_steps": (25, 5), "deit_batch": (1024, 2),
                   "deit_steps": (10, 1), "deit_aug_images": (1024, 16), "deit_ref_images": (4096, 32)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Speed benchmark: data pipelines, training step, whole epoch and its "
                                            "step/outside split, CRD negative sampling, teacher cache, packed "
                                            "runs, projected table cost, the ImageNet loader and step, and DeiT.")
    p.add_argument("--out", default="bench", help="folder for benchmark.json and benchmark.md")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes that check every section runs (the test); not a measurement")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--imagenet", action="store_true", help="only the ImageNet rows (same as --sections imagenet)")
    p.add_argument("--budget_s", type=float, default=None,
                   help="stop starting new items after this many seconds (default 420 on CUDA, none on CPU)")
    p.add_argument("--pairs", default=None, help=f"teacher:student list (default {','.join(PAIRS)})")
    p.add_argument("--methods", default=None, help=f"method list (default {','.join(METHODS)})")
    p.add_argument("--settings", default=None,
                   help="<fp32|bf16>[+cl][+compile|+cg|+graph|+eager][+cudnn] list (default: the 8-point grid plus "
                        f"{','.join(GRAPHED + EXPERIMENTAL)} on CUDA; the 4 uncompiled points on CPU)")
    p.add_argument("--headline", default=None, help="pair of the epoch section (default: the first pair)")
    p.add_argument("--grid", default="full", choices=("full", "headline"),
                   help="headline: every setting on the headline pair, only the first setting on the others")
    for name, default, text in INT_FLAGS:
        p.add_argument(f"--{name}", type=int, default=default, help=text)
    p.add_argument("--imagenet_pair", default="resnet34:resnet18", help="teacher:student of the ImageNet step")
    p.add_argument("--imagenet_settings", default=None,
                   help=f"settings of the ImageNet step (default {IMAGENET_SETTINGS['cuda']} on CUDA, "
                        f"{IMAGENET_SETTINGS['cpu']} on CPU)")
    p.add_argument("--imagenet_workers", default=None,
                   help="comma list of ImageNet loader worker counts "
                        "(default: the three largest of 1,2,4,8,16 up to the CPU count)")
    p.add_argument("--deit_methods", default=",".join(deit.METHOD_FLAGS),
                   help=f"methods of the DeiT step, from {', '.join(deit.METHOD_FLAGS)}")
    p.add_argument("--deit_settings", default=None,
                   help=f"settings of the DeiT step (default {DEIT_SETTINGS['cuda']} on CUDA, "
                        f"{DEIT_SETTINGS['cpu']} on CPU)")
    p.add_argument("--packing_ks", default=None,
                   help="comma list of packed-run counts K (default 1,2,4,8,16; on the CPU up to its cores)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's); 1 gives steadier numbers on a shared CPU")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak for the FLOP floor (default: H100/H200 table)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The flags, with ``--quick`` filling in its sizes for every flag not given."""
    args = build_parser().parse_args(argv)
    if args.quick:
        given = {a.lstrip("-").split("=")[0] for a in (sys.argv[1:] if argv is None else argv) if a.startswith("--")}
        for key, value in QUICK.items():
            if key not in given:
                setattr(args, key, value)
    return args


def resolve_defaults(args: argparse.Namespace, device: torch.device) -> set[str]:
    """Fills in the device-dependent defaults and returns the sections to run.

    Raises:
        UserError: an unknown section, setting or DeiT method, or a bad worker list.
    """
    cuda, cpus = device.type == "cuda", os.cpu_count() or 1
    args.pairs = args.pairs or ",".join(PAIRS)
    args.methods = args.methods or ",".join(METHODS)
    args.settings = args.settings or ",".join(PLAIN + (COMPILED + GRAPHED + EXPERIMENTAL if cuda else ()))
    args.headline = args.headline or args.pairs.split(",")[0]
    args.budget_s = (420.0 if cuda else 0.0) if args.budget_s is None else args.budget_s
    args.ref_workers = min(8, cpus) if args.ref_workers is None else args.ref_workers
    args.deit_workers = min(16, cpus) if args.deit_workers is None else args.deit_workers
    for key, (on_cuda, on_cpu) in DEVICE_DEFAULTS.items():
        if getattr(args, key) is None or (key != "epoch_images" and not getattr(args, key)):
            setattr(args, key, on_cuda if cuda else on_cpu)
    args.imagenet_settings = args.imagenet_settings or IMAGENET_SETTINGS["cuda" if cuda else "cpu"]
    args.deit_settings = args.deit_settings or DEIT_SETTINGS["cuda" if cuda else "cpu"]
    counts = [w for w in (1, 2, 4, 8, 16) if w <= cpus] or [1]
    args.imagenet_workers = args.imagenet_workers or ",".join(str(w) for w in counts[-3:])
    sections = {"imagenet"} if args.imagenet else {s for s in args.sections.split(",") if s}
    try:
        if sections - set(SECTIONS):
            raise ValueError(f"unknown section(s) {', '.join(sorted(sections - set(SECTIONS)))}; "
                             f"choose from {', '.join(SECTIONS)}")
        unknown = set(args.deit_methods.split(",")) - set(deit.METHOD_FLAGS)
        if unknown:
            raise ValueError(f"unknown --deit_methods {', '.join(sorted(unknown))}; choose from "
                             f"{', '.join(deit.METHOD_FLAGS)}")
        parse_settings(args.settings), parse_settings(args.imagenet_settings), parse_settings(args.deit_settings)
        packing.packing_ks(args.packing_ks, cuda)
        if not all(w.strip().isdigit() for w in str(args.imagenet_workers).split(",")):
            raise ValueError(f"--imagenet_workers must be a comma list of non-negative integers, "
                             f"got {args.imagenet_workers!r}")
    except ValueError as err:
        raise UserError(str(err)) from None
    return sections


def run_all(bench: Bench, sections: set[str]) -> None:
    """Runs the selected ``sections`` in priority order: the cheap data rows, the headline
    pair's steps, the epoch and whole-table sections, ImageNet and DeiT, the rest of the CIFAR
    grid, and last the cost projection (arithmetic on what was measured)."""
    args = bench.args
    wanted = {"data", "steps", "epoch"} & sections
    cifar = data.synthetic_data(args.step_images, 1).to(bench.env.device) if wanted else None
    if "data" in sections:
        data.run_data(bench, cifar)
    if "crd" in sections:
        data.run_crd(bench)
    if "imagenet" in sections:
        imagenet.run_loader(bench)
    plan = step.step_plan(args.pairs.split(","), args.methods.split(","), parse_settings(args.settings),
                          args.headline, args.grid) if "steps" in sections else []
    keep = lambda: epoch.reserve(bench)  # noqa: E731
    step.run_steps(bench, plan, 1, cifar, keep)
    for name, run in (("epoch", epoch.run_epochs), ("split", epoch.run_split)):
        if name in sections:
            run(bench)
    step.run_steps(bench, plan, 2, cifar, keep)
    for name, run in (("cache", cache.run), ("packing", packing.run), ("imagenet", imagenet.run_steps),
                      ("deit", deit.run)):
        if name in sections:
            run(bench)
    step.run_steps(bench, plan, 99, cifar, keep)
    if "cost" in sections:
        cost.run(bench)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Runs the benchmark; writes ``benchmark.json``/``benchmark.md`` into ``--out``, prints
    the Markdown and returns the result dict."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = distributed.resolve_device(args.device)
    sections = resolve_defaults(args, device)
    clock, started = Clock(device), time.perf_counter()
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    given = list(sys.argv[1:] if argv is None else argv)
    result: dict[str, Any] = {"header": report.header(device, given), "smoke": bool(args.quick),
                              "sections": sorted(sections), "args": vars(args), "loader": [], "crd": [],
                              "steps": [], "epoch": [], "split": [], "cache": [], "packing": [], "cost": None,
                              "imagenet": {"files": None, "loader": [], "steps": []},
                              "deit": {"augment": [], "loader": [], "steps": []}, "skipped": [], "errors": []}

    def save() -> None:
        report.write_outputs(args.out, result, report.render(result, REPORT))
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as save_root:
        args.save_root = save_root
        run_all(Bench(distributed.DistEnv(0, 1, 0, device), args, clock, Budget(args.budget_s, clock.cuda),
                      result, save), sections)
    result["elapsed_s"] = time.perf_counter() - started
    save()
    print(report.render(result, REPORT), flush=True)
    return result
