"""scripts/fetch_pretrained_teachers.sh against a loopback HTTP server with Range support.

The server serves real checkpoints of random weights: a good resnet56, a truncated wrn_40_2,
and a resnet20 posing as vgg13. A partial resnet56 download already on disk must be resumed
(the server sees a Range request); bad files must be deleted with a clear message.

When the per-file host fails, the script falls back to a ``cifar_teachers.tar`` built here
(with hostile members: links, ``..``, absolute names, a device), served whole or broken off
mid-transfer. ImageNet files are served under names that carry their own SHA-256 prefix and
requested as ``--imagenet ARCH=FILE`` (torchvision's real names cannot be forged).
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import re
import socket
import subprocess
import sys
import tarfile
import threading
import time

import pytest
import torch

from train_utils import REPO

import models
from teacher_zoo import cli as teachers
from teacher_zoo import fetch as teacher_fetch
from imagenet_fixtures import published_state_dict


def _checkpoint(arch: str) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": models.create_model(arch, 100).state_dict(), "epoch": 240, "best_acc": 1.0}, buffer)
    return buffer.getvalue()


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET with ``Range: bytes=N-`` support (206 / 416), 404 for unknown paths; a path in
    ``server.cut`` gets only that many body bytes, once, and the connection is closed."""

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
        cut = self.server.cut.pop(self.path, None)
        self.wfile.write(body[start:] if cut is None else body[start:start + cut])
        self.close_connection = cut is not None

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.cut = {}, [], {}
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


@pytest.fixture(scope="module")
def blobs():
    return {"resnet56": _checkpoint("resnet56"), "wrn_40_2": _checkpoint("wrn_40_2"),
            "resnet20": _checkpoint("resnet20")}


@pytest.fixture(autouse=True)
def _fresh_server_state(server):
    server.files.clear()
    server.requests.clear()
    server.cut.clear()


def _url(arch: str) -> str:
    return f"/repo/{arch}_vanilla/ckpt_epoch_240.pth"


TAR_PATH = "/mdistiller/cifar_teachers.tar"


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _fetch(server, dest, *archs: str, **env_over: str) -> subprocess.CompletedProcess:
    base = f"http://127.0.0.1:{server.server_port}"
    env = {**os.environ, "KD_TEACHER_URL": f"{base}/repo/", "KD_TEACHER_TAR_URL": base + TAR_PATH,
           "KD_TEACHER_IMAGENET_URL": f"{base}/torchvision/", "KD_TEACHER_DIR": str(dest),
           "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env_over}
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "fetch_pretrained_teachers.sh"), *archs],
                          env=env, capture_output=True, text=True, timeout=300)


