"""End to end on a tiny ILSVRC-style folder: SRRL, ReviewKD, KD++, NKD, and CTKD on KD and DKD,
for ResNet-34 → ResNet-18 and ResNet-50 → MobileNet, through the real ``train_student.py``.

Each case trains one epoch (finite loss columns in ``metrics.csv``) and resumes exactly: two
epochs straight equal one epoch plus ``--resume`` (student weights, every method-owned tensor
in ``resume.pth``, metrics). KD++'s teacher class means are built by the first run of a save
root and loaded, untouched, by the runs after it (the resume included); a corrupt file is
rebuilt to the same means. CTKD's temperature θ moves in the first epoch and is restored.

224-pixel networks on one CPU thread are slow, so the folder holds 4 small training JPEGs
(two steps of batch 2) and 3 validation ones, and the teachers are random networks whose
BatchNorm statistics are set on smooth noise (sane logits, made in a second, no training).
The learning rate is 0.01 (our choice: the recipe's 0.1 is for batch 256). The default suite
runs one case per pair (KD++'s class means, DKD+CTKD's θ) and the corrupt-file case; the
whole method × pair matrix runs with ``KD_SLOW_TESTS=1``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models
import train_student
from distiller_zoo.dkd import dkd_loss
from imagenet_fixtures import WNIDS, smooth_image
from train_utils import load, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
slow = pytest.mark.skipif(not os.environ.get("KD_SLOW_TESTS"), reason="set KD_SLOW_TESTS=1")

PAIRS = {"r34-r18": ("resnet34", "resnet18"), "r50-mv1": ("resnet50", "mobilenet_v1")}
# method -> (the metrics column of its term, its flags, the task_state part holding CTKD's θ)
METHODS = {
    "srrl": ("loss_main_srrl", ["--distill", "srrl"], None),
    "reviewkd": ("loss_main_reviewkd", ["--distill", "reviewkd"], None),
    "kdpp": ("loss_main_kdpp", ["--distill", "kdpp"], None),
    "nkd": ("loss_main_nkd", ["--distill", "nkd"], None),
    "kd+ctkd": ("loss_add_kd", ["--distill", "kd", "--add", "kd", "-r", "0.1", "-a", "0.9", "-b", "0",
                                "--ctkd", "global"], "add"),
    "dkd+ctkd": ("loss_main_dkd", ["--distill", "dkd", "--ctkd", "global"], "main"),
}
# cls_KD's res50_distill_mv1_img.py clips NKD's MobileNet gradients at 5
PAIR_EXTRA = {("nkd", "r50-mv1"): ["--clip_grad", "5"]}
DEFAULT_CASES = {("kdpp", "r50-mv1"), ("dkd+ctkd", "r34-r18")}
THETA = "ctkd.global_t.global_T"
MEANS_LINE = "teacher class means: "


def cases() -> list:
    return [pytest.param(m, p, id=f"{m}-{p}", marks=() if (m, p) in DEFAULT_CASES else slow)
            for m in METHODS for p in PAIRS]


# ---- fixtures: the folder and the teachers ---------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """``train/<wnid>/`` with 2, 1, 1 small JPEGs (every class has a mean), ``val/`` one each."""
    from PIL import Image

    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, counts in (("train", (2, 1, 1)), ("val", (1, 1, 1))):
        for wnid, count in zip(WNIDS, counts):
            (root / split / wnid).mkdir(parents=True)
            for k in range(count):
                pixels = smooth_image(rng, 48 + 16 * k, 64)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{k}.JPEG", quality=90)
    return str(root)


def calibrated_teacher(arch: str, path: Path) -> None:
    """Saves a random ``arch`` (3 classes) as torchvision ships its files (a bare state dict
    without BatchNorm counters), its BatchNorm statistics those of smooth 112-pixel noise: in
    eval mode it then gives logits of a few units, as a trained teacher does, where default
    statistics give hundreds."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = models.create_model(arch, len(WNIDS))
        noise = F.interpolate(torch.randn(4, 3, 6, 6), size=112, mode="bilinear", align_corners=False)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the one batch
    with torch.no_grad():
        model.train()(1.5 * noise)
    path.parent.mkdir(parents=True)
    torch.save({k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}, path)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Callable[[str], str]:
    """``teacher(arch)`` → the path of its file in ``<arch>_imagenet/``, made once per module."""
    root, made = tmp_path_factory.mktemp("models"), {}

    def get(arch: str) -> str:
        if arch not in made:
            made[arch] = root / f"{arch}_imagenet" / f"{arch}-tiny.pth"
            calibrated_teacher(arch, made[arch])
        return str(made[arch])

    return get


def run(teacher_path: str, folder: str, save_root: Path, student: str, *flags: str) -> Path:
    """``train_student.py`` on the folder; returns the run folder."""
    argv = ["--path_t", teacher_path, "--model_s", student, "--dataset", "imagenet", "--data_folder", folder,
            "--batch_size", "2", "--epochs", "1", "--learning_rate", "0.01", "--seed", "1", "--workers", "0",
            "--save_root", str(save_root), "--device", "cpu", *flags]
    return Path(train_student.main(argv)).parent


def means_status(out: str) -> list[str]:
    """The class-means lines a run printed: ``built (<why>) <path>`` or ``loaded <path>``."""
    return [line[len(MEANS_LINE):] for line in out.splitlines() if line.startswith(MEANS_LINE)]


def only_means_file(save_root: Path) -> Path:
    files = list((save_root / "cache").glob("*-classmeans-*.pt"))
    assert len(files) == 1, files
    return files[0]


