"""Section ``deit``: the DeiT-S → DeiT-Ti row fed from the GPU (issue's recipe: 300 epochs of
ImageNet, 1024 images per step, RandAugment ``rand-m9-mstd0.5-inc1`` + random erasing p 0.25).

- Augmentation on a batch: a ``[B, 3, 224, 224]`` uint8 batch of crops on the device through
  the training loader's own ops (:func:`dataset.imagenet_batches.augment_views`: flip then
  batched RandAugment; :func:`~dataset.imagenet_transforms.flip_normalize`; the recipe's
  :class:`~dataset.random_erasing.RandomErasing`), against a reference-style pipeline written
  here without timm: per sample a PIL image, flip, RandAugment with timm's op and level
  definitions in PIL, ``ToTensor``, ``Normalize`` and erasing, in ``--deit_workers``
  ``DataLoader`` workers. Images/s; decode and the random-resized crop are not in these rows.
- Loader: the ImageNet section's loader rows with the recipe's augmentations (bicubic,
  mixup/CutMix off as in the recipe) over the same generated JPEGs: GPU decode + device ops,
  and the same tensor ops in CPU workers.
- Step: ``deit_small_patch16_224`` teacher, ``deit_tiny_patch16_224`` student, ``--distill vitkd
  --add nkd`` and ``--distill wttm`` (γ 0.8, β 1.6), built like every row, with the recipe's
  optimiser flags that the scripts know; images/s and 300 epochs projected from the step.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import numpy as np
import torch

from dataset.augment_recipe import DEIT
from dataset.imagenet_batches import augment_views
from dataset.imagenet_transforms import IMAGENET_MEAN, IMAGENET_STD, flip_normalize
from dataset.randaugment import draw_rand_augment
from helper.student_flags import build_parser
from scripts.bench import imagenet, report
from scripts.bench.data import loader_row
from scripts.bench.timing import Bench, Setting, parse_settings

DEIT_PAIR = "deit_small_patch16_224:deit_tiny_patch16_224"
METHOD_FLAGS = {"vitkd+nkd": ("--distill", "vitkd", "--add", "nkd", "-r", "1", "-a", "1", "-b", "1"),
                "wttm": ("--distill", "wttm", "--ttm_l", "0.8", "-r", "1", "-a", "0", "-b", "1.6")}
# cls_KD 1.0's DeiT recipe (issue 15.4); only those the scripts already parse are passed.
RECIPE_FLAGS = (("--dataset", "imagenet"), ("--opt", "adamw"), ("--wd_skip", "norm_bias_tokens"),
                ("--learning_rate", "1e-3"), ("--weight_decay", "0.05"), ("--sched", "cosine"),
                ("--warmup_epochs", "20"), ("--min_lr", "1e-5"), ("--clip_grad", "5"), ("--smoothing", "0.1"))
DEIT_EPOCHS, DEIT_STEP_IMAGES = 300, 1024
AUGMENT = dataclasses.replace(DEIT, mixup=0.0, cutmix=0.0)  # the recipe's: batch mixing off
DEIT_300_EPOCHS_H_TARGET = 24.0  # one H200
DEIT_LOADER_IMG_S_TARGET = 10_000.0  # GPU decode + device augmentation, 16 CPU cores


def recipe_flags() -> tuple[list[str], list[str]]:
    """(the recipe's flags the student parser knows, the names of those it does not yet)."""
    parser, known, missing = build_parser(), [], []
    for flag, value in RECIPE_FLAGS:
        try:
            _, rest = parser.parse_known_args(["--path_t", "unused.pth", flag, value])
        except (SystemExit, Exception):  # an ambiguous abbreviation of a longer flag: unknown
            rest = [flag]
        (missing.append(flag) if rest else known.extend((flag, value)))
    return known, missing


def crops(n: int, device: torch.device) -> torch.Tensor:
    """``[n, 3, 224, 224]`` uint8 photo-like crops (8 distinct, repeated), on ``device``."""
    rng = np.random.default_rng(0)
    distinct = torch.stack([torch.from_numpy(imagenet.photo_like(rng, 224, 224)).permute(2, 0, 1)
                            for _ in range(min(n, 8))])
    return distinct.repeat(math.ceil(n / len(distinct)), 1, 1, 1)[:n].contiguous().to(device)


def device_augment_row(bench: Bench, n: int) -> dict[str, Any]:
    """Images/s of flip + RandAugment + normalise + erasing on an ``n``-image batch on the device."""
    clock, device = bench.clock, bench.clock.device
    config = AUGMENT.rand_augment_config(IMAGENET_MEAN, "bicubic")
    erasing, pixels = AUGMENT.erasing(), crops(n, device)
    gen = torch.Generator(device=device).manual_seed(0)

    def pipeline() -> torch.Tensor:
        flip = torch.rand(n, generator=gen, device=device) < 0.5
        out, flip = augment_views(pixels, flip, draw_rand_augment(n, config, gen), config)
        return erasing(flip_normalize(out, flip), gen)
    pipeline()
    samples = [clock.seconds(pipeline, events=False) for _ in range(bench.args.repeats)]
    return loader_row(f"ours: batched tensor ops on {device.type}", n, 0, 1, samples, decode="batch", batch=n)


def _pil_rand_augment():
    """timm's ``rand-m9-mstd0.5-inc1`` per image, with timm's op and level definitions in PIL."""
    from PIL import Image, ImageEnhance, ImageOps
    neg = lambda v: -v if random.random() > 0.5 else v  # noqa: E731  timm's _randomly_negate
    affine = lambda img, m, rs, fill: img.transform(  # noqa: E731
        img.size, Image.AFFINE, m, resample=rs, fillcolor=fill)
    shift = lambda m, side: neg(m / 10 * 0.45) * side  # noqa: E731
    enhance = lambda cls: lambda img, m, rs, fill: cls(img).enhance(max(0.1, 1 + neg(m / 10 * 0.9)))  # noqa: E731
    ops = {"AutoContrast": lambda img, m, rs, fill: ImageOps.autocontrast(img),
           "Equalize": lambda img, m, rs, fill: ImageOps.equalize(img),
           "Invert": lambda img, m, rs, fill: ImageOps.invert(img),
           "Rotate": lambda img, m, rs, fill: img.rotate(neg(m / 10 * 30), resample=rs, fillcolor=fill),
           "PosterizeIncreasing": lambda img, m, rs, fill: ImageOps.posterize(img, 4 - int(m / 10 * 4)),
           "SolarizeIncreasing": lambda img, m, rs, fill: ImageOps.solarize(img, 256 - int(m / 10 * 256)),
           "SolarizeAdd": lambda img, m, rs, fill: img.point(
               [min(255, i + int(m / 10 * 110)) if i < 128 else i for i in range(256)] * 3),
           "ColorIncreasing": enhance(ImageEnhance.Color), "ContrastIncreasing": enhance(ImageEnhance.Contrast),
           "BrightnessIncreasing": enhance(ImageEnhance.Brightness),
           "SharpnessIncreasing": enhance(ImageEnhance.Sharpness),
           "ShearX": lambda img, m, rs, fill: affine(img, (1, neg(m / 10 * 0.3), 0, 0, 1, 0), rs, fill),
           "ShearY": lambda img, m, rs, fill: affine(img, (1, 0, 0, neg(m / 10 * 0.3), 1, 0), rs, fill),
           "TranslateXRel": lambda img, m, rs, fill: affine(img, (1, 0, shift(m, img.size[0]), 0, 1, 0), rs, fill),
           "TranslateYRel": lambda img, m, rs, fill: affine(img, (1, 0, 0, 0, 1, shift(m, img.size[1])), rs, fill)}
    fill = tuple(round(255 * x) for x in IMAGENET_MEAN)

    def apply(img):
        for name in random.choices(list(ops), k=2):
            if random.random() <= 0.5:
                m = min(10.0, max(0.0, random.gauss(9, 0.5)))
                img = ops[name](img, m, random.choice((Image.BILINEAR, Image.BICUBIC)), fill)
        return img
    return apply


class ReferenceStyleDeiT(torch.utils.data.Dataset):
    """Per sample, as timm's training transform after the crop: flip, PIL RandAugment,
    ToTensor, Normalize, RandomErasing (p 0.25, per-pixel normal)."""

    def __init__(self, pixels: torch.Tensor) -> None:
        self.images = pixels.cpu().permute(0, 2, 3, 1).contiguous().numpy()  # [N, H, W, C]
        self.mean, self.std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.rand_augment = None  # built in the worker (its ops are closures)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image
        img = Image.fromarray(self.images[index])
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        self.rand_augment = self.rand_augment or _pil_rand_augment()
        img = self.rand_augment(img)
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float().div(255).sub_(self.mean).div_(self.std)
        return AUGMENT.erasing()(x[None], torch.default_generator)[0]


def reference_augment_row(bench: Bench, n: int, workers: int) -> dict[str, Any]:
    """Images/s of the reference-style pipeline over ``n`` crops in ``workers`` workers."""
    loader = torch.utils.data.DataLoader(ReferenceStyleDeiT(crops(n, torch.device("cpu"))), batch_size=min(64, n),
                                         num_workers=workers, persistent_workers=workers > 0)
    drain = lambda: [b.to(bench.clock.device) for b in loader]  # noqa: E731
    drain()  # starts the workers
    samples = [bench.clock.seconds(drain, events=False) for _ in range(bench.args.loader_repeats)]
    return loader_row("reference-style: PIL RandAugment per sample, DataLoader", n, workers, len(loader), samples,
                      decode="batch", batch=min(64, n))


def run(bench: Bench) -> None:
    """Augmentation rows, loader rows, then the step under each ``--deit_settings`` setting."""
    args, section = bench.args, bench.result["deit"]

    def augment() -> list[dict[str, Any]]:
        return [device_augment_row(bench, args.deit_aug_images),
                reference_augment_row(bench, args.deit_ref_images, args.deit_workers)]
    section["augment"] = bench.budgeted("deit augment", "deit augmentation", augment) or []

    def loader() -> list[dict[str, Any]]:
        root = imagenet.ensure_folder(bench)
        workers = [int(w) for w in str(args.imagenet_workers).split(",")]
        return imagenet.loader_rows(root, bench.clock, workers, args.loader_repeats, AUGMENT, "bicubic",
                                    " + RandAugment + erasing") if root else []
    section["loader"] = bench.budgeted("deit augment", "deit loader", loader) or []
    for method in args.deit_methods.split(","):
        for setting in parse_settings(args.deit_settings):
            row = bench.budgeted("deit compile" if setting.compile else "deit eager",
                                 f"deit step {method} {setting.name}", lambda: step_row(bench, method, setting))
            if row is not None:
                section["steps"].append(row)
                bench.save()


def step_row(bench: Bench, method: str, setting: Setting) -> dict[str, Any]:
    """The DeiT step of ``method`` under ``setting``, with the projected 300 epochs."""
    known, missing = recipe_flags()
    row = imagenet.step_row(DEIT_PAIR, method, [*known, *METHOD_FLAGS[method]], setting, bench.args.deit_batch,
                            bench.args.deit_steps, bench)
    row.update(projected_300_epochs_h=DEIT_EPOCHS * imagenet.IMAGENET_TRAIN / row["images_per_s"] / 3600,
               recipe_flags_unknown=missing)
    return row


def targets(result: dict[str, Any]) -> list[str]:
    section = result.get("deit") or {}
    out = []
    rows = {r["pipeline"].split(":")[0]: r for r in section.get("augment", [])}
    if {"ours", "reference-style"} <= set(rows):
        ours, ref = rows["ours"], rows["reference-style"]
        tail = report.SMOKE if result.get("smoke") else "context for the loader target"
        out.append(f"- DeiT augmentation on 224-px crops: ours **{ours['images_per_s']:,.0f} images/s** vs PIL "
                   f"RandAugment in {report.workers(ref['workers'])} {ref['images_per_s']:,.0f} images/s — {tail}")
    out += imagenet.loader_target_lines(result, section.get("loader", []), "DeiT loader (recipe augmentations)",
                                        DEIT_LOADER_IMG_S_TARGET)
    steps = [r for r in section.get("steps", []) if r.get("compile") != "eager fallback"]
    if steps:
        best = max(steps, key=lambda r: r["images_per_s"])
        hours = best["projected_300_epochs_h"]
        out.append(f"- DeiT-S → DeiT-Ti, 300 epochs at the best step rate ({best['method']}, {best['setting']}, "
                   f"{best['images_per_s']:,.1f} images/s): **{hours:,.1f} h** on one device (step only) — "
                   + report.judged(result, f"≤ {DEIT_300_EPOCHS_H_TARGET:.0f} GPU-hours on one H200",
                                   hours <= DEIT_300_EPOCHS_H_TARGET))
    return out


def tables(result: dict[str, Any]) -> list[str]:
    if "deit" not in result["sections"]:
        return []
    section = result.get("deit") or {}
    lines = ["## DeiT augmentation on 224-pixel uint8 crops (flip + RandAugment rand-m9-mstd0.5-inc1 + normalise + "
             "erasing p 0.25)", ""]
    lines += report.table(["pipeline", "images", "workers", "images/s", "s/pass IQR"],
                          [[r["pipeline"], r["images"], r["workers"], f"{r['images_per_s']:,.0f}",
                            report.quartiles(r["s_per_pass"], d=3)[1]] for r in section.get("augment", [])])
    lines += ["## DeiT training loader (recipe augmentations, bicubic, over the generated JPEGs)", ""]
    lines += imagenet.loader_table({}, section.get("loader", []))
    steps = section.get("steps", [])
    missing = steps[0].get("recipe_flags_unknown") if steps else None
    lines += [f"## DeiT-S → DeiT-Ti training step (224 px, 1000 classes; the recipe's step is {DEIT_STEP_IMAGES} "
              "images)", "", f"Synthetic batches; built through helper.student like every row. {DEIT_EPOCHS} epochs "
              f"= the step alone over 1,281,167 images per epoch at the row's images/s "
              f"({math.ceil(imagenet.IMAGENET_TRAIN / DEIT_STEP_IMAGES)} steps of {DEIT_STEP_IMAGES})."
              + (f" Recipe flags the scripts do not parse yet (not applied): {', '.join(missing)}."
                 if missing else ""), ""]
    return lines + report.table(["teacher:student", "method", "setting", "batch", "ms/step", "IQR", "images/s",
                                 "first call s", "GFLOP/step", "TFLOP/s", "300 epochs h", "compile; step; note"],
                                [imagenet.step_cells(r, "projected_300_epochs_h") for r in steps])
