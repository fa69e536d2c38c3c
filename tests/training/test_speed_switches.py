"""The speed switches (``--precision``, ``--channels_last``, ``--compile``) and the sync-free step.

Runs the entry scripts in-process on the shrunk digits set (see train_utils): bf16 autocast
and channels_last finish with finite losses and plain fp32 checkpoints; ``--compile``
traces and runs (with dynamo's ``aot_eager`` backend, which needs no C++ compiler; the
inductor test is opt-in, ``KD_SLOW_TESTS=1``, as CPU inductor takes minutes here); a
compilation that fails falls back to eager with a warning. The last test counts the
tensor-to-host conversions of ``Trainer.train_epoch`` and checks that their number does
not grow with the number of steps.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import pytest
import torch

import models
from dataset.base import CIFAR100_MEAN, CIFAR100_STD, ImageDataset
from dataset.loader import DeviceLoader
from helper import distributed, speed
from helper.loop import Trainer
from helper.assemble import assemble
from helper.student import build_objective
from helper.student_flags import parse_config
from train_utils import digits_teacher, load, read_metrics, run_student, run_teacher

N_TRAIN, N_TEST = 96, 50


@pytest.fixture(autouse=True)
def one_thread_here():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def teacher_run(root: Path, *extra: str) -> Path:
    best = run_teacher(n_train=N_TRAIN, n_test=N_TEST, argv=["--model", "resnet8", "--dataset", "digits", "--epochs", "1",
                               "--batch_size", "32", "--seed", "1", "--save_root", str(root),
                               "--device", "cpu", *extra])
    return Path(best).parent


def finite_metrics(run_dir: Path) -> dict[str, float]:
    _, rows = read_metrics(run_dir / "metrics.csv")
    assert len(rows) == 1
    values = {k: float(v) for k, v in rows[0].items()}
    assert all(math.isfinite(v) for v in values.values()), values
    return values


@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--channels_last"],
                                   ["--precision", "bf16", "--channels_last"]])
def test_teacher_precision_and_layout(tmp_path, extra):
    run_dir = teacher_run(tmp_path, *extra)
    finite_metrics(run_dir)
    ckpt = load(run_dir / "resnet8_best.pth")["model"]
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt.values())  # autocast keeps fp32 weights
    models.create_model("resnet8", 10).load_state_dict(ckpt)  # reference keys, any layout


def test_student_bf16_channels_last(tmp_path, tmp_path_factory):
    teacher = digits_teacher(tmp_path_factory)
    run_student(n_train=N_TRAIN, n_test=N_TEST, argv=["--path_t", teacher, "--model_s", "resnet8", "--distill", "wttm", "-b", "3",
                        "--dataset", "digits", "--epochs", "1", "--batch_size", "32", "--seed", "1",
                        "--precision", "bf16", "--channels_last", "--save_root", str(tmp_path),
                        "--device", "cpu"])
    values = finite_metrics(next((tmp_path / "student_model").iterdir()))
    assert values["loss_main_wttm"] > 0


def test_compile_runs(tmp_path, monkeypatch):
    """--compile goes through dynamo (aot_eager backend: tracing and AOT autograd, no C++)."""
    real, compiled = torch.compile, []

    def aot_eager(module, **kwargs):
        compiled.append(type(module).__name__)
        return real(module, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        finite_metrics(teacher_run(tmp_path, "--compile"))
    torch._dynamo.reset()
    assert compiled == ["ResNet"]
    assert not [w for w in caught if "torch.compile" in str(w.message)]  # no eager fallback


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """--compile_mode reduce-overhead (CUDA graphs on a GPU) is what torch.compile is asked for."""
    real, modes = torch.compile, []

    def aot_eager(module, mode=None, **kwargs):
        modes.append(mode)
        return real(module, backend="aot_eager")
    monkeypatch.setattr(torch, "compile", aot_eager)
    torch._dynamo.reset()
    finite_metrics(teacher_run(tmp_path, "--compile", "--compile_mode", "reduce-overhead"))
    torch._dynamo.reset()
    assert modes == ["reduce-overhead"]


@pytest.mark.skipif(os.environ.get("KD_SLOW_TESTS") != "1", reason="CPU inductor takes minutes; KD_SLOW_TESTS=1")
def test_compile_with_inductor(tmp_path):
    torch._dynamo.reset()
    finite_metrics(teacher_run(tmp_path, "--compile"))
    torch._dynamo.reset()


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    def broken(module, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no backend here")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(UserWarning, match="torch.compile failed .*no backend here.*running eagerly"):
        run_dir = teacher_run(tmp_path, "--compile")
    finite_metrics(run_dir)
    assert load(run_dir / "resnet8_best.pth")["model"].keys() == models.create_model("resnet8", 10).state_dict().keys()


def test_compile_off_returns_the_module_itself():
    net = torch.nn.Linear(2, 2)
    assert speed.maybe_compile(net, False) is net


# ---- no host sync on the per-step path ---------------------------------------------------

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def count_host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts calls of the tensor methods that read a value back to the host."""
    counts = dict.fromkeys(SYNCS, 0)
    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return counts


def student_trainer(method: str, steps: int, tmp_path: Path) -> Trainer:
    """A Trainer for resnet8→resnet8 with ``method`` over ``steps`` batches of 16, as
    a student run assembles it (random teacher, synthetic images)."""
    env = distributed.DistEnv(0, 1, 0, torch.device("cpu"))
    n = 16 * steps
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 10
    data = ImageDataset("synthetic", images, labels, images[:16], labels[:16], 10, CIFAR100_MEAN, CIFAR100_STD)
    cfg = parse_config(["--path_t", "x", "--model_s", "resnet8", "--distill", method, "-b", "1",
                        "--nce_k", "32", "--seed", "1", "--print_freq", "1000",
                        "--save_root", str(tmp_path)], env, "resnet8")
    teacher = models.create_model("resnet8", 10).eval().requires_grad_(False)
    objective = build_objective(cfg, env, data, teacher)
    fmt = torch.contiguous_format
    loader = DeviceLoader(images, labels, 16, CIFAR100_MEAN, CIFAR100_STD, train=True, seed=1)
    return assemble(cfg, env, objective, "resnet8", (loader, []), str(tmp_path), None, fmt, teacher=teacher)


@pytest.mark.parametrize("method", ["wttm", "crd"])
def test_train_epoch_reads_the_host_a_constant_number_of_times(tmp_path, method):
    totals = {}
    for steps in (2, 6):
        trainer = student_trainer(method, steps, tmp_path / str(steps))
        with pytest.MonkeyPatch.context() as mp:
            counts = count_host_reads(mp)
            stats = trainer.train_epoch(1)
        assert math.isfinite(stats["loss"])
        totals[steps] = sum(counts.values())
    assert totals[2] == totals[6], totals  # nothing per step
    assert 1 <= totals[2] <= 8, totals  # the epoch-end meter read (+ CRD's one-off constants)
