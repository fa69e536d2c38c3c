"""Test-set evaluation: top-1/top-5 accuracy (percent) and mean cross-entropy."""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from helper.distributed import DistEnv, all_reduce_sum
from helper.speed import autocast


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, precision: str = "fp32",
             memory_format: torch.memory_format = torch.contiguous_format,
             env: Optional[DistEnv] = None) -> dict[str, float]:
    """Scores ``model`` in eval mode over ``loader``; restores its train/eval mode after.

    Args:
        model: maps images ``[B, 3, H, W]`` to logits ``[B, K]``.
        loader: yields ``(images, labels, index)`` batches.
        precision: ``fp32`` or ``bf16`` (autocast of the forward pass).
        memory_format: layout the model is run in.
        env: with several ranks, the sums are added over ranks, so a loader that gives each
            rank its own shard of the test set scores the whole set (a loader that gives every
            rank the whole set scores it the same).

    Returns:
        ``{"acc1", "acc5"}`` in percent and ``"loss"`` (mean cross-entropy, nats).
    """
    was_training = model.training
    model.eval()
    totals = None
    count = 0
    try:
        for images, labels, _ in loader:
            with autocast(images.device, precision):
                logits = model(images.contiguous(memory_format=memory_format))
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(labels[:, None])
            batch = torch.stack([hit[:, 0].sum().float(), hit.any(dim=1).sum().float(),
                                 F.cross_entropy(logits, labels, reduction="sum")])
            totals = batch if totals is None else totals + batch
            count += labels.shape[0]
    finally:
        model.train(was_training)
    if totals is None:
        raise ValueError("evaluate: the loader yielded no batches")
    packed = torch.cat([totals, totals.new_tensor([count])])
    if env is not None:
        packed = all_reduce_sum(packed, env)
    acc1, acc5, loss = (packed[:3] / packed[3]).tolist()  # the one host sync of the evaluation
    return {"acc1": 100.0 * acc1, "acc5": 100.0 * acc5, "loss": loss}
