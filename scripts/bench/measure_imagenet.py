"""ImageNet rows: the streaming loader over ILSVRC-style JPEGs, and the 224-pixel WTTM step.

- Loader: ``ImageFolderData.loaders`` (the training loader a run uses) over the folder of
  :mod:`scripts.bench.imagenet_files`, with PIL decoding in ``DataLoader`` workers
  (``decode="workers"``) at several worker counts, and with nvJPEG decoding on the GPU
  (``decode="device"``) where CUDA and torchvision are present.
- Step: the paper's ResNet-34 → ResNet-18 WTTM setting (``--dataset imagenet --distill wttm
  --ttm_l 0.8 -r 1 -a 0 -b 1.6``) built through ``helper.student`` like the CIFAR rows, fed
  synthetic normalised 224-pixel batches with 1000 classes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

import models
from dataset.imagenet_decode import nvjpeg_available
from dataset.imagenet_loader import ImageFolderData, load_imagenet
from helper import distributed
from helper.speed import memory_format
from scripts.bench.measure_loader import loader_row
from scripts.bench.measure_step import (CycledBatches, build_run, compile_status, config_record,
                                        count_step_flops, step_mode, student_argv, student_config,
                                        time_steps)
from scripts.bench.timing import Clock, Setting, apply_global_switches

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 training images
IMAGENET_CLASSES = 1000
EPOCHS = 100
# The paper's WTTM for ResNet-34 -> ResNet-18 (gamma 0.8, beta 1.6); --dataset imagenet brings
# the data set's own recipe (torchdistill's optimiser and schedule).
WTTM_FLAGS = ("--dataset", "imagenet", "--distill", "wttm", "--ttm_l", "0.8", "-r", "1", "-a", "0", "-b", "1.6")
GPU_DECODE = "GPU decode: nvJPEG + crop on the device"
CPU_DECODE = "CPU workers: PIL decode + crop"
UNAVAILABLE = "unavailable: no CUDA/torchvision"


@dataclass(frozen=True)
class ImageNetShapes:
    """What ``build_objective`` reads of ImageNet, without the images.

    Attributes:
        train_labels: ``[1281167]`` int64 labels (``i % 1000``) on the device.
        num_classes: 1000.
        image_size: network input side in pixels (224).
    """

    train_labels: torch.Tensor
    num_classes: int = IMAGENET_CLASSES
    image_size: int = 224


def synthetic_batches(batch: int, size: int, classes: int, device: torch.device,
                      fmt: torch.memory_format, count: int = 2) -> list[tuple[torch.Tensor, ...]]:
    """``count`` batches ``(images [B, 3, size, size] float32 ~ N(0, 1), labels [B], index [B])``."""
    g = torch.Generator().manual_seed(0)
    out = []
    for k in range(count):
        images = torch.randn(batch, 3, size, size, generator=g).to(device, memory_format=fmt)
        labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        out.append((images, labels, torch.arange(k * batch, (k + 1) * batch, device=device)))
    return out


def step_row(setting: Setting, env: distributed.DistEnv, args: Any, clock: Clock,
             flops: dict[str, Optional[float]]) -> dict[str, Any]:
    """ms/step and images/s of the ImageNet WTTM step under ``setting`` at ``--imagenet_batch``."""
    pair, batch = args.imagenet_pair, args.imagenet_batch
    sizes = {models.input_size(name) for name in pair.split(":")}
    if sizes != {224}:
        raise ValueError(f"--imagenet_pair {pair} needs two 224-pixel networks "
                         f"({', '.join(models.model_names(224))})")
    apply_global_switches(setting, clock.cuda)
    argv = student_argv(pair, [*WTTM_FLAGS, "--batch_size", str(batch)], setting, args.save_root)
    cfg = student_config(pair, argv, env)
    data = ImageNetShapes(torch.arange(IMAGENET_TRAIN, device=env.device) % IMAGENET_CLASSES)
    loader = CycledBatches(synthetic_batches(batch, data.image_size, data.num_classes, env.device,
                                             memory_format(cfg.channels_last)))
    start = time.perf_counter()
    run = build_run(cfg, env, data, loader)
    build_s = time.perf_counter() - start
    timed, _ = time_steps(run, loader, clock, args.warmup, args.imagenet_steps, args.repeats)
    if pair not in flops and not setting.compile:
        flops[pair] = count_step_flops(run, loader.batches[0])
    images_per_s = batch / (timed["ms_per_step"]["median"] / 1e3)
    return {"pair": pair, "method": "wttm", "setting": setting.name, "batch": batch,
            "image_size": data.image_size, "num_classes": data.num_classes, **timed,
            "images_per_s": images_per_s, "build_s": build_s,
            "projected_100_epochs_h": EPOCHS * IMAGENET_TRAIN / images_per_s / 3600,
            "flops_per_step": flops.get(pair), "compile": compile_status(run), "step_mode": step_mode(run),
            "argv": argv, "config": config_record(run.cfg)}


def loader_rows(root: str, clock: Clock, workers: list[int], repeats: int) -> list[dict[str, Any]]:
    """Training-loader rows: CPU workers at each count, then GPU decode at each count (or one
    row saying why it is unavailable)."""
    data = load_imagenet(root)
    batch = min(64, len(data.train_labels))
    rows = [_timed_pass(data, "workers", w, batch, clock, repeats) for w in workers]
    if nvjpeg_available(clock.device):
        rows += [_timed_pass(data, "device", w, batch, clock, repeats) for w in workers]
    else:
        rows.append({"pipeline": GPU_DECODE, "decode": "device", "workers": None, "batch": batch,
                     "unavailable": UNAVAILABLE})
    return rows


def _timed_pass(data: ImageFolderData, decode: str, workers: int, batch: int, clock: Clock,
                repeats: int) -> dict[str, Any]:
    """Images/s of full passes over the training split (the first pass, which starts the
    workers, is timed apart)."""
    train, _ = data.loaders(batch, batch, seed=0, device=clock.device, workers=workers, decode=decode)
    seen = []

    def drain() -> None:
        seen.append(sum(int(labels.shape[0]) for _, labels, _ in train))
    with train:
        first = clock.seconds(drain, events=False)
        samples = [clock.seconds(drain, events=False) for _ in range(repeats)]
    name = GPU_DECODE if decode == "device" else CPU_DECODE
    return loader_row(name, seen[-1], workers, len(train), samples, decode=decode, batch=batch,
                      first_pass_s=first, skipped=train.num_skipped)
