"""Where the table runner's local trials run: ``--gpus`` checked against the visible GPUs.

A :class:`Slot` is one trial running at a time: the GPUs it spans (indices as this process
sees them, ``0`` being the first device ``torch.cuda`` lists after any
``CUDA_VISIBLE_DEVICES`` of our own), or none for the CPU, and the number of processes
the run has (one per GPU; torchrun starts them). A GPU slot's run sees only its GPUs
(``CUDA_VISIBLE_DEVICES``) and gets ``--device cuda`` (rank r takes ``cuda:r``), so it
fails loudly instead of training on the CPU when a GPU is gone; a CPU slot's run gets
``--device cpu``. Each run's processes get their share of the CPU threads. Standard
library only.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from errors import UserError


def visible_gpu_count() -> int:
    """GPUs this process sees (``torch.cuda.device_count()``; tests replace it)."""
    import torch  # the runner's planning imports no torch until it needs it
    return torch.cuda.device_count()

CPU = "cpu"
USAGE = "give comma-separated GPU ids such as 0,1, or cpu"


@dataclass(frozen=True)
class Slot:
    """One concurrent run: its GPUs (empty: the CPU) and its process count."""

    gpus: tuple[int, ...] = ()
    procs: int = 1

    @property
    def cpu(self) -> bool:
        return not self.gpus


def gpu_slots(spec: Optional[str], jobs_per_gpu: int, visible: int, gpus_per_run: int = 1) -> list[Slot]:
    """The slots for ``--gpus spec --jobs-per-gpu jobs_per_gpu --gpus_per_run gpus_per_run``.

    The GPUs are grouped in order, ``gpus_per_run`` to a run; each group hosts
    ``jobs_per_gpu`` runs at once (slots listed round-robin over the groups). Without GPUs, ``jobs_per_gpu`` runs share the CPU, each
    with ``gpus_per_run`` processes.

    Args:
        spec: the ``--gpus`` text: ``"0,2"``, ``"cpu"``, or None for every visible GPU
            (the CPU when there is none).
        jobs_per_gpu: runs at once on each GPU group (on the CPU when it has no GPU).
        visible: the number of GPUs this process sees (``torch.cuda.device_count()``).
        gpus_per_run: GPUs (processes) of one run.

    Raises:
        UserError: an empty or non-integer id, a repeated id, one the machine does not
            have, or GPUs that do not split into groups of ``gpus_per_run``.
    """
    if jobs_per_gpu < 1:
        raise UserError(f"--jobs-per-gpu must be at least 1, got {jobs_per_gpu}")
    if gpus_per_run < 1:
        raise UserError(f"--gpus_per_run must be at least 1, got {gpus_per_run}")
    if spec is None:
        ids = list(range(visible))
    elif spec.strip().lower() == CPU:
        ids = []
    else:
        ids = _parse_ids(spec, visible)
    if not ids:
        return [Slot((), gpus_per_run)] * jobs_per_gpu
    if len(ids) % gpus_per_run:
        raise UserError(f"--gpus_per_run {gpus_per_run} needs the GPUs in groups of {gpus_per_run}, but "
                        f"{len(ids)} GPU{'s' if len(ids) > 1 else ''} ({','.join(map(str, ids))}) are given; "
                        f"choose them with --gpus")
    groups = [tuple(ids[i:i + gpus_per_run]) for i in range(0, len(ids), gpus_per_run)]
    # round-robin, so that the first runs to start spread over the groups
    return [Slot(group, gpus_per_run) for _ in range(jobs_per_gpu) for group in groups]


def _parse_ids(spec: str, visible: int) -> list[int]:
    tokens = [t.strip() for t in spec.split(",")]
    for position, token in enumerate(tokens, 1):
        if not token:
            raise UserError(f"--gpus {spec!r}: id {position} is empty; {USAGE}")
        if not token.isdigit():
            raise UserError(f"--gpus {spec!r}: {token!r} is not a GPU id (a non-negative integer); {USAGE}")
    ids = [int(t) for t in tokens]
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise UserError(f"--gpus {spec!r}: GPU {repeated[0]} is listed twice; "
                        f"use --jobs-per-gpu to run several trials on one GPU")
    missing = [i for i in ids if i >= visible]
    if missing:
        seen = "no GPU" if visible == 0 else f"{visible} GPU{'s' if visible > 1 else ''} (ids 0-{visible - 1})"
        raise UserError(f"--gpus {spec!r}: there is no GPU {missing[0]}; this process sees {seen}; "
                        f"use --gpus cpu to run on the CPU")
    return ids


def slot_launch(slot: Slot, environ: Mapping[str, str],
                threads: Optional[int] = None) -> tuple[list[str], dict[str, str]]:
    """The ``train_student.py`` flags and environment for a run on ``slot``.

    Args:
        slot: where the run goes.
        environ: this process's environment; an index is mapped through its
            ``CUDA_VISIBLE_DEVICES`` (``0`` under ``CUDA_VISIBLE_DEVICES=2,3`` is device 2).
        threads: CPU threads per process (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``); None
            leaves them as they are.
    """
    env = {} if threads is None else {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if slot.cpu:
        return ["--device", "cpu"], {**env, "CUDA_VISIBLE_DEVICES": ""}
    ours = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    devices = [ours[i] if i < len(ours) else str(i) for i in slot.gpus]
    return ["--device", "cuda"], {**env, "CUDA_VISIBLE_DEVICES": ",".join(devices)}


def slot_name(slot: Slot) -> str:
    """``GPU 1``, ``GPUs 0,1``, ``the CPU``, ``the CPU (2 processes)``."""
    if slot.cpu:
        return "the CPU" + (f" ({slot.procs} processes)" if slot.procs > 1 else "")
    return f"GPU{'s' if len(slot.gpus) > 1 else ''} {','.join(map(str, slot.gpus))}"


def describe_slots(slots: Sequence[Slot], environ: Mapping[str, str], threads: Optional[int] = None) -> str:
    """``GPU 0 ×2 (--device cuda, CUDA_VISIBLE_DEVICES=0), ...`` or ``the CPU ×1 (--device cpu)``,
    then the threads per process when set."""
    parts = []
    for slot, n in Counter(slots).items():
        flags, env = slot_launch(slot, environ)
        where = "" if slot.cpu else f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
        how = "" if slot.procs == 1 else f", torchrun ×{slot.procs}" if not slot.cpu else ", torchrun"
        parts.append(f"{slot_name(slot)} ×{n} ({' '.join(flags)}{where}{how})")
    text = ", ".join(parts)
    return text + (f"; {threads} CPU thread{'s' if threads > 1 else ''} per process" if threads else "")


def refuse_device_flag(passthrough: Sequence[str]) -> None:
    """Raises UserError when the arguments after ``--`` set ``--device`` (or an abbreviation
    argparse would accept): the local runner chooses each run's device from ``--gpus``."""
    for token in passthrough:
        name = token.split("=", 1)[0]
        if len(name) >= 4 and "--device".startswith(name):
            raise UserError(f"{token!r} after -- would override the runner's devices; choose them "
                            f"with --gpus (GPU ids, or cpu): a GPU slot's run gets --device cuda, "
                            f"a CPU slot's --device cpu")
