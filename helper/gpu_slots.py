"""Where the table runner's local trials run: ``--gpus`` checked against the visible GPUs.

A slot is one trial running at a time: a GPU index as this process sees it (``0`` is the
first device ``torch.cuda`` lists, after any ``CUDA_VISIBLE_DEVICES`` of our own), or None
for the CPU. A GPU slot's run sees only that GPU (``CUDA_VISIBLE_DEVICES``) and gets
``--device cuda``, so it fails loudly instead of training on the CPU when the GPU is gone;
a CPU slot's run gets ``--device cpu``. Standard library only.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping, Optional, Sequence

from errors import UserError

CPU = "cpu"
USAGE = "give comma-separated GPU ids such as 0,1, or cpu"


def gpu_slots(spec: Optional[str], jobs_per_gpu: int, visible: int) -> list[Optional[int]]:
    """The slots for ``--gpus spec --jobs-per-gpu jobs_per_gpu``.

    Args:
        spec: the ``--gpus`` text: ``"0,2"``, ``"cpu"``, or None for every visible GPU
            (the CPU when there is none).
        jobs_per_gpu: trials run at once on each GPU (on the CPU when it has no GPU).
        visible: the number of GPUs this process sees (``torch.cuda.device_count()``).

    Raises:
        UserError: an empty or non-integer id, a repeated id, or one the machine does not have.
    """
    if jobs_per_gpu < 1:
        raise UserError(f"--jobs-per-gpu must be at least 1, got {jobs_per_gpu}")
    if spec is None:
        ids = list(range(visible))
    elif spec.strip().lower() == CPU:
        ids = []
    else:
        ids = _parse_ids(spec, visible)
    return [i for i in ids for _ in range(jobs_per_gpu)] or [None] * jobs_per_gpu


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


def slot_launch(slot: Optional[int], environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """The ``train_student.py`` flags and environment for a run on ``slot``.

    Args:
        slot: a GPU index as this process sees it, or None for the CPU.
        environ: this process's environment; an index is mapped through its
            ``CUDA_VISIBLE_DEVICES`` (``0`` under ``CUDA_VISIBLE_DEVICES=2,3`` is device 2).
    """
    if slot is None:
        return ["--device", "cpu"], {"CUDA_VISIBLE_DEVICES": ""}
    ours = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    device = ours[slot] if slot < len(ours) else str(slot)
    return ["--device", "cuda"], {"CUDA_VISIBLE_DEVICES": device}


def slot_name(slot: Optional[int]) -> str:
    return "the CPU" if slot is None else f"GPU {slot}"


def describe_slots(slots: Sequence[Optional[int]], environ: Mapping[str, str]) -> str:
    """``GPU 0 ×2 (--device cuda, CUDA_VISIBLE_DEVICES=0), ...`` or ``the CPU ×1 (--device cpu)``."""
    parts = []
    for slot, n in Counter(slots).items():
        flags, env = slot_launch(slot, environ)
        where = "" if slot is None else f", CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}"
        parts.append(f"{slot_name(slot)} ×{n} ({' '.join(flags)}{where})")
    return ", ".join(parts)


def refuse_device_flag(passthrough: Sequence[str]) -> None:
    """Raises UserError when the arguments after ``--`` set ``--device`` (or an abbreviation
    argparse would accept): the local runner chooses each run's device from ``--gpus``."""
    for token in passthrough:
        name = token.split("=", 1)[0]
        if len(name) >= 4 and "--device".startswith(name):
            raise UserError(f"{token!r} after -- would override the runner's devices; choose them "
                            f"with --gpus (GPU ids, or cpu): a GPU slot's run gets --device cuda, "
                            f"a CPU slot's --device cpu")