def _tar(*members: tuple) -> bytes:
    """A tar archive of ``(name, data)`` regular files and ``(name, type, linkname)`` others."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, *rest in members:
            info = tarfile.TarInfo(name)
            if len(rest) == 1:
                info.size = len(rest[0])
                tar.addfile(info, io.BytesIO(rest[0]))
            else:
                info.type, info.linkname = rest
                tar.addfile(info)
    return buffer.getvalue()


def _member(arch: str) -> str:
    return f"cifar_teachers/{arch}_vanilla/ckpt_epoch_240.pth"


def _files(root) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


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
    # the ImageNet rows: torchvision's files, checked by the SHA-256 prefix of their names
    assert "missing" in rows["resnet34"] and "73.314" in rows["resnet34"]
    assert rows["resnet34"].endswith(os.path.join(str(tmp_path), "resnet34_imagenet", "resnet34-b627a593.pth"))
    (tmp_path / "resnet50_imagenet").mkdir()
    (tmp_path / "resnet50_imagenet" / "resnet50-0676ba61.pth").write_bytes(b"not torchvision's file")
    assert teachers.main(["list", "--root", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert "INVALID (SHA-256" in rows["resnet50"] and "76.130" in rows["resnet50"]
    assert "missing" in rows["resnet18"]


def test_check_exit_codes(blobs, tmp_path, capsys):
    path = tmp_path / "x.pth"
    path.write_bytes(blobs["resnet56"])
    assert teachers.main(["check", str(path), "--arch", "resnet56", "--num_classes", "100"]) == 0
    assert teachers.main(["check", str(path), "--arch", "resnet56", "--num_classes", "10"]) == teachers.EXIT_INVALID
    assert "the teacher has 100 classes, the data 10" in capsys.readouterr().err
    assert teachers.main(["check", str(path), "--arch", "resnet110"]) == teachers.EXIT_INVALID
    assert "does not match architecture resnet110" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        teachers.main(["check", str(path), "--arch", "no_such_net"])
    assert err.value.code == 2


def test_archive_fallback_resumes_and_extracts_only_the_expected_files(server, blobs, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "wrn.pth").write_bytes(blobs["wrn_40_2"])  # a valid teacher a link could reach
    absolute = str(tmp_path / "absolute.pth")
    archive = _tar(
        (_member("resnet56"), blobs["resnet56"]),
        (_member("wrn_40_2"), tarfile.SYMTYPE, str(outside / "wrn.pth")),  # the expected name, as a link
        ("cifar_teachers/resnet56_vanilla/notes.txt", b"unexpected"),
        ("cifar_teachers/ResNet50_aug/ckpt_epoch_240.pth", b"unexpected"),
        ("../escape.pth", b"outside"),
        ("cifar_teachers/../../escape2.pth", b"outside"),
        (absolute, b"absolute"),
        ("cifar_teachers/hardlink", tarfile.LNKTYPE, str(outside / "wrn.pth")),
        ("cifar_teachers/device", tarfile.CHRTYPE, ""),
    )
    server.files[TAR_PATH] = archive
    dest = tmp_path / "models"
    dest.mkdir()
    (dest / "cifar_teachers.tar.part").write_bytes(archive[:10_000])  # an earlier run stopped here
    server.cut[TAR_PATH] = 50_000  # and this transfer breaks off after 50,000 more bytes
    out = _fetch(server, dest, "resnet56", "wrn_40_2", KD_TEACHER_URL=f"http://127.0.0.1:{_closed_port()}/repo")
    assert out.returncode == 1, out.stdout + out.stderr
    # the per-file host was asked once, then the archive for both, resumed twice
    assert out.stderr.count("no answer from") == 1
    assert [rng for path, rng in server.requests if path == TAR_PATH] == ["bytes=10000-", "bytes=60000-"]
    assert "resnet56: ok" in out.stdout and "from the archive" in out.stdout
    assert (dest / "resnet56_vanilla" / "ckpt_epoch_240.pth").read_bytes() == blobs["resnet56"]
    # the link was refused (not followed to the valid file outside); nothing else came out,
    # and the archive and the staging folder are gone
    assert "refused member" in out.stderr and "error: wrn_40_2: download failed: not in the archive" in out.stderr
    assert _files(dest) == [os.path.join("resnet56_vanilla", "ckpt_epoch_240.pth")]
    assert os.listdir(dest) == ["resnet56_vanilla"]
    assert sorted(os.listdir(tmp_path)) == ["models", "outside"]
    assert _files(outside) == ["wrn.pth"] and not os.path.exists(absolute)
    assert "1 teacher(s) missing or invalid: wrn_40_2" in out.stderr


def test_offline_fails_fast_and_leaves_no_folders(tmp_path):
    closed = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "KD_TEACHER_URL": closed + "/repo", "KD_TEACHER_TAR_URL": closed + TAR_PATH,
           "KD_TEACHER_DIR": str(tmp_path / "save" / "models"), "PYTHON": sys.executable}
    started = time.monotonic()
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "fetch_pretrained_teachers.sh")],
                         env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - started < 60
    assert out.returncode == 1, out.stdout + out.stderr
    assert "(set KD_TEACHER_URL or KD_TEACHER_TAR_URL to a mirror)" in out.stderr
    assert "6 teacher(s) missing or invalid" in out.stderr
    assert os.listdir(tmp_path) == []  # save/ and save/models/ were created and removed again


def _hashed(stem: str, body: bytes, digits: int = 8) -> str:
    return f"{stem}-{hashlib.sha256(body).hexdigest()[:digits]}.pth"


def test_imagenet_good_wrong_hash_and_resumed(server, tmp_path):
    from helper.distill import teacher_arch_from_path

    good = _torchvision_file("resnet18")
    blob = os.urandom(300_000)
    names = {"resnet18": _hashed("resnet18", good), "tinynet": _hashed("tinynet", blob, 10),
             "resnet34": "resnet34-00000000.pth"}
    assert not hashlib.sha256(b"x" * 1000).hexdigest().startswith("00000000")
    server.files.update({f"/torchvision/{names['resnet18']}": good, f"/torchvision/{names['tinynet']}": blob,
                         f"/torchvision/{names['resnet34']}": b"x" * 1000})
    partial = tmp_path / "tinynet_imagenet" / (names["tinynet"] + ".part")
    partial.parent.mkdir()
    partial.write_bytes(blob[:100_000])
    out = _fetch(server, tmp_path, "--imagenet", *(f"{arch}={name}" for arch, name in names.items()))
    assert out.returncode == 1, out.stdout + out.stderr
    # good (made as torchvision's: no BatchNorm counters): placed where train_student.py reads
    # the architecture, and loaded into our resnet18
    placed = tmp_path / "resnet18_imagenet" / names["resnet18"]
    assert placed.read_bytes() == good and teacher_arch_from_path(str(placed)) == "resnet18"
    assert "resnet18: ok" in out.stdout and "resnet18: loads into our resnet18" in out.stdout
    # resumed from byte 100000; no model of that name: the load check is skipped with a note
    assert (f"/torchvision/{names['tinynet']}", "bytes=100000-") in server.requests
    assert (tmp_path / "tinynet_imagenet" / names["tinynet"]).read_bytes() == blob and not partial.exists()
    assert "tinynet: no tinynet in models.model_dict yet: skipped the load check" in out.stdout
    # wrong hash: deleted (its folder too), reported, and the run fails
    assert not (tmp_path / "resnet34_imagenet").exists()
    assert "error: resnet34: the downloaded file's SHA-256 does not start with the prefix" in out.stderr
    assert "1 teacher(s) missing or invalid: resnet34" in out.stderr


def test_imagenet_table_mirror_and_bad_arguments(capsys):
    assert teacher_fetch.main(["imagenet-files"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[:3] for row in rows] == [
        ["resnet34", "resnet34-b627a593.pth", "https://download.pytorch.org/models/resnet34-b627a593.pth"],
        ["resnet50", "resnet50-0676ba61.pth", "https://download.pytorch.org/models/resnet50-0676ba61.pth"]]
    assert [row[3] for row in rows] == [("yes" if a in models.model_dict else "no") for a in ("resnet34", "resnet50")]
    assert teacher_fetch.main(["imagenet-files", "resnet18", "resnet20=resnet20-0123abcd.pth",
                               "--base", "http://mirror/tv"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [row[2] for row in rows] == ["http://mirror/tv/resnet18-f37072fd.pth",
                                        "http://mirror/tv/resnet20-0123abcd.pth"]
    assert rows[1][3] == "yes"  # resnet20 is a registered model: the script will load-check it
    assert teacher_fetch.main(["imagenet-files", "resnet101", "resnet152"]) == 0  # the stronger teachers
    assert [line.split("\t")[1] for line in capsys.readouterr().out.splitlines()] == [
        "resnet101-63fe2227.pth", "resnet152-394f9c45.pth"]
    for bad, why in [("resnet200", "unknown ImageNet teacher"), ("wide_resnet=w-0123abcd.pth", "letters and digits"),
                     ("resnet50=resnet50.pth", "does not carry a SHA-256 prefix"),
                     ("resnet50=../resnet50-0123abcd.pth", "bare file name")]:
        with pytest.raises(SystemExit) as err:
            teacher_fetch.main(["imagenet-files", bad])
        assert err.value.code == 2 and why in capsys.readouterr().err, bad


def test_sha256_prefix_convention(tmp_path, capsys):
    assert teacher_fetch.sha256_prefix("resnet34-b627a593.pth") == "b627a593"
    assert teacher_fetch.sha256_prefix("wide_resnet50_2-95faca4d.pth") == "95faca4d"
    body = os.urandom(5000)
    good = tmp_path / _hashed("net", body)
    good.write_bytes(body)
    part = tmp_path / (_hashed("net", body, 12) + ".part")  # a complete download not yet renamed
    part.write_bytes(body)
    assert teacher_fetch.sha256_matches(str(good)) and teacher_fetch.sha256_matches(str(part))
    assert teacher_fetch.main(["sha256", str(good)]) == 0
    renamed = tmp_path / "net-00000000.pth"
    renamed.write_bytes(body)
    assert teacher_fetch.main(["sha256", str(renamed)]) == teacher_fetch.EXIT_INVALID == teachers.EXIT_INVALID
    assert "does not start with 00000000" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        teacher_fetch.main(["sha256", str(renamed), "--name", "net.pth"])
    assert err.value.code == 2


def test_extract_accepts_dot_prefix_and_drops_truncated_members(blobs, tmp_path):
    whole = _tar(("./" + _member("resnet56"), blobs["resnet56"]), (_member("wrn_40_2"), blobs["wrn_40_2"]))
    (tmp_path / "a.tar").write_bytes(whole)
    (tmp_path / "one").mkdir()
    written, notes = teacher_fetch.extract_teachers(str(tmp_path / "a.tar"), str(tmp_path / "one"), ["resnet56"])
    assert written == ["resnet56"] and notes == []
    assert _files(tmp_path / "one") == [os.path.join("cifar_teachers", "resnet56_vanilla", "ckpt_epoch_240.pth")]
    # cut inside wrn_40_2's data: resnet56 (whole) comes out, wrn_40_2 does not
    (tmp_path / "b.tar").write_bytes(whole[: len(whole) - len(blobs["wrn_40_2"]) // 2])
    (tmp_path / "two").mkdir()
    written, notes = teacher_fetch.extract_teachers(str(tmp_path / "b.tar"), str(tmp_path / "two"),
                                                    ["resnet56", "wrn_40_2"])
    assert written == ["resnet56"] and any("truncated" in note for note in notes)
    assert not (tmp_path / "two" / "cifar_teachers" / "wrn_40_2_vanilla" / "ckpt_epoch_240.pth").exists()
    (tmp_path / "c.tar").write_bytes(b"<html>not an archive</html>" * 40)
    assert teacher_fetch.main(["extract-cifar", str(tmp_path / "c.tar"), str(tmp_path), "resnet56"]) == 3


# --- torchvision's files: no BatchNorm counters -------------------------------------------------

def _torchvision_file(arch: str, num_classes: int = 1000) -> bytes:
    """A file made as torchvision's IMAGENET1K_V1 ones were: ``torch.save`` of a plain dict in
    torchvision's key order, without ``num_batches_tracked``."""
    buffer = io.BytesIO()
    torch.save(published_state_dict(arch, num_classes=num_classes), buffer)
    return buffer.getvalue()


