"""CIFAR-100 from the official python archive: download, verify, extract, decode.

The folder layout is the one torchvision uses (``<data_folder>/cifar-100-python/{train,
test,meta}``), so a copy that torchvision downloaded earlier is reused as it is. Nothing
here executes code from the archive: members are checked before extraction and the
pickles are read by an unpickler that only rebuilds numpy arrays.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from errors import UserError

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
FOLDER_NAME = "cifar-100-python"
PICKLES = ("train", "test", "meta")
_CHUNK = 1 << 20


def load_cifar100(data_folder: str, download: bool = True, url: str = CIFAR100_URL,
                  md5: str = CIFAR100_MD5) -> ImageDataset:
    """Loads CIFAR-100, fetching and extracting the archive into ``data_folder`` if needed.

    Order of preference: an extracted ``<data_folder>/cifar-100-python/`` folder, then the
    archive ``<data_folder>/cifar-100-python.tar.gz``, then a download from ``url``.

    Args:
        data_folder: folder that holds (or will hold) the archive and its extracted folder.
        download: whether a missing archive may be downloaded.
        url: where to download the archive from.
        md5: expected MD5 hex digest of the archive.

    Returns:
        CPU tensors: train ``[50000, 3, 32, 32]`` and test ``[10000, 3, 32, 32]`` uint8
        images, int64 fine labels, 100 classes, the reference normalisation statistics.

    Raises:
        UserError: data missing while offline, checksum mismatch, truncated download,
            corrupt or unsafe archive.
    """
    root = Path(data_folder).expanduser()
    folder = root / FOLDER_NAME
    if not all((folder / name).is_file() for name in PICKLES):
        archive = root / ARCHIVE_NAME
        if archive.is_file():
            if _md5_of_file(archive) != md5.lower():
                raise UserError(f"{archive} fails its MD5 check (expected {md5}); it is "
                                "incomplete or not the CIFAR-100 python archive. Delete it "
                                "and run again to download a fresh copy.")
        elif download:
            _download(url, archive, md5)
        else:
            raise UserError(_missing_message(root, url))
        _extract(archive, root)
    num_classes = len(_read_meta(folder / "meta"))
    train_images, train_labels = _read_split(folder / "train", num_classes)
    test_images, test_labels = _read_split(folder / "test", num_classes)
    return ImageDataset("cifar100", train_images, train_labels, test_images, test_labels,
                        num_classes, CIFAR100_MEAN, CIFAR100_STD)


def _missing_message(root: Path, url: str) -> str:
    return (f"CIFAR-100 is not in {root} and downloading is off: download {url} and put it "
            f"at {root / ARCHIVE_NAME} (or its extracted folder at {root / FOLDER_NAME}/), "
            "or allow downloading.")


def _offline_message(root: Path, url: str, reason: object) -> str:
    return (f"could not download {url} ({reason}). Without internet access, download it on "
            f"another machine and put it at {root / ARCHIVE_NAME} (or its extracted folder "
            f"at {root / FOLDER_NAME}/).")


def _md5() -> "hashlib._Hash":
    try:
        return hashlib.md5(usedforsecurity=False)  # integrity check, allowed under FIPS
    except TypeError:  # Python 3.8
        return hashlib.md5()


def _md5_of_file(path: Path) -> str:
    digest = _md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, archive: Path, md5: str) -> None:
    """Streams ``url`` into a temporary file next to ``archive``; renames it once verified.

    A download that fails removes the folders it created for the archive (a failed offline
    first run leaves no empty ``./data`` behind).
    """
    created = _missing_folders(archive.parent)
    try:
        archive.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{ARCHIVE_NAME}.", suffix=".part",
                                        dir=archive.parent)
    except OSError as err:
        _remove_empty(created)
        raise UserError(f"cannot write to {archive.parent}: {err}") from err
    tmp, done = Path(tmp_name), False
    try:
        digest, received, expected = _md5(), 0, None
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            expected = int(resp.headers.get("Content-Length") or 0) or None
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"downloading {ARCHIVE_NAME}", mininterval=1.0) as bar:
                for chunk in iter(lambda: resp.read(_CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise UserError(f"download of {url} stopped after {received} of {expected} "
                            "bytes; run again to retry.")
        if digest.hexdigest() != md5.lower():
            raise UserError(f"the file downloaded from {url} fails its MD5 check (got "
                            f"{digest.hexdigest()}, expected {md5}); it was deleted. Run "
                            f"again, or download it by hand and put it at {archive}.")
        os.replace(tmp, archive)
        done = True
    except http.client.IncompleteRead as err:
        raise UserError(f"download of {url} stopped after {received} bytes (the connection "
                        "closed early); run again to retry.") from err
    except urllib.error.HTTPError as err:
        raise UserError(_offline_message(archive.parent, url, f"HTTP {err.code} {err.reason}")
                        ) from err
    except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise UserError(_offline_message(archive.parent, url, reason)) from err
    finally:
        tmp.unlink(missing_ok=True)
        if not done:
            _remove_empty(created)


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder.parent != folder:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Removes ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _check_member(member: tarfile.TarInfo, dest: str, archive: Path) -> None:
    """Rejects links, devices, absolute paths and paths that leave ``dest``."""
    name = member.name
    problem = None
    if not (member.isfile() or member.isdir()):
        problem = "it is not a regular file or folder"  # links could point anywhere
    elif os.path.isabs(name) or name.startswith(("/", "\\")):
        problem = "its path is absolute"
    else:
        target = os.path.realpath(os.path.join(dest, name))
        if os.path.commonpath([dest, target]) != dest:
            problem = "its path leaves the extraction folder"
    if problem:
        raise UserError(f"unsafe member {name!r} in {archive}: {problem}. The archive is "
                        "corrupt or was tampered with; delete it and download it again.")


def _extract(archive: Path, root: Path) -> None:
    """Extracts into a private temporary folder, then moves the CIFAR files into place."""
    try:
        tmp = tempfile.mkdtemp(prefix=f".{FOLDER_NAME}.", dir=root)
    except OSError as err:
        raise UserError(f"cannot extract {archive}: {root} is not writable ({err})") from err
    dest = os.path.realpath(tmp)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:  # every member is checked before anything is written
                _check_member(member, dest, archive)
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **extra)
        source = Path(dest) / FOLDER_NAME
        for name in PICKLES:
            if not (source / name).is_file():
                raise UserError(f"{archive} is not the CIFAR-100 python archive: it has "
                                f"no {FOLDER_NAME}/{name}. Delete it and download it again.")
        (root / FOLDER_NAME).mkdir(exist_ok=True)
        for item in source.iterdir():
            if item.is_file():
                os.replace(item, root / FOLDER_NAME / item.name)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as err:
        raise UserError(f"cannot extract {archive} ({err}); if it is corrupt, delete it "
                        "and run again to download a fresh copy.") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Forbidden(pickle.UnpicklingError):
    pass


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol 2 as _codecs.encode(text, 'latin1').
    if encoding not in ("latin1", "latin-1"):
        raise _Forbidden(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's own array rebuilder, whatever its module
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise _Forbidden(f"it refers to {module}.{name}") from None


def _load_pickle(path: Path) -> dict[str, Any]:
    """Reads one CIFAR pickle; keys are returned as ``str`` whatever the pickle used."""
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as err:  # any failure of a foreign file is a corrupt-data problem
        raise UserError(f"{path} is corrupt or unsafe ({err}); delete {path.parent} and "
                        "the archive next to it, then run again.") from err
    if not isinstance(obj, dict):
        raise UserError(f"{path} is corrupt: expected a dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _corrupt(path: Path, what: str) -> UserError:
    return UserError(f"{path} is corrupt: {what}. Delete {path.parent} and the archive "
                     "next to it, then run again.")


def _read_meta(path: Path) -> list:
    names = _load_pickle(path).get("fine_label_names")
    if not isinstance(names, list) or not names:
        raise _corrupt(path, "no fine_label_names list")
    return names


def _read_split(path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Decodes ``data`` (``[N, 3072]`` uint8, R, G, B planes of 32x32 rows) and labels."""
    batch = _load_pickle(path)
    data, labels = batch.get("data"), batch.get("fine_labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == 3 * 32 * 32):
        raise _corrupt(path, "'data' is not a uint8 [N, 3072] array")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError):
        labels = np.asarray([None])
    if labels.shape != data.shape[:1] or labels.dtype.kind not in "iu":
        raise _corrupt(path, f"'fine_labels' is not a list of {data.shape[0]} integers")
    if labels.size and not (0 <= labels.min() and labels.max() < num_classes):
        raise _corrupt(path, f"a label lies outside 0..{num_classes - 1}")
    images = torch.from_numpy(np.array(data, copy=True).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels.astype(np.int64))
