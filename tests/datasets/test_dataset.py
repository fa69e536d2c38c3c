"""Data sets: CIFAR-100 download, verification, safe extraction and decoding; digits; registry.

The CIFAR tests serve tiny archives in the official format over loopback HTTP, so the real
download, checksum, extraction and unpickling code runs end to end without the internet.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from cifar_fixtures import (LoopbackServer, cifar_archive, cifar_pickles, dump_pickle,
                            make_tar_gz, make_tiny_cifar, md5_hex, unused_url)
from dataset import (CIFAR100_MEAN, CIFAR100_STD, DATASETS, ImageDataset, load_cifar100,
                     load_dataset, load_digits32)
from errors import UserError

ARCHIVE = "cifar-100-python.tar.gz"


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # loopback traffic must never go through a proxy
    monkeypatch.setenv("NO_PROXY", "*")
    with LoopbackServer() as srv:
        yield srv


def leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- CIFAR-100: success paths -------------------------------------------------------------

@pytest.mark.parametrize("style", ["py2", "py3"])
def test_download_extract_and_decode(server, tmp_path, style):
    tiny = make_tiny_cifar()
    body = cifar_archive(tiny, style)
    url = server.serve("/c100.tar.gz", body)
    ds = load_cifar100(str(tmp_path), url=url, md5=md5_hex(body))

    assert leftovers(tmp_path) == ["cifar-100-python", ARCHIVE]
    assert (tmp_path / ARCHIVE).read_bytes() == body
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.mean == CIFAR100_MEAN and ds.std == CIFAR100_STD
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.test_images.shape == (6, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_labels.tolist() == tiny.train_labels
    assert ds.test_labels.tolist() == tiny.test_labels
    # Row layout: 1024 red, then green, then blue values, each plane row-major 32 x 32.
    for i, c, y, x in [(0, 0, 0, 0), (3, 1, 2, 5), (11, 2, 31, 30), (5, 2, 17, 0)]:
        assert ds.train_images[i, c, y, x].item() == tiny.train_data[i, c * 1024 + y * 32 + x]
    for i, c, y, x in [(0, 1, 9, 31), (5, 0, 31, 31)]:
        assert ds.test_images[i, c, y, x].item() == tiny.test_data[i, c * 1024 + y * 32 + x]


def test_extracted_folder_is_reused_without_network(server, tmp_path):
    tiny = make_tiny_cifar(seed=1)
    body = cifar_archive(tiny)
    url = server.serve("/c100.tar.gz", body)
    first = load_cifar100(str(tmp_path), url=url, md5=md5_hex(body))
    (tmp_path / ARCHIVE).unlink()  # a torchvision-style folder: the archive is not needed
    again = load_cifar100(str(tmp_path), download=False, url=unused_url(), md5=md5_hex(body))
    assert torch.equal(first.train_images, again.train_images)
    assert torch.equal(first.test_labels, again.test_labels)


def test_archive_in_place_is_verified_and_extracted_offline(tmp_path):
    body = cifar_archive(make_tiny_cifar(seed=2))
    (tmp_path / ARCHIVE).write_bytes(body)
    ds = load_cifar100(str(tmp_path), download=False, url=unused_url(), md5=md5_hex(body))
    assert ds.train_images.shape[0] == 12
    assert (tmp_path / "cifar-100-python" / "train").is_file()


def test_archive_in_place_with_wrong_checksum_is_refused(tmp_path):
    (tmp_path / ARCHIVE).write_bytes(cifar_archive(make_tiny_cifar()))
    with pytest.raises(UserError, match="MD5"):
        load_cifar100(str(tmp_path), url=unused_url(), md5="0" * 32)
    assert not (tmp_path / "cifar-100-python").exists()


# --- CIFAR-100: download failures ---------------------------------------------------------

def test_checksum_mismatch_removes_the_download(server, tmp_path):
    body = cifar_archive(make_tiny_cifar())
    url = server.serve("/c100.tar.gz", body)
    with pytest.raises(UserError, match="MD5") as err:
        load_cifar100(str(tmp_path), url=url, md5="0" * 32)
    assert "deleted" in str(err.value)
    assert leftovers(tmp_path) == []


def test_truncated_download_leaves_nothing(server, tmp_path):
    body = cifar_archive(make_tiny_cifar())
    url = server.serve("/c100.tar.gz", body, truncate=True)
    with pytest.raises(UserError, match="stopped after"):
        load_cifar100(str(tmp_path), url=url, md5=md5_hex(body))
    assert leftovers(tmp_path) == []


def test_http_error_is_a_user_error(server, tmp_path):
    url = server.serve("/c100.tar.gz", b"x").replace("c100", "missing")
    with pytest.raises(UserError, match="404"):
        load_cifar100(str(tmp_path), url=url, md5="0" * 32)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("download", [True, False])
def test_offline_without_data_says_where_to_put_the_archive(tmp_path, download):
    folder = tmp_path / "data"
    with pytest.raises(UserError) as err:
        load_cifar100(str(folder), download=download, url=unused_url())
    message = str(err.value)
    assert str(folder / ARCHIVE) in message
    assert "cifar-100-python.tar.gz" in message and "\n" not in message
    assert not any(p.name.endswith(".part") for p in tmp_path.rglob("*"))
    assert not folder.exists()  # no empty ./data left behind by a failed first run


def test_failed_download_removes_only_the_folders_it_created(server, tmp_path):
    url = server.serve("/c100.tar.gz", b"x").replace("c100", "missing")
    with pytest.raises(UserError, match="404"):
        load_cifar100(str(tmp_path / "new" / "data"), url=url, md5="0" * 32)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError, match="404"):
        load_cifar100(str(tmp_path / "mine"), url=url, md5="0" * 32)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # a folder the user made stays


# --- CIFAR-100: corrupt and hostile archives ----------------------------------------------

def serve_and_load(server, tmp_path, body: bytes) -> ImageDataset:
    url = server.serve("/c100.tar.gz", body)
    return load_cifar100(str(tmp_path / "data"), url=url, md5=md5_hex(body))


def test_corrupt_pickle_is_a_user_error(server, tmp_path):
    good = cifar_pickles(make_tiny_cifar())["train"]
    with pytest.raises(UserError, match="corrupt"):
        serve_and_load(server, tmp_path, cifar_archive(make_tiny_cifar(), train=good[:200]))


def test_wrong_content_is_a_user_error(server, tmp_path):
    labels_mismatch = dump_pickle({b"data": np.zeros((3, 3072), np.uint8),
                                   b"fine_labels": [1, 2]}, "py2")
    with pytest.raises(UserError, match="fine_labels"):
        serve_and_load(server, tmp_path, cifar_archive(make_tiny_cifar(), test=labels_mismatch))


def test_corrupt_archive_is_a_user_error(server, tmp_path):
    with pytest.raises(UserError, match="cannot extract"):
        serve_and_load(server, tmp_path, b"\x1f\x8b\x08 this is not really gzip")


class _Hostile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return os.mkdir, (self.target,)


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_pickle_that_calls_a_function_is_rejected(server, tmp_path, style):
    marker = tmp_path / "pwned"
    evil = dump_pickle({b"data": _Hostile(str(marker)), b"fine_labels": []}, style)
    with pytest.raises(UserError, match="corrupt or unsafe.*mkdir"):
        serve_and_load(server, tmp_path, cifar_archive(make_tiny_cifar(), train=evil))
    assert not marker.exists()


def test_codecs_encode_only_decodes_latin1(server, tmp_path):
    # _codecs.encode is how Python 3 writes bytes at protocol 2; only latin1 is accepted.
    def text(value: str) -> bytes:
        return pickle.BINUNICODE + struct.pack("<I", len(value)) + value.encode()

    payload = (pickle.PROTO + b"\x02" + pickle.GLOBAL + b"_codecs\nencode\n" + text("abc")
               + text("rot13") + pickle.TUPLE2 + pickle.REDUCE + pickle.STOP)
    assert pickle.loads(payload) == "nop"  # what an unrestricted unpickler would run
    with pytest.raises(UserError, match="corrupt or unsafe.*rot13"):
        serve_and_load(server, tmp_path, cifar_archive(make_tiny_cifar(), meta=payload))


@pytest.mark.parametrize("name", ["cifar-100-python/../../escaped", "../escaped",
                                  "/tmp/escaped-absolute-cifar-test"])
def test_member_outside_the_folder_is_rejected(server, tmp_path, name):
    files = {f"cifar-100-python/{k}": v for k, v in cifar_pickles(make_tiny_cifar()).items()}
    files[name] = b"gotcha"
    with pytest.raises(UserError, match="unsafe member"):
        serve_and_load(server, tmp_path, make_tar_gz(files))
    assert not (tmp_path / "escaped").exists()
    assert not os.path.exists("/tmp/escaped-absolute-cifar-test")
    assert leftovers(tmp_path / "data") == [ARCHIVE]  # nothing extracted at all


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_link_members_are_rejected(server, tmp_path, kind):
    def add_link(tar: tarfile.TarFile) -> None:
        info = tarfile.TarInfo("cifar-100-python/link")
        info.type, info.linkname = kind, "/etc/passwd"
        tar.addfile(info)

    files = {f"cifar-100-python/{k}": v for k, v in cifar_pickles(make_tiny_cifar()).items()}
    with pytest.raises(UserError, match="unsafe member 'cifar-100-python/link'"):
        serve_and_load(server, tmp_path, make_tar_gz(files, extra=add_link))
    assert leftovers(tmp_path / "data") == [ARCHIVE]


def test_archive_without_the_cifar_files_is_refused(server, tmp_path):
    body = make_tar_gz({"cifar-100-python/train": b"", "readme.txt": b"hi"})
    with pytest.raises(UserError, match="no cifar-100-python/test"):
        serve_and_load(server, tmp_path, body)


# --- digits, registry, container ----------------------------------------------------------

def test_digits_shapes_split_and_statistics():
    ds = load_digits32()
    assert ds.name == "digits" and ds.num_classes == 10
    assert ds.train_images.shape == (1347, 3, 32, 32) and ds.test_images.shape == (450, 3, 32, 32)
    assert ds.train_images.dtype == torch.uint8 and ds.test_labels.dtype == torch.int64
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    assert torch.equal(ds.train_images[:, 0], ds.train_images[:, 2])  # grey on 3 channels
    blocks = ds.train_images[:5, 0].reshape(5, 8, 4, 8, 4)  # nearest: constant 4x4 blocks
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    train_counts = torch.bincount(ds.train_labels, minlength=10)
    test_counts = torch.bincount(ds.test_labels, minlength=10)
    total = train_counts + test_counts
    assert ((test_counts - 0.25 * total).abs() <= 1).all()  # stratified
    scaled = ds.train_images.double() / 255
    assert np.allclose(ds.mean, scaled.mean(dim=(0, 2, 3)).tolist(), atol=1e-12)
    assert np.allclose(ds.std, scaled.std(dim=(0, 2, 3), correction=0).tolist(), atol=1e-12)


def test_digits_split_is_fixed():
    a, b = load_digits32(), load_digits32()
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    joined = torch.cat([a.train_images, a.test_images]).flatten(1)
    assert torch.unique(joined, dim=0).shape[0] >= 1700  # train and test are disjoint draws


def test_registry_and_unknown_name(tmp_path):
    assert DATASETS == ("cifar100", "digits", "imagenet")
    assert load_dataset("digits", str(tmp_path)).num_classes == 10
    with pytest.raises(UserError, match="unknown data set 'cifar10'.*cifar100, digits"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(UserError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", str(tmp_path), download=False)


def test_image_dataset_is_frozen_and_moves():
    ds = load_digits32()
    with pytest.raises(dataclasses.FrozenInstanceError):
        ds.num_classes = 3
    moved = ds.to("cpu")
    assert moved is not ds and moved.train_images is ds.train_images
    assert moved.mean == ds.mean and moved.num_classes == 10
    with pytest.raises(ValueError, match="uint8"):
        dataclasses.replace(ds, train_images=ds.train_images.float())
