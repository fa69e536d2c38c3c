"""Tiny archives in the exact CIFAR-100 python format, and a loopback HTTP server.

The official pickles were written by Python 2 (protocol 2): strings are ``str`` opcodes and
arrays refer to ``numpy.core.multiarray._reconstruct``. :class:`Py2StylePickler` writes the
same opcodes from Python 3, so the tests read what a real download contains.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

_RECONSTRUCT = np.empty(0).__reduce__()[0]


class Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` (BINSTRING) opcodes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None) -> None:
        if obj is _RECONSTRUCT:  # the module name numpy 1.x (and the original files) used
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def dump_pickle(obj: object, style: str) -> bytes:
    """Pickles ``obj`` at protocol 2, ``'py2'`` style (like the official files) or ``'py3'``."""
    if style == "py3":
        return pickle.dumps(obj, protocol=2)
    buffer = io.BytesIO()
    Py2StylePickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


@dataclass
class TinyCifar:
    """What a tiny archive holds: ``[N, 3072]`` uint8 rows and fine labels per split."""

    train_data: np.ndarray
    train_labels: list
    test_data: np.ndarray
    test_labels: list


def make_tiny_cifar(n_train: int = 12, n_test: int = 6, seed: int = 0) -> TinyCifar:
    rng = np.random.default_rng(seed)
    return TinyCifar(
        rng.integers(0, 256, (n_train, 3072), dtype=np.uint8),
        [int(v) for v in rng.integers(0, 100, n_train)],
        rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
        [int(v) for v in rng.integers(0, 100, n_test)])


def cifar_pickles(tiny: TinyCifar, style: str = "py2") -> dict[str, bytes]:
    """The three pickles of the official archive, keyed by file name."""

    def split(name: bytes, data: np.ndarray, labels: list) -> bytes:
        return dump_pickle({
            b"filenames": [b"img_%05d.png" % i for i in range(len(labels))],
            b"batch_label": b"%s batch 1 of 1" % name,
            b"fine_labels": labels,
            b"coarse_labels": [label // 5 for label in labels],
            b"data": data,
        }, style)

    meta = {b"fine_label_names": [b"fine_%02d" % i for i in range(100)],
            b"coarse_label_names": [b"coarse_%02d" % i for i in range(20)]}
    return {"train": split(b"training", tiny.train_data, tiny.train_labels),
            "test": split(b"testing", tiny.test_data, tiny.test_labels),
            "meta": dump_pickle(meta, style)}


def make_tar_gz(members: dict[str, bytes],
                extra: Optional[Callable[[tarfile.TarFile], None]] = None) -> bytes:
    """A gzipped tar of regular files (name -> content); ``extra`` may add odd members."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        if extra is not None:
            extra(tar)
    return buffer.getvalue()


def cifar_archive(tiny: TinyCifar, style: str = "py2", **replace: bytes) -> bytes:
    """The archive bytes; ``replace`` swaps a pickle's content (e.g. ``train=b'junk'``)."""
    files = {**cifar_pickles(tiny, style), **replace}
    members = {f"cifar-100-python/{name}": content for name, content in files.items()}
    members["cifar-100-python/file.txt~"] = b""
    return make_tar_gz(members)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


class LoopbackServer:
    """Serves registered byte strings on 127.0.0.1; ``truncate`` routes stop halfway."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[bytes, bool]] = {}
        routes = self.routes

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path not in routes:
                    self.send_error(404)
                    return
                body, truncate = routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if truncate else body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def serve(self, path: str, body: bytes, truncate: bool = False) -> str:
        """Registers ``body`` under ``path``; returns its URL."""
        self.routes[path] = (body, truncate)
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def __enter__(self) -> "LoopbackServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def unused_url() -> str:
    """A loopback URL on a port that nothing listens on (connection refused)."""
    with http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler) as s:
        port = s.server_port
    return f"http://127.0.0.1:{port}/cifar-100-python.tar.gz"
