"""DDP on CPU: ``torchrun --nproc_per_node=2`` (gloo) of both entry scripts on digits.

Each 2-process job is a real subprocess (``python -m torch.distributed.run``) of the test
launcher (``tests/train_utils.py``), on the first :data:`N_TRAIN` training and :data:`N_TEST`
test digits, global batch 64 (32 per rank): three steps per epoch, the last one partial.

What is compared is what the design makes exact, never accuracy after training (one epoch of
digits is in its steep early phase, where test accuracy moves by 10 points with the seed):

* the teacher job's weights after its three steps equal, to float rounding, those of the
  same three steps computed here in one process the way DDP defines them: each rank's shard
  of every global batch (built by the library's own loaders for rank 0 and rank 1, with
  their own augmentation draws), BatchNorm over each shard, the two gradients averaged, one
  SGD step at the recipe's LR. The logged training loss is the mean of those shard losses;
  the logged test accuracy is exactly that of the saved weights on the whole test set
  (evaluation shards the test set across ranks and sums the counts);
* the job takes as many steps per epoch as one process with the same global batch, logs
  once (one run folder, one metrics row per epoch, one summary line, one progress line per
  step) and ``--resume`` continues a 2-process run bit for bit;
* CRD's memory banks: every row of the training set is updated (a unit vector) in the bank
  rank 0 saves, so the rows of rank 1's shard reached rank 0 (they are lost otherwise).
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from train_utils import (REPO, digits_teacher, launcher_command, load, only_run_dir, read_metrics,
                         small_data, subprocess_env)

N_TRAIN, N_TEST = 160, 50
GLOBAL_BATCH, RANKS, SEED = 64, 2, 1
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 5e-4  # the CIFAR recipe digits trains with
STEPS = -(-N_TRAIN // GLOBAL_BATCH)  # one process, global batch 64: 64, 64, 32
# CRD (the recipe's weight) with method-owned trainable embeddings and buffers (memory banks)
STUDENT = ["--model_s", "resnet8", "--distill", "crd", "-r", "1", "-a", "0", "-b", "0.8",
           "--nce_k", "64"]


def common(epochs: int = 1, print_freq: int = 1) -> list[str]:
    """Flags of every run: digits, the seed's global batch of 64, seed 1, CPU."""
    return ["--dataset", "digits", "--epochs", str(epochs), "--batch_size", str(GLOBAL_BATCH),
            "--seed", str(SEED), "--print_freq", str(print_freq), "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(who: str, args: list[str], timeout: float = 300) -> str:
    """Runs ``train_<who>.py`` on 2 gloo ranks on the shrunk digits; returns stdout (asserts a
    clean exit)."""
    launcher, *rest = launcher_command(who, args, N_TRAIN, N_TEST)[1:]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={RANKS}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", launcher, *rest]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(threads=1), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def progress_steps(stdout: str, epoch: int = 1) -> list[tuple[int, int]]:
    """``(step, steps)`` of each progress line of ``epoch`` in stdout."""
    return [(int(a), int(b)) for a, b in re.findall(rf"^epoch {epoch} \[(\d+)/(\d+)\]", stdout, re.M)]


def check_logged_once(stdout: str, run_dir: Path, epochs: int = 1) -> dict[str, str]:
    """One progress line per step (as many steps as one process takes), one summary line and
    one metrics row per epoch; returns the last row."""
    assert progress_steps(stdout, epochs) == [(k, STEPS) for k in range(1, STEPS + 1)], stdout
    assert len(re.findall(rf"^epoch {epochs}/{epochs} ", stdout, re.M)) == 1, stdout
    assert len(re.findall(r"^best test accuracy", stdout, re.M)) == 1, stdout
    _, rows = read_metrics(run_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    return rows[-1]


def ddp_steps_in_one_process(data) -> tuple[torch.nn.Module, float]:
    """The teacher job's epoch 1, computed in this process as DDP defines it.

    Returns:
        rank 0's network after the epoch (its parameters are every rank's; its BatchNorm
        statistics are rank 0's own, as ``broadcast_buffers=False`` keeps them), and the mean
        training cross-entropy over the epoch's samples (nats).
    """
    torch.manual_seed(SEED)  # seed_everything, then the network is built (rank 0's is broadcast)
    model = models.create_model("resnet8", data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    loaders = [data.loaders(GLOBAL_BATCH // RANKS, 500, SEED, rank=r, world_size=RANKS)[0]
               for r in range(RANKS)]
    model.train()
    loss_sum, count = 0.0, 0
    for shards in zip(*loaders, strict=True):
        optimizer.zero_grad(set_to_none=True)
        for rank, (images, labels, _) in enumerate(shards):
            loss = F.cross_entropy(model(images), labels)
            (loss / RANKS).backward()  # DDP averages the ranks' gradients
            loss_sum, count = loss_sum + loss.item() * len(labels), count + len(labels)
            if rank == 0:
                rank0_buffers = [b.clone() for b in model.buffers()]
        for buffer, kept in zip(model.buffers(), rank0_buffers):
            buffer.copy_(kept)
        optimizer.step()
    return model, loss_sum / count


def test_teacher_two_ranks_match_one(tmp_path, one_thread):
    stdout = torchrun("teacher", ["--model", "resnet8", *common(), "--save_root", str(tmp_path)])
    run_dir = only_run_dir(tmp_path / "models")
    row = check_logged_once(stdout, run_dir)
    saved = load(run_dir / "resnet8_last.pth")["model"]

    data = small_data(["--dataset", "digits"], N_TRAIN, N_TEST)
    assert len(data.loaders(GLOBAL_BATCH, 500, SEED)[0]) == STEPS  # the single process's steps
    model, train_loss = ddp_steps_in_one_process(data)
    expected = model.state_dict()
    assert saved.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(saved[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert float(row["train_loss"]) == pytest.approx(train_loss, rel=1e-4)
    # the test set split across ranks and summed: the saved network's score on the whole set
    from helper.evaluate import evaluate

    model.load_state_dict(saved)
    scored = evaluate(model, data.loaders(GLOBAL_BATCH, 500, SEED)[1])
    assert float(row["test_acc"]) == pytest.approx(scored["acc1"], abs=1e-3)
    assert float(row["test_loss"]) == pytest.approx(scored["loss"], rel=1e-4)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    return digits_teacher(tmp_path_factory)


def test_student_two_ranks_log_once_and_share_crd_memory(teacher, tmp_path):
    stdout = torchrun("student", ["--path_t", teacher, *STUDENT, *common(), "--save_root", str(tmp_path)])
    assert stdout.count("teacher resnet14 (") == 1, stdout
    run_dir = only_run_dir(tmp_path / "student_model")
    row = check_logged_once(stdout, run_dir)
    assert float(row["loss_main_crd"]) > 0 and float(row["loss_ce"]) > 0
    state = load(run_dir / "resume.pth")["task_state"]["main"]  # method state saved once, by rank 0
    for bank in ("memory_v1", "memory_v2"):
        memory = state[f"criterion.contrast.{bank}"]
        assert memory.shape == (N_TRAIN, 128)
        # an updated row is a unit vector; a row still at its uniform initialisation is not
        # (its squared norm is 1 ± 0.08), so rank 1's rows reached rank 0's bank
        torch.testing.assert_close(memory.norm(dim=1), torch.ones(N_TRAIN), rtol=0, atol=1e-4)


def test_resume_two_ranks_is_exact(tmp_path):
    """A 2-rank run stopped after epoch 1 and resumed to epoch 2 ends on the weights of the
    uninterrupted 2-rank run."""
    two = ["--model", "resnet8", *common(epochs=2, print_freq=1000)]
    first = ["--model", "resnet8", *common(epochs=1, print_freq=1000)]
    torchrun("teacher", [*two, "--save_root", str(tmp_path / "straight")])
    torchrun("teacher", [*first, "--save_root", str(tmp_path / "split")])
    stdout = torchrun("teacher", [*two, "--save_root", str(tmp_path / "split"), "--resume"])
    assert len(re.findall(r"^resumed .* after epoch 1$", stdout, re.M)) == 1, stdout
    straight = load(only_run_dir(tmp_path / "straight" / "models") / "resnet8_last.pth")
    split_dir = only_run_dir(tmp_path / "split" / "models")
    split = load(split_dir / "resnet8_last.pth")
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    _, rows = read_metrics(split_dir / "metrics.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_sync_bn_converts_in_place_and_refuses_cpu_ranks():
    from errors import UserError
    from helper import distributed

    model = models.create_model("resnet8", 10)
    keys = {k: v.shape for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    one_rank = distributed.DistEnv(0, 1, 0, torch.device("cpu"))
    distributed.convert_sync_bn(model, True, one_rank)  # one process: nothing to synchronise
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    with pytest.raises(UserError, match="--sync_bn needs CUDA"):
        distributed.convert_sync_bn(model, True, distributed.DistEnv(0, 2, 0, torch.device("cpu")))
    # on CUDA ranks every BatchNorm becomes a SyncBatchNorm with the same keys and parameters
    # (the conversion itself runs anywhere; only SyncBatchNorm's forward needs a GPU)
    distributed.convert_sync_bn(model, True, distributed.DistEnv(0, 2, 0, torch.device("cuda", 0)))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, torch.nn.SyncBatchNorm) for m in bns)
    assert {k: v.shape for k, v in model.state_dict().items()} == keys
    assert [id(p) for p in model.parameters()] == params
