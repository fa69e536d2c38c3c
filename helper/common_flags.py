"""The flags both entry scripts share (data, augmentation, model, optimisation, run, speed),
their validation and the values derived from them (the data set's reference recipe, the
learning rate of the light students, the drawn seed).
"""
from __future__ import annotations

import argparse
import math
import os
import random
from typing import Any, Mapping, Optional

from dataset import DATASETS, DECODE_MODES, dataset_help
from errors import UserError
from helper import augment_flags, optim
from helper.speed import COMPILE_MODES

LIGHT_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
DEFAULT_LR = 0.05
LIGHT_LR = 0.01
# The recipe a data set trains with where the flags leave it open. CIFAR-100 (and digits):
# RepDistiller's; ImageNet: torchdistill's ILSVRC-2012 KD config, which the paper used
# (configs/official/ilsvrc2012/yoshitomo-matsubara/kd-resnet18_from_resnet34.yaml).
RECIPES = {
    "cifar": {"epochs": 240, "batch_size": 64, "learning_rate": DEFAULT_LR,
              "lr_decay_epochs": "150,180,210", "weight_decay": 5e-4},
    "imagenet": {"epochs": 100, "batch_size": 256, "learning_rate": 0.1,
                 "lr_decay_epochs": "30,60,90", "weight_decay": 1e-4},
}


def recipe_of(dataset: str) -> dict[str, Any]:
    """The default recipe of a data set (``imagenet``'s, else CIFAR-100's)."""
    return RECIPES["imagenet" if dataset == "imagenet" else "cifar"]


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the flags shared by ``train_teacher.py`` and ``train_student.py``."""
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar100", choices=DATASETS, help=dataset_help())
    data.add_argument("--data_folder", default="./data",
                      help="cifar100: where cifar-100-python.tar.gz / cifar-100-python/ live; "
                           "imagenet: the folder holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG")
    data.add_argument("--workers", type=int, default=None,
                      help="image-folder data (imagenet): loader worker processes per rank, 0 reads "
                           "in the main process (default: the CPU cores this process may use, "
                           "shared by the ranks on this node, one left to each rank, at most 32)")
    data.add_argument("--decode", default="auto", choices=DECODE_MODES,
                      help="image-folder data: where JPEGs are decoded; device = by this process "
                           "(nvJPEG on CUDA), workers = PIL in the workers, auto = device when "
                           "CUDA and torchvision's nvJPEG decoder are present, else workers")
    augment_flags.add_arguments(parser.add_argument_group(
        "training-batch augmentation (image-folder data; all off by default)"))
    model = parser.add_argument_group("model")
    model.add_argument("--drop_path", type=float, default=0.0,
                       help="stochastic depth of the trained network (the ViTs; 0: none)")

    cifar, imagenet = RECIPES["cifar"], RECIPES["imagenet"]
    recipe = parser.add_argument_group("optimisation (unset: the data set's reference recipe)")
    recipe.add_argument("--batch_size", type=int, default=None,
                       help=f"global batch size per step, split across DDP ranks (default: "
                            f"{cifar['batch_size']}; imagenet {imagenet['batch_size']})")
    recipe.add_argument("--epochs", type=int, default=None,
                       help=f"number of training epochs (default: {cifar['epochs']}; imagenet "
                            f"{imagenet['epochs']})")
    recipe.add_argument("--learning_rate", type=float, default=None,
                       help=f"SGD learning rate (default: {DEFAULT_LR}, {LIGHT_LR} for "
                            f"MobileNetV2/ShuffleV1/ShuffleV2; imagenet {imagenet['learning_rate']})")
    recipe.add_argument("--lr_decay_epochs", default=None,
                       help=f"comma-separated epochs after which the LR is multiplied by --lr_decay_rate "
                            f"(default: {cifar['lr_decay_epochs']}; imagenet {imagenet['lr_decay_epochs']})")
    recipe.add_argument("--lr_decay_rate", type=float, default=0.1, help="LR decay factor")
    recipe.add_argument("--weight_decay", type=float, default=None,
                       help=f"SGD weight decay (default: {cifar['weight_decay']}; imagenet "
                            f"{imagenet['weight_decay']})")
    recipe.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    recipe.add_argument("--lr_scale", default="none", choices=("none", "linear"),
                       help="linear: multiply the LR by batch_size / the recipe's batch (64; "
                            "imagenet 256), the linear scaling rule")
    optim.add_arguments(parser.add_argument_group(
        "optimiser, schedule, clipping, smoothing (recipe flags; defaults: SGD with the step schedule)"))

    run = parser.add_argument_group("run")
    run.add_argument("--trial", default="0", help="trial id, part of the run name")
    run.add_argument("--seed", type=int, default=None,
                     help="random seed; when not given (or 0, the seed code's 'unseeded') one is drawn and recorded")
    run.add_argument("--save_freq", type=int, default=40, help="write ckpt_epoch_<N>.pth every N epochs")
    run.add_argument("--print_freq", type=int, default=100, help="print progress every N steps")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in its run folder from resume.pth (fresh start if none)")
    run.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    run.add_argument("--save_root", default="./save", help="root folder of run outputs")
    run.add_argument("--run_name", default=None,
                     help="run folder name (default: built from the flags that distinguish runs)")
    run.add_argument("--sync_bn", action="store_true",
                     help="under DDP (torchrun, CUDA): synchronise BatchNorm statistics across "
                          "ranks (torch's SyncBatchNorm), as one process with the global batch would")

    speed = parser.add_argument_group("speed")
    speed.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                       help="bf16: autocast the forward passes to bfloat16 (losses stay fp32)")
    speed.add_argument("--channels_last", action="store_true", help="channels_last memory format")
    speed.add_argument("--compile", action="store_true",
                       help="torch.compile the networks (falls back to eager with a warning)")
    # off (eager) by default: the eager step is what was measured on a GPU; graphs become the
    # default only with a passing scripts/gpu_acceptance.py report committed (docs/SPEED.md)
    speed.add_argument("--cuda_graphs", default="off", choices=("auto", "on", "off"),
                       help="replay the training step from a CUDA graph. off: always eager; auto: "
                            "on one CUDA process without --compile when every part allows it (else "
                            "eager, said at start); on: the same, warning when it cannot. Each "
                            "capture is checked against an eager step; a failed one falls back to "
                            "eager, recorded in graph_events.jsonl and summary.json")
    speed.add_argument("--compile_mode", default="default",
                       choices=COMPILE_MODES,
                       help="torch.compile mode with --compile; reduce-overhead adds CUDA graphs")


def parse_decay_epochs(text: str) -> list[int]:
    """``"150,180,210"`` → ``[150, 180, 210]``; raises UserError when malformed."""
    try:
        epochs = [int(t) for t in str(text).split(",") if t.strip() != ""]
    except ValueError:
        raise UserError(f"--lr_decay_epochs must be comma-separated integers, got {text!r}") from None
    if any(e <= 0 for e in epochs) or epochs != sorted(epochs):
        raise UserError(f"--lr_decay_epochs must be positive and increasing, got {text!r}")
    return epochs


def default_learning_rate(model: str) -> float:
    """The reference's LR for a student/teacher architecture: 0.01 for the light nets."""
    return LIGHT_LR if model in LIGHT_MODELS else DEFAULT_LR