def test_torchvision_files_pass_check_list_and_the_teacher_load(tmp_path, monkeypatch, capsys):
    from helper.distill import build_teacher
    from helper.student import read_teacher

    path = tmp_path / "resnet18_imagenet" / "resnet18-f37072fd.pth"
    path.parent.mkdir()
    path.write_bytes(_torchvision_file("resnet18"))
    assert teachers.main(["check", str(path), "--arch", "resnet18", "--num_classes", "1000"]) == 0
    assert "is a valid resnet18 checkpoint" in capsys.readouterr().out
    monkeypatch.setattr(teachers, "sha256_matches", lambda file: True)  # the name cannot be forged
    assert teachers.main(["list", "--root", str(tmp_path)]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["resnet18"].split()[2] == "valid", rows["resnet18"]
    # train_student.py's way: read the file (weights_only), build the frozen teacher
    file = read_teacher(str(path))
    teacher = build_teacher(file.checkpoint, file.path, file.arch(None), 1000, torch.device("cpu"))
    assert all(int(v) == 0 for k, v in teacher.state_dict().items() if k.endswith("num_batches_tracked"))
    assert torch.equal(teacher.state_dict()["fc.weight"], file.checkpoint["fc.weight"])


def test_other_gaps_classes_and_non_checkpoints_are_one_line(tmp_path, capsys):
    state = published_state_dict("resnet18", num_classes=3)
    torch.save({k: v for k, v in state.items() if k != "layer1.0.bn1.running_var"}, tmp_path / "gap.pth")
    torch.save(published_state_dict("resnet18", num_classes=3), tmp_path / "three.pth")
    (tmp_path / "notes.pth").write_text("hello, these are my notes\n")
    (tmp_path / "page.pth").write_text("<!DOCTYPE html><html><body>404</body></html>")
    for name, classes, fragment in [("gap.pth", 3, "1 missing keys (e.g. layer1.0.bn1.running_var)"),
                                    ("three.pth", 2, "the teacher has 3 classes, the data 2"),
                                    ("notes.pth", 2, "it is a text file (it begins 'hello, these are my notes')"),
                                    ("page.pth", 2, "it is an HTML/XML page")]:
        argv = ["check", str(tmp_path / name), "--arch", "resnet18", "--num_classes", str(classes)]
        assert teachers.main(argv) == teachers.EXIT_INVALID
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1, err
        assert "(101)" not in err and "shape mismatches" not in err


# --- --deit: mmcls's DeiT III-S file, fetched as is ---------------------------------------------

DEIT3 = "deit3_small_patch16_224"


@pytest.fixture(scope="module")
def mmcls_deit3() -> bytes:
    """A 1000-class DeiT III-S file made as mmcls's runner saves it: ``{'meta', 'state_dict'}``
    with mmcls's key names (random weights; ~88 MB, as the real one)."""
    from vit_fixtures import facebook_state_dict, mmcls_state_dict

    torch.manual_seed(0)
    state = models.create_model(DEIT3, 1000).state_dict()
    buffer = io.BytesIO()
    torch.save({"meta": {"mmcls_version": "0.24.1", "epoch": 300},
                "state_dict": mmcls_state_dict(facebook_state_dict(state))}, buffer)
    return buffer.getvalue()


def test_deit_fetch_resumes_checks_the_hash_and_load_and_converts_nothing(server, mmcls_deit3, tmp_path):
    from helper.distill import teacher_arch_from_path

    name = _hashed("deit3-small-p16_in21k-pre_3rdparty_in1k_20221009", mmcls_deit3)
    wrong = _torchvision_file("resnet18")  # its own hash, but ResNet weights for a ViT arch
    wrong_name = _hashed("deit3-small-resnet-inside", wrong)
    server.files.update({f"/deit3/{name}": mmcls_deit3, f"/deit3/{wrong_name}": wrong})
    partial = tmp_path / f"{DEIT3}_imagenet" / (name + ".part")
    partial.parent.mkdir()
    partial.write_bytes(mmcls_deit3[:1_000_000])
    base = f"http://127.0.0.1:{server.server_port}/deit3/"
    out = _fetch(server, tmp_path, "--deit", f"{DEIT3}={name}", f"{DEIT3}={wrong_name}", KD_TEACHER_DEIT_URL=base)
    assert out.returncode == 1, out.stdout + out.stderr  # the ResNet file fails the run
    placed = tmp_path / f"{DEIT3}_imagenet" / name
    assert (f"/deit3/{name}", "bytes=1000000-") in server.requests and not partial.exists()
    assert placed.read_bytes() == mmcls_deit3  # mmcls's layout on disk, mapped only when loaded
    assert teacher_arch_from_path(str(placed)) == DEIT3
    assert f"{DEIT3}: ok" in out.stdout and f"{DEIT3}: loads into our {DEIT3}" in out.stdout
    # a file whose hash matches but that is no DeiT III-S: kept, reported in one line
    errors = [line for line in out.stderr.splitlines() if line.startswith(f"error: {DEIT3}")]
    assert len(errors) == 1 and "matches its SHA-256 but does not load into our" in errors[0], out.stderr
    assert f"1 teacher(s) missing or invalid: {DEIT3}" in out.stderr


def test_deit_offline_fails_fast_names_the_mirror_variable_and_leaves_no_folders(tmp_path):
    closed = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ, "KD_TEACHER_DEIT_URL": closed + "/deit3", "PYTHON": sys.executable,
           "KD_TEACHER_DIR": str(tmp_path / "save" / "models"), "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "fetch_pretrained_teachers.sh"), "--deit"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and time.monotonic() - start < 30
    assert f"{closed}/deit3/deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth" in out.stdout
    assert "(set KD_TEACHER_DEIT_URL to a mirror holding deit3-small-p16_in21k" in out.stderr
    assert f"1 teacher(s) missing or invalid: {DEIT3}" in out.stderr
    assert os.listdir(tmp_path) == []


def test_deit_table_and_names(capsys):
    assert teacher_fetch.main(["imagenet-files", "--deit"]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows == [[DEIT3, "deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth",
                     "https://download.openmmlab.com/mmclassification/v0/deit3/"
                     "deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth", "yes"]]
    assert teacher_fetch.sha256_prefix(rows[0][1]) == "dcd90827"  # '-' inside mmcls's stems
    assert teacher_fetch.main(["imagenet-files", "--deit", "--base", "http://mirror/mm"]) == 0
    assert capsys.readouterr().out.split("\t")[2] == (
        "http://mirror/mm/deit3-small-p16_in21k-pre_3rdparty_in1k_20221009-dcd90827.pth")
    for bad, why in [("resnet34", "unknown DeiT teacher"), ("deit_x=deit-0123abcd.pth", "letters and digits only")]:
        with pytest.raises(SystemExit) as err:
            teacher_fetch.main(["imagenet-files", "--deit", bad])
        assert err.value.code == 2 and why in capsys.readouterr().err, bad
