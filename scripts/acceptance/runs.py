"""The acceptance sections that drive whole runs and the benchmark's code: digits end to end
(``helper.student.train``, what ``train_student.py`` runs), nvJPEG vs PIL decoding, the
benchmark's step rows with and without CUDA graphs, and the ImageNet loader."""
from __future__ import annotations

import csv
import glob
import io
import json
import os
from typing import Any

import numpy as np
import torch

import models


def small_digits(n_train: int, n_test: int) -> Any:
    """The digits set cut to its first images (the smoke run), handed to the runs."""
    import dataclasses

    import dataset

    data = dataset.load_dataset("digits", "unused")
    return dataclasses.replace(data, train_images=data.train_images[:n_train], train_labels=data.train_labels[:n_train],
                               test_images=data.test_images[:n_test], test_labels=data.test_labels[:n_test])


def _teacher_file(root: str) -> str:
    path = os.path.join(root, "teachers", "resnet8_vanilla", "ckpt_epoch_0.pth")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.manual_seed(0)
    model = models.create_model("resnet8", 10)
    torch.save({"model": model.state_dict(), "epoch": 0, "best_acc": 0.0, "arch": "resnet8"}, path)
    return path


def digits_runs(root: str, device: torch.device, epochs: int, data: Any = None) -> dict[str, Any]:
    """``train_student`` on digits (``data`` when given) twice, ``--cuda_graphs on`` and
    ``off``: per-epoch rows and each run's ``summary.json`` step record."""
    from helper.student import train
    teacher = _teacher_file(root)
    out: dict[str, Any] = {}
    for mode in ("on", "off"):
        save_root = os.path.join(root, f"graphs_{mode}")
        train(["--path_t", teacher, "--model_s", "resnet8", "--dataset", "digits", "--distill", "wttm",
               "--ttm_l", "0.1", "-b", "1", "--epochs", str(epochs), "--seed", "1", "--cuda_graphs", mode,
               "--save_root", save_root, "--device", str(device), "--teacher_cache", "off",
               "--print_freq", "1000000", "--lr_decay_epochs", str(max(epochs - 1, 1))], data)
        [run_dir] = glob.glob(os.path.join(save_root, "student_model", "*"))
        with open(os.path.join(run_dir, "metrics.csv"), encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as handle:
            summary = json.load(handle)
        out[mode] = {"rows": rows, "summary": summary}
    return out


def compare_digits(runs: dict[str, Any], cuda: bool) -> tuple[list[dict[str, Any]], bool, list[str]]:
    """Per-epoch loss and accuracy of the two runs; passes when the losses agree within 1e-3
    relative, test accuracy within 1 point, and the graph run ran as a graph with no fallback."""
    rows, ok = [], True
    for on, off in zip(runs["on"]["rows"], runs["off"]["rows"]):
        loss_on, loss_off = float(on["train_loss"]), float(off["train_loss"])
        rel = abs(loss_on - loss_off) / max(abs(loss_off), 1e-12)
        acc = abs(float(on["test_acc"]) - float(off["test_acc"]))
        ok &= rel <= 1e-3 and acc <= 1.0
        rows.append({"epoch": on["epoch"], "train_loss on": loss_on, "train_loss off": loss_off, "loss rel diff": rel,
                     "test_acc on": float(on["test_acc"]), "test_acc off": float(off["test_acc"])})
    summary = runs["on"]["summary"]
    lines = [f"--cuda_graphs on: step_mode `{summary.get('step_mode')}`, captures {summary.get('graph_captures')}, "
             f"graph events {summary.get('graph_events')}",
             f"--cuda_graphs off: step_mode `{runs['off']['summary'].get('step_mode')}`"]
    ok &= "step_mode" in summary and not summary.get("graph_events")
    if cuda:
        ok &= str(summary.get("step_mode", "")).startswith("CUDA graph")
    return rows, bool(ok), lines


def jpegs() -> list[tuple[str, bytes]]:
    """Generated test JPEGs: photo-like YCbCr at two qualities and subsamplings, a progressive
    one, and one stored as RGB with an Adobe APP14 marker (transform 0)."""
    from PIL import Image

    from scripts.bench.imagenet import photo_like
    rng = np.random.default_rng(0)
    out = []
    for name, kwargs in (("baseline q90 4:2:0", {"quality": 90}), ("baseline q75 4:4:4", {"quality": 75, "subsampling": 0}),
                         ("progressive q90", {"quality": 90, "progressive": True}),
                         ("Adobe RGB (APP14 transform 0)", {"quality": 95, "keep_rgb": True})):
        buffer = io.BytesIO()
        Image.fromarray(photo_like(rng, 120, 160)).save(buffer, "JPEG", **kwargs)
        out.append((name, buffer.getvalue()))
    return out


def decode_rows(device: torch.device) -> tuple[list[dict[str, Any]], bool, str]:
    """PIL vs the run's decoder (nvJPEG where available) per generated JPEG."""
    from dataset.imagenet_decode import BatchDecoder, decode_bytes, gpu_decodable, nvjpeg_available
    decoder = BatchDecoder(device)
    rows, ok = [], True
    for name, data in jpegs():
        pil = decode_bytes(data).to(torch.int16)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if gpu_decodable(data) and decoder.use_nvjpeg:
            ours = decoder.decode([tensor])[0]
            via = "nvJPEG"
        else:
            ours, via = decoder._pil(tensor), "PIL"
        diff = (ours.cpu().to(torch.int16) - pil).abs()
        adobe = "Adobe" in name
        good = (via == "PIL" and int(diff.max()) == 0) if adobe else int(diff.max()) <= 16 and float(diff.float().mean()) <= 1.0
        ok &= good
        rows.append({"file": name, "decoded by": via, "max grey-level diff": int(diff.max()),
                     "mean diff": float(diff.float().mean()), "ok": good})
    note = "" if nvjpeg_available(device) else "nvJPEG unavailable here (no CUDA/torchvision): PIL on both sides"
    return rows, bool(ok), note


def bench_steps(device: torch.device, save_root: str, pair: str, smoke: bool) -> list[dict[str, Any]]:
    """The benchmark's step rows (``scripts/bench/step``), fp32 and bf16+cl, each with
    ``--cuda_graphs on`` and ``off``: ms per step and how the step ran."""
    from helper import distributed
    from scripts.bench import data as bench_data, step as bench_step
    from scripts.bench.timing import Clock, Setting, apply_global_switches
    env = distributed.DistEnv(0, 1, 0, device)
    clock = Clock(device)
    data = bench_data.synthetic_data(256, 1)
    batches = bench_data.cifar_batches(data, device, batch=16 if smoke else 64)
    rows = []
    for name in ("fp32", "bf16+cl"):
        setting = Setting.parse(name)
        apply_global_switches(setting, clock.cuda)
        for graphs in ("off", "on"):
            argv = bench_step.student_argv(pair, ["--distill", "wttm", "--ttm_l", "0.1", "-b", "1"], setting,
                                             save_root, ["--cuda_graphs", graphs])
            loader = bench_step.CycledBatches(batches[setting.channels_last])
            run = bench_step.build_run(bench_step.student_config(pair, argv, env), env, data, loader)
            timed, _ = bench_step.time_steps(run, loader, clock, 2 if smoke else 10, 2 if smoke else 50,
                                               1 if smoke else 5)
            rows.append({"setting": name, "--cuda_graphs": graphs, "ms/step median": timed["ms_per_step"]["median"],
                         "step mode": bench_step.step_mode(run)})
    return rows


def imagenet_loader(device: torch.device, root: str, smoke: bool) -> list[dict[str, Any]]:
    """Images/s of the ImageNet training loader over generated ILSVRC-style JPEGs."""
    from scripts.bench.imagenet import loader_rows, write_ilsvrc_folder
    from scripts.bench.timing import Clock
    folder = write_ilsvrc_folder(os.path.join(root, "imagenet"), 32 if smoke else 512, 8 if smoke else 64)
    workers = [0] if smoke else [4, 8]
    rows = loader_rows(folder.root, Clock(device), workers, 1 if smoke else 2)
    return [{"pipeline": r["pipeline"], "workers": r.get("workers"),
             "images/s": r.get("images_per_s", "unavailable")} for r in rows]
