"""scripts/fetch_pretrained_teachers.sh against a loopback HTTP server with Range support.

The server serves real checkpoints of random weights: a good resnet56, a truncated wrn_40_2,
and a resnet20 posing as vgg13. A partial resnet56 download already on disk must be resumed
(the server sees a Range request); bad files must be deleted with a clear message.
"""
from __future__ import annotations

import http.server
import io
import os
import re
import subprocess
import sys
import threading

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import models  # noqa: E402
from helper import teachers  # noqa: E402


def _checkpoint(arch: str) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": models.create_model(arch, 100).state_dict(), "epoch": 240, "best_acc": 1.0}, buffer)
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` support (206 / 416), 404 for unknown paths."""

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        self.server.requests.append((self.path, self.headers.get("Range")))
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, match = 0, re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match:
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests = {}, []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def blobs():
    return {"resnet56": _checkpoint("resnet56"), "wrn_40_2": _checkpoint("wrn_40_2"),
            "resnet20": _checkpoint("resnet20")}


def _url(arch: str) -> str:
    return f"/repo/{arch}_vanilla/ckpt_epoch_240.pth"


def _fetch(server, dest, *archs: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_TEACHER_URL": f"http://127.0.0.1:{server.server_port}/repo/",
           "KD_TEACHER_DIR": str(dest), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "fetch_pretrained_teachers.sh"), *archs],
                          env=env, capture_output=True, text=True, timeout=300)


def test_good_resumed_truncated_and_wrong_downloads(server, blobs, tmp_path):
    good = blobs["resnet56"]
    server.files.update({_url("resnet56"): good,
                         _url("wrn_40_2"): blobs["wrn_40_2"][: len(blobs["wrn_40_2"]) // 2],
                         _url("vgg13"): blobs["resnet20"]})
    partial = tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth.part"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(good[:100_000])  # an interrupted earlier download
    server.requests.clear()
    out = _fetch(server, tmp_path, "resnet56", "wrn_40_2", "vgg13")
    assert out.returncode == 1, out.stdout + out.stderr
    # resnet56: resumed from byte 100000 and verified
    assert (_url("resnet56"), "bytes=100000-") in server.requests
    assert (tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth").read_bytes() == good
    assert not partial.exists() and "resnet56: ok" in out.stdout
    # the truncated and the wrong file are gone, each with a message, and the run failed
    for arch in ("wrn_40_2", "vgg13"):
        folder = tmp_path / f"{arch}_vanilla"
        assert not list(folder.glob("ckpt_epoch_240.pth*")), arch
        assert f"error: {arch}: the downloaded file is not a valid {arch} checkpoint" in out.stderr
    assert "2 teacher(s) missing or invalid: wrn_40_2 vgg13" in out.stderr


def test_present_files_are_kept_or_replaced(server, blobs, tmp_path):
    server.files.update({_url("resnet56"): blobs["resnet56"], _url("wrn_40_2"): blobs["wrn_40_2"]})
    for arch in ("resnet56", "wrn_40_2"):
        (tmp_path / f"{arch}_vanilla").mkdir()
    (tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth").write_bytes(blobs["resnet56"])
    (tmp_path / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth").write_bytes(b"not a checkpoint")
    server.requests.clear()
    out = _fetch(server, tmp_path, "resnet56", "wrn_40_2")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resnet56: already present and valid" in out.stdout
    assert "wrn_40_2: the file in place is not a valid wrn_40_2 checkpoint" in out.stderr
    assert [path for path, _ in server.requests] == [_url("wrn_40_2")]  # nothing fetched twice
    assert (tmp_path / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth").read_bytes() == blobs["wrn_40_2"]


def test_unreachable_file_and_bad_arguments(server, tmp_path):
    out = _fetch(server, tmp_path, "ResNet50")  # not served: 404
    assert out.returncode == 1 and "error: ResNet50: download failed" in out.stderr
    assert not list(tmp_path.rglob("*.pth*"))
    out = _fetch(server, tmp_path, "resnet8")
    assert out.returncode == 2 and "unknown teacher 'resnet8'" in out.stderr


def test_list_shows_present_valid_and_invalid(blobs, tmp_path, capsys):
    (tmp_path / "resnet56_vanilla").mkdir()
    (tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth").write_bytes(blobs["resnet56"])
    (tmp_path / "vgg13_vanilla").mkdir()
    (tmp_path / "vgg13_vanilla" / "ckpt_epoch_240.pth").write_bytes(blobs["resnet20"])
    assert teachers.main(["list", "--root", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "valid" in rows["resnet56"] and "72.34" in rows["resnet56"]
    assert "INVALID" in rows["vgg13"] and "missing" in rows["ResNet50"]


def test_check_exit_codes(blobs, tmp_path, capsys):
    path = tmp_path / "x.pth"
    path.write_bytes(blobs["resnet56"])
    assert teachers.main(["check", str(path), "--arch", "resnet56", "--num_classes", "100"]) == 0
    assert teachers.main(["check", str(path), "--arch", "resnet56", "--num_classes", "10"]) == teachers.EXIT_INVALID
    assert teachers.main(["check", str(path), "--arch", "resnet110"]) == teachers.EXIT_INVALID
    assert "does not match architecture resnet110" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        teachers.main(["check", str(path), "--arch", "no_such_net"])
    assert err.value.code == 2
