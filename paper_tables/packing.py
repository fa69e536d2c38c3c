"""Several runs per GPU: the arithmetic of packing, CPU-thread shares, estimates and MPS.

``scripts/reproduce.py --jobs-per-gpu auto`` runs a short calibration (:mod:`paper_tables.calibrate`)
that measures the aggregate training throughput of K concurrent runs on one device
(images/s summed over the K processes) and picks K here: the K whose projected time for
the whole plan is within :data:`TOLERANCE` of the shortest, the smallest such K (fewer
processes hold less memory for the same speed). ``--estimate`` projects the plan's
device-hours and wall time from the same table. Standard library only.
"""
from __future__ import annotations

import heapq
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

from errors import UserError

CANDIDATE_KS = (1, 2, 4, 8, 16)
TOLERANCE = 0.03  # a K within 3 % of the fastest counts as the fastest
MPS_PIPE_DEFAULT = "/tmp/nvidia-mps"
AUTO = "auto"


def parse_jobs_per_gpu(text: Union[str, int]) -> Union[int, str]:
    """``--jobs-per-gpu``: a positive integer, or ``auto``."""
    value = str(text).strip().lower()
    if value == AUTO:
        return AUTO
    if not value.isdigit() or int(value) < 1:
        raise UserError(f"--jobs-per-gpu must be a positive integer or auto, got {text!r}")
    return int(value)


def candidate_ks(cpu: bool, cores: int) -> list[int]:
    """The Ks a calibration tries: :data:`CANDIDATE_KS`, on the CPU only up to its cores."""
    ks = [k for k in CANDIDATE_KS if not cpu or k <= max(cores, 1)]
    return ks or [1]


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_share(cores: int, processes: int, user_limit: Optional[str] = None) -> int:
    """CPU threads for each of ``processes`` concurrent processes on ``cores`` cores.

    An equal share, at least 1; an ``OMP_NUM_THREADS`` the user set (``user_limit``) caps it.
    """
    share = max(1, cores // max(processes, 1))
    if user_limit and user_limit.strip().isdigit() and int(user_limit) > 0:
        share = min(share, int(user_limit))
    return share


def choose_k(rates: Sequence[Mapping[int, float]], work: Sequence[float]) -> int:
    """The K that finishes the plan soonest (the smallest within :data:`TOLERANCE`).

    Args:
        rates: per calibration group (one per pair), aggregate images/s on one device by K.
        work: images each group's runs must still train.

    Raises:
        ValueError: no K was measured for every group.
    """
    common = set.intersection(*(set(r) for r in rates)) if rates else set()
    if not common:
        raise ValueError("no K was calibrated for every pair of the plan")
    time_of = {k: sum(w / r[k] for r, w in zip(rates, work)) for k in sorted(common)}
    best = min(time_of.values())
    return min(k for k, t in time_of.items() if t <= best * (1 + TOLERANCE))


@dataclass(frozen=True)
class RunWork:
    """One trial still to train: images to process and the calibrated rates of its pair.

    Attributes:
        images: epochs left × steps per epoch × global batch.
        rates: aggregate images/s of K runs on one device (per-process batch), by K.
        devices: devices one run spans (its GPUs; 1 on the CPU).
    """

    images: float
    rates: Mapping[int, float]
    devices: int = 1


@dataclass(frozen=True)
class Estimate:
    """A plan's projection: device-hours, wall-clock seconds, and the per-run rate used."""

    device_hours: float
    wall_s: float
    runs: int


def estimate(work: Sequence[RunWork], k: int, slots: int) -> Estimate:
    """Projects a plan packed ``k`` runs per device over ``slots`` concurrent runs.

    A run's rate is its share of the device's aggregate, ``rate(k) / k``, times the devices
    it spans (linear scaling across a run's GPUs: an assumption, not a measurement). Its
    device time is its duration × devices / k; the wall time places the runs in order on
    the first slot to come free, as the runner does.
    """
    free_at = [0.0] * max(slots, 1)
    device_s = 0.0
    for run in work:
        seconds = run.images / (run.rates[k] / k * run.devices)
        device_s += seconds * run.devices / k
        heapq.heappush(free_at, heapq.heappop(free_at) + seconds)
    return Estimate(device_s / 3600.0, max(free_at), len(work))


def images_to_train(epochs_left: int, n_train: int, batch: int) -> float:
    """Epochs × steps per epoch × global batch (the last partial step counted whole)."""
    return float(max(epochs_left, 0) * math.ceil(n_train / batch) * batch)


def mps_status(environ: Mapping[str, str], timeout_s: float = 5.0) -> Optional[str]:
    """How the NVIDIA MPS control daemon is reached when it runs (None when it does not).

    Looks for its control pipe (``$CUDA_MPS_PIPE_DIRECTORY``, default
    :data:`MPS_PIPE_DEFAULT`), else asks ``nvidia-cuda-mps-control`` for its server list.
    CUDA processes that see the same pipe directory use MPS without further setup.
    """
    pipe_dir = environ.get("CUDA_MPS_PIPE_DIRECTORY") or MPS_PIPE_DEFAULT
    if os.path.exists(os.path.join(pipe_dir, "control")):
        return f"MPS control daemon at {pipe_dir}"
    tool = shutil.which("nvidia-cuda-mps-control")
    if tool is None:
        return None
    try:
        out = subprocess.run([tool], input="get_server_list\n", capture_output=True, text=True,
                             timeout=timeout_s, env=dict(environ))
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "MPS control daemon (nvidia-cuda-mps-control answers)" if out.returncode == 0 else None
