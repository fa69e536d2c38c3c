"""Plain, safe, atomic checkpoints.

Every file is written to a temporary name in the same folder, flushed to disk and then
renamed over the target (``os.replace`` is atomic on POSIX), so a kill at any moment leaves
the previous good file. Everything is loaded with ``weights_only=True``: checkpoints hold
tensors, numbers, strings, lists and dicts only.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch

from errors import UserError


def current_umask() -> int:
    """The process's umask, read without changing it where Linux reports it (``os.umask``
    alone can only be read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` atomically."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically (UTF-8)."""
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def load_checkpoint(path: str, what: str = "checkpoint") -> dict[str, Any]:
    """Loads a checkpoint dict safely (``weights_only=True``, onto the CPU).

    Raises:
        UserError: the file is missing, truncated, not a checkpoint, or holds objects that
            are not plain data.
    """
    if os.path.isdir(path):
        found = sorted(name for name in os.listdir(path) if name.endswith(".pth"))
        listing = (f"its .pth files: {', '.join(found[:8])}{' …' if len(found) > 8 else ''}"
                   if found else "it holds no .pth file")
        raise UserError(f"{what} {path} is a folder, not a file; {listing}")
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - random bytes fail in any way (KeyError, struct.error...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"{what} {path} is corrupt or not a plain checkpoint ({first[:200]})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a checkpoint dict")
    return obj


def state_dict_of(ckpt: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (``ckpt['model']``, or a bare state dict)."""
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} has no 'model' state dict")
    return sd


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, path: str) -> None:
    """Loads ``state`` into ``model`` strictly; a mismatch is a one-line UserError.

    Args:
        model: the freshly built architecture.
        state: the checkpoint's state dict.
        arch: the architecture name, for the message.
        path: the checkpoint path, for the message.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise UserError(f"checkpoint {path} does not match architecture {arch}: {'; '.join(detail)}")
    model.load_state_dict(state, strict=True)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global random states (torch CPU, CUDA of ``device``, numpy, python) as plain data."""
    import random

    import numpy as np

    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype("int64")), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": _python_state_to_plain(random.getstate()),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restores what :func:`rng_state` saved."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