def _check_finite_positive(name: str, value: Optional[float], allow_zero: bool = False) -> None:
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise UserError(f"--{name} must be a finite {'non-negative' if allow_zero else 'positive'} number, got {value}")


def check_save_root(path: str) -> None:
    """Raises UserError unless ``path`` is a writable folder or could be created as one.

    Creates nothing: the nearest existing ancestor must be a writable folder.
    """
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"cannot create save folder {path!r}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"save folder {path!r} is not writable ({probe})")


def derive_common(flags: Mapping[str, Any], model: str, drawn_seed: Optional[int] = None) -> dict[str, Any]:
    """Validates the shared flags and returns them with derived values filled in.

    Args:
        flags: the parsed flags (``vars(args)``, or a resumed run's merged flags).
        model: the architecture being trained (decides the default learning rate).
        drawn_seed: the seed to use when ``--seed`` is unset (a resumed run's recorded one);
            None draws a fresh one.
    """
    recipe = recipe_of(flags["dataset"])
    flags = {**flags, **{k: recipe[k] for k in ("epochs", "batch_size", "lr_decay_epochs", "weight_decay")
                         if flags[k] is None}}
    if flags["epochs"] <= 0:
        raise UserError(f"--epochs must be positive, got {flags['epochs']}")
    if flags["batch_size"] <= 0:
        raise UserError(f"--batch_size must be positive, got {flags['batch_size']}")
    if flags["save_freq"] <= 0 or flags["print_freq"] <= 0:
        raise UserError("--save_freq and --print_freq must be positive")
    if flags.get("workers") is not None and flags["workers"] < 0:
        raise UserError(f"--workers must be 0 or more, got {flags['workers']}")
    _check_finite_positive("learning_rate", flags["learning_rate"])
    _check_finite_positive("lr_decay_rate", flags["lr_decay_rate"])
    _check_finite_positive("weight_decay", flags["weight_decay"], allow_zero=True)
    _check_finite_positive("momentum", flags["momentum"], allow_zero=True)
    # SGD's momentum buffer grows without bound at momentum >= 1 (2 reached a loss of 9032).
    # (--lr_decay_rate > 1 stays allowed: an LR that grows is unusual, not undefined.)
    if flags["momentum"] >= 1:
        raise UserError(f"--momentum must be in [0, 1), got {flags['momentum']}")
    if flags["seed"] is not None and not 0 <= flags["seed"] < 2**63:
        raise UserError(f"--seed must be an integer in [0, 2**63), got {flags['seed']}")
    if not 0.0 <= flags.get("drop_path", 0.0) < 1.0:
        raise UserError(f"--drop_path must be in [0, 1), got {flags['drop_path']}")
    try:
        optim.validate(flags)
        augment_flags.train_augment(flags)
    except ValueError as err:
        raise UserError(str(err)) from None
    values = dict(flags)
    values["lr_decay_epochs"] = parse_decay_epochs(flags["lr_decay_epochs"])
    base_lr = flags["learning_rate"]
    if base_lr is None:
        base_lr = recipe["learning_rate"] if flags["dataset"] == "imagenet" else default_learning_rate(model)
    values["base_learning_rate"] = base_lr
    scale = flags["batch_size"] / recipe["batch_size"] if flags["lr_scale"] == "linear" else 1.0
    values["learning_rate"] = base_lr * scale
    if flags["seed"]:
        values["seed"] = flags["seed"]
    else:
        values["seed"] = drawn_seed if drawn_seed else random.SystemRandom().randrange(1, 2**31 - 1)
    values["seed_drawn"] = not flags["seed"]
    run_name = flags["run_name"]
    if run_name is not None and (run_name.startswith("/") or ".." in run_name.split("/") or not run_name.strip("/")):
        raise UserError(f"--run_name must be a relative name inside --save_root, got {run_name!r}")
    check_save_root(flags["save_root"])
    return values
