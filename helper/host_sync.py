"""The host-sync screen: one training step of a method under a dispatch mode that refuses
every op that makes the host wait for the device.

A CUDA graph records device work only; an op whose result the host must read (``.item()``,
``nonzero``, a boolean-mask index, ``unique``, a device→host copy) either fails during
capture or bakes one batch's answer into every replay. :class:`RefuseHostSync` turns each
such op into an error naming it, on any device: on the CPU nothing needs the host, so the
screen refuses the ops themselves, which is what a CUDA step would wait on.

:func:`build_case` assembles a step exactly as ``train_student.py`` does (the flags through
:func:`helper.student_flags.parse_config`, :func:`helper.student.build_objective` and
:func:`helper.assemble.assemble_step`); :func:`screen_step` runs one step under the mode. The
``--add`` combinations the paper tables run come from :func:`paper_tables.recipes.add_combinations`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import models
from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from helper import distributed
from helper.assemble import assemble_step
from helper.student import build_objective
from helper.student_flags import parse_config

aten = torch.ops.aten
# Ops whose output size or value the host must know: each waits for the device.
ALWAYS_SYNC = {
    aten._local_scalar_dense.default: ".item() / float() / bool() of a tensor",
    aten.is_nonzero.default: "bool() of a tensor",
    aten.equal.default: "torch.equal",
    aten.nonzero.default: "nonzero",
    aten.argwhere.default: "argwhere",
    aten.masked_select.default: "masked_select",
    aten._unique.default: "unique", aten._unique2.default: "unique",
    aten.unique_dim.default: "unique", aten.unique_consecutive.default: "unique_consecutive",
    aten.bincount.default: "bincount (its length is the maximum)",
    aten._pin_memory.default: "pin_memory (host allocation)",
}


def _bool_index(indices: Sequence[Optional[torch.Tensor]]) -> bool:
    return any(i is not None and i.dtype == torch.bool for i in indices)


def refused(func: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """Why ``func(*args, **kwargs)`` needs the host, or None when it does not."""
    if func in ALWAYS_SYNC:
        return ALWAYS_SYNC[func]
    packet = func.overloadpacket
    if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and _bool_index(args[1]):
        return "boolean-mask indexing (nonzero)"
    if packet is aten.repeat_interleave and func is aten.repeat_interleave.Tensor \
            and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if packet is aten._to_copy:
        source, target = args[0].device, kwargs.get("device")
        if target is not None and torch.device(target).type == "cpu" and source.type != "cpu":
            return "device→host copy"
    if packet is aten.copy_ and args[0].device.type == "cpu" and args[1].device.type != "cpu":
        return "device→host copy"
    return None


class HostSyncError(RuntimeError):
    """An op that needs the host ran inside the screened step."""


class RefuseHostSync(TorchDispatchMode):
    """Raises :class:`HostSyncError` at the first op that would make the host wait."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = refused(func, args, kwargs)
        if why is not None:
            raise HostSyncError(f"{func} needs the host: {why}")
        return func(*args, **kwargs)


@dataclass
class Case:
    """One screened configuration: a method (``--distill``), maybe with an ``--add`` term."""

    distill: str
    add: Optional[str] = None
    alpha: float = 1.0

    @property
    def name(self) -> str:
        return self.distill + (f"+{self.add}" if self.add else "")

    def flags(self) -> list[str]:
        if self.add:
            return ["--distill", self.distill, "--add", self.add, "-a", str(self.alpha)]
        return ["--distill", self.distill]


# Pairs tried in order until a method builds for one (FSP and AB need matching stages; a
# method for transformers needs a transformer pair, when the registry has one).
def candidate_pairs() -> list[tuple[str, str]]:
    pairs = [("resnet8", "resnet8"), ("resnet14", "MobileNetV2")]
    vits = [n for n in models.model_dict if n.startswith("deit")]
    pairs += [(t, s) for t in vits for s in vits][:1]
    return pairs


def synthetic_data(size: int, n: int = 64, classes: int = 10) -> Any:
    """A small in-memory data set of ``n`` random ``size``-pixel images (what methods with
    data-set statistics, KD++'s class means, read through its loaders)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % classes
    return ImageDataset("synthetic", images, labels, images[:8], labels[:8], classes, CIFAR100_MEAN, CIFAR100_STD)


@dataclass
class Built:
    """A step assembled for a case, and one batch for it."""

    case: Case
    pair: tuple[str, str]
    objective: Any
    step: Any
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


def build_case(case: Case, device: torch.device, save_root: str, batch: int = 8,
               extra: Sequence[str] = (), cached: Any = None) -> Built:
    """The step ``train_student.py`` would run for ``case`` on the first pair it builds for
    (``extra`` flags come last and win; ``cached``: a teacher-cache stand-in for the teacher).

    Raises:
        the last pair's error when the method builds for none of them.
    """
    env = distributed.DistEnv(0, 1, 0, device)
    error: Exception = ValueError("no pair")
    for teacher_name, student_name in candidate_pairs():
        argv = ["--path_t", "unused.pth", "--model_s", student_name, *case.flags(), "--seed", "1",
                "--save_root", save_root, "--nce_k", "16", "--cuda_graphs", "off", *extra]
        size = models.input_size(student_name)
        data = synthetic_data(size).to(device)
        try:
            cfg = parse_config(argv, env, teacher_name)
            torch.manual_seed(0)
            teacher = models.create_model(teacher_name, 10).to(device).eval().requires_grad_(False)
            objective = build_objective(cfg, env, data, teacher)
        except Exception as err:  # this pair does not suit the method: try the next
            error = err
            continue
        fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
        step = assemble_step(cfg, env, objective, teacher, fmt, cached)
        g = torch.Generator().manual_seed(0)
        images = torch.randn(batch, 3, size, size, generator=g).to(device)
        index = torch.randperm(64, generator=g)[:batch].to(device)
        return Built(case, (teacher_name, student_name), objective, step, (images, index % 10, index, None))
    raise error


def screen_step(built: Built, epoch: int = 1) -> Any:
    """One eager step of ``built`` (the same step object the loop calls) under
    :class:`RefuseHostSync`; raises :class:`HostSyncError` at the first host wait."""
    step = getattr(built.step.run, "eager", built.step.run)
    built.objective.train()
    with RefuseHostSync():
        return step(*built.batch, epoch)
