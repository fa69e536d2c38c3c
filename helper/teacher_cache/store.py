"""The teacher-output cache on disk: key, file pair, checks, lock, atomic finish.

One cache is two files in ``<save_root>/cache/``, named ``<arch>-<dataset>-<digest>``:

- ``.f32``: raw little-endian float32 logits, ``rows × classes``, row = view id
  (:mod:`dataset.views`); memory-mapped read-only, so concurrent runs share one page-cached
  copy.
- ``.json``: the header: format, the full :class:`CacheKey`, shape, dtype, byte count and
  the SHA-256 of every ``CHUNK_BYTES`` chunk of the ``.f32`` file.

Opening checks the header against the key the run expects, the file size and every chunk's
SHA-256 (in threads: hashlib releases the GIL), so a corrupt, truncated or mismatched cache
is refused, never used. Builds write a temporary file under an exclusive ``flock`` on
``.lock`` and rename it into place; the header is written last.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import torch

from errors import UserError
from helper.checkpoint import atomic_write_text

FORMAT = "teacher-logits/1"
CHUNK_BYTES = 32 << 20
LAYOUT = "row = ((index * (2*pad+1) + dy) * (2*pad+1) + dx) * 2 + flip; float32 little-endian"


@dataclass(frozen=True)
class CacheKey:
    """Everything the cached logits depend on; a run uses a cache only when all agree.

    Attributes:
        teacher_sha256: SHA-256 of the teacher checkpoint file.
        teacher_arch: its architecture.
        dataset: the data set name.
        data_sha256: SHA-256 of the training images (uint8, in order, C-contiguous).
        image_shape: ``[N, C, H, W]`` of the training images.
        num_classes: classes of the teacher's output.
        pad: RandomCrop zero padding in pixels (with the image count, fixes the views).
        mean, std: per-channel normalisation of the teacher's input (0..1 scale).
        precision: ``fp32`` or ``bf16`` autocast of the teacher's forward.
        channels_last: memory format of the teacher's input and weights.
        device_type: ``cpu`` or ``cuda``: their kernels round differently.
    """

    teacher_sha256: str
    teacher_arch: str
    dataset: str
    data_sha256: str
    image_shape: tuple[int, ...]
    num_classes: int
    pad: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str
    channels_last: bool
    device_type: str

    def as_json(self) -> dict[str, Any]:
        """The key as plain JSON values (tuples become lists), as stored in the header."""
        return json.loads(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def digest(self) -> str:
        """SHA-256 (hex) of the key's canonical JSON."""
        return hashlib.sha256(json.dumps(self.as_json(), sort_keys=True).encode()).hexdigest()


def images_sha256(images: torch.Tensor) -> str:
    """SHA-256 of a uint8 image tensor's bytes in C order (copied to the host once)."""
    array = np.ascontiguousarray(images.detach().to("cpu").numpy())
    return hashlib.sha256(memoryview(array).cast("B")).hexdigest()


class CachePaths(NamedTuple):
    """The files of one cache: ``header`` (.json), ``data`` (.f32) and ``lock``."""

    header: str
    data: str
    lock: str


def cache_paths(folder: str, key: CacheKey) -> CachePaths:
    """Where the cache of ``key`` lives in ``folder`` (nothing is created)."""
    stem = os.path.join(folder, f"{key.teacher_arch}-{key.dataset}-{key.digest()[:16]}")
    return CachePaths(stem + ".json", stem + ".f32", stem + ".lock")


def chunk_sha256(path: str, size: int, threads: int = 8) -> list[str]:
    """SHA-256 (hex) of every ``CHUNK_BYTES`` chunk of the first ``size`` bytes of ``path``."""
    fd = os.open(path, os.O_RDONLY)
    try:
        def one(offset: int) -> str:
            return hashlib.sha256(os.pread(fd, min(CHUNK_BYTES, size - offset), offset)).hexdigest()

        with ThreadPoolExecutor(max_workers=max(1, min(threads, os.cpu_count() or 1))) as pool:
            return list(pool.map(one, range(0, size, CHUNK_BYTES)))
    finally:
        os.close(fd)


def table_bytes(rows: int, classes: int) -> int:
    return rows * classes * 4