def assert_finite_losses(run_dir: Path, term: str) -> None:
    header, rows = read_metrics(run_dir / "metrics.csv")
    assert term in header, header
    losses = [c for c in header if c == "train_loss" or c.startswith("loss")]
    for row in rows:
        assert all(math.isfinite(float(row[c])) for c in losses), row
        assert float(row[term]) != 0.0, row  # the method's term is really in the objective


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        else:
            assert value == b[key], key


# ---- one epoch, exact resume, class means reused ---------------------------------------------

@pytest.mark.parametrize("method, pair", cases())
def test_an_epoch_then_resume_equals_two_epochs_straight(method, pair, folder, teacher, tmp_path, capsys):
    term, flags, theta_part = METHODS[method]
    arch_t, arch_s = PAIRS[pair]
    flags = [*flags, *PAIR_EXTRA.get((method, pair), [])]
    path_t = teacher(arch_t)
    straight = run(path_t, folder, tmp_path, arch_s, *flags, "--epochs", "2", "--run_name", "a")
    status = [means_status(capsys.readouterr().out)]
    first = run(path_t, folder, tmp_path, arch_s, *flags, "--run_name", "b")
    status.append(means_status(capsys.readouterr().out))
    assert_finite_losses(first, term)
    theta1 = load(first / "resume.pth")["task_state"][theta_part][THETA] if theta_part else None
    means = only_means_file(tmp_path) if method == "kdpp" else None
    before = (means.stat().st_mtime_ns, means.read_bytes()) if means else None
    resumed = run(path_t, folder, tmp_path, arch_s, *flags, "--epochs", "2", "--run_name", "b", "--resume")
    status.append(means_status(capsys.readouterr().out))
    assert resumed == first

    a, b = load(straight / f"{arch_s}_last.pth"), load(resumed / f"{arch_s}_last.pth")
    assert a["epoch"] == b["epoch"] == 2
    assert_same_tensors(a["model"], b["model"])
    state_a, state_b = (load(d / "resume.pth")["task_state"] for d in (straight, resumed))
    assert state_a.keys() == state_b.keys()
    for part in state_a:  # connectors, projector, θ: every method-owned tensor
        assert_same_tensors(state_a[part], state_b[part])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(read_metrics(straight / "metrics.csv")[1]) == strip(read_metrics(resumed / "metrics.csv")[1])
    assert_finite_losses(straight, term)

    if theta_part:  # θ moved from 1 in epoch 1 (λ(1) < 0): one not restored ends elsewhere
        assert theta1.shape == (1,) and float(theta1) != 1.0 and THETA in state_b[theta_part]
    if method == "kdpp":  # built by the first run, then loaded and left alone
        assert status == [[f"built (missing) {means}"], [f"loaded {means}"], [f"loaded {means}"]]
        assert (means.stat().st_mtime_ns, means.read_bytes()) == before
    else:
        assert status == [[], [], []]
        assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("*classmeans*"))


def test_a_corrupt_class_mean_file_is_rebuilt_to_the_same_means(folder, teacher, tmp_path, capsys):
    path_t = teacher("resnet50")
    run(path_t, folder, tmp_path, "mobilenet_v1", "--distill", "kdpp", "--run_name", "a")
    means = only_means_file(tmp_path)
    assert means_status(capsys.readouterr().out) == [f"built (missing) {means}"]
    good = load(means)
    assert good["means"].shape == (len(WNIDS), 2048) and good["counts"].tolist() == [2, 1, 1]
    means.write_bytes(means.read_bytes()[: means.stat().st_size // 2])  # cut short
    second = run(path_t, folder, tmp_path, "mobilenet_v1", "--distill", "kdpp", "--run_name", "b")
    [line] = means_status(capsys.readouterr().out)
    assert line.startswith("built (unreadable") and line.endswith(str(means))
    assert_finite_losses(second, "loss_main_kdpp")
    rebuilt = load(means)  # the pass is seeded: the same means, a valid file again
    assert torch.equal(rebuilt["means"], good["means"]) and rebuilt["sha256"] == good["sha256"]


# ---- DKD at CTKD's learnable temperature ------------------------------------------------------

def test_dkd_at_a_learnable_temperature_gives_it_a_finite_gradient():
    """Found by the DKD+CTKD runs above: NCKD's masked teacher probability is exactly 0, and
    kl_div's gradient with respect to a 0 target is NaN, which θ received at the first step.
    Reference: NCKD over the non-target classes only (no mask), TCKD as the paper writes it."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), 3.0 * torch.randn(4, 5, generator=g)
    labels = torch.tensor([0, 2, 4, 1])
    T = torch.tensor([15.6], requires_grad=True)
    ours = dkd_loss(s, t, labels, 1.0, 8.0, T)
    (grad_ours,) = torch.autograd.grad(ours.sum(), T)

    T_ref = torch.tensor([15.6], requires_grad=True)
    mask = F.one_hot(labels, 5).bool()
    p_s, p_t = F.softmax(s / T_ref, 1), F.softmax(t / T_ref, 1)
    b_s = torch.stack([p_s[mask], p_s[~mask].reshape(4, 4).sum(1)], 1)
    b_t = torch.stack([p_t[mask], p_t[~mask].reshape(4, 4).sum(1)], 1)
    tckd = (b_t * (b_t.log() - b_s.log())).sum() / 4
    r_s = F.log_softmax(s[~mask].reshape(4, 4) / T_ref, 1)
    r_t = F.log_softmax(t[~mask].reshape(4, 4) / T_ref, 1)
    nckd = (r_t.exp() * (r_t - r_s)).sum() / 4
    ref = (tckd + 8.0 * nckd) * T_ref ** 2
    (grad_ref,) = torch.autograd.grad(ref.sum(), T_ref)
    assert torch.allclose(ours, ref, rtol=1e-5) and torch.isfinite(grad_ours).all()
    assert torch.allclose(grad_ours, grad_ref, rtol=1e-4, atol=1e-7)
