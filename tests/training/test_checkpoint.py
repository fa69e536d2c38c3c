"""helper/checkpoint.py on its own: atomic writes, the file mode of the umask, weights-only
loads, the one-line reasons for files that are not checkpoints, the strict load with the
missing-counter exception, and the random states."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from errors import UserError
from helper.checkpoint import (atomic_save, file_sha256, load_checkpoint, load_weights, new_file_mode,
                               rng_state, set_rng_state)


def test_atomic_save_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.pth"
    atomic_save({"x": torch.arange(3)}, str(path))
    atomic_save({"x": torch.arange(4)}, str(path))
    assert torch.equal(load_checkpoint(str(path))["x"], torch.arange(4))
    assert os.listdir(tmp_path) == ["a.pth"]
    assert (path.stat().st_mode & 0o777) == new_file_mode()


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.pth"
    atomic_save({"x": 1}, str(path))

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError):
        atomic_save({"x": Unsaveable()}, str(path))
    assert load_checkpoint(str(path)) == {"x": 1} and os.listdir(tmp_path) == ["a.pth"]


def test_new_file_mode_follows_the_umask():
    old = os.umask(0o077)
    try:
        assert new_file_mode() == 0o600
    finally:
        os.umask(old)
    assert new_file_mode() == 0o666 & ~old


@pytest.mark.parametrize("content, reason", [
    (b"", "empty"), (b"hello world, not a checkpoint", "text"), (b"<!DOCTYPE html><html>", "HTML"),
])
def test_files_that_are_not_checkpoints_get_one_line(tmp_path, content, reason):
    path = tmp_path / "t.pth"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_checkpoint(str(path), "teacher checkpoint")
    assert reason in str(err.value) and "\n" not in str(err.value) and "(101)" not in str(err.value)


def test_unsafe_objects_are_refused(tmp_path):
    path = tmp_path / "t.pth"
    torch.save({"model": {}, "opt": nn.Linear(2, 2)}, path)  # a module: not plain data
    with pytest.raises(UserError):
        load_checkpoint(str(path))


def test_strict_load_accepts_only_missing_batchnorm_counters():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    load_weights(fresh, state, "net", "f.pth")  # torchvision's files: no counters
    assert torch.equal(fresh[0].weight, net[0].weight)
    with pytest.raises(UserError, match="missing"):
        load_weights(fresh, {k: v for k, v in state.items() if k != "1.running_var"}, "net", "f.pth")
    with pytest.raises(UserError):
        load_weights(fresh, {**state, "extra.weight": torch.zeros(1)}, "net", "f.pth")


def test_file_sha256(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert file_sha256(str(path)) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_random_states_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    atomic_save({"rng": rng_state(torch.device("cpu"))}, str(tmp_path / "r.pth"))
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(load_checkpoint(str(tmp_path / "r.pth"))["rng"], torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first
