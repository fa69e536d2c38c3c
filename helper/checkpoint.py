"""Plain, safe, atomic checkpoints.

Every file is written to a temporary name in the same folder, flushed to disk and then
renamed over the target (``os.replace`` is atomic on POSIX), so a kill at any moment leaves
the previous good file. Everything is loaded with ``weights_only=True``: checkpoints hold
tensors, numbers, strings, lists and dicts only.
"""
from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import tempfile
import zipfile
from typing import Any, Callable

import numpy as np
import torch

from errors import UserError
from models.vit import ARCHS as VIT_ARCHS
from models.vit_layouts import to_timm_state_dict


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file under this process's umask (0644 under 022).

    The umask is read from ``/proc/self/status`` (Linux); ``os.umask`` could only read it by
    setting it, which races with other threads creating files, so elsewhere the common 022
    is assumed.
    """
    mask = 0o022
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    mask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o666 & ~mask


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """The hex SHA-256 of a file, read in ``chunk``-byte pieces (a teacher's identity)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write(path: str, write: Callable[[Any], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        # mkstemp creates the file 0600; give it the mode open() would (0644 under umask 022)
        os.fchmod(fd, new_file_mode())
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
        raise UserError(f"{what} {path} {unreadable_reason(path, err)}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} is not a checkpoint dict")
    return obj


def unreadable_reason(path: str, err: Exception) -> str:
    """Why ``torch.load`` could not read ``path``, said by what the file is.

    torch's own errors name internals: a text file fails the legacy unpickler with a bare
    ``KeyError`` (its bytes read as a memo lookup: ``'he'`` of ``hello`` asks for memo 101),
    and a weights-only refusal starts with a paragraph about torch 2.6's defaults.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
    if size == 0:
        return "is empty (0 bytes), not a checkpoint"
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return f"is corrupt: a zip-format torch file cut short or damaged ({size:,} bytes, no zip directory)"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if not any(n.endswith("/data.pkl") for n in names):
            listing = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
            return f"is a zip archive but not a torch checkpoint (it holds {listing})"
    refused = re.search(r"Unsupported global: GLOBAL (\S+) was not an allowed global", str(err))
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch's zip format, or its legacy pickle
        # torch's own globals are allowed: a refused "torch..." name is a cut-off one
        if refused and not refused.group(1).startswith("torch"):
            return (f"holds an object of type {refused.group(1)}, which weights_only=True refuses: "
                    "a checkpoint holds tensors, numbers, strings, lists and dicts only")
        return f"is corrupt: a torch file that cannot be read to the end ({type(err).__name__})"
    return f"is corrupt or not a torch checkpoint: {_file_kind(head)}"


def _file_kind(head: bytes) -> str:
    """What the first bytes of a file that is not a torch file look like."""
    if head.startswith(b"\x1f\x8b"):
        return "it is a gzip file"
    if head[257:262] == b"ustar":
        return "it is a tar archive"
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "it is an HTML/XML page (a download that got an error or login page?)"
    try:
        decoded = head.decode("utf-8")
    except UnicodeDecodeError:
        decoded = None
    if decoded is not None and all(c.isprintable() or c in "\r\n\t" for c in decoded):
        start = " ".join(decoded.split())[:40]
        return f"it is a text file (it begins {start!r})"
    return f"neither torch's zip format nor its legacy format (it begins with bytes {head[:4].hex(' ')})"


def state_dict_of(ckpt: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The model state dict of a checkpoint (``ckpt['model']``, or a bare state dict)."""
    sd = ckpt.get("model", ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"checkpoint {path} has no 'model' state dict")
    return sd


def model_state_of(ckpt: dict[str, Any], path: str, arch: str) -> dict[str, torch.Tensor]:
    """The state dict of ``arch`` in a teacher file, in our (timm's, torchvision's,
    RepDistiller's) key layout: a ViT file in mmcls's (``state_dict`` nested, ``backbone.*``)
    or Facebook's (``model`` nested, ``gamma_1``) layout is mapped key by key by
    :func:`models.vit_layouts.to_timm_state_dict`; any other file is :func:`state_dict_of`'s.

    Raises:
        UserError: no state dict, or a ViT file whose keys no table maps (one line).
    """
    if arch in VIT_ARCHS:
        try:
            return to_timm_state_dict(ckpt)
        except ValueError as err:
            raise UserError(f"teacher checkpoint {path}: {err}") from None
    return state_dict_of(ckpt, path)


COUNTER = "num_batches_tracked"


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], arch: str, path: str) -> None:
    """Loads ``state`` into ``model`` strictly; a mismatch is a one-line UserError.

    BatchNorm's ``num_batches_tracked`` counters may be missing: torchvision's IMAGENET1K_V1
    files (2017 weights, re-saved) hold none, and torch's own strict load fills them for
    such files. Every other missing or unexpected key is a mismatch. A classifier of another
    width says so in classes ("the teacher has 1000 classes, the data 100").

    Args:
        model: the freshly built architecture.
        state: the checkpoint's state dict.
        arch: the architecture name, for the message.
        path: the checkpoint path, for the message.
    """
    own = model.state_dict()
    counters = [k for k in own if k not in state and k.rsplit(".", 1)[-1] == COUNTER]
    missing = [k for k in own if k not in state and k not in counters]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(_mismatch(model, state, own, arch, path, missing, unexpected, wrong))
    if counters:
        # a copy that keeps the file's _metadata; the counters start at 0, as torch's would
        filled = collections.OrderedDict(state)
        if hasattr(state, "_metadata"):
            filled._metadata = state._metadata  # type: ignore[attr-defined]
        filled.update((k, torch.zeros_like(own[k])) for k in counters)
        state = filled
    model.load_state_dict(state, strict=True)


def _classifier_keys(model: torch.nn.Module) -> tuple[str, ...]:
    """``weight`` and ``bias`` keys of the last ``nn.Linear`` (the classifier)."""
    linear = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linear:
        return ()
    prefix = linear[-1] + "." if linear[-1] else ""
    return (prefix + "weight", prefix + "bias")


def _mismatch(model: torch.nn.Module, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor],
              arch: str, path: str, missing: list[str], unexpected: list[str], wrong: list[str]) -> str:
    """The one-line message of a state dict that does not fit ``model``."""
    head = _classifier_keys(model)
    if wrong and not missing and not unexpected and set(wrong) <= set(head):
        rows = {int(state[k].shape[0]) for k in wrong} | {int(own[k].shape[0]) for k in wrong}
        if len(rows) == 2 and all(tuple(state[k].shape[1:]) == tuple(own[k].shape[1:]) for k in wrong):
            return (f"checkpoint {path} is a {arch} with another classifier: the teacher has "
                    f"{int(state[head[0]].shape[0])} classes, the data {int(own[head[0]].shape[0])}")
    detail = []
    if missing:
        detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
    if unexpected:
        detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        detail.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
    return f"checkpoint {path} does not match architecture {arch}: {'; '.join(detail)}"


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global random states (torch CPU, CUDA of ``device``, numpy, python) as plain data."""
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
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
