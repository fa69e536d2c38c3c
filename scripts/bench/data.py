"""Sections ``data`` and ``crd``: the CIFAR data pipeline against the seed's per-sample one,
and CRD negative sampling against the reference's per-sample loop.

Images are synthetic uint8 CIFAR-shaped tensors (timing does not depend on pixel values).
"""
from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch

from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from distiller_zoo.crd import ContrastSampler
from helper.speed import memory_format
from scripts.bench import report
from scripts.bench.timing import Bench, Clock, summarize

BATCH = 64  # the recipe's batch size
CLASSES = 100
CIFAR_LOADER_SPEEDUP_TARGET = 20.0  # ours / reference-style images/s
CRD_SPEEDUP_TARGET = 50.0  # reference / ours ms per batch
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def synthetic_data(n_train: int, n_test: int, classes: int = CLASSES) -> ImageDataset:
    """CIFAR-shaped uint8 images ``[N, 3, 32, 32]`` with balanced labels (``i % classes``), CPU."""
    g = torch.Generator().manual_seed(0)
    train = torch.randint(0, 256, (n_train, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = torch.randint(0, 256, (max(n_test, 1), 3, 32, 32), dtype=torch.uint8, generator=g)
    return ImageDataset("synthetic", train, torch.arange(n_train) % classes, test,
                        torch.arange(test.shape[0]) % classes, classes, CIFAR100_MEAN, CIFAR100_STD)


def cifar_batches(data: ImageDataset, device: torch.device, batch: int = BATCH,
                  count: int = 4) -> dict[bool, list[Batch]]:
    """``count`` augmented batches of ``data`` from ``DeviceLoader``, per layout (channels_last?)."""
    out = {}
    for cl in (False, True):
        loader = DeviceLoader(data.train_images.to(device), data.train_labels.to(device), batch, data.mean,
                              data.std, train=True, seed=0, memory_format=memory_format(cl))
        out[cl] = [b for _, b in zip(range(count), loader)]
    return out


class ReferenceStyleCIFAR(torch.utils.data.Dataset):
    """The seed's training pipeline per sample, written here without torchvision: PIL image,
    RandomCrop(32, padding=4) with zero fill, RandomHorizontalFlip(), ToTensor(),
    Normalize(mean, std); random draws from torch as torchvision makes them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images = images.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, C] as CIFAR's arrays
        self.labels = labels.cpu().tolist()
        self.mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR100_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        """``(image [3, 32, 32] float32 normalised, label, index)``."""
        from PIL import Image  # in the worker, as the seed's transforms import it
        top, left = (int(v) for v in torch.randint(0, 9, (2,)))
        padded = Image.new("RGB", (40, 40))
        padded.paste(Image.fromarray(self.images[index]), (4, 4))
        img = padded.crop((left, top, left + 32, top + 32))
        if bool(torch.rand(1) < 0.5):
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous().float().div(255)
        return x.sub_(self.mean).div_(self.std), self.labels[index], index


def loader_row(name: str, images: int, workers: int, batches: int, samples: list[float],
               **extra: Any) -> dict[str, Any]:
    """A data-pipeline row from the seconds of each timed pass over ``images`` images."""
    med = statistics.median(samples)
    return {"pipeline": name, "images": images, "workers": workers, "s_per_pass": summarize(samples),
            "images_per_s": images / med, "ms_per_batch": 1e3 * med / max(batches, 1), **extra}


def device_loader_rows(data: ImageDataset, clock: Clock, n_images: int, repeats: int) -> list[dict[str, Any]]:
    """Images/s of our on-device loader over the first ``n_images`` images, in both layouts."""
    n = min(n_images, data.train_images.shape[0])
    images, labels = data.train_images[:n].to(clock.device), data.train_labels[:n].to(clock.device)
    rows = []
    for cl in (False, True):
        loader = DeviceLoader(images, labels, BATCH, data.mean, data.std, train=True, seed=0,
                              memory_format=memory_format(cl))

        def drain(loader: DeviceLoader = loader) -> None:
            for _ in loader:
                pass
        drain()
        samples = [clock.seconds(drain, events=False) for _ in range(repeats)]
        rows.append(loader_row("ours: DeviceLoader" + (", channels_last" if cl else ""), n, 0, len(loader), samples))
    return rows


def reference_loader_row(data: ImageDataset, clock: Clock, n_images: int, workers: int,
                         repeats: int) -> dict[str, Any]:
    """Images/s of the reference-style pipeline on the same images (workers started first)."""
    n = min(n_images, data.train_images.shape[0])
    dataset = ReferenceStyleCIFAR(data.train_images[:n], data.train_labels[:n])
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)

    def drain() -> None:
        for images, labels, _ in loader:  # the seed copies each batch to the device
            images.to(clock.device), labels.to(clock.device)
    drain()  # starts the workers
    samples = [clock.seconds(drain, events=False) for _ in range(repeats)]
    return loader_row("reference-style: PIL per sample, DataLoader", n, workers, len(loader), samples)


def crd_rows(clock: Clock, n_data: int, k: int, repeats: int, reference_repeats: int) -> list[dict[str, Any]]:
    """Milliseconds per batch of 64 for ``ContrastSampler.draw`` ('exact' mode: ``k`` negatives
    from other classes, out of ``n_data`` samples) and for the reference's loop (one process)."""
    device = clock.device
    labels = torch.arange(n_data) % CLASSES
    sampler = ContrastSampler(labels.to(device), k, "exact", torch.Generator(device=device).manual_seed(0))
    index = torch.randperm(n_data)[:BATCH].to(device)
    for _ in range(3):
        sampler.draw(index)
    ours = [1e3 * clock.seconds(lambda: sampler.draw(index)) for _ in range(repeats)]
    labels_np = labels.numpy()
    negatives = [np.flatnonzero(labels_np != c) for c in range(CLASSES)]  # the reference's cls_negative
    rows_idx = index.cpu().numpy()

    def reference() -> torch.Tensor:
        rows = []
        for i in rows_idx:
            neg = np.random.choice(negatives[labels_np[i]], k, replace=k > len(negatives[labels_np[i]]))
            rows.append(np.hstack((np.asarray([i]), neg)))
        return torch.from_numpy(np.stack(rows)).to(device)
    reference()
    ref = [1e3 * clock.seconds(reference, events=False) for _ in range(reference_repeats)]
    common = {"batch": BATCH, "n_data": n_data, "k": k}
    return [{"sampler": "ours: ContrastSampler.draw (batched, on device)", "ms": summarize(ours), **common},
            {"sampler": "reference: numpy.random.choice per sample", "ms": summarize(ref), **common}]


def run_data(bench: Bench, data: ImageDataset) -> None:
    """Our loader in both layouts, then the reference-style pipeline."""
    args, clock = bench.args, bench.clock
    rows = bench.item("data pipeline (ours)", lambda: device_loader_rows(
        data, clock, args.loader_images, args.loader_repeats)) or []
    reference = bench.item("data pipeline (reference-style)", lambda: reference_loader_row(
        data, clock, args.ref_images, args.ref_workers, args.loader_repeats))
    bench.result["loader"] = rows + ([reference] if reference else [])
    bench.save()


def run_crd(bench: Bench) -> None:
    args = bench.args
    bench.result["crd"] = bench.item("CRD sampling", lambda: crd_rows(
        bench.clock, args.crd_images, args.crd_k, args.crd_repeats, args.ref_crd_repeats)) or []
    bench.save()


def targets(result: dict[str, Any]) -> list[str]:
    out = []
    ours = [r for r in result["loader"] if r["pipeline"] == "ours: DeviceLoader"]
    ref = [r for r in result["loader"] if r["pipeline"].startswith("reference")]
    if ours and ref:
        ratio = ours[0]["images_per_s"] / ref[0]["images_per_s"]
        tail = report.judged(result, f"≥ {CIFAR_LOADER_SPEEDUP_TARGET:.0f}×", ratio >= CIFAR_LOADER_SPEEDUP_TARGET)
        out.append(f"- CIFAR data pipeline: ours / reference-style ({report.workers(ref[0]['workers'])}) = "
                   f"**{ratio:.1f}×** — {tail}")
    if len(result["crd"]) == 2:
        ratio = result["crd"][1]["ms"]["median"] / result["crd"][0]["ms"]["median"]
        out.append(f"- CRD sampling per batch: reference / ours = **{ratio:.1f}×** — "
                   + report.judged(result, f"≥ {CRD_SPEEDUP_TARGET:.0f}×", ratio >= CRD_SPEEDUP_TARGET))
    return out


def tables(result: dict[str, Any]) -> list[str]:
    lines = []
    if "data" in result["sections"]:
        lines += ["## Data pipeline (batch 64, random crop + flip + normalise)", ""]
        lines += report.table(["pipeline", "images", "workers", "images/s", "ms/batch", "s/pass IQR",
                               "s/pass min–max"],
                              [[r["pipeline"], r["images"], r["workers"], f"{r['images_per_s']:,.0f}",
                                f"{r['ms_per_batch']:.3f}", *report.quartiles(r["s_per_pass"], d=3)[1:]]
                               for r in result["loader"]])
    if "crd" in result["sections"]:
        lines += ["## CRD negatives per batch of 64", ""]
        lines += report.table(["sampler", "N", "K", "ms median", "IQR", "min–max"],
                              [[r["sampler"], r["n_data"], r["k"], *report.quartiles(r["ms"], d=3)]
                               for r in result["crd"]])
    return lines
