"""CRD negative sampling for one batch: our batched on-device draw against the reference's
per-sample ``numpy.random.choice(pool, K, replace=False)`` loop."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distiller_zoo.crd import ContrastSampler
from scripts.bench.timing import Clock, summarize

BATCH = 64
CLASSES = 100


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
            pool = negatives[labels_np[i]]
            neg = np.random.choice(pool, k, replace=k > len(pool))
            rows.append(np.hstack((np.asarray([i]), neg)))
        return torch.from_numpy(np.stack(rows)).to(device)
    reference()
    ref = [1e3 * clock.seconds(reference, events=False) for _ in range(reference_repeats)]
    common = {"batch": BATCH, "n_data": n_data, "k": k}
    return [{"sampler": "ours: ContrastSampler.draw (batched, on device)", "ms": summarize(ours), **common},
            {"sampler": "reference: numpy.random.choice per sample", "ms": summarize(ref), **common}]
