"""Section ``imagenet``: the streaming loader over ILSVRC-style JPEGs, and the 224-pixel step.

- Files: ``root/{train,val}/<wnid>/<wnid>_<k>.JPEG`` with ILSVRC's typical geometry and weight
  (500×375, one in four portrait, quality 90, about 110 KB: a bicubic blow-up of a random 24×24
  image plus uniform noise of ±40); ``--imagenet_files`` are encoded, the rest hard links. They
  sit in the page cache: decoding is measured, disk reads are not.
- Loader: ``ImageFolderData.loaders`` (the training loader a run uses) with PIL decoding in
  ``DataLoader`` workers at several worker counts, and with nvJPEG decoding on the GPU where
  CUDA and torchvision are present (the DeiT section reuses it with its augmentations).
- Step: the paper's ResNet-34 → ResNet-18 WTTM setting (``--dataset imagenet --distill wttm
  --ttm_l 0.8 -r 1 -a 0 -b 1.6``) built with :func:`scripts.bench.step.build_run`, fed
  synthetic normalised 224-pixel batches with 1000 classes.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

import models
from dataset.augment_recipe import TrainAugment
from dataset.imagenet_decode import nvjpeg_available
from dataset.imagenet_loader import load_imagenet
from helper.speed import memory_format
from scripts.bench import report
from scripts.bench.data import loader_row
from scripts.bench.step import (CycledBatches, build_run, compile_status, config_record, count_step_flops,
                                step_mode, student_argv, student_config, time_steps)
from scripts.bench.timing import Bench, Setting, apply_global_switches, parse_settings

IMAGENET_TRAIN, IMAGENET_CLASSES = 1_281_167, 1000  # ILSVRC-2012 training images, classes
IMAGENET_LOADER_IMG_S_TARGET = 4000.0  # GPU decode, 16 CPU cores
IMAGENET_STEP_IMG_S_TARGET = 3000.0  # ResNet-34 -> ResNet-18 WTTM, best setting
IMAGENET_100_EPOCHS_H_TARGET = 12.0
WTTM_FLAGS = ("--dataset", "imagenet", "--distill", "wttm", "--ttm_l", "0.8", "-r", "1", "-a", "0", "-b", "1.6")
GPU_DECODE, CPU_DECODE = "GPU decode: nvJPEG + crop on the device", "CPU workers: PIL decode + crop"
UNAVAILABLE = "unavailable: no CUDA/torchvision"
WIDTH, HEIGHT, QUALITY, NOISE, GRID, MAX_CLASSES = 500, 375, 90, 40, 24, 10


@dataclass(frozen=True)
class GeneratedFolder:
    """What :func:`write_ilsvrc_folder` wrote: the folder, training entries, distinct JPEGs,
    class folders, their mean size in KiB and the seconds spent writing."""

    root: str
    train_files: int
    unique_files: int
    classes: int
    mean_kb: float
    seconds: float


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels that compress like a photograph at quality 90."""
    small = Image.fromarray(rng.integers(0, 256, (GRID, GRID, 3), dtype=np.uint8))
    big = np.asarray(small.resize((width, height), Image.BICUBIC), dtype=np.int16)
    return np.clip(big + rng.integers(-NOISE, NOISE + 1, big.shape, dtype=np.int16), 0, 255).astype(np.uint8)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_ilsvrc_folder(root: str, train_files: int, unique_files: int, seed: int = 0) -> GeneratedFolder:
    """Writes ``train_files`` training entries (``unique_files`` of them encoded) over up to
    ten classes, and one validation file per class, under ``root`` (created).

    Raises:
        ValueError: ``train_files`` or ``unique_files`` below 1.
    """
    if train_files < 1 or unique_files < 1:
        raise ValueError("need at least one training file and one unique file")
    start, rng = time.perf_counter(), np.random.default_rng(seed)
    unique_files = min(unique_files, train_files)
    wnids = [f"n{10000000 + k:08d}" for k in range(min(MAX_CLASSES, train_files))]
    encoded, sizes = [], []
    for k in range(train_files):
        wnid = wnids[k % len(wnids)]
        path = os.path.join(root, "train", wnid, f"{wnid}_{k}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if k < unique_files:
            height, width = (WIDTH, HEIGHT) if k % 4 == 3 else (HEIGHT, WIDTH)
            Image.fromarray(photo_like(rng, height, width)).save(path, "JPEG", quality=QUALITY)
            encoded.append(path)
            sizes.append(os.path.getsize(path))
        else:
            _link_or_copy(encoded[k % unique_files], path)
    for i, wnid in enumerate(wnids):
        path = os.path.join(root, "val", wnid, f"ILSVRC2012_val_{i:08d}.JPEG")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _link_or_copy(encoded[i % unique_files], path)
    return GeneratedFolder(root, train_files, unique_files, len(wnids), float(np.mean(sizes)) / 1024,
                           time.perf_counter() - start)


def loader_rows(root: str, clock: Any, workers: Sequence[int], repeats: int, augment: Optional[TrainAugment] = None,
                interpolation: str = "bilinear", label: str = "") -> list[dict[str, Any]]:
    """Training-loader rows: CPU workers at each count, then GPU decode at each count (or one
    row saying why it is unavailable). ``augment``/``interpolation``: the run's training
    options; ``label`` is appended to the pipeline names."""
    data = load_imagenet(root)
    batch = min(64, len(data.train_labels))
    rows = []
    for decode in ("workers", "device"):
        if decode == "device" and not nvjpeg_available(clock.device):
            rows.append({"pipeline": GPU_DECODE + label, "decode": "device", "workers": None, "batch": batch,
                         "unavailable": UNAVAILABLE})
            continue
        for count in workers:
            train, _ = data.loaders(batch, batch, seed=0, device=clock.device, workers=count, decode=decode,
                                    train_interpolation=interpolation, augment=augment)
            seen = []
            drain = lambda: seen.append(sum(int(labels.shape[0]) for _, labels, _ in train))  # noqa: E731
            with train:
                first = clock.seconds(drain, events=False)  # starts the workers
                samples = [clock.seconds(drain, events=False) for _ in range(repeats)]
            name = (GPU_DECODE if decode == "device" else CPU_DECODE) + label
            rows.append(loader_row(name, seen[-1], count, len(train), samples, decode=decode, batch=batch,
                                   first_pass_s=first, skipped=train.num_skipped))
    return rows


def ensure_folder(bench: Bench) -> Optional[str]:
    """Writes the ILSVRC-style folder once per run (recorded under ``result["imagenet"]["files"]``)."""
    args, section = bench.args, bench.result["imagenet"]
    root = os.path.join(args.save_root, "ilsvrc")
    if section.get("files") is None:
        folder = bench.item("imagenet JPEGs",
                            lambda: write_ilsvrc_folder(root, args.imagenet_images, args.imagenet_files))
        if folder is None:
            return None
        section["files"] = {k: v for k, v in dataclasses.asdict(folder).items() if k != "root"}
    return root


@dataclass(frozen=True)
class ImageNetShapes:
    """What ``build_objective`` reads of ImageNet, without the images: ``train_labels``
    (``[1281167]`` int64, ``i % 1000``, on the device), ``num_classes``, ``image_size``."""

    train_labels: torch.Tensor
    num_classes: int = IMAGENET_CLASSES
    image_size: int = 224


def synthetic_batches(batch: int, size: int, classes: int, device: torch.device,
                      fmt: torch.memory_format, count: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """``count`` batches ``(images [B, 3, size, size] float32 ~ N(0, 1), labels [B], index [B])``."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt),
             torch.randint(0, classes, (batch,), generator=g).to(device),
             torch.arange(k * batch, (k + 1) * batch, device=device)) for k in range(count)]


def step_row(pair: str, method: str, flags: Sequence[str], setting: Setting, batch: int, steps: int,
             bench: Bench) -> dict[str, Any]:
    """ms/step and images/s of a 224-pixel, 1000-class step of ``pair`` (``flags``: the method's)
    under ``setting`` at ``batch``; FLOPs counted once per (pair, method) on an eager step."""
    args, env, clock = bench.args, bench.env, bench.clock
    if {models.input_size(name) for name in pair.split(":")} != {224}:
        raise ValueError(f"{pair} needs two 224-pixel networks ({', '.join(models.model_names(224))})")
    apply_global_switches(setting, clock.cuda)
    argv = student_argv(pair, [*flags, "--batch_size", str(batch)], setting, args.save_root)
    cfg = student_config(pair, argv, env)
    data = ImageNetShapes(torch.arange(IMAGENET_TRAIN, device=env.device) % IMAGENET_CLASSES)
    loader = CycledBatches(synthetic_batches(batch, data.image_size, data.num_classes, env.device,
                                             memory_format(cfg.channels_last)))
    start = time.perf_counter()
    run = build_run(cfg, env, data, loader)
    build_s = time.perf_counter() - start
    timed, _ = time_steps(run, loader, clock, args.warmup, steps, args.repeats)
    key = ("imagenet", pair, method)
    if key not in bench.flops and not setting.compile:
        bench.flops[key] = count_step_flops(run, loader.batches[0])
    return {"pair": pair, "method": method, "setting": setting.name, "batch": batch, "image_size": data.image_size,
            "num_classes": data.num_classes, **timed, "images_per_s": batch / (timed["ms_per_step"]["median"] / 1e3),
            "build_s": build_s, "flops_per_step": bench.flops.get(key), "compile": compile_status(run),
            "step_mode": step_mode(run), "argv": argv, "config": config_record(run.cfg)}


def run_loader(bench: Bench) -> None:
    """Writes the ILSVRC-style folder and measures the training loader over it."""
    def measure() -> list[dict[str, Any]]:
        root = ensure_folder(bench)
        workers = [int(w) for w in str(bench.args.imagenet_workers).split(",")]
        return loader_rows(root, bench.clock, workers, bench.args.loader_repeats) if root else []
    bench.result["imagenet"]["loader"] = bench.budgeted("imagenet loader", "imagenet loader", measure) or []
    bench.save()


def run_steps(bench: Bench) -> None:
    """The ImageNet WTTM step under each ``--imagenet_settings`` setting that fits the budget."""
    args = bench.args
    for setting in parse_settings(args.imagenet_settings):
        row = bench.budgeted("imagenet compile" if setting.compile else "imagenet eager",
                             f"imagenet step {args.imagenet_pair} wttm {setting.name}",
                             lambda: step_row(args.imagenet_pair, "wttm", WTTM_FLAGS, setting, args.imagenet_batch,
                                              args.imagenet_steps, bench))
        if row is not None:
            row["projected_100_epochs_h"] = 100 * IMAGENET_TRAIN / row["images_per_s"] / 3600
            bench.result["imagenet"]["steps"].append(row)
            bench.save()


def loader_target_lines(result: dict[str, Any], rows: list[dict[str, Any]], what: str, target: float) -> list[str]:
    """The best CPU-worker and GPU-decode rows; the target is stated for GPU decode."""
    out = []
    for decode, label in (("workers", "CPU workers"), ("device", "GPU decode")):
        measured = [r for r in rows if r["decode"] == decode and not r.get("unavailable")]
        if measured:
            best = max(measured, key=lambda r: r["images_per_s"])
            tail = report.judged(result, f"≥ {target:,.0f} images/s with 16 CPU cores + GPU decode",
                                 decode == "device" and best["images_per_s"] >= target)
            if decode == "workers" and result["header"]["device_type"] == "cuda" and not result.get("smoke"):
                tail = "no target of its own (GPU decode is the judged path)"
            out.append(f"- {what}, {label}: best **{best['images_per_s']:,.0f} images/s** "
                       f"({report.workers(best['workers'])}, {result['header']['cpu_count']} CPUs) — {tail}")
    if any(r.get("unavailable") for r in rows):
        out.append(f"- {what}, GPU decode: {UNAVAILABLE}" + (f" — {report.SMOKE}" if result.get("smoke") else ""))
    return out


def targets(result: dict[str, Any]) -> list[str]:
    section = result.get("imagenet") or {}
    out = loader_target_lines(result, section.get("loader", []), "ImageNet loader", IMAGENET_LOADER_IMG_S_TARGET)
    steps = [r for r in section.get("steps", []) if r.get("compile") != "eager fallback"]
    if steps:
        best = max(steps, key=lambda r: r["images_per_s"])
        hours = best["projected_100_epochs_h"]
        out.append(f"- ImageNet step ({best['pair']} WTTM, batch {best['batch']}): best **{best['images_per_s']:,.1f} "
                   f"images/s** ({best['setting']}) — " + report.judged(
                       result, f"≥ {IMAGENET_STEP_IMG_S_TARGET:,.0f} images/s",
                       best["images_per_s"] >= IMAGENET_STEP_IMG_S_TARGET))
        out.append(f"- ImageNet 100 epochs at that step rate: **{hours:,.1f} h** (step only) — "
                   + report.judged(result, f"≤ {IMAGENET_100_EPOCHS_H_TARGET:.0f} GPU-hours",
                                   hours <= IMAGENET_100_EPOCHS_H_TARGET))
    return out


def loader_table(section: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    files, lines = section.get("files"), []
    if files:
        lines += [f"{files['train_files']} training files ({files['unique_files']} distinct JPEGs of 500×375 "
                  f"or 375×500, quality 90, {files['mean_kb']:.0f} KiB mean; the rest hard links) in "
                  f"{files['classes']} class folders, written in {files['seconds']:.1f} s; in the page "
                  "cache, so disk reads are not measured.", ""]
    cells = [[r["pipeline"], None, r["batch"], None, r["unavailable"], None, None, None] if r.get("unavailable") else
             [r["pipeline"], r["workers"], r["batch"], r["images"], f"{r['images_per_s']:,.0f}",
              f"{r['ms_per_batch']:.2f}",
              report.quartiles(r["s_per_pass"], d=3)[1], f"{r['first_pass_s']:.2f}"] for r in rows]
    return lines + report.table(["pipeline", "workers", "batch", "images", "images/s", "ms/batch", "s/pass IQR",
                                 "first pass s"], cells)


def step_cells(r: dict[str, Any], hours_key: str) -> list[Any]:
    med, iqr, _ = report.quartiles(r["ms_per_step"], d=1)
    return [r["pair"], r["method"], r["setting"], r["batch"], med, iqr, f"{r['images_per_s']:,.1f}",
            f"{r['first_call_s']:.2f}", *report.tflops(r, d=1), f"{r[hours_key]:,.1f}", report.how(r)]


def tables(result: dict[str, Any]) -> list[str]:
    if "imagenet" not in result["sections"]:
        return []
    section = result.get("imagenet") or {}
    lines = ["## ImageNet data pipeline (training loader, 224-pixel views)", ""]
    lines += loader_table(section, section.get("loader", []))
    lines += ["## ImageNet training step (WTTM, 224 px, 1000 classes)", "",
              "Synthetic batches; built through helper.student like the CIFAR rows. "
              "100 epochs = the step alone over 1,281,167 images (no loader, no validation).", ""]
    return lines + report.table(["teacher:student", "method", "setting", "batch", "ms/step", "IQR", "images/s",
                                 "first call s", "GFLOP/step", "TFLOP/s", "100 epochs h", "compile; step; note"],
                                [step_cells(r, "projected_100_epochs_h") for r in section.get("steps", [])])
