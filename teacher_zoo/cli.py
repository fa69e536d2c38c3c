"""The published teachers (CIFAR-100, ImageNet, DeiT): where they live, whether a file is one, how good it is.

    python -m teacher_zoo check PATH --arch ARCH [--num_classes 100]
    python -m teacher_zoo list [--root save/models]
    python -m teacher_zoo verify [ARCH ...] [--root save/models] [--device auto]
    python -m teacher_zoo verify --imagenet --data_folder DIR [ARCH ...] [--workers N]
    python -m teacher_zoo verify --deit --data_folder DIR [--workers N]

``check`` loads a file with ``weights_only=True`` into the architecture (keys and shapes
must match exactly); it exits 0 when the file is a valid checkpoint, 3 when it is not (the
fetch script deletes such files), 2 on a usage error. ``list`` shows which teachers are
present and valid: the CIFAR-100 ones, and torchvision's ImageNet files of
``IMAGENET_TEACHERS`` (``<root>/<arch>_imagenet/<file>``, checked by SHA-256). ``verify``
scores each present teacher on the test set and flags any that is more than
``--tolerance`` points from the published top-1 (exit 1 when one is flagged); with
``--imagenet`` (short for ``--dataset imagenet``) it scores the ImageNet files on the val
split of the ILSVRC-2012 folder ``--data_folder`` against torchvision's top-1. ``--deit``
scores the DeiT table's teacher (mmcls's DeiT III-S file, ``<root>/<arch>_imagenet/<file>``) on
that split twice, both bicubic: as mmcls does (shorter side 224, centre crop 224: mmcls lists
83.06) and as the student is evaluated (256 -> 224: the table's 82.76), rows ``ARCH`` and
``ARCH@256``; ``--expected`` takes either name.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import models
from dataset import load_dataset
from errors import UserError, exit_on_user_error
from helper.distributed import resolve_device
from helper.data_setup import default_workers
from teacher_zoo.fetch import sha256_matches
from teacher_zoo.files import (DEIT_EVALS, TORCHVISION_EVAL, InvalidCheckpoint, deit_expected,
                               load_teacher_file, score, stored_accuracy, teacher_path)
from teacher_zoo.published import (DEIT_TEACHERS, EXIT_INVALID, IMAGENET_TEACHERS, PAPER_IMAGENET_TOP1,
                                   PUBLISHED_TOP1, TEACHER_ROOT, imagenet_teacher_path, teacher_checkpoint)


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        _, ckpt = load_teacher_file(args.path, args.arch, args.num_classes)
    except InvalidCheckpoint as err:
        print(f"invalid: {err}", file=sys.stderr)
        return EXIT_INVALID
    acc = stored_accuracy(ckpt)
    print(f"ok: {args.path} is a valid {args.arch} checkpoint"
          + (f" (stored accuracy {acc:.2f})" if acc is not None else ""))
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    print(f"{'arch':<11} {'published':>9}  status   path")
    for arch, top1 in PUBLISHED_TOP1.items():
        path = teacher_checkpoint(args.root, arch)
        if not os.path.exists(path):
            status = "missing"
        else:
            try:
                load_teacher_file(path, arch, 100)
                status = "valid"
            except InvalidCheckpoint as err:
                status = f"INVALID ({err})"
        print(f"{arch:<11} {top1:>9.2f}  {status:<8} {path}")
    for arch, row in {**IMAGENET_TEACHERS, **DEIT_TEACHERS}.items():
        path = imagenet_teacher_path(args.root, arch)
        status = _imagenet_status(path, arch) if os.path.exists(path) else "missing"
        print(f"{arch:<11} {row.top1:>9.3f}  {status:<8} {path}")
    return 0


def _imagenet_status(path: str, arch: str) -> str:
    """``valid`` when the SHA-256 matches the name (and the file loads, once ``arch`` is a
    registered model), else ``INVALID (why)``."""
    if not sha256_matches(path):
        return "INVALID (SHA-256 does not match the prefix in its name)"
    if arch in models.model_dict:
        try:
            load_teacher_file(path, arch, 1000)
        except InvalidCheckpoint as err:
            return f"INVALID ({err})"
    return "valid"


def _expected_table(pairs: Sequence[str], imagenet: bool, deit: bool = False) -> dict[str, float]:
    if deit:
        table = deit_expected()
    elif imagenet:
        table = {a: row.top1 for a, row in IMAGENET_TEACHERS.items()}
    else:
        table = dict(PUBLISHED_TOP1)
    for item in pairs:
        arch, sep, value = item.partition("=")
        try:
            table[arch] = float(value)
        except ValueError:
            raise UserError(f"--expected wants ARCH=ACCURACY, got {item!r}") from None
        if not sep:
            raise UserError(f"--expected wants ARCH=ACCURACY, got {item!r}")
    return table


def _fetch_hint(imagenet: bool, deit: bool) -> str:
    return "bash scripts/fetch_pretrained_teachers.sh" + (" --deit" if deit else " --imagenet" if imagenet else "")


def _cmd_verify(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise UserError("--batch_size must be positive and --workers 0 or more")
    deit = args.deit
    imagenet = deit or args.dataset == "imagenet"
    expected = _expected_table(args.expected, imagenet, deit)
    pipelines = DEIT_EVALS if deit else (TORCHVISION_EVAL,)
    archs = args.archs or list(DEIT_TEACHERS if deit else IMAGENET_TEACHERS if imagenet else PUBLISHED_TOP1)
    unknown = [a + p.suffix for a in archs for p in pipelines if a + p.suffix not in expected]
    if unknown:
        raise UserError(f"no expected accuracy for {unknown[0]}; pass --expected {unknown[0]}=ACC")
    paths = {arch: teacher_path(args.root, arch, imagenet) for arch in archs}
    if not any(os.path.isfile(path) for path in paths.values()):
        raise UserError(f"no {'DeiT ' if deit else 'ImageNet ' if imagenet else ''}teacher checkpoints "
                        f"under {args.root}; run {_fetch_hint(imagenet, deit)}")
    device = resolve_device(args.device)
    data = load_dataset("imagenet" if deit else args.dataset, args.data_folder, download=True)
    workers = default_workers() if args.workers is None else args.workers
    width = max([11] + [len(a + p.suffix) for a in archs for p in pipelines])
    if deit:
        for p in pipelines:
            print(f"{'ARCH' + p.suffix}: {p.note}")
    print(f"{'arch':<{width}} {'measured':>8} {'expected':>8} {'diff':>6}  verdict")
    flagged = 0
    for arch in archs:
        names = [arch + p.suffix for p in pipelines]
        if not os.path.isfile(paths[arch]):
            for name in names:
                print(f"{name:<{width}} {'-':>8} {expected[name]:>8.2f} {'-':>6}  missing ({paths[arch]})")
            continue
        try:
            model, _ = load_teacher_file(paths[arch], arch, data.num_classes)
        except InvalidCheckpoint as err:
            print(f"{arch:<{width}} {'-':>8} {expected[names[0]]:>8.2f} {'-':>6}  FLAG: {err}")
            flagged += 1
            continue
        for name, pipeline in zip(names, pipelines):
            acc = score(model, data, device, args.batch_size, workers, args.decode, pipeline)
            paper = PAPER_IMAGENET_TOP1.get(arch) if imagenet and not deit else None
            flagged += _report(name, acc, expected[name], args.tolerance, width, paper)
    if flagged:
        print(f"{flagged} teacher(s) flagged", file=sys.stderr)
    return 1 if flagged else 0


def _report(name: str, acc: float, expected: float, tolerance: float, width: int,
            paper: Optional[float]) -> bool:
    """Prints one verify row; True when it is flagged."""
    diff = acc - expected
    bad = abs(diff) > tolerance
    verdict = f"FLAG: more than {tolerance} points off" if bad else "ok"
    if paper is not None:
        verdict += f" (the paper quotes {paper:.2f})"
    print(f"{name:<{width}} {acc:>8.2f} {expected:>8.2f} {diff:>+6.2f}  {verdict}", flush=True)
    return bad


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m teacher_zoo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="is PATH a valid checkpoint of ARCH? (exit 0 yes, 3 no)")
    check.add_argument("path")
    check.add_argument("--arch", required=True)
    check.add_argument("--num_classes", type=int, default=None,
                       help="expected classifier width (default: whatever the file holds)")
    listing = sub.add_parser("list", help="which published teachers (CIFAR-100, ImageNet) are present and valid")
    verify = sub.add_parser("verify", help="score present teachers against the published top-1")
    verify.add_argument("archs", nargs="*",
                        help="subset of teachers (default: all of the data set's table)")
    verify.add_argument("--dataset", default="cifar100", help="cifar100, digits or imagenet")
    verify.add_argument("--imagenet", dest="dataset", action="store_const", const="imagenet",
                        help="short for --dataset imagenet: torchvision's files, ILSVRC-2012 val")
    verify.add_argument("--deit", action="store_true",
                        help="the DeiT table's teacher (mmcls's DeiT III-S) on ILSVRC-2012 val, twice: "
                             "224 bicubic crop 1.0 (ARCH, mmcls's 83.06) and 256 -> 224 bicubic "
                             "(ARCH@256, the table's 82.76)")
    verify.add_argument("--data_folder", default="./data",
                        help="CIFAR-100 archive folder, or the ImageNet folder (train/, val/)")
    verify.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    verify.add_argument("--batch_size", type=int, default=250, help="images per evaluation batch")
    verify.add_argument("--workers", type=int, default=None,
                        help="ImageNet loader workers (default: as train_student.py)")
    verify.add_argument("--decode", default="auto", choices=("auto", "workers", "device"),
                        help="ImageNet: where JPEGs are decoded (as train_student.py)")
    verify.add_argument("--tolerance", type=float, default=0.3, help="allowed |measured - expected|")
    verify.add_argument("--expected", action="append", default=[], metavar="ARCH=ACC",
                        help="expected top-1 instead of the published one (repeatable; with --deit "
                             "ARCH or ARCH@256)")
    for p in (listing, verify):
        p.add_argument("--root", default=TEACHER_ROOT,
                       help="teacher folder: <root>/<arch>_vanilla/ckpt_epoch_240.pth, "
                            "<root>/<arch>_imagenet/<torchvision file>")
    return parser


@exit_on_user_error
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return {"check": _cmd_check, "list": _cmd_list, "verify": _cmd_verify}[args.command](args)

