"""One run on several processes: ``torchrun --nproc_per_node=N train_*.py …``.

NCCL on GPUs, gloo on CPU. Each rank trains on its shard of one shared permutation;
the trainable module is wrapped in DistributedDataParallel, the teacher is not; only
rank 0 writes logs and checkpoints.
"""
from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` → ``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but CUDA is not available here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device_flag: str) -> DistEnv:
    """Joins the process group when launched by torchrun, and picks this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_flag, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world, local_rank, device)


def wrap(module: nn.Module, env: DistEnv) -> nn.Module:
    """Wraps the trainable module in DDP when there is more than one rank."""
    if not env.enabled:
        return module
    ids = [env.device.index] if env.device.type == "cuda" else None
    # No per-step buffer broadcast: it would ship CRD's 51 MB memory bank from rank 0 every
    # step (CRD shares its own updates); BN running statistics stay per rank, rank 0's are saved.
    # torch >= 2.12 renames the switch (the old name warns); buffers still agree at init.
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters:
        return nn.parallel.DistributedDataParallel(module, device_ids=ids, forward_sync_buffers=False)
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def convert_sync_bn(module: nn.Module, enabled: bool, env: DistEnv) -> None:
    """With ``--sync_bn`` on several CUDA ranks, swaps every BatchNorm inside ``module`` (in
    place, parameters and buffers kept) for torch's ``SyncBatchNorm``, whose batch statistics
    cover the global batch as one process's would. A no-op on one rank.

    Raises:
        UserError: ``--sync_bn`` on CPU ranks (SyncBatchNorm runs on GPUs only).
    """
    if not enabled or not env.enabled:
        return
    if env.device.type != "cuda":
        raise UserError("--sync_bn needs CUDA devices: torch's SyncBatchNorm does not run on the CPU")
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(module)  # replaces children in place
    assert converted is module, "convert_sync_bn expects a container, not a BatchNorm itself"


def share_buffers(module: nn.Module, env: DistEnv) -> None:
    """Gives every rank rank 0's buffers of ``module`` (its BatchNorm statistics), so that
    ranks scoring their shards of the test set score the network rank 0 checkpoints.

    Buffers only move evaluation: in train mode BatchNorm normalises with batch statistics.
    """
    if env.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sums ``tensor`` over ranks in place (a no-op on one rank) and returns it."""
    if env.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, env: DistEnv):
    """Rank 0's ``obj`` on every rank (e.g. the drawn seed)."""
    if not env.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