def check_cache(paths: CachePaths, key: CacheKey, rows: int, classes: int,
                verify_data: bool = True) -> Optional[str]:
    """Why the cache at ``paths`` cannot serve ``key`` (None when it can).

    Checks, in order: both files exist; the header parses, has this format and exactly this
    key, shape and dtype; the data file has exactly the header's byte count; and (with
    ``verify_data``) every chunk's SHA-256 matches the header's.
    """
    if not os.path.exists(paths.header) and not os.path.exists(paths.data):
        return "missing"
    try:
        with open(paths.header, encoding="utf-8") as handle:
            header = json.load(handle)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return f"header {paths.header} unreadable ({type(err).__name__})"
    if header.get("format") != FORMAT:
        return f"header format {header.get('format')!r}, expected {FORMAT!r}"
    stored = header.get("key") if isinstance(header.get("key"), dict) else {}
    differ = sorted(k for k, v in key.as_json().items() if stored.get(k) != v)
    if differ:
        return f"header is for another {', '.join(differ)}"
    expected = table_bytes(rows, classes)
    if (header.get("rows"), header.get("classes"), header.get("dtype"), header.get("bytes")) != \
            (rows, classes, "float32", expected):
        return "header shape or dtype does not match the data set"
    try:
        size = os.path.getsize(paths.data)
    except OSError:
        return f"data file {paths.data} missing"
    if size != expected:
        return f"data file truncated or padded ({size} of {expected} bytes)"
    if verify_data:
        sums = chunk_sha256(paths.data, size)
        bad = [i for i, (a, b) in enumerate(zip(sums, header.get("sha256_chunks") or [])) if a != b]
        if bad or len(sums) != len(header.get("sha256_chunks") or []):
            return f"checksum mismatch (corrupt data, chunk {bad[0] if bad else len(sums)})"
    return None


def open_table(paths: CachePaths, rows: int, classes: int) -> torch.Tensor:
    """``[rows, classes]`` float32 CPU tensor backed by a read-only shared map of the data."""
    array = np.memmap(paths.data, dtype="<f4", mode="r", shape=(rows, classes))
    with warnings.catch_warnings():  # read-only by design: nothing writes through it
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(array)


@contextlib.contextmanager
def build_lock(paths: CachePaths) -> Iterator[None]:
    """Holds an exclusive ``flock`` on the cache's lock file (released when the holder dies)."""
    os.makedirs(os.path.dirname(paths.lock), exist_ok=True)
    with open(paths.lock, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"teacher cache: waiting for another run building {paths.data}", file=sys.stderr,
                  flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def start_file(paths: CachePaths, rows: int, classes: int) -> str:
    """Creates the (sparse, zero) temporary data file of a build; call under :func:`build_lock`.

    Removes the old header first (a crash later leaves "missing", not a stale pair) and the
    temporary files of builds that died (the lock is ours, so nobody else writes them).
    """
    size = table_bytes(rows, classes)
    folder = os.path.dirname(paths.data)
    free = _free_bytes(folder)
    if free is not None and free < size:
        raise UserError(f"the teacher cache needs {size / 1e9:.2f} GB in {folder}, only "
                        f"{free / 1e9:.2f} GB free; free space or use --teacher_cache off")
    for stale in glob.glob(glob.escape(paths.data) + ".tmp-*"):
        os.unlink(stale)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.header)
    tmp = f"{paths.data}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        handle.truncate(size)
    return tmp


def _free_bytes(folder: str) -> Optional[int]:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def finish_file(paths: CachePaths, tmp: str, key: CacheKey, rows: int, classes: int,
                extra: dict[str, Any]) -> None:
    """Checksums the finished temporary file, renames it into place, then writes the header."""
    size = table_bytes(rows, classes)
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    header = {"format": FORMAT, "key": key.as_json(), "rows": rows, "classes": classes,
              "dtype": "float32", "layout": LAYOUT, "bytes": size, "chunk_bytes": CHUNK_BYTES,
              "sha256_chunks": chunk_sha256(tmp, size), **extra}
    os.replace(tmp, paths.data)
    atomic_write_text(paths.header, json.dumps(header, indent=1) + "\n")
