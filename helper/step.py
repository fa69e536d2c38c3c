"""One training step: teacher forward, objective forward and backward, optimiser step.

The loop calls a step once per batch and never looks inside it; the eager :class:`TrainStep`
below is what every run uses on the CPU, and what a CUDA-graph step replays (see
``helper/graph_step.py``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from helper.optim import clip_gradients, hard_labels
from helper.speed import autocast


class StepOut(NamedTuple):
    """What a step hands the meters: the weighted loss, each unweighted term (0-d tensors) and
    the number of correct top-1 predictions (0-d), all still on the device."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    correct: torch.Tensor


class TrainStep:
    """The eager step.

    Args:
        objective: maps ``(images, labels, index, epoch, teacher_out)`` to ``{"loss", "logits",
            "terms"}`` (the student plus the methods' parts; maybe DDP-wrapped).
        teacher: maps ``(images, views)`` to the teacher's outputs, or None (teacher training).
        optimizer: updates the objective's trainable parameters.
        precision: ``fp32`` or ``bf16`` (autocast of the forward passes).
        memory_format: layout the images are given in.
        cache_casts: autocast's weight-cast cache (off when the step is captured as a graph).
        clip_grad: the largest global L2 norm of ``parameters``' gradients (``--clip_grad``),
            or None.
        parameters: what the optimiser updates (the norm is taken over these).
    """

    def __init__(self, objective: nn.Module, teacher: Optional[Callable[..., Any]],
                 optimizer: torch.optim.Optimizer, precision: str,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 cache_casts: bool = True, clip_grad: Optional[float] = None,
                 parameters: Sequence[nn.Parameter] = ()) -> None:
        self.objective, self.teacher, self.optimizer = objective, teacher, optimizer
        self.precision, self.memory_format, self.cache_casts = precision, memory_format, cache_casts
        self.clip_grad, self.parameters = clip_grad, list(parameters)
        if clip_grad is not None and not self.parameters:
            raise ValueError("clip_grad needs the parameters whose gradient norm it bounds")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                 views: Optional[torch.Tensor], epoch: int) -> StepOut:
        """Runs one step on a batch ``images [B, 3, H, W]``, ``labels [B]``, ``index [B]`` and
        the loader's view ids ``views [B]`` (None when the loader does not report them)."""
        teacher_out = self.teacher(images, views) if self.teacher is not None else None
        with autocast(images.device, self.precision, self.cache_casts):
            out = self.objective(images, labels, index, epoch, teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        clip_gradients(self.parameters, self.clip_grad)
        self.optimizer.step()
        correct = out["logits"].detach().argmax(dim=1).eq(hard_labels(labels)).sum()
        return StepOut(out["loss"].detach(), {k: v.detach() for k, v in out["terms"].items()}, correct)


def unpack(batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """A loader's batch ``(images, labels, index[, views])`` with ``views`` None when absent."""
    images, labels, index, *rest = batch
    return images, labels, index, (rest[0] if rest else None)
